import json

import pytest
from datasets import load_dataset

from chatfb.learning.exports import BadImportFile, export, parse_jsonl


def write(tmp_path, lines):
    p = tmp_path / "fb.jsonl"
    p.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
    return p


GOOD = [
    {"prompt": "What is 2+2?", "reply": "5", "kind": "correction", "text": "4", "user": "ann", "ts": "2026-01-02T03:04:05Z"},
    {"prompt": [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Hi"}], "reply": "Go away.",
     "kind": "rating", "rating": -1},
    {"prompt": "Summarise X", "reply": "Long text ...", "kind": "critique", "text": "too long"},
]


def test_parse_good_file(tmp_path):
    recs = parse_jsonl(write(tmp_path, GOOD + [""]))
    assert [r["kind"] for r in recs] == ["correction", "rating", "critique"]
    assert recs[0]["prompt"] == [{"role": "user", "content": "What is 2+2?"}]
    assert recs[0]["ts"].year == 2026 and recs[0]["ts"].tzinfo is None


def test_every_bad_line_is_named(tmp_path):
    lines = [GOOD[0], "{not json", {"prompt": "q", "reply": "r", "kind": "rating", "rating": 3},
             {"prompt": "q", "reply": "r", "kind": "critique"}, {"prompt": [], "reply": "r", "kind": "rating", "rating": 1},
             {"prompt": "q", "reply": "r", "kind": "correction", "text": "x", "extra": 1},
             {"prompt": "q", "reply": "r" * 50, "kind": "rating", "rating": 1}]
    with pytest.raises(BadImportFile) as e:
        parse_jsonl(write(tmp_path, lines), max_chars=20)
    assert [n for n, _ in e.value.problems] == [2, 3, 4, 5, 6, 7]
    msg = str(e.value)
    assert "line 2: invalid JSON" in msg and "line 3: 'rating' must be 1 or -1" in msg
    assert "line 7: 'reply' is longer than 20" in msg and "nothing was imported" in msg


def test_empty_file_is_refused(tmp_path):
    with pytest.raises(BadImportFile, match="no records"):
        parse_jsonl(write(tmp_path, [""]))


def test_exports_load_with_datasets(tmp_path, store):
    store.import_feedback(parse_jsonl(write(tmp_path, GOOD)))
    cid = store.create_conversation("s")
    store.add_message(cid, "user", "Tell me a joke")
    a = store.add_message(cid, "assistant", "No.")
    store.log_feedback(a, "implicit", rating=-1, text="regenerated")
    records = store.feedback_records()

    path, n = export(records, "sft", tmp_path / "out")
    ds = load_dataset("json", data_files=str(path), split="train")
    assert n == 1 and ds[0]["messages"][-1] == {"role": "assistant", "content": "4"}

    path, n = export(records, "dpo", tmp_path / "out", "parquet")
    ds = load_dataset("parquet", data_files=str(path), split="train")
    assert n == 1 and ds[0]["chosen"][0]["content"] == "4" and ds[0]["rejected"][0]["content"] == "5"

    path, n = export(records, "kto", tmp_path / "out")
    ds = load_dataset("json", data_files=str(path), split="train")
    assert sorted((r["completion"][0]["content"], r["label"]) for r in ds) == [("Go away.", False), ("No.", False)]
    assert ds[0]["prompt"][0]["role"] in ("system", "user")


def test_interrupted_export_keeps_the_previous_file(tmp_path, monkeypatch):
    from chatfb.learning import exports as feedback_io

    path = feedback_io.write_rows([{"a": 1}], tmp_path / "sft.jsonl")
    calls = {"n": 0}
    real = feedback_io.json.dumps

    def disk_full_on_second_row(obj, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real(obj, **kw)

    monkeypatch.setattr(feedback_io.json, "dumps", disk_full_on_second_row)
    with pytest.raises(OSError, match="No space"):
        feedback_io.write_rows([{"a": 2}, {"a": 3}], path)
    assert path.read_text() == '{"a": 1}\n' and not list(tmp_path.glob(".*tmp"))


def test_every_exported_row_carries_who_gave_it_its_kind_and_scope(store):
    from chatfb.learning.exports import export_rows

    cid = store.create_conversation("k:anon")
    store.add_message(cid, "user", "Who painted the Mona Lisa?")
    a = store.add_message(cid, "assistant", "Picasso.")
    crit = store.log_feedback(a, "critique", text="wrong painter", session_id="k:anon")
    store.add_candidates([{"feedback_id": crit, "message_id": a, "origin": "inloop", "text": "Leonardo.", "verdict": "ok",
                           "status": "offered"}])
    fixed = store.log_feedback(a, "correction", text="Leonardo.", session_id="k:anon", derived_from=crit)
    liked = store.log_feedback(a, "rating", rating=1, session_id="k:anon")
    ann = store.create_conversation("k:ann", "ann")
    store.add_message(ann, "user", "Hi")
    b = store.add_message(ann, "assistant", "Hello.")
    flagged = store.log_feedback(b, "correction", text="Hello there.", user_name="ann", session_id="k:ann")
    records = store.feedback_records()
    scopes = {fixed: "shared", liked: "personal", crit: "personal", flagged: "none"}

    (sft,) = export_rows(records, "sft", scopes=scopes)  # the flagged author's row is left out
    assert {k: sft[k] for k in ("feedback_id", "feedback_kind", "scope", "source")} == {
        "feedback_id": fixed, "feedback_kind": "accepted_revision", "scope": "shared", "source": "revision"}
    assert sft["author"].startswith("anon-") and "k:anon" not in str(sft)  # the session id itself is never shown
    (dpo,) = export_rows(records, "dpo", scopes=scopes)
    assert (dpo["feedback_id"], dpo["scope"]) == (fixed, "shared")
    (kto,) = export_rows(records, "kto", scopes=scopes)
    assert (kto["feedback_id"], kto["feedback_kind"], kto["scope"]) == (liked, "rating", "personal")
    assert {r["author"] for r in export_rows(records, "sft")} >= {"ann"}  # without scopes: all kept, personal
    assert {r["scope"] for r in export_rows(records, "sft")} == {"personal"}
    hidden = {r["author"] for r in export_rows(records, "sft", name_salt=b"secret")}
    assert "ann" not in hidden and not hidden & {r["author"] for r in export_rows(records, "sft", name_salt=b"other")}
