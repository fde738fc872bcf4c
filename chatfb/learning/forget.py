"""Deleting a user deletes their teaching: their rows leave every training and export file chatfb keeps.

`python -m chatfb delete-user NAME` removes the user's rows from the store (chatfb.store.db.Store.delete_user);
this module removes them from the files under the data folder (chatfb.layout names them):

    work/<adapter>/*.jsonl, *.parquet   what each learning cycle trained on (sft.jsonl, dpo.jsonl)
    exports/<time>/*.jsonl, *.parquet   the admin tab's exports
    snapshots/latest.duckdb, work/<adapter>/snapshot.duckdb   copies of the store (removed; made again on demand)

A row is the user's when its provenance names them (feedback_id, author; chatfb.learning.rows.PROVENANCE), or,
in files written before rows carried provenance, when its question and taught reply are one of the user's.
`forget_user` says which adapters trained on the user's rows: they keep them until a cycle retrains.
"""

from __future__ import annotations

import logging
from pathlib import Path

from chatfb.layout import DataLayout
from chatfb.learning.rows import read_rows, write_rows
from chatfb.learning.training_data import last_user, scrub
from chatfb.store.records import FeedbackRecord

log = logging.getLogger(__name__)

ROW_FILES = ("*.jsonl", "*.parquet")


def _question_and_answer(row: dict) -> tuple[str, str]:
    """The last user message and the taught (or rated) assistant reply of a row in any of chatfb's formats."""
    if "messages" in row:
        messages = row["messages"]
        return last_user(messages[:-1]), (messages[-1] or {}).get("content", "")
    prompt = row.get("prompt") or []
    answer = row.get("completion") or row.get("chosen") or []
    return last_user(prompt), (answer[0] if answer else {}).get("content", "")


def _theirs(user_name: str, records: list[FeedbackRecord]):
    ids = {r.feedback_id for r in records}
    pairs = set()
    for r in records:
        q = last_user(r.prompt)
        for answer in {(r.text or "").strip(), r.reply.strip()} - {""}:
            pairs.update({(q, answer), (scrub(q), answer)})  # training files hold scrubbed questions

    def match(row: dict) -> bool:
        if row.get("feedback_id") in ids or row.get("author") == user_name:
            return True
        q, a = _question_and_answer(row)
        return "feedback_id" not in row and (q, a.strip()) in pairs

    return match


def _read(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    return read_rows(path)


def scrub_file(path: Path, match) -> int:
    """Rewrite `path` without the rows `match` picks (atomically); returns how many went."""
    rows = _read(path)
    kept = [r for r in rows if not match(r)]
    if len(kept) != len(rows):
        write_rows(kept, path)
    return len(rows) - len(kept)


def forget_user(layout: DataLayout, user_name: str, records: list[FeedbackRecord]) -> dict[str, int]:
    """Remove `user_name`'s rows (`records`: their feedback, read before the store deleted it) from every
    training and export file. Returns {adapter name: rows removed from its cycle's files} for each adapter
    that trained on them, plus "exports": rows removed from exports."""
    match = _theirs(user_name, records)
    trained: dict[str, int] = {}
    exported = 0
    work_root = layout.root / "work"
    for folder in sorted(p for p in work_root.glob("*") if p.is_dir()) if work_root.exists() else []:
        (folder / "snapshot.duckdb").unlink(missing_ok=True)  # a dead cycle's copy of the store
        removed = sum(scrub_file(f, match) for pattern in ROW_FILES for f in sorted(folder.glob(pattern)))
        if removed:
            trained[folder.name] = removed
    if layout.exports.exists():
        for pattern in ROW_FILES:
            for f in sorted(layout.exports.rglob(pattern)):
                exported += scrub_file(f, match)
    for copy in (layout.latest_snapshot, Path(f"{layout.latest_snapshot}.wal")):
        copy.unlink(missing_ok=True)
    log.info("deleted %s's rows from training files of %s and %d export rows", user_name, sorted(trained), exported)
    return {**trained, "exports": exported}
