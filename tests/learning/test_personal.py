"""Personal adapters: who gets one in a learning cycle (enough feedback of their own, the most new first, a
bounded number a cycle), that only its owner is served it, that a failing gate leaves the user on the
shared adapter with the reason in the adapter's row, and that delete-user removes them."""

import json
from pathlib import Path

import pytest

from chatfb.app.admin import AdminService
from chatfb.app.chat_service import ChatService
from chatfb.config import Settings
from chatfb.learning import worker
from chatfb.learning.cycle import personal_owners, run_cycle
from chatfb.serving.adapters import AdapterRegistry, AdapterRouter, model_label, personal_prefix
from chatfb.serving.vllm_server import vllm_command, vllm_options


def make_adapter(store, settings, name, status="candidate", owner=None):
    path = settings.data_dir / "adapters" / name
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text("{}")
    store.add_adapter(name, None, status, name, owner=owner)


def give_corrections(store, user, n, text="Email support@chatfb.example."):
    for i in range(n):
        cid = store.create_conversation(f"s-{user}", user)
        store.add_message(cid, "user", f"How do I reach support about order {user}{i}?")
        reply = store.add_message(cid, "assistant", "I don't know.")
        store.log_feedback(reply, "correction", text=text, user_name=user, session_id=f"s-{user}")


def registry_for(store, settings, client):
    return AdapterRegistry(store, [client], AdapterRouter("chatfb-base"), settings.data_dir)


def test_only_the_owner_is_served_their_personal_adapter(store, settings, fake_client):
    registry = registry_for(store, settings, fake_client)
    make_adapter(store, settings, "chatfb-v0001")
    registry.activate("chatfb-v0001", background_unload=False)
    mine = f"{personal_prefix('ann', 'chatfb')}-v0001"
    make_adapter(store, settings, mine, owner="ann")
    registry.promote_personal("ann", mine)
    assert mine in fake_client.loaded and store.live_personal_adapters() == {"ann": mine}
    assert store.live_adapter()["name"] == "chatfb-v0001"  # the shared one stays live beside it

    chat = ChatService(settings, store, fake_client, registry.router)
    fake_client.enqueue("ann's answer", "bob's answer", "anonymous answer")
    for session, user in (("s-ann", "ann"), ("s-bob", "bob"), ("s-anon", None)):
        _, stream = chat.send(session, None, "hello", user=user)
        (*_, last) = stream
    models = [h["model"] for h in fake_client.history]
    assert models == [mine, "chatfb-v0001", "chatfb-v0001"]  # bob and an anonymous browser never get ann's
    with pytest.raises(Exception, match="no personal adapter"):
        registry.promote_personal("bob", mine)  # nobody is served another user's adapter
    with pytest.raises(Exception, match="served only to them"):
        registry.promote(mine)  # nor everyone
    assert model_label(mine) == "your model v1" and model_label("chatfb-v0001") == "chatfb-v0001"
    # a new shared version goes live for everyone else; ann keeps hers
    make_adapter(store, settings, "chatfb-v0002")
    registry.activate("chatfb-v0002", background_unload=False)
    assert store.live_adapter()["name"] == "chatfb-v0002" and store.live_personal_adapters() == {"ann": mine}
    assert registry.router.acquire("ann") == mine and registry.router.acquire("bob") == "chatfb-v0002"


def test_a_restart_serves_each_user_their_live_personal_adapter_again(store, settings, fake_client):
    mine = f"{personal_prefix('ann', 'chatfb')}-v0002"
    make_adapter(store, settings, mine, owner="ann")
    store.set_live_personal("ann", mine)
    registry = registry_for(store, settings, fake_client)
    registry.restore()
    assert registry.router.acquire("ann") == mine and registry.router.acquire("bob") == "chatfb-base"


