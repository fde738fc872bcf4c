"""The rows of chatfb's data files, in TRL's conversational formats: built here and nowhere else.

    sft_row(prompt, reply)                {"messages": [*prompt, <assistant reply>]}        export sft.jsonl
    dpo_row(prompt, chosen, rejected)     {"prompt": [...], "chosen": [<assistant>], "rejected": [<assistant>]}
    kto_row(prompt, completion, label)    {"prompt": [...], "completion": [<assistant>], "label": bool}
    prompt_completion_row(prompt, reply)  {"prompt": [...], "completion": [<assistant>]}  what chatfb.learning.train learns

A prompt is a list of {role, content} messages. Extra fields follow a row's own: provenance (`PROVENANCE`:
the feedback row, who gave it, the kind of feedback, the scope it may teach; chatfb.learning.trust) and an
export's "source" and "critique_id". TRL's trainers ignore them; chatfb.learning.train drops them
(`trl_fields`). Exports (chatfb.learning.exports, chatfb.learning.hub)
and training (chatfb.learning.training_data, the nightly cycle, chatfb.learning.train) all go through these functions,
so a file written by one reads the same in the others. `write_rows` / `read_rows` store them.
`EXPORT_SCHEMAS` says what each exported format holds: the local export and the Hub's dataset card use it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


# Each exported format: (its row, what fills it). "source" is "correction" (written by the user) or "revision"
# (a proposed revision the user accepted; "critique_id" is the critique it was made from).
EXPORT_SCHEMAS = {
    "sft": ('{"messages": [..., {"role": "assistant", "content": <corrected reply>}], "source", "critique_id"}',
            "corrections, and proposed revisions users accepted"),
    "dpo": ('{"prompt": [...], "chosen": [<corrected reply>], "rejected": [<original reply>], "source", "critique_id"}',
            "corrections, chosen over the original reply and over each revision the user dismissed"),
    "kto": ('{"prompt": [...], "completion": [<reply>], "label": true or false}',
            "👍/👎 ratings, regenerated (implicitly rejected) replies and dismissed revisions (false)"),
}
EXPORT_FORMATS = tuple(EXPORT_SCHEMAS)


def assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def sft_row(prompt: list[dict], reply: str, **extra) -> dict:
    return {"messages": prompt + assistant(reply), **extra}


def dpo_row(prompt: list[dict], chosen: str, rejected: str, **extra) -> dict:
    return {"prompt": prompt, "chosen": assistant(chosen), "rejected": assistant(rejected), **extra}


def kto_row(prompt: list[dict], completion: str, label: bool, **extra) -> dict:
    return {"prompt": prompt, "completion": assistant(completion), "label": label, **extra}


def prompt_completion_row(prompt: list[dict], reply: str, **extra) -> dict:
    return {"prompt": prompt, "completion": assistant(reply), **extra}


# who taught a row, and whom it may teach: feedback_id, author (user name, or "anon-" + a hash of the
# session), feedback_kind (chatfb.learning.trust.PROVENANCE_KINDS), scope (personal | shared)
PROVENANCE = ("feedback_id", "author", "feedback_kind", "scope")


# whether a promoted adapter learnt the row's feedback (chatfb.learning.uptake.export_fields): "learned",
# "not learned" or "" (never checked), and the adapter that was asked
UPTAKE = ("uptake", "uptake_adapter")


def provenance(feedback_id: str, author: str, feedback_kind: str, scope: str) -> dict:
    return {"feedback_id": feedback_id, "author": author, "feedback_kind": feedback_kind, "scope": scope}


def trl_fields(row: dict) -> dict:
    """A row without chatfb's extra fields, as the trainers get it."""
    return {k: v for k, v in row.items() if k not in PROVENANCE and k not in ("source", "critique_id", *UPTAKE)}


def write_rows(rows: list[dict], path: Path) -> Path:
    """Write JSONL or Parquet (by suffix) atomically: a crash leaves the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        if path.suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(rows), tmp)
        else:
            with open(tmp, "w", encoding="utf-8") as fh:
                for row in rows:
                    fh.write(json.dumps(row, ensure_ascii=False) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_rows(path: Path) -> list[dict]:
    """The rows of a JSONL file; none when it does not exist."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
