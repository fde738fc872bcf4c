"""The chat service: what happens when a user sends a message, regenerates a reply or gives feedback.

It validates input, logs every turn to the store (pending -> ok | failed | stopped), streams the
reply from the model server through the adapter router, and refuses feedback on messages the
session does not own. The Gradio UI and the serving benchmark both drive this class.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Iterator

from chatfb.adapters import AdapterRouter
from chatfb.config import Settings
from chatfb.model_client import ModelClient, ModelError, StreamResult
from chatfb.store import Store, StoreError

log = logging.getLogger(__name__)


class ChatInputError(ValueError):
    """Input the app refuses; str(e) is shown to the user as is."""


@dataclass
class ReplyUpdate:
    """One streamed step of a reply."""

    message_id: str
    text: str
    model: str
    done: bool = False
    error: str | None = None


class RateLimiter:
    """At most `per_minute` actions per key in any 60-second window."""

    def __init__(self, per_minute: int):
        self.per_minute = per_minute
        self._events: dict[str, deque] = defaultdict(deque)
        self._lock = threading.Lock()

    def check(self, key: str) -> None:
        now = time.monotonic()
        with self._lock:
            q = self._events[key]
            while q and now - q[0] > 60:
                q.popleft()
            if len(q) >= self.per_minute:
                raise ChatInputError("You are sending too fast. Please wait a minute and try again.")
            q.append(now)


class ChatService:
    def __init__(self, settings: Settings, store: Store, client: ModelClient, router: AdapterRouter):
        self.settings = settings
        self.store = store
        self.client = client
        self.router = router
        self.limiter = RateLimiter(settings.rate_limit_per_minute)

    # -- conversations ----------------------------------------------------------------------
    def _own_conversation(self, session_id: str, conversation_id: str | None, system_prompt: str,
                          user: str | None) -> str:
        if conversation_id:
            conv = self.store.conversation(conversation_id)
            if conv is None or conv["session_id"] != session_id:
                raise ChatInputError("This conversation is not yours. Start a new one.")
            if conv["system_prompt"] != system_prompt:
                self.store.set_system_prompt(conversation_id, system_prompt)
            return conversation_id
        return self.store.create_conversation(session_id, user, system_prompt)

    def history(self, session_id: str, conversation_id: str | None) -> list[dict]:
        """The conversation's visible messages (replaced replies hidden), only for its own session."""
        if not conversation_id:
            return []
        conv = self.store.conversation(conversation_id)
        if conv is None or conv["session_id"] != session_id:
            return []
        return self.store.messages(conversation_id)

    def _check_text(self, text: str, what: str, limit: int) -> str:
        text = (text or "").strip()
        if not text:
            raise ChatInputError(f"Your {what} is empty.")
        if len(text) > limit:
            raise ChatInputError(f"Your {what} is {len(text)} characters long; the limit is {limit}.")
        return text

    # -- sending ----------------------------------------------------------------------------
    def send(self, session_id: str, conversation_id: str | None, text: str, system_prompt: str = "",
             user: str | None = None) -> tuple[str, Iterator[ReplyUpdate]]:
        """Log the user's message and return (conversation_id, stream of reply updates).
        Raises ChatInputError before anything is stored or sent."""
        text = self._check_text(text, "message", self.settings.max_message_chars)
        if len(system_prompt or "") > self.settings.max_message_chars:
            raise ChatInputError(f"The system prompt is longer than {self.settings.max_message_chars} characters.")
        self.limiter.check(session_id)
        cid = self._own_conversation(session_id, conversation_id, system_prompt or "", user)
        return cid, self._reply(cid, user_text=text)

    def regenerate(self, session_id: str, conversation_id: str | None, system_prompt: str = "",
                   user: str | None = None) -> Iterator[ReplyUpdate]:
        """Answer the last user message again; the replaced reply gets an implicit negative."""
        if not conversation_id:
            raise ChatInputError("There is nothing to regenerate yet.")
        cid = self._own_conversation(session_id, conversation_id, system_prompt or "", user)
        msgs = self.store.messages(cid)
        if not msgs:
            raise ChatInputError("There is nothing to regenerate yet.")
        self.limiter.check(session_id)
        last = msgs[-1]
        replaces = None
        if last["role"] == "assistant":
            replaces = last["id"]
            if last["status"] == "ok":
                self.store.log_feedback(last["id"], "implicit", rating=-1, text="regenerated", user_name=user,
                                        session_id=session_id)
        return self._reply(cid, replaces=replaces)

    def _reply(self, cid: str, replaces: str | None = None, user_text: str | None = None) -> Iterator[ReplyUpdate]:
        """Log the pending reply (with the user's message before it, in one transaction, when
        `user_text` is given) and return the stream that generates it."""
        # Counted as in flight from here, so a swap never unloads the adapter this reply will use.
        model = self.router.acquire()
        try:
            adapter = None if model == self.router.base_name else model
            if user_text is not None:
                _, mid = self.store.add_turn(cid, user_text, model=self.router.base_name, adapter=adapter)
            else:
                mid = self.store.add_message(cid, "assistant", "", status="pending", model=self.router.base_name,
                                             adapter=adapter, replaces=replaces)
        except BaseException:
            self.router.release(model)
            raise
        return self._stream(mid, model)

    def _stream(self, mid: str, model: str) -> Iterator[ReplyUpdate]:
        s = self.settings
        result = StreamResult()
        status, error = "stopped", None
        try:
            messages = self.store.history_before(mid)
            for _ in self.client.stream_chat(messages, model, s.max_tokens, s.temperature, s.top_p, result):
                yield ReplyUpdate(mid, result.text, model)
            status = "ok"
        except ModelError as e:
            status, error = "failed", str(e)
            log.warning("reply %s failed: %s", mid, e)
        finally:
            self.router.release(model)
            if status == "ok" and not result.text.strip():
                status, error = "failed", "The model returned an empty reply."
            self.store.finish_message(mid, result.text, status, error, result.ttft_ms, result.latency_ms,
                                      result.prompt_tokens, result.completion_tokens)
            log.info("reply %s %s model=%s ttft_ms=%s tokens=%s", mid, status, model,
                     None if result.ttft_ms is None else round(result.ttft_ms), result.completion_tokens)
        yield ReplyUpdate(mid, result.text, model, done=True, error=error if status == "failed" else None)

    # -- feedback ---------------------------------------------------------------------------
    def rate(self, session_id: str, message_id: str, rating: int, user: str | None = None) -> str:
        self.limiter.check(session_id)
        return self._feedback(session_id, message_id, "rating", rating=rating, user=user)

    def critique(self, session_id: str, message_id: str, text: str, user: str | None = None) -> str:
        text = self._check_text(text, "critique", self.settings.max_feedback_chars)
        self.limiter.check(session_id)
        return self._feedback(session_id, message_id, "critique", text=text, user=user)

    def correct(self, session_id: str, message_id: str, text: str, user: str | None = None) -> str:
        text = self._check_text(text, "correction", self.settings.max_feedback_chars)
        self.limiter.check(session_id)
        return self._feedback(session_id, message_id, "correction", text=text, user=user)

    def _feedback(self, session_id, message_id, kind, rating=None, text=None, user=None) -> str:
        if not message_id:
            raise ChatInputError("Pick a reply first.")
        msg = self.store.message(message_id)
        if msg is not None and msg["status"] in ("pending", "failed"):
            raise ChatInputError("That reply is not finished; feedback goes on finished replies.")
        try:
            return self.store.log_feedback(message_id, kind, rating=rating, text=text, user_name=user,
                                           session_id=session_id)
        except StoreError as e:
            raise ChatInputError(str(e).capitalize() + ".") from None