def test_the_cycle_picks_users_with_enough_feedback_the_most_new_first_and_bounded(store, settings):
    give_corrections(store, "ann", 7)
    give_corrections(store, "bob", 6)
    give_corrections(store, "cat", 5)
    give_corrections(store, "dan", 4)  # too few
    s = settings.with_(personal_min_feedback=5, personal_max_per_cycle=2)
    assert personal_owners(store, s) == ["ann", "bob"]
    # ann's adapter is newer than all her feedback: she has nothing new, so cat comes next
    make_adapter(store, settings, f"{personal_prefix('ann', 'chatfb')}-v0001", owner="ann")
    assert personal_owners(store, s) == ["bob", "cat"]
    store.flag_author("bob", "spam")  # a flagged author's rows never train: not even their own adapter
    assert personal_owners(store, s) == ["cat"]
    assert personal_owners(store, s.with_(personal_max_per_cycle=0)) == []
    # the operator's imports count for the user they name unless vouched for (then they teach the shared adapter)
    def imported(user, n, trusted):
        store.import_feedback([{"prompt": [{"role": "user", "content": f"q{i}"}], "reply": "r", "kind": "correction",
                                "text": "a better reply", "user": user} for i in range(n)], trusted=trusted)

    imported("eve", 9, True)
    imported(None, 9, False)
    imported("fay", 6, False)
    assert personal_owners(store, s.with_(personal_max_per_cycle=9)) == ["fay", "cat"]


def test_a_row_an_admin_rejected_or_a_flagged_authors_rows_never_train_a_personal_adapter(store, settings):
    """An admin's rejection judges what a row teaches: it trains nobody, its author's own adapter included; a flagged
    author's rows train nothing (the worker builds a personal adapter's data from these scopes)."""
    from chatfb.learning.training_data import owner_scopes, shared_scopes

    give_corrections(store, "ann", 5)
    give_corrections(store, "bob", 6)
    s = settings.with_(personal_min_feedback=5, personal_max_per_cycle=9)
    assert personal_owners(store, s) == ["bob", "ann"]
    rejected = store.feedback_records(user_name="ann")[0].feedback_id
    store.set_review([rejected], "rejected")
    store.flag_author("bob", "spam")
    assert personal_owners(store, s) == []  # ann has 4 rows left that may train: too few; bob none
    records = store.feedback_records()
    scopes = shared_scopes(records, s, store.reviews(), store.flagged_authors())
    ann = owner_scopes(records, scopes, "ann")
    assert ann[rejected] == "others" and sum(v == "shared" for v in ann.values()) == 4
    assert set(owner_scopes(records, scopes, "bob").values()) == {"others"}


def cycle(store, settings, fake_client, monkeypatch, candidate_learns: bool, trained: list, owner_server="http://fake",
          promote=True, launches: list | None = None, unwritten: str = "\0", child=None, learnt: dict | None = None):
    """A whole cycle, its children run in this process with a fake trainer and a fake model server (the owner's,
    or with `owner_server` None one the child starts, which holds no adapter yet). A personal adapter that learns
    answers support questions with its owner's correction from `learnt` (user -> text), or the support address."""
    monkeypatch.setattr(worker, "model_server", lambda s, url, merged=None: (fake_client, settings.data_dir, lambda: None))
    launches = [] if launches is None else launches  # adapters per trainer process

    def train(s, base, data, out, dpo, init=None, more=()):
        for data, out, init in [(data, out, init)] + [(Path(m["data"]), Path(m["output_dir"]),
                                                       m["init_adapter"] and Path(m["init_adapter"])) for m in more]:
            rows = [json.loads(line) for line in (data / "sft.jsonl").read_text().splitlines()]
            trained.append((out.name, init, {r["author"] for r in rows if "author" in r},  # replay rows carry none
                            {r["scope"] for r in rows if "scope" in r}, set(fake_client.loaded)))
            if out.name.startswith(unwritten):  # this one's training failed: no adapter folder
                continue
            out.mkdir(parents=True)
            (out / "adapter_config.json").write_text("{}")
        launches.append(1 + len(more))
        return 1 if any(o.startswith(unwritten) for o in [out.name] + [Path(m["output_dir"]).name for m in more]) else 0

    monkeypatch.setattr(worker, "train_adapter", train)

    def complete(messages, model, **kw):
        personal = "-u" in model and model != "chatfb-base"
        if candidate_learns and personal and "support" in messages[-1]["content"]:
            return [next((text for user, text in (learnt or {}).items()
                          if model.startswith(personal_prefix(user, "chatfb") + "-")), "Email support@chatfb.example.")]
        return ["I don't know." if "support" in messages[-1]["content"] else "Paris."]

    fake_client.complete = complete

    class Done:
        def wait(self):
            return 0

    registry = registry_for(store, settings, fake_client)
    make_adapter(store, settings, "chatfb-v0001")
    if owner_server:
        registry.activate("chatfb-v0001", background_unload=False)
    else:  # live, but on no server: the child's own server must load it
        store.set_live("chatfb-v0001")
        registry.router.switch("chatfb-v0001")
    result = run_cycle(store, registry, settings, promote, owner_server=owner_server, command=lambda *works: works,
                       start=lambda works, output: (child or worker.main)([str(w) for w in works]) or Done())
    return registry, result


