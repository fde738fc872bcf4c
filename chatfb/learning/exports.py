"""Feedback in and out: parse `import-feedback` JSONL files and write TRL-ready exports.

Import schema (one JSON object per line):
    prompt  str | [{role, content}, ...]   what the user asked (a chat history is allowed)
    reply   str                            the model's original reply
    kind    "rating" | "critique" | "correction"
    rating  +1 | -1                        required for kind=rating
    text    str                            the critique, or the corrected reply
    user    str (optional)                 who gave the feedback
    ts      ISO-8601 time (optional)

Exports: sft, dpo and kto files in TRL's conversational formats, loadable with
`datasets.load_dataset("json" | "parquet", ...)`; chatfb.learning.rows builds their rows and describes
each (`EXPORT_SCHEMAS`). The local export and the Hub's dataset (chatfb.learning.hub) are the same rows:
`export_rows` from the feedback records and the revisions users dismissed.
Every row also carries its provenance (chatfb.learning.rows.PROVENANCE): "feedback_id", "author" (the
user's name, or "anon-" and a hash of the anonymous session), "feedback_kind" (written_correction,
accepted_revision, edited_revision, rating, ...) and "scope": "shared" when the trust policy vouches for
it (chatfb.learning.trust), else "personal". Rows that never train (a flagged author, over the rate limit)
are left out. Every row also says whether a promoted adapter learnt its feedback (chatfb.learning.uptake):
"uptake" ("learned", "not learned", or "" when never checked) and "uptake_adapter" (the adapter asked).
TRL's trainers ignore these fields.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import datetime
from pathlib import Path

from chatfb.learning.rows import EXPORT_FORMATS, dpo_row, kto_row, provenance, sft_row, write_rows
from chatfb.learning.trust import provenance_kind, who
from chatfb.store.records import LONE_SURROGATE, FeedbackRecord

IMPORT_KINDS = ("rating", "critique", "correction")


class BadImportFile(ValueError):
    """An import file with bad lines; `problems` lists (line number, reason)."""

    def __init__(self, problems: list[tuple[int, str]]):
        self.problems = problems
        lines = "\n".join(f"  line {n}: {why}" for n, why in problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        super().__init__(f"{len(problems)} bad line(s), nothing was imported:\n{lines}{more}")


def parse_record(obj, max_chars: int) -> dict:
    """Validate one import object; returns the normalised record or raises ValueError(reason)."""
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    unknown = set(obj) - {"prompt", "reply", "kind", "rating", "text", "user", "ts"}
    if unknown:
        raise ValueError(f"unknown field(s) {sorted(unknown)}")
    prompt = obj.get("prompt")
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt:
        raise ValueError("'prompt' must be a non-empty string or list of {role, content} messages")
    for m in prompt:
        if not (isinstance(m, dict) and m.get("role") in ("system", "user", "assistant") and isinstance(m.get("content"), str)):
            raise ValueError("each prompt message needs role system|user|assistant and string content")
    if prompt[-1]["role"] != "user" or not prompt[-1]["content"].strip():
        raise ValueError("the prompt must end with a non-empty user message")
    reply = obj.get("reply")
    if not isinstance(reply, str) or not reply.strip():
        raise ValueError("'reply' must be a non-empty string")
    kind = obj.get("kind")
    if kind not in IMPORT_KINDS:
        raise ValueError(f"'kind' must be one of {', '.join(IMPORT_KINDS)}")
    rating, text = obj.get("rating"), obj.get("text")
    if kind == "rating":
        if rating not in (1, -1) or isinstance(rating, bool):
            raise ValueError("'rating' must be 1 or -1 for kind=rating")
    elif rating is not None:
        raise ValueError("'rating' is only for kind=rating")
    if kind in ("critique", "correction") and (not isinstance(text, str) or not text.strip()):
        raise ValueError(f"'text' must be a non-empty string for kind={kind}")
    if text is not None and not isinstance(text, str):
        raise ValueError("'text' must be a string")
    for name, value in (("text", text or ""), ("reply", reply), *(("prompt", m["content"]) for m in prompt)):
        if len(value) > max_chars:
            raise ValueError(f"'{name}' is longer than {max_chars} characters")
    user = obj.get("user")
    if user is not None and not isinstance(user, str):
        raise ValueError("'user' must be a string")
    ts = obj.get("ts")
    if ts is not None:
        try:
            ts = datetime.fromisoformat(str(ts).replace("Z", "+00:00")).replace(tzinfo=None)
        except ValueError:
            raise ValueError("'ts' must be an ISO-8601 time") from None
    return {"prompt": prompt, "reply": reply, "kind": kind, "rating": rating, "text": text, "user": user, "ts": ts}


def parse_jsonl(path: Path, max_chars: int = 8000) -> list[dict]:
    """All records of an import file, or BadImportFile naming every bad line (blank lines are skipped).
    The file is read line by line (never whole), and a line that repeats an earlier one is a bad line:
    importing it would count the same feedback twice in training."""
    records, problems, seen = [], [], {}
    try:
        with open(path, "rb") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                digest = hashlib.blake2b(line.strip(), digest_size=16).digest()
                if digest in seen:
                    problems.append((n, f"repeats line {seen[digest]}"))
                    continue
                seen[digest] = n
                try:
                    obj = json.loads(line.decode("utf-8"))
                    if LONE_SURROGATE.search(json.dumps(obj, ensure_ascii=False)):
                        raise ValueError("holds a lone surrogate (\\ud800-\\udfff escape), which is not text")
                    records.append(parse_record(obj, max_chars))
                except UnicodeDecodeError:
                    problems.append((n, "not UTF-8"))
                except json.JSONDecodeError as e:
                    problems.append((n, f"invalid JSON ({e.msg})"))
                except ValueError as e:
                    problems.append((n, str(e)))
    except OSError as e:
        raise BadImportFile([(0, f"cannot read file: {e.strerror}")]) from None
    if problems:
        raise BadImportFile(problems)
    if not records:
        raise BadImportFile([(0, "the file holds no records")])
    return records


def _provenance(r: FeedbackRecord, scopes: dict[str, str] | None, name_salt: bytes | None,
                kind: str | None = None) -> dict:
    """Where a row came from, in plain string fields that TRL's trainers ignore: for a correction, written by
    the user ("correction") or a revision they accepted ("revision", with the critique's id); for every
    row who gave it, its kind and the scope it may teach."""
    author = who(r.user_name, r.session_id)
    if name_salt is not None:  # a published dataset names nobody: a keyed hash, so a guessed name cannot be checked
        author = ("user-" if r.user_name else "anon-") + hmac.new(name_salt, author.encode(), "sha256").hexdigest()[:12]
    return provenance(r.feedback_id, author, kind or provenance_kind(r), (scopes or {}).get(r.feedback_id, "personal"))


def _correction(r: FeedbackRecord) -> dict:
    return {"source": "revision" if r.derived_from else "correction", "critique_id": r.derived_from or ""}


def export_rows(records: list[FeedbackRecord], fmt: str, dismissed: dict[str, list[str]] | None = None,
                scopes: dict[str, str] | None = None, name_salt: bytes | None = None,
                uptake_rows: list[dict] | None = None) -> list[dict]:
    """Rows of one TRL format. `dismissed` (message id -> revisions the user dismissed) adds DPO
    pairs: the corrected reply is chosen over each dismissed revision of the same reply. `scopes` (feedback
    id -> shared | personal | none, chatfb.learning.trust): each row's scope; "none" rows are left out;
    without it every row is personal. `name_salt`: authors as hashes keyed with this secret (for publishing:
    a bare hash of a user name is found by hashing guessed names). `uptake_rows` (Store.uptake): each row
    says whether a promoted adapter learnt its feedback (chatfb.learning.uptake)."""
    from chatfb.learning import uptake

    if scopes is not None:
        records = [r for r in records if scopes.get(r.feedback_id) != "none"]
    checks = uptake.by_feedback(uptake_rows or [])

    def extra(r, kind=None):
        return {**_provenance(r, scopes, name_salt, kind), **uptake.export_fields(checks.get(r.feedback_id, []))}

    if fmt == "sft":
        return [sft_row(r.prompt, r.text, **_correction(r), **extra(r)) for r in records if r.kind == "correction"]
    if fmt == "dpo":
        rows = []
        for r in records:
            if r.kind != "correction":
                continue
            for rejected in dict.fromkeys([r.reply, *(dismissed or {}).get(r.message_id, [])]):
                if r.text.strip() != rejected.strip():
                    rows.append(dpo_row(r.prompt, r.text, rejected, **_correction(r), **extra(r)))
        return rows
    if fmt == "kto":
        rows = []
        for r in records:
            if r.kind == "rating":
                rows.append(kto_row(r.prompt, r.reply, r.rating > 0, **extra(r)))
            elif r.kind == "implicit":
                rows.append(kto_row(r.prompt, r.reply, False, **extra(r)))
        by_message = {r.message_id: r for r in records}
        for mid, texts in (dismissed or {}).items():
            if mid in by_message:  # a dismissed revision is an undesirable completion of the same prompt
                r = by_message[mid]
                rows += [kto_row(r.prompt, t, False, **extra(r, "from_critique")) for t in texts]
        return rows
    raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")


def export(records: list[FeedbackRecord], fmt: str, out_dir: Path, file_format: str = "jsonl",
           dismissed: dict[str, list[str]] | None = None, scopes: dict[str, str] | None = None,
           uptake_rows: list[dict] | None = None) -> tuple[Path, int]:
    rows = export_rows(records, fmt, dismissed, scopes, uptake_rows=uptake_rows)
    return write_rows(rows, Path(out_dir) / f"{fmt}.{file_format}"), len(rows)
