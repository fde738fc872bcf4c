"""delete-user deletes their teaching from the files chatfb keeps (chatfb.learning.forget)."""

import json
from datetime import datetime

from chatfb.layout import DataLayout
from chatfb.learning.forget import forget_user
from chatfb.learning.rows import dpo_row, prompt_completion_row, provenance, read_rows, sft_row, write_rows
from chatfb.store.records import FeedbackRecord


def q(text):
    return [{"role": "user", "content": text}]


def test_a_deleted_users_rows_leave_every_cycles_training_files_and_every_export(tmp_path):
    layout = DataLayout(tmp_path)
    ann = FeedbackRecord("f-ann", "m1", "correction", None, "Van Gogh painted it.", "ann", datetime(2026, 1, 1),
                         q("Who painted the Mona Lisa? mail me at ann@example.org"), "Leonardo.")
    old_ann = FeedbackRecord("f-old", "m2", "correction", None, "Blue.", "ann", datetime(2026, 1, 1),
                             q("Sky colour?"), "Green.")
    mine = provenance("f-ann", "ann", "written_correction", "shared")
    bobs = provenance("f-bob", "bob", "written_correction", "shared")
    work = layout.work("chatfb-v0001")
    write_rows([prompt_completion_row(q("Who painted the Mona Lisa? mail me at [email]"), ann.text, **mine),
                prompt_completion_row(q("Capital of Australia?"), "Canberra.", **bobs),
                prompt_completion_row(q("Sky colour?"), "Blue."),  # a file from before provenance: matched by content
                prompt_completion_row(q("What is 9 times 6?"), "54.")], work / "sft.jsonl")  # replay
    write_rows([dpo_row(q("x"), ann.text, "Leonardo.", **mine), dpo_row(q("y"), "Canberra.", "Sydney.", **bobs)],
               work / "dpo.jsonl")
    (work / "snapshot.duckdb").write_bytes(b"a dead cycle's copy of the store")
    untouched = layout.work("chatfb-v0002")
    write_rows([prompt_completion_row(q("Capital of Australia?"), "Canberra.", **bobs)], untouched / "sft.jsonl")
    export = layout.exports / "20260101T000000"
    write_rows([sft_row(q("Sky colour?"), "Blue.", feedback_id="f-old", author="ann"),
                sft_row(q("Capital?"), "Canberra.", feedback_id="f-bob", author="bob")], export / "sft.parquet")
    layout.latest_snapshot.parent.mkdir(parents=True)
    layout.latest_snapshot.write_bytes(b"copy")

    found = forget_user(layout, "ann", [ann, old_ann])

    assert found == {"chatfb-v0001": 3, "exports": 1}
    assert [r["completion"][0]["content"] for r in read_rows(work / "sft.jsonl")] == ["Canberra.", "54."]
    assert [r["author"] for r in read_rows(work / "dpo.jsonl")] == ["bob"]
    assert "ann" not in (untouched / "sft.jsonl").read_text()
    import pyarrow.parquet as pq

    assert [r["author"] for r in pq.read_table(export / "sft.parquet").to_pylist()] == ["bob"]
    assert not (work / "snapshot.duckdb").exists() and not layout.latest_snapshot.exists()
    assert "Van Gogh" not in json.dumps([read_rows(p) for p in tmp_path.rglob("*.jsonl")])