def settings_for_cycle(settings):
    return settings.with_(scorer="server", train_mode="supervised", replay_examples=0, holdout_fraction=0.5,
                          personal_min_feedback=5, personal_max_per_cycle=1)


def test_a_personal_adapter_trains_on_from_the_shared_one_on_its_owners_rows_and_serves_them(
        store, settings, fake_client, monkeypatch):
    settings = settings_for_cycle(settings)
    give_corrections(store, "ann", 12)
    give_corrections(store, "bob", 6, text="Email bob@elsewhere.example.")
    trained = []
    registry, result = cycle(store, settings, fake_client, monkeypatch, True, trained)
    mine = f"{personal_prefix('ann', 'chatfb')}-v0001"
    # nothing vouched for: no shared adapter trained; ann (most new feedback) gets hers, bob waits (one a cycle)
    assert [t[0] for t in trained] == [mine]
    (_, init, authors, scopes, _), = trained
    assert init == settings.layout.adapters / "chatfb-v0001" and authors == {"ann"} and scopes == {"personal"}
    (personal,) = result.personal
    assert personal["promoted"], personal["reason"]
    row = store.adapter(mine)
    assert (row["owner"], row["status"], row["parent"]) == ("ann", "live", "chatfb-v0001")
    assert registry.router.acquire("ann") == mine and registry.router.acquire("bob") == "chatfb-v0001"
    assert store.live_adapter()["name"] == "chatfb-v0001"


def test_a_personal_adapter_whose_rows_the_split_held_none_of_is_gated_on_one_of_them(
        store, settings, fake_client, monkeypatch):
    """With a handful of rows the hash split may hold out none (holdout 0 here): one of the owner's rows is held
    out anyway, so the gate judges the adapter instead of refusing it for want of held-out feedback every cycle."""
    from chatfb.learning import training_data

    settings = settings_for_cycle(settings)
    monkeypatch.setattr(training_data, "is_heldout", lambda feedback_id, fraction, seed: False)
    give_corrections(store, "ann", 5)
    trained = []
    registry, result = cycle(store, settings, fake_client, monkeypatch, True, trained)
    (personal,) = result.personal
    assert personal["promoted"], personal["reason"]
    assert personal["counts"]["heldout_examples"] == 1 and personal["counts"]["train_examples"] == 4


def test_a_personal_adapter_that_fails_its_gate_leaves_the_user_on_the_shared_one_with_the_reason(
        store, settings, fake_client, monkeypatch):
    settings = settings_for_cycle(settings)
    give_corrections(store, "ann", 12)
    registry, result = cycle(store, settings, fake_client, monkeypatch, False, [])
    mine = f"{personal_prefix('ann', 'chatfb')}-v0001"
    (personal,) = result.personal
    assert not personal["promoted"]
    row = store.adapter(mine)
    assert (row["owner"], row["status"]) == ("ann", "rejected")
    assert row["metrics"]["decision"].startswith("not better on held-out feedback")
    assert registry.router.acquire("ann") == "chatfb-v0001" and mine not in fake_client.loaded
    assert store.live_personal_adapters() == {}
    from chatfb.ui.admin_tab import adapters_frame  # the admin view says whose it is and why it is not served

    shown = adapters_frame(AdminService(store, registry, settings=settings)).set_index("name").loc[mine]
    assert shown["for"] == "ann" and shown["status"] == "rejected" and shown["note"] == row["metrics"]["decision"]


