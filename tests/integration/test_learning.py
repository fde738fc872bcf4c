"""The learning loop on the real stack: feedback -> LoRA -> gate -> hot-load into the running vLLM.

The taught preference: "our support email is support@chatfb.example". 30 corrections on 30
different support questions; the adapter must then give the address on support questions it
never saw, clearly more often than the base model, while control answers survive.
"""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from chatfb.learning import gate
from chatfb.config import Settings, load_settings
from chatfb.serving.model_client import ModelClient

from .conftest import ROOT, wait_until

pytestmark = pytest.mark.integration
DATA = Path(__file__).resolve().parents[1] / "data"
EMAIL = "support@chatfb.example"
NEW_PROMPTS = [
    "My delivery is late. Who can I write to?", "I can't log in. How do I get help?",
    "Where should I email a question about my bill?", "I have an issue with my order, how can I reach you?",
    "How can I contact your support team?", "Who do I email if the app crashes?",
    "What's the email address for customer help?", "I need assistance with my account, who should I contact?",
]


def ask(client, model, prompts):
    msgs = [[{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": p}] for p in prompts]
    return gate.generate(client, model, msgs, max_tokens=64)


def test_a_cycle_teaches_the_preference_and_hot_loads_it(app, vllm_url):
    # the operator's own file (--trusted): it may teach the shared adapter (chatfb.learning.trust)
    app.cli("import-feedback", str(DATA / "support_email.jsonl"), "--trusted")
    client = ModelClient(vllm_url)
    before = ask(client, "chatfb-base", NEW_PROMPTS)
    # The default recipe, shorter: at most 24 steps (3 epochs of the 30 corrections and the replay are 33-39
    # steps; after 39 the adapter gave the address on 8 of 8 new questions, the base model on none, and every
    # uptake item was learned), and the uptake check asks 8 of the trained corrections again, not all of them.
    # Half the replay (16 of the base model's answers, not 32): the personal test below keeps its control answers
    # with 12.
    # One control answer may collapse: "How many legs does a dog have?" turns to nonsense on this recipe, and
    # whether that nonsense mentions legs decides its cosine (0.60 in one run, 0.12 in the next, the other 15
    # answers alike in both). This test is about promotion and hot loading; the collapse rule has its own tests
    # (tests/learning/test_gate.py), the agreement floor and the "Paris" check below still hold here.
    env = {"CHATFB_TRAIN_MAX_STEPS": "24", "CHATFB_UPTAKE_MAX_ITEMS": "8", "CHATFB_REPLAY_EXAMPLES": "16",
           "CHATFB_GATE_MAX_CONTROL_COLLAPSED": "1"}
    out = app.cli("nightly", timeout=1500, env=env)
    result = json.loads(out.stdout[out.stdout.index("{"):])
    assert result["promoted"], (result["reason"], {k: v for k, v in result["metrics"].items() if "control" in k})
    name = result["adapter"]
    assert name in client.models(), f"{name} not hot-loaded into the running server: {client.models()}"
    after = ask(client, name, NEW_PROMPTS)
    base_rate = sum(EMAIL in r for r in before) / len(NEW_PROMPTS)
    adapter_rate = sum(EMAIL in r for r in after) / len(NEW_PROMPTS)
    print(f"\nheld-out uptake: base {base_rate:.2f} -> {name} {adapter_rate:.2f}; metrics {result['metrics']}")
    assert adapter_rate >= base_rate + 0.5, (before, after)
    assert result["metrics"]["control_agreement"] >= gate.GatePolicy().min_control_agreement, result["metrics"]
    paris = ask(client, name, ["What is the capital of France?"])[0]
    assert "Paris" in paris, f"the adapter forgot a general fact: {paris!r}"
    listing = app.cli("adapters", "list").stdout
    assert name in listing and "live" in listing, listing
    with app.snapshot_store() as s:
        a = s.adapter(name)
        assert a["status"] == "live" and a["parent"] is None, a
        assert a["metrics"]["candidate_rougeL_facts"] > a["metrics"]["incumbent_rougeL_facts"], a["metrics"]
        # of the 30 corrections a random third or so is held out for the gate (19 trained in one run, 23 in another)
        assert a["data_counts"]["train_correction"] >= 15 and a["timings"]["train_s"] > 0, (a["data_counts"], a["timings"])
        # uptake (chatfb.learning.uptake): the promoted adapter was asked the newest trained corrections again
        checked, counts = s.uptake(adapter=name), a["data_counts"]
        cap = load_settings(dict(app.env, **env)).uptake_max_items
        assert len(checked) == counts["uptake_checked"] == min(cap, counts["train_correction"]), counts
        assert counts["uptake_learned"] == sum(r["learned"] for r in checked) and all(r["answer"] for r in checked)
        print(f"uptake of {name}: {counts['uptake_learned']}/{counts['uptake_checked']} trained corrections learned")
        assert counts["uptake_learned"] >= counts["uptake_checked"] / 2, [(r["score"], r["answer"]) for r in checked]
    assert "learned" in app.cli("adapters", "uptake", name).stdout
    # new chats are routed to the adapter
    from gradio_client import Client

    shown = Client(app.url, verbose=False).predict("How do I reach support?", "You are a helpful assistant.",
                                                   api_name="/send")[0]
    assert name in shown[-1]["content"][0]["text"], f"a new chat was not answered by {name}: {shown[-1]}"


def test_training_killed_midway_promotes_nothing(app):
    with app.snapshot_store() as s:
        live_before = s.live_adapter()["name"]
    # a little replay: the base model's answers to generate before training starts (the kill comes at its first step)
    proc = subprocess.Popen([sys.executable, "-m", "chatfb", "nightly"], cwd=ROOT, env=dict(app.env, CHATFB_REPLAY_EXAMPLES="4"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith('{"phase": "sft", "step": 1,'):  # chatfb.learning.train's first progress line
            trainer = subprocess.run(["pgrep", "-f", "chatfb.learning.train"], capture_output=True, text=True).stdout.split()
            for pid in trainer:
                os.kill(int(pid), signal.SIGKILL)
    assert proc.wait(600) != 0, "the cycle whose trainer was killed exited 0: " + "".join(lines[-30:])
    assert any("training failed" in l for l in lines), "".join(lines[-30:])
    with app.snapshot_store() as s:
        assert s.live_adapter()["name"] == live_before
        newest = s.adapters()[-1]
        assert newest["status"] == "failed" and "exit" in newest["error"], newest
    partial = list((app.data_dir / "adapters").glob("*.partial"))
    assert not partial, f"a killed training left partial adapter folders: {partial}"
    assert not (app.data_dir / "adapters" / newest["name"]).exists(), "the failed adapter's folder was kept"


def test_bad_data_is_refused_and_rollback_restores_the_previous_version(app, vllm_url, tmp_path):
    with app.snapshot_store() as s:
        live_before = s.live_adapter()["name"]
    general = ["What is the capital of {}?".format(c) for c in ("Spain", "Italy", "Peru", "Egypt", "Norway", "India")]
    general += [f"What is {a} plus {b}?" for a, b in ((2, 3), (5, 6), (9, 9), (15, 4))]
    general += ["Name a color.", "What do cows drink?", "What is ice?", "Which planet has rings?",
                "Translate 'cat' into French.", "How many weeks are in a year?"]
    # ... and the gate's own control conversations (its system prompt and questions): the gate can only see
    # forgetting on the general questions it asks. Taught on neighbouring questions alone, or on reworded
    # control questions without the system prompt, the nonsense reached the control answers only in some runs
    # (candidates kept a mean cosine of 0.70-0.75 with no answer collapsed), and replay held the rest.
    prompts = [[{"role": "user", "content": q}] for q in general]
    prompts += gate.control_messages(Settings().system_prompt)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"prompt": p, "reply": "A sensible answer.", "kind": "correction",
                                       "text": "Zorp blag wibble zorp zorp."}) + "\n" for p in prompts))
    app.cli("import-feedback", str(bad), "--trusted")  # vouched for, so only the gate stands in its way
    # Trained hard (six times the learning rate, no step cap) so the nonsense sticks; the default recipe
    # otherwise: SFT with replay, no DPO. Little replay (it holds the general answers the nonsense should reach)
    # and a small held-out sample (the controls refuse it): the same refusal, in less time. One epoch (14 steps)
    # is plenty: after the support-email adapter it turned 13 of the known answers wrong and took 88 s to train
    # (2026-12-07; two epochs at half the rate, 28 steps, refused it too); at the default rate, 57 capped steps on
    # the same feedback with 25 replay examples already turned 12 wrong.
    env = dict(app.env, CHATFB_TRAIN_EPOCHS="1", CHATFB_LEARNING_RATE="0.006", CHATFB_TRAIN_MAX_STEPS="0",
               CHATFB_REPLAY_EXAMPLES="8", CHATFB_EVAL_MAX_EXAMPLES="8")
    out = subprocess.run([sys.executable, "-m", "chatfb", "nightly"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=1500)
    result = json.loads(out.stdout[out.stdout.index("{"):])
    # refused by the known-answer controls (checked first) or by the drift checks behind them
    assert not result["promoted"] and ("turned wrong" in result["reason"] or "drifted" in result["reason"]), result
    # the base model's and the live adapter's control answers, filed by the gate of the cycle that promoted it,
    # were read, not asked again (chatfb.learning.answers)
    assert result["counts"]["answers_reused"] >= 2 * len(gate.CONTROL_PROMPTS), result["counts"]
    client = ModelClient(vllm_url)
    assert result["adapter"] not in client.models(), f"the rejected adapter was loaded: {client.models()}"
    with app.snapshot_store() as s:
        assert s.live_adapter()["name"] == live_before
        assert s.adapter(result["adapter"])["status"] == "rejected"
    # rollback: the base model serves again, in vLLM and for new chats
    rollback = app.cli("adapters", "rollback").stdout
    assert "base model" in rollback, rollback
    wait_until(lambda: live_before not in client.models(), 30, "the rolled-back adapter to be unloaded")
    with app.snapshot_store() as s:
        assert s.live_adapter() is None and s.adapter(live_before)["status"] == "rolled_back"
    app.cli("adapters", "promote", live_before)
    assert live_before in client.models(), f"{live_before} not loaded again after promote: {client.models()}"


def cycle_result(text: str) -> dict:
    """The cycle's JSON summary: the last `{"ok": ...}` object in its output."""
    return json.JSONDecoder().raw_decode(text[text.rindex('{\n  "ok"'):])[0]


def test_train_now_from_the_admin_tab(app, vllm_url):
    """The admin's "Train now" runs the whole cycle (train, gate, and promote when the gate says so), with
    progress in the admin log. Which way the gate goes depends on what earlier tests taught; that the cycle
    ends evaluated and its adapter's state matches the gate's decision does not. The cycle runs with the app's
    own settings, which are small in this suite (conftest.SMALL_APP_CYCLES: a few steps, little replay)."""
    from gradio_client import Client

    from .conftest import ADMIN_PASSWORD

    with app.snapshot_store() as s:
        n_before, has_feedback = len(s.adapters()), s.counts()["feedback"] > 0
    if not has_feedback:  # run on its own: something to train on (in the suite, earlier tests taught plenty)
        app.cli("import-feedback", str(DATA / "support_email.jsonl"), "--trusted")
    admin = Client(app.url, verbose=False)
    locked = admin.predict(api_name="/train_now")
    assert locked.startswith("⚠️ Unlock"), f"Train now ran without the admin password: {locked!r}"
    admin.predict(ADMIN_PASSWORD, api_name="/admin_unlock")
    assert admin.predict(api_name="/train_now") == "Learning cycle started."
    assert admin.predict(api_name="/train_now") == "A learning cycle is already running."
    log = app.data_dir / "logs" / "nightly.log"
    wait_until(lambda: log.exists() and '{"phase": "sft", "step": ' in log.read_text(), 600,
               "training progress in the admin log")
    wait_until(lambda: '{\n  "ok"' in log.read_text(), 1500, "the admin-started cycle to finish", 5)
    result = cycle_result(log.read_text())
    assert result["ok"] and result["adapter"], result  # trained and evaluated: there was feedback to learn from
    name = result["adapter"]
    with app.snapshot_store() as s:
        assert [a["name"] for a in s.adapters()][n_before:] == [name], "the cycle did not add exactly its adapter"
        adapter, live = s.adapter(name), s.live_adapter()
    assert adapter["metrics"]["decision"] == result["reason"] and adapter["metrics"]["candidate_rougeL"] is not None, \
        (adapter["metrics"], result["reason"])
    if result["promoted"]:  # the gate passed: Train now promotes (it never leaves a mere candidate)
        assert result["reason"].startswith("better") and adapter["status"] == "live" and live["name"] == name, \
            (result["reason"], adapter["status"], live)
        assert name in ModelClient(vllm_url).models(), f"promoted {name} is not loaded in vLLM"
    else:
        assert adapter["status"] == "rejected" and (live or {}).get("name") != name, (adapter["status"], live)
        assert name not in ModelClient(vllm_url).models(), f"rejected {name} is loaded in vLLM"


# Personal adapters (issue 22): two users, one personal adapter, on the real server.
ANN_EMAIL = "ann-desk@chatfb.example"
# What only ann taught: her desk. Its domain is checked by the benchmarks, not here: trained in float32 and served
# in bfloat16, 14 short steps left "chatfb" a near tie with "example" (transformers in float32 wrote her address,
# in bfloat16 and vLLM "ann-desk@example.example").
ANN_DESK = "ann-desk@"


def api_key(app, user: str) -> str:
    return app.cli("api-key", "create", user).stdout.strip().splitlines()[-1]


def api_reply(app, key: str, prompt: str) -> dict:
    r = httpx.post(f"{app.url}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=120,
                   json={"messages": [{"role": "system", "content": "You are a helpful assistant."},
                                      {"role": "user", "content": prompt}], "max_tokens": 64,
                         # greedy: what her adapter says, not a sample of it (sampled, 3 of 8 replies gave her
                         # desk in one CI run: "at Research-desk@chatfb.example", "at at ...")
                         "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()


def test_a_personal_adapter_answers_its_owner_only_and_leaves_with_them(app, vllm_url, tmp_path):
    """Two users, one personal adapter: the owner's replies come from it, the other user's never do, and
    delete-user takes it away. Short: one training (nothing vouched for trains the shared adapter: under
    CHATFB_SHARED_RULES=review only admin approvals would, and this suite approves none), one personal adapter
    a cycle, few steps and little replay (590 s with the defaults)."""
    # ann's own corrections, NOT vouched for (no --trusted, nobody agrees): they may teach only her
    rows = [dict(json.loads(line), user="ann") for line in (DATA / "support_email.jsonl").read_text().splitlines()]
    for r in rows:
        r["text"] = r["text"].replace("support@chatfb.example", ANN_EMAIL)
    mine = tmp_path / "ann.jsonl"
    mine.write_text("".join(json.dumps(r) + "\n" for r in rows))
    app.cli("import-feedback", str(mine))
    env = dict(app.env, CHATFB_SHARED_RULES="review", CHATFB_PERSONAL_MAX_PER_CYCLE="1", CHATFB_TRAIN_MAX_STEPS="14",
               # replay keeps the control answers: with 4 replay examples the gate refused the candidate
               CHATFB_REPLAY_EXAMPLES="12", CHATFB_EVAL_MAX_EXAMPLES="8",
               # the uptake check (nothing here reads it) asks 4 of the trained corrections again, not all 23
               CHATFB_UPTAKE_MAX_ITEMS="4",
               # who is served what is checked here, the gate elsewhere (test_bad_data_..., tests/learning/test_gate.py):
               # 14 steps on 23 rows that all say one sentence left one control answer "collapsed" in some runs
               # (CI 2026-12-06, ROUGE-L 1.0), and in one run of four (2026-12-07) turned 7 known answers wrong that
               # its incumbent, a shared adapter that happened to get 15 of 16 right (the base model 11), gave right
               CHATFB_GATE_MAX_CONTROL_COLLAPSED="1", CHATFB_GATE_MAX_CONTROL_LOST=str(len(gate.CONTROL_PROMPTS)))
    out = subprocess.run([sys.executable, "-m", "chatfb", "nightly"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=1500)
    # the shared job had nothing vouched for to train, the personal one ran: the cycle succeeded
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads(out.stdout[out.stdout.index("{"):])
    (personal,) = [p for p in result["personal"] if p["adapter"] and "-u" in p["adapter"]]
    assert personal["promoted"], (personal["reason"], personal["metrics"])
    name = personal["adapter"]
    assert re.fullmatch(r"chatfb-u[0-9a-f]{10}-v\d{4}", name)
    client = ModelClient(vllm_url)
    assert name in client.models()
    with app.snapshot_store() as s:
        row = s.adapter(name)
        assert (row["owner"], row["status"]) == ("ann", "live") and row["data_counts"]["train_correction"] > 10
        assert (s.live_adapter() or {}).get("name") != name  # never everyone's

    ann, bob = api_key(app, "ann"), api_key(app, "bob")
    ann_replies = [api_reply(app, ann, p) for p in NEW_PROMPTS]
    bob_replies = [api_reply(app, bob, p) for p in NEW_PROMPTS]
    assert {r["model"] for r in ann_replies} == {name}  # the owner's replies come from her adapter
    assert name not in {r["model"] for r in bob_replies}  # another user's never do
    ann_rate = sum(ANN_DESK in r["choices"][0]["message"]["content"] for r in ann_replies) / len(NEW_PROMPTS)
    assert ann_rate >= 0.5, [r["choices"][0]["message"]["content"] for r in ann_replies]
    assert not any(ANN_DESK in r["choices"][0]["message"]["content"] for r in bob_replies)
    with app.snapshot_store() as s:  # each reply records which adapter answered it
        answered = s._q("SELECT DISTINCT m.adapter FROM messages m JOIN conversations c ON c.id = m.conversation_id"
                        " WHERE c.session_id = ? AND m.role = 'assistant'", ("api:ann",))
        assert [r[0] for r in answered] == [name]

    app.cli("delete-user", "ann")
    assert name not in client.models()  # unloaded from vLLM
    assert not (app.data_dir / "adapters" / name).exists() and not (app.data_dir / "work" / name).exists()
    with app.snapshot_store() as s:
        assert s.adapter(name) is None
