"""PROPOSAL (not collected: outside tests/): an integration test for personal adapters, for the lead to review
and append to tests/integration/test_learning.py, which already has `json`, `subprocess`, `sys`, `ModelClient`,
`ROOT`, `DATA`, `NEW_PROMPTS`, `ask` and the session's `app` / `vllm_url` fixtures. Not run here (the rules: no
real vLLM from a helper); it costs one extra training + gate in the nightly it runs (one personal adapter).

What it checks (issue 22, item 3 and its integration test): two users, one personal adapter, on the real server:
ann's untrusted feedback trains nothing shared but her own adapter; her API replies come from it and teach her
address, bob's never come from it; delete-user unloads it from vLLM and removes its files.
"""

import json
import re

import httpx

from chatfb.serving.model_client import ModelClient
from tests.integration.test_learning import DATA, NEW_PROMPTS  # in test_learning.py itself: drop this line

ANN_EMAIL = "ann-desk@chatfb.example"


def api_key(app, user: str) -> str:
    return app.cli("api-key", "create", user).stdout.strip().splitlines()[-1]


def api_reply(app, key: str, prompt: str) -> dict:
    r = httpx.post(f"{app.url}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=120,
                   json={"messages": [{"role": "system", "content": "You are a helpful assistant."},
                                      {"role": "user", "content": prompt}], "max_tokens": 64})
    assert r.status_code == 200, r.text
    return r.json()


def test_a_personal_adapter_answers_its_owner_only_and_leaves_with_them(app, vllm_url, tmp_path):
    # ann's own corrections, NOT vouched for (no --trusted, nobody agrees): they may teach only her
    rows = [dict(json.loads(line), user="ann") for line in (DATA / "support_email.jsonl").read_text().splitlines()]
    for r in rows:
        r["text"] = r["text"].replace("support@chatfb.example", ANN_EMAIL)
    mine = tmp_path / "ann.jsonl"
    mine.write_text("".join(json.dumps(r) + "\n" for r in rows))
    app.cli("import-feedback", str(mine))
    out = app.cli("nightly", timeout=2400)
    result = json.loads(out.stdout[out.stdout.index("{"):])
    (personal,) = [p for p in result["personal"] if p["adapter"] and "-u" in p["adapter"]]
    assert personal["promoted"], personal
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
    ann_rate = sum(ANN_EMAIL in r["choices"][0]["message"]["content"] for r in ann_replies) / len(NEW_PROMPTS)
    assert ann_rate >= 0.5, [r["choices"][0]["message"]["content"] for r in ann_replies]
    assert not any(ANN_EMAIL in r["choices"][0]["message"]["content"] for r in bob_replies)
    with app.snapshot_store() as s:  # each reply records which adapter answered it
        answered = s._q("SELECT DISTINCT m.adapter FROM messages m JOIN conversations c ON c.id = m.conversation_id"
                        " WHERE c.session_id = ? AND m.role = 'assistant'", ("api:ann",))
        assert [r[0] for r in answered] == [name]

    app.cli("delete-user", "ann")
    assert name not in client.models()  # unloaded from vLLM
    assert not (app.data_dir / "adapters" / name).exists() and not (app.data_dir / "work" / name).exists()
    with app.snapshot_store() as s:
        assert s.adapter(name) is None