def test_delete_user_removes_their_personal_adapters(store, settings, fake_client):
    registry = registry_for(store, settings, fake_client)
    old, mine = (f"{personal_prefix('ann', 'chatfb')}-v000{i}" for i in (1, 2))
    theirs = f"{personal_prefix('bob', 'chatfb')}-v0001"
    for name, owner in ((old, "ann"), (mine, "ann"), (theirs, "bob")):
        make_adapter(store, settings, name, owner=owner)
        settings.layout.work(name).mkdir(parents=True)
    registry.promote_personal("ann", mine)
    registry.promote_personal("bob", theirs)
    AdminService(store, registry, settings=settings).delete_user("ann")
    assert [a["name"] for a in store.adapters()] == [theirs]
    for name in (old, mine):
        assert not (settings.layout.adapters / name).exists() and not settings.layout.work(name).exists()
    assert mine not in fake_client.loaded and theirs in fake_client.loaded
    assert registry.router.acquire("ann") == "chatfb-base" and registry.router.acquire("bob") == theirs


def test_vllm_gets_as_many_lora_slots_as_the_settings_say(settings):
    cmd = vllm_command(settings.data_dir, "m", 8000, 16, 2048, **{"max_loras": vllm_options(
        settings.with_(vllm_max_loras=6))["max_loras"]})
    assert cmd[cmd.index("--max-loras") + 1] == "6" and cmd[cmd.index("--max-cpu-loras") + 1] == "12"


def test_a_cycle_on_its_own_model_server_loads_the_shared_adapter_it_starts_from(store, settings, fake_client,
                                                                                 monkeypatch):
    settings = settings_for_cycle(settings).with_(replay_examples=2)
    give_corrections(store, "ann", 12)
    trained = []
    fake_client.complete_finished = lambda p, model, max_tokens=192: (
        "Paris." if model in fake_client.models() else pytest.fail(f"{model} is not on the server"))
    _, result = cycle(store, settings, fake_client, monkeypatch, True, trained, owner_server=None)
    (_, _, _, _, loaded), = trained
    assert "chatfb-v0001" in loaded and result.personal[0]["promoted"], result.personal


def test_the_personal_adapters_of_one_cycle_replay_and_gate_on_answers_asked_once(store, settings, fake_client,
                                                                                   monkeypatch):
    """Two users' adapters in one cycle both replay the live shared adapter's answers and are gated against the
    base model's and the shared adapter's control answers: each of those is asked once (the answer file,
    chatfb.learning.answers), not once a user."""
    from collections import Counter

    from chatfb.learning import gate

    settings = settings_for_cycle(settings).with_(replay_examples=4, personal_max_per_cycle=2)
    give_corrections(store, "ann", 12)
    give_corrections(store, "bob", 12, text="Email bob@chatfb.example.")
    replayed = Counter()

    def finished(p, model, max_tokens=192):
        replayed[model, p[-1]["content"]] += 1
        return "Paris."

    fake_client.complete_finished = finished
    control, generate = Counter(), gate.generate

    def counted(client, model, prompts, max_tokens=128):
        control.update((model, p[-1]["content"]) for p in prompts if p[-1]["content"] in gate.CONTROL_PROMPTS)
        return generate(client, model, prompts, max_tokens)

    monkeypatch.setattr(gate, "generate", counted)
    trained, launches = [], []
    registry, result = cycle(store, settings, fake_client, monkeypatch, True, trained, launches=launches,
                             learnt={"bob": "Email bob@chatfb.example."})
    assert len(trained) == 2 and len(result.personal) == 2
    assert launches == [2]  # one trainer process for both
    assert all(p["promoted"] for p in result.personal), [p["reason"] for p in result.personal]
    assert set(replayed) == {("chatfb-v0001", q) for q in worker.REPLAY_PROMPTS[:4]} and set(replayed.values()) == {1}
    assert {m for m, _ in control} >= {"chatfb-base", "chatfb-v0001"}
    assert all(control[m, q] == 1 for m in ("chatfb-base", "chatfb-v0001") for q in gate.CONTROL_PROMPTS), control
    jobs = [json.loads((settings.layout.work(t[0]) / "job.json").read_text()) for t in trained]
    assert jobs[0]["answers"] == jobs[1]["answers"] and jobs[0]["answers"].endswith("answers.json")


