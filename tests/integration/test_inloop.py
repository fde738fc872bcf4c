"""In-loop language feedback on the real stack: a critique gets a revision from the real vLLM server,
accepting it lands a correction with its provenance in DuckDB and in the exports, and a saved
guideline reaches its owner's next request and nobody else's."""

import uuid

import pytest
from datasets import load_dataset
from gradio_client import Client

pytestmark = pytest.mark.integration


def _ok(status: str) -> bool:
    return status.startswith("✅")


def test_critique_revision_accept_and_export(app, tmp_path):
    c = Client(app.url, verbose=False)
    # a question the 135M model answers on its subject: retries revise the same reply, and drafts must keep its
    # content, so one reply off its own subject would sink every try (tests/integration/test_browser.py)
    c.predict("Why do leaves change color in autumn?", "You are a helpful assistant.", api_name="/send")
    # a critique the 135M model can follow: its lists are numbered, so a "- " list critique is met so rarely
    # that the filters (rightly) drop every draft, and the flow under test would not be reached
    critique = "Too long. Answer in one short sentence."
    out = c.predict(critique, False, False, api_name="/revise")
    status, box, note, revision = out[0], out[1], out[2], out[3]
    assert _ok(status) and box == "", out
    for _ in range(6):  # a 135M model: a few tries to get a draft the scorer keeps (4 were not enough in one CI)
        if "Revised following your feedback" in note:
            break
        assert "could not be made" not in note, note  # the server is up: a failure here is a bug
        out = c.predict(api_name="/retry_revision")
        note, revision = out[2], out[3]
    assert "Revised following your feedback" in note and revision.strip(), out
    status = c.predict(revision, api_name="/accept_revision")[0]
    assert _ok(status), status
    with app.snapshot_store() as s:
        records = s.feedback_records()
        [corr] = [f for f in records if f.kind == "correction" and f.text == revision.strip() and f.derived_from]
        [crit] = [f for f in records if f.feedback_id == corr.derived_from]
        assert crit.kind == "critique" and crit.text == critique and corr.message_id == crit.message_id, \
            f"the correction is not derived from this critique of the same reply: {crit} / {corr}"
        cands = s.candidates("feedback_id = ?", (crit.feedback_id,))
        assert "accepted" in {c["status"] for c in cands} and all(c["verdict"] for c in cands), cands
    app.cli("export", "--format", "sft", "--out", str(tmp_path / "out"))
    app.cli("export", "--format", "dpo", "--out", str(tmp_path / "out"))
    sft = load_dataset("json", data_files=str(tmp_path / "out" / "sft.jsonl"), split="train")
    assert any(r["messages"][-1]["content"] == corr.text and r["critique_id"] == crit.feedback_id for r in sft), \
        "no SFT row with the accepted revision as target, linked to its critique"
    dpo = load_dataset("json", data_files=str(tmp_path / "out" / "dpo.jsonl"), split="train")
    assert any(r["chosen"][0]["content"] == corr.text and r["source"] == "revision" for r in dpo), \
        "no DPO pair with the accepted revision chosen"


def test_empty_critique_is_refused_and_nothing_is_generated(app):
    c = Client(app.url, verbose=False)
    c.predict("Hello there.", "You are a helpful assistant.", api_name="/send")
    with app.snapshot_store() as s:
        n = s.counts().get("feedback_critique", 0), len(s.candidates())
    status = c.predict("   ", False, False, api_name="/revise")[0]
    assert status.startswith("⚠️") and "empty" in status, status
    with app.snapshot_store() as s:
        assert (s.counts().get("feedback_critique", 0), len(s.candidates())) == n, \
            "an empty critique stored (critiques, candidates)"


def test_a_guideline_reaches_its_owners_requests_only(app):
    a, b = Client(app.url, verbose=False), Client(app.url, verbose=False)
    rule = f"Always end your answer with the words 'Have a nice day' ({uuid.uuid4().hex[:6]})."
    note = a.predict(rule, api_name="/save_guideline")[0]
    assert _ok(note), note
    cat, dog = f"What is a cat? ({rule[-8:-2]})", f"What is a dog? ({rule[-8:-2]})"
    a.predict(cat, "You are a helpful assistant.", api_name="/send")
    b.predict(dog, "You are a helpful assistant.", api_name="/send")
    with app.snapshot_store() as s:
        [g] = s.guidelines("text = ?", (rule,))
        rows = s._q("SELECT u.content, r.guidelines FROM messages u JOIN messages r ON r.conversation_id = u.conversation_id"
                    " AND r.seq = u.seq + 1 WHERE u.content IN (?, ?)", (cat, dog))
    applied = {q: json_list(ids) for q, ids in rows}
    assert applied == {cat: [g["id"]], dog: []}, "the guideline must reach its owner's reply and no one else's"


def json_list(raw):
    import json

    return json.loads(raw) if raw else []
