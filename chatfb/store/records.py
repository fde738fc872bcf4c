"""The store's record types and small values, importable without DuckDB (training, exports, Hub)."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone

FEEDBACK_KINDS = ("rating", "critique", "correction", "implicit")
CANDIDATE_STATUSES = ("offered", "accepted", "rejected", "kept", "dropped")
GUIDELINE_STATUSES = ("active", "pending", "retired")
REVIEW_DECISIONS = ("approved", "rejected")


# JSON may escape a lone surrogate ("\\ud800"); Python decodes it, but UTF-8 (DuckDB, vLLM) cannot hold it.
LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def utf8_text(text: str | None) -> str:
    """`text` as valid UTF-8 can hold it: each lone surrogate (LONE_SURROGATE) becomes U+FFFD."""
    return LONE_SURROGATE.sub("\ufffd", text or "")


def last_user(prompt: list[dict]) -> str:
    """The last user message of a prompt (a list of chat messages), or ""."""
    return next((m["content"] for m in reversed(prompt) if m["role"] == "user"), "")


class StoreError(Exception):
    """A request the store refuses; the message is safe to show a user."""


class StoreLocked(StoreError):
    """Another process (normally the running app) holds the DuckDB file."""


# Why a reply ended, as the model server said: anything but "stop" (the token limit's "length", an "abort") left it
# unfinished. A reply with no reason stored ended by the user's Stop when its status says so (Stop stores the text
# shown then), or is from before reasons were stored. The store's query (feedback_records) says the same in SQL.
CUT_OFF_SQL = "coalesce(m.finish_reason <> 'stop', m.status = 'stopped', FALSE)"


def cut_off(finish_reason: str | None, status: str | None) -> bool:
    """The reply ends where something cut it off, not where the model ended it (see CUT_OFF_SQL)."""
    return finish_reason != "stop" if finish_reason is not None else status == "stopped"


def new_id() -> str:
    return uuid.uuid4().hex


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


@dataclass(frozen=True)
class FeedbackRecord:
    """One active piece of feedback with everything training and export need."""

    feedback_id: str
    message_id: str
    kind: str
    rating: int | None
    text: str | None
    user_name: str | None
    created_at: datetime
    prompt: list[dict]  # chat messages before the reply, system prompt first when set
    reply: str
    derived_from: str | None = None  # a correction made by accepting a revision: the critique it came from
    # Provenance (chatfb.learning.trust decides from it who may learn what):
    session_id: str | None = None  # the anonymous (or logged-in) session that gave it; "import" for the CLI's
    client: str | None = None  # a salted hash of the client's address, when the app recorded one
    origin: str | None = None  # written_correction | accepted_revision | edited_revision | critique | rating | implicit
    trusted: bool = False  # imported with `import-feedback --trusted`
    private_guideline: bool = False  # the reply was written under a user's own (not global) guideline
    reply_cut_off: bool = False  # the reply ends where the token limit (or the user's Stop) cut it off