def test_a_personal_adapter_is_never_published_to_the_hub(settings, monkeypatch, capsys):
    from chatfb.cli import main as cli
    from chatfb.store.db import Store

    mine = f"{personal_prefix('ann', 'chatfb')}-v0001"
    with Store(settings.db_path) as s:
        make_adapter(s, settings, mine, status="live", owner="ann")
    monkeypatch.setenv("CHATFB_DATA_DIR", str(settings.data_dir))
    import chatfb.cli

    monkeypatch.setattr(chatfb.cli, "push_built", lambda *a, **k: pytest.fail("a user's adapter was pushed"))
    assert cli(["push-adapter", mine, "someone/repo"]) == 2
    assert "personal adapter and is not published" in capsys.readouterr().err


def test_in_one_cycle_a_personal_adapter_whose_training_failed_fails_alone(store, settings, fake_client, monkeypatch):
    """The cycle's personal adapters share one child and one trainer process: the trainer leaving one user's
    adapter unwritten fails that user's job, with the reason; the other user's adapter is gated and served."""
    settings = settings_for_cycle(settings).with_(personal_max_per_cycle=2)
    give_corrections(store, "ann", 12)
    give_corrections(store, "bob", 12, text="Email support@chatfb.example today.")
    trained = []
    bob = personal_prefix("bob", "chatfb")
    registry, result = cycle(store, settings, fake_client, monkeypatch, True, trained, unwritten=bob)
    by_name = {p["adapter"]: p for p in result.personal}
    assert len(result.personal) == 2
    mine, theirs = f"{personal_prefix('ann', 'chatfb')}-v0001", f"{bob}-v0001"
    assert by_name[mine]["promoted"], by_name[mine]["reason"]
    assert not by_name[theirs]["promoted"] and "training failed" in by_name[theirs]["reason"]
    assert registry.router.acquire("ann") == mine and registry.router.acquire("bob") == "chatfb-v0001"


def test_a_personal_adapter_gated_before_the_child_died_keeps_its_result(store, settings, fake_client, monkeypatch):
    """Each job's result is written as soon as it is decided: the child killed (SIGTERM: SystemExit) during the
    second gate leaves the first user's gated adapter recorded and served, the second user's job failed."""
    settings = settings_for_cycle(settings).with_(personal_max_per_cycle=2)
    give_corrections(store, "ann", 12)
    give_corrections(store, "bob", 12, text="Email support@chatfb.example today.")
    monkeypatch.setattr(worker, "gate_workers", lambda s, gated: 1)  # one gate after the other
    gated, real_gate = [], worker._gate

    def gate_then_die(s, *a):
        if gated:
            raise SystemExit(143)
        gated.append(s.job.owner)
        return real_gate(s, *a)

    monkeypatch.setattr(worker, "_gate", gate_then_die)

    def killed(argv):
        try:
            return worker.main(argv)
        except SystemExit:
            return None

    registry, result = cycle(store, settings, fake_client, monkeypatch, True, [], child=killed)
    first = f"{personal_prefix(gated[0], 'chatfb')}-v0001"
    by_owner = {store.adapter(p["adapter"])["owner"]: p for p in result.personal}
    assert by_owner[gated[0]]["promoted"], by_owner[gated[0]]["reason"]
    assert registry.router.acquire(gated[0]) == first
    other = ({"ann", "bob"} - set(gated)).pop()
    assert not by_owner[other]["promoted"] and "before it finished" in by_owner[other]["reason"]


def test_gates_at_once_fill_the_lora_slots_their_incumbents_leave():
    """Gates side by side each hold their candidate in a LoRA slot, and the incumbents they share hold theirs:
    the base model (no shared adapter live yet) holds none, so all four slots gate; one shared adapter leaves three;
    users' own live adapters take a slot each beside their candidate."""
    from types import SimpleNamespace

    settings = Settings(vllm_max_loras=4)

    def gated(*incumbents):
        return [SimpleNamespace(job=SimpleNamespace(incumbent=i)) for i in incumbents]

    assert worker.gate_workers(settings, gated(None, None, None, None, None)) == 4
    assert worker.gate_workers(settings, gated(None, None)) == 2
    assert worker.gate_workers(settings, gated("shared-v1", "shared-v1", "shared-v1", "shared-v1")) == 3
    assert worker.gate_workers(settings, gated("u1-v1", "u2-v1", "shared-v1", "u3-v1")) == 2
    assert worker.gate_workers(Settings(vllm_max_loras=1), gated("shared-v1", "shared-v1")) == 1
