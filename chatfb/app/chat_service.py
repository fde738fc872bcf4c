"""The chat service: what happens when a user sends a message, regenerates a reply or gives feedback.

It validates input, logs every turn to the store (pending -> ok | failed | stopped), streams the
reply from the model server through the adapter router, and refuses feedback on messages the
session does not own. The Gradio UI and the serving benchmark both drive this class.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections import defaultdict, deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from typing import Callable, Iterator

from chatfb.critique import candidates, constraints, guidelines
from chatfb.serving.adapters import AdapterRouter
from chatfb.config import Settings
from chatfb.critique.judge import ServerJudge
from chatfb.learning.trust import who
from chatfb.serving.model_client import ModelClient, ModelError, StreamResult
from chatfb.store.db import Store
from chatfb.store.records import StoreError, cut_off, utf8_text

log = logging.getLogger(__name__)


# Characters that show nothing: a text of only these (and spaces) is empty.
INVISIBLE = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad\u180e\u200e\u200f\u202a\u202b\u202c\u202d\u202e"
                                  "\u2066\u2067\u2068\u2069"))

class ChatInputError(ValueError):
    """Input the app refuses; str(e) is shown to the user as is."""


class RateLimited(ChatInputError):
    """Too many actions in the last minute (the API answers 429)."""


@dataclass
class ReplyUpdate:
    """One streamed step of a reply."""

    message_id: str
    text: str
    model: str
    done: bool = False
    error: str | None = None


@dataclass(frozen=True)
class Sampling:
    """How one reply is sampled, where a client asks for other than the settings (the OpenAI-compatible
    API's `temperature`, `top_p`, `max_tokens`). None fields take the settings' values; `max_tokens` never
    goes above them."""

    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None

    def resolved(self, settings: Settings) -> tuple[int, float, float]:
        """(max_tokens, temperature, top_p) for one request."""
        limit = settings.max_tokens
        return (limit if self.max_tokens is None else min(self.max_tokens, limit),
                settings.temperature if self.temperature is None else self.temperature,
                settings.top_p if self.top_p is None else self.top_p)


@dataclass
class RevisionUpdate:
    """One streamed step of a proposed revision. While `done` is False, `text` is a draft being
    written; when done, it is the best candidate (`candidate_id`), or `error` says why none is offered."""

    critique_id: str
    text: str
    done: bool = False
    candidate_id: str | None = None
    error: str | None = None


MAX_TITLE_CHARS = 120
REVISION_FAILED = "The revision could not be made right now (the model is busy or down). Your critique is saved."
MODEL_UNAVAILABLE = "The model is unavailable right now (the operator can see why). Please try again later."
NO_GOOD_REVISION = ("None of the drafts followed your critique well enough to offer. Your critique is saved: "
                    "try again, or correct the reply yourself.")


def coalesced(updates: Iterator[ReplyUpdate], every_s: float,
              clock: Callable[[], float] = time.monotonic) -> Iterator[ReplyUpdate]:
    """The updates of a reply at most one per `every_s` seconds: each carries the whole text so far, so the
    ones in between are skipped, not lost. The first and the last (done) always go out. Closing this closes
    `updates` (the reply's stream stores the reply when closed)."""
    if every_s <= 0:
        return updates
    return _every(updates, every_s, clock)


def _every(updates: Iterator[ReplyUpdate], every_s: float, clock: Callable[[], float]) -> Iterator[ReplyUpdate]:
    sent_at = None
    try:
        for upd in updates:
            now = clock()
            if upd.done or sent_at is None or now - sent_at >= every_s:
                sent_at = now
                yield upd
    finally:
        updates.close()


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
                raise RateLimited("You are sending too fast. Please wait a minute and try again.")
            q.append(now)


def client_key(address: str | None, secret: str) -> str | None:
    """A keyed hash of a client's address, recorded per conversation (the store never holds the address): sessions
    from one address count once towards the trust policy's agreement rule (chatfb.learning.trust)."""
    if not address:
        return None
    return hmac.new(secret.encode(), f"client-address:{address}".encode(), "sha256").hexdigest()[:16]


class ChatService:
    def __init__(self, settings: Settings, store: Store, client: ModelClient, router: AdapterRouter, judge=None,
                 model_unavailable: Callable[[], str | None] | None = None):
        self.settings = settings
        # why nothing may be sent to the model server now (None: it may); asked before every request
        self.model_unavailable = model_unavailable or (lambda: None)
        self.store = store
        self.client = client
        self.judge = judge if judge is not None else ServerJudge(client)  # scores revisions (chatfb.critique.judge)
        self.router = router
        self.limiter = RateLimiter(settings.rate_limit_per_minute)
        self._live: dict[str, StreamResult] = {}  # reply id -> its stream's text so far (see stop)
        self._decide = threading.Lock()  # accepting / dismissing a revision: one decision at a time

    # -- conversations ----------------------------------------------------------------------
    def _own_conversation(self, session_id: str, conversation_id: str | None, system_prompt: str,
                          user: str | None, client: str | None = None) -> str:
        if conversation_id:
            conv = self.store.conversation(conversation_id)
            if conv is None or conv["session_id"] != session_id:
                raise ChatInputError("This conversation is not yours. Start a new one.")
            if conv["system_prompt"] != system_prompt:
                self.store.set_system_prompt(conversation_id, system_prompt)
            return conversation_id
        return self.store.create_conversation(session_id, user, system_prompt, client=client)

    def history(self, session_id: str, conversation_id: str | None) -> list[dict]:
        """The conversation's visible messages (replaced replies hidden), only for its own session."""
        if not conversation_id:
            return []
        conv = self.store.conversation(conversation_id)
        if conv is None or conv["session_id"] != session_id:
            return []
        return self.store.messages(conversation_id)

    def _check_text(self, text: str, what: str, limit: int) -> str:
        text = utf8_text(text).strip()
        if not text.translate(INVISIBLE).strip():
            raise ChatInputError(f"Your {what} is empty.")
        if len(text) > limit:
            raise ChatInputError(f"Your {what} is {len(text)} characters long; the limit is {limit}.")
        return text

    def feedback_state(self, session_id: str, messages: list[dict]) -> dict[str, dict]:
        """This session's active rating and correction of each reply, and whether a promoted adapter learnt
        its correction or critique (chatfb.learning.uptake.footer): {message id: {"rating", "correction", "uptake"}}."""
        from chatfb.learning import uptake

        out: dict[str, dict] = {}
        if not messages:
            return out
        taught: dict[str, str] = {}  # feedback id -> the reply it is on
        for f in self.store.conversation_feedback(messages[0]["conversation_id"]):
            if f["session_id"] != session_id:
                continue
            if f["kind"] in ("rating", "correction"):
                out.setdefault(f["message_id"], {})[f["kind"]] = f["rating"] if f["kind"] == "rating" else f["text"]
            if f["kind"] in ("correction", "critique"):
                taught[f["id"]] = f["message_id"]
        for fid, rows in uptake.by_feedback(self.store.uptake(feedback_ids=list(taught))).items():
            out.setdefault(taught[fid], {})["uptake"] = uptake.footer(rows)
        return out

    def offered_revision(self, session_id: str, messages: list[dict]) -> dict | None:
        """The newest revision offered to this session on one of these replies and not yet accepted or
        dismissed (a candidate row), or None."""
        if not messages:
            return None
        shown = {m["id"] for m in messages}  # not one on a reply an edit took out of the conversation
        offered = [c for c in self.store.offered_candidates(messages[0]["conversation_id"], session_id)
                   if c["message_id"] in shown]
        return offered[0] if offered else None

    def message(self, session_id: str, message_id: str | None) -> dict | None:
        """One message of this session's conversations, or None (unknown, or another session's)."""
        m = self.store.message(message_id) if message_id else None
        if m is None:
            return None
        conv = self.store.conversation(m["conversation_id"])
        return m if conv is not None and conv["session_id"] == session_id else None

    def critiqued_reply(self, session_id: str, critique_id: str | None) -> str | None:
        """The id of the reply a critique of this session is about, or None."""
        fb = self.store.feedback(critique_id) if critique_id else None
        return fb["message_id"] if fb is not None and fb["session_id"] == session_id else None

    def latest_conversation(self, session_id: str) -> str | None:
        return self.store.latest_conversation(session_id)

    def conversations(self, session_id: str) -> list[dict]:
        """This session's conversations, the most recently active first (id, title, created_at, last_at)."""
        return self.store.conversations_of(session_id)

    def owns(self, session_id: str, conversation_id: str | None) -> bool:
        """Whether the conversation exists and is this session's (empty or not)."""
        conv = self.store.conversation(conversation_id) if conversation_id else None
        return conv is not None and conv["session_id"] == session_id

    def _own(self, session_id: str, conversation_id: str | None) -> str:
        if not self.owns(session_id, conversation_id):
            raise ChatInputError("Pick one of your conversations first.")
        return conversation_id

    def rename_conversation(self, session_id: str, conversation_id: str | None, title: str) -> None:
        title = self._check_text(title, "title", MAX_TITLE_CHARS)
        self.store.set_title(self._own(session_id, conversation_id), title)

    def delete_conversation(self, session_id: str, conversation_id: str | None) -> None:
        """Remove one of this session's conversations for good (its feedback too)."""
        self.store.delete_conversation(self._own(session_id, conversation_id))

    # -- sending ----------------------------------------------------------------------------
    def send(self, session_id: str, conversation_id: str | None, text: str, system_prompt: str = "",
             user: str | None = None, history: list[tuple[str, str]] | None = None,
             client: str | None = None, sampling: Sampling | None = None) -> tuple[str, Iterator[ReplyUpdate]]:
        """Log the user's message and return (conversation_id, stream of reply updates). `history`: (role, text)
        turns a new conversation starts with (an API client's own history, chatfb.app.api_chat); `client`: the
        `client_key` of the sender's address, recorded when this starts a conversation; `sampling`: the
        request's own sampling, else the settings'.
        Raises ChatInputError (RateLimited too) before anything is stored or sent."""
        limit = self.settings.max_message_chars
        text = self._check_text(text, "message", limit)
        system_prompt = utf8_text(system_prompt)
        if len(system_prompt) > limit:
            raise ChatInputError(f"The system prompt is longer than {limit} characters.")
        if history and any(len(t) > limit for _, t in history):
            raise ChatInputError(f"A message in the history is longer than {limit} characters.")
        self.limiter.check(session_id)
        if history and not conversation_id:
            cid = self.store.create_conversation(session_id, user, system_prompt or "", client=client)
            for role, earlier in history:
                self.store.add_message(cid, role, earlier)
        else:
            cid = self._own_conversation(session_id, conversation_id, system_prompt or "", user, client)
        return cid, self._reply(cid, session_id, user, user_text=text, sampling=sampling)

    def edit_message(self, session_id: str, conversation_id: str | None, message_id: str | None, text: str,
                     system_prompt: str = "", user: str | None = None) -> Iterator[ReplyUpdate]:
        """The user edited one of their messages and sent it again: the conversation goes on from the
        edited message with a new reply (a new branch). The old message and what followed it stay in
        the store, marked replaced (with their feedback); the conversation shows the new branch."""
        text = self._check_text(text, "message", self.settings.max_message_chars)
        m = self.message(session_id, message_id)
        if m is None or m["role"] != "user" or m["replaced"] or m["conversation_id"] != conversation_id:
            raise ChatInputError("Only your own messages in this conversation can be edited and sent again.")
        self.limiter.check(session_id)
        cid = self._own_conversation(session_id, conversation_id, system_prompt or "", user)
        return self._reply(cid, session_id, user, user_text=text, edits=message_id)

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
        return self._reply(cid, session_id, user, replaces=replaces)

    def _reply(self, cid: str, session_id: str, user: str | None, replaces: str | None = None,
               user_text: str | None = None, edits: str | None = None,
               sampling: Sampling | None = None) -> Iterator[ReplyUpdate]:
        """Log the pending reply (with the user's message before it, in one transaction, when
        `user_text` is given: `edits` names the user message it replaces) and return the stream that
        generates it."""
        rules = self.store.guidelines_for(session_id, user)
        # Counted as in flight from here, so a swap never unloads the adapter this reply will use. The user's
        # own personal adapter answers them when they have one (the same author id the cycle trained it for).
        model = self.router.acquire(who(user, session_id))
        try:
            adapter = None if model == self.router.base_name else model
            ids = [g["id"] for g in rules]
            if user_text is not None:
                _, mid = self.store.add_turn(cid, user_text, model=self.router.base_name, adapter=adapter, guidelines=ids,
                                            replaces=edits)
            else:
                mid = self.store.add_message(cid, "assistant", "", status="pending", model=self.router.base_name,
                                             adapter=adapter, replaces=replaces, guidelines=ids)
        except BaseException:
            self.router.release(model)
            raise
        return coalesced(self._stream(mid, model, [g["text"] for g in rules], sampling or Sampling()),
                         self.settings.stream_every_s)

    def _stream(self, mid: str, model: str, rules: list[str], sampling: Sampling) -> Iterator[ReplyUpdate]:
        result = StreamResult()
        status, error = "stopped", None
        self._live[mid] = result
        try:
            why = self.model_unavailable()
            if why is not None:
                status, error = "failed", MODEL_UNAVAILABLE
                log.warning("reply %s not sent: the model is unavailable: %s", mid, why)
            else:
                messages = guidelines.apply(self.store.history_before(mid), rules)
                yield from self._generate(mid, messages, model, rules, result, sampling)
                status = "ok"
        except ModelError as e:
            status, error = "failed", str(e)
            log.warning("reply %s failed: %s", mid, e)
        finally:
            self._live.pop(mid, None)
            self.router.release(model)
            if status == "ok" and not result.text.strip():
                status, error = "failed", "The model returned an empty reply."
            # After Stop (which stored the text shown then), a word already in flight must not change
            # what was stored: the first write of a stopped reply stands.
            self.store.finish_message(mid, result.text, status, error, result.ttft_ms, result.latency_ms,
                                      result.prompt_tokens, result.completion_tokens,
                                      only_if_pending=status == "stopped", finish_reason=result.finish_reason)
            log.info("reply %s %s model=%s ttft_ms=%s tokens=%s", mid, status, model,
                     None if result.ttft_ms is None else round(result.ttft_ms), result.completion_tokens)
        yield ReplyUpdate(mid, result.text, model, done=True, error=error if status == "failed" else None)

    def _generate(self, mid: str, messages: list[dict], model: str, rules: list[str],
                  result: StreamResult, sampling: Sampling) -> Iterator[ReplyUpdate]:
        """Stream the reply in the shape of the user's guidelines (chatfb.critique.constraints): framed by an
        opening or closing phrase one of them asks for, or held to the regex of another literal shape. A
        server that refuses structured outputs (400, before any text) is asked again without: the guideline
        is still in the prompt."""
        p = sampling.resolved(self.settings)
        frame = constraints.guideline_frame(rules)
        if frame is not None:  # the model answers as it would; the phrase is added, once
            raw = StreamResult(started=result.started)
            try:
                for _ in self.client.stream_chat(messages, model, *p, raw):
                    result.text, result.ttft_ms = constraints.framed(raw.text, *frame, done=False), raw.ttft_ms
                    yield ReplyUpdate(mid, result.text, model)
                # a reply the token limit cut off ends where it was cut: no closing phrase after half a word
                closing = "" if cut_off(raw.finish_reason, "ok") else frame[1]
                result.text = constraints.framed(raw.text, frame[0], closing) if raw.text.strip() else ""
            finally:  # a failed or abandoned reply keeps its timings and counts too
                for f in ("ttft_ms", "latency_ms", "prompt_tokens", "completion_tokens", "finish_reason"):
                    setattr(result, f, getattr(raw, f))
            return
        regex = constraints.guideline_regex(rules)
        held = {"regex": regex} if regex else {}  # clients without structured outputs are asked as before
        try:
            for _ in self.client.stream_chat(messages, model, *p, result, **held):
                yield ReplyUpdate(mid, result.text, model)
        except ModelError as e:
            if regex is None or e.status != 400 or result.text:
                raise
            log.warning("reply %s: structured outputs refused (%s); answering without the guideline's regex", mid, e)
            for _ in self.client.stream_chat(messages, model, *p, result):
                yield ReplyUpdate(mid, result.text, model)

    def stop(self, session_id: str, conversation_id: str | None) -> None:
        """The user pressed Stop: store what each of the conversation's pending replies has said so
        far, marked stopped, now. The UI stops reading the stream at once, but the stream's own
        cleanup (which writes the same) runs only when its generator is closed, later."""
        for m in self.history(session_id, conversation_id):
            result = self._live.get(m["id"]) if m["status"] == "pending" else None
            if result is not None:
                self.store.finish_message(m["id"], result.text, "stopped", None, result.ttft_ms,
                                          (time.perf_counter() - result.started) * 1000, result.prompt_tokens,
                                          result.completion_tokens, only_if_pending=True,
                                          finish_reason=result.finish_reason)  # a reply whole by then stays whole

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

    # -- in-loop revision -------------------------------------------------------------------
    def revise(self, session_id: str, message_id: str, critique: str,
               user: str | None = None) -> tuple[str, Iterator[RevisionUpdate]]:
        """Save a critique and return (critique id, stream of a proposed revision): the same conversation
        answered again with the critique as an instruction, several candidates in one request, the best
        by the shared scorer (chatfb.critique.candidates). Bad input raises ChatInputError before anything is
        stored or generated; a failed generation still leaves the critique saved."""
        critique = self._check_text(critique, "critique", self.settings.max_feedback_chars)
        fid = self.critique(session_id, message_id, critique, user)
        return fid, self._revision(session_id, user, message_id, fid, critique)

    def revise_again(self, session_id: str, critique_id: str, user: str | None = None) -> Iterator[RevisionUpdate]:
        """Another set of candidates for a critique this session gave ("Try again")."""
        fb = self.store.feedback(critique_id)
        if fb is None or fb["kind"] != "critique" or fb["session_id"] != session_id or fb["superseded_at"] is not None:
            raise ChatInputError("That critique is not yours, or it was revised since. Send a critique first.")
        self.limiter.check(session_id)
        return self._revision(session_id, user, fb["message_id"], critique_id, fb["text"], second_look=True)

    def _revision(self, session_id: str, user: str | None, message_id: str, critique_id: str,
                  critique: str, second_look: bool = False) -> Iterator[RevisionUpdate]:
        """`second_look` ("Try again"): when no draft is kept, score them again beside the model's plain answer
        (`_against_the_plain_answer`)."""
        s = self.settings
        why = self.model_unavailable()
        if why is not None:
            log.warning("revision for critique %s not made: the model is unavailable: %s", critique_id, why)
            yield RevisionUpdate(critique_id, "", done=True, error=MODEL_UNAVAILABLE)
            return
        rules = [g["text"] for g in self.store.guidelines_for(session_id, user)]
        prompt = guidelines.apply(self.store.history_before(message_id), rules)
        critiqued = self.store.message(message_id)
        # a reply the token limit or Stop cut off is framed only up to its last whole sentence
        original = constraints.PlainAnswer.of(critiqued["content"], cut_off(critiqued["finish_reason"], critiqued["status"]))
        model = self.router.acquire(who(user, session_id))
        t0 = time.perf_counter()
        ttft = None
        messages = candidates.instruction_messages(prompt, critique)
        # The nightly's candidates (chatfb.critique.candidates.generate), the sampled ones streamed so the user
        # watches the first being written; the ones held to a format the critique states literally are asked
        # meanwhile, in a request of their own (vLLM batches the two).
        pool = ThreadPoolExecutor(1)
        try:
            # Neither waits for its stragglers (candidates.stream_drafts): a draft still running long after its
            # siblings finished is most often one the token limit will cut off, never offered anyway.
            held = pool.submit(candidates.held_to_format, self.client, messages, model, critique,
                               max(1, s.revision_candidates // 2), s.revision_max_tokens,
                               patience=s.revision_patience)
            drafts: dict[int, str] = {}
            finish: dict[int, str | None] = {}
            with closing(candidates.stream_drafts(self.client, messages, model, s.revision_candidates,
                                                  s.revision_max_tokens, finish=finish,
                                                  patience=s.revision_patience)) as streamed:
                for index, delta in streamed:  # a user who leaves closes it: the request stops
                    drafts[index] = drafts.get(index, "") + delta
                    if index == 0 and delta:
                        ttft = ttft or time.perf_counter() - t0
                        yield RevisionUpdate(critique_id, self._showable(drafts[0], critique, prompt, original))
            cands = [candidates.Candidate(drafts.get(i, ""), finish.get(i)) for i in range(s.revision_candidates)]
            timings = {"drafts_s": time.perf_counter() - t0}
            # the critiqued reply cut at sentence ends for a length critique, or framed by the phrase asked for
            # (its facts, in the asked form); then the held ones
            cands += candidates.content_keeping(critique, original) + held.result()
            timings["held_s"] = time.perf_counter() - t0
            ranked = candidates.score(self.judge, model, prompt, critique, cands, original)
            timings["scored_s"] = time.perf_counter() - t0
            if second_look and candidates.best(ranked) is None:
                try:
                    ranked = self._against_the_plain_answer(model, prompt, critique, cands, original) or ranked
                except Exception:  # noqa: BLE001 - a second look that failed leaves the first one's result
                    log.warning("the second look at critique %s's drafts failed", critique_id, exc_info=True)
                timings["plain_s"] = time.perf_counter() - t0
        except ModelError as e:
            log.warning("revision for critique %s failed: %s", critique_id, e)
            yield RevisionUpdate(critique_id, "", done=True, error=REVISION_FAILED)
            return
        except Exception:  # noqa: BLE001 - the judge or the embedder failed: the user gets a message, the log the trace
            log.exception("scoring the revision for critique %s failed", critique_id)
            yield RevisionUpdate(critique_id, "", done=True, error=REVISION_FAILED)
            return
        finally:
            pool.shutdown(wait=False, cancel_futures=True)  # a user who left, or a failure, abandons the held request
            self.router.release(model)
        best = candidates.best(ranked)
        rows = [{"feedback_id": critique_id, "message_id": message_id, "origin": "inloop", "text": c.text,
                 "score": c.score, "verdict": c.verdict, "status": "offered" if c is best else "dropped",
                 "session_id": session_id, "details": {**c.details, "model": model}} for c in ranked]
        ids = self.store.add_candidates(rows)
        log.info("revision for critique %s: %d candidates, %s ok, ttft_s=%s, %s", critique_id, len(ranked),
                 sum(c.ok for c in ranked), None if ttft is None else round(ttft, 3),
                 ", ".join(f"{k}={v:.2f}" for k, v in timings.items()))
        if best is None:
            yield RevisionUpdate(critique_id, "", done=True, error=NO_GOOD_REVISION)
            return
        yield RevisionUpdate(critique_id, best.text, done=True, candidate_id=ids[ranked.index(best)])

    def _against_the_plain_answer(self, model: str, prompt: list[dict], critique: str, cands: list,
                                  original: str) -> list | None:
        """On "Try again", when no draft was kept: the drafts scored again with the model's own plain answer to
        the prompt as a second reference, as the nightly scores them, and that answer cut or framed as a
        candidate too; None when it adds nothing. A draft must keep the critiqued reply's content, and a reply
        off its own subject ("Use a Bamboo Toilet Set" for tips on a tidy desk) fails every good draft, on every
        try. Not on the first try: there it cost 10 s more to the end (median; 8 critiques each way, side by side,
        bench/results/inloop_second_look) for 4 offers against 3, and 3 that follow and are right either way."""
        plain = candidates.plain_answer(self.client, model, prompt, self.settings.revision_max_tokens)
        if not plain or plain == (original or "").strip():
            return None
        seen = {c.text for c in cands}
        again = [candidates.Candidate(c.text, c.finish_reason, source=c.source) for c in cands]
        again += [c for c in candidates.content_keeping(critique, plain) if c.text not in seen]
        return candidates.score(self.judge, model, prompt, critique, again, original, reference=plain)

    @staticmethod
    def _showable(draft: str, critique: str, prompt: list[dict], original: str) -> str:
        """The draft being written, or nothing while it echoes the critique or talks about the feedback or
        the reply (it would never be offered; a user should not watch it be written either)."""
        context = " ".join([m["content"] for m in prompt if m["role"] == "user"][-1:] + [original or ""])
        return "" if candidates.about_the_critique(draft, critique, context) else draft

    def _own_candidate(self, session_id: str, candidate_id: str) -> dict:
        if not candidate_id:
            raise ChatInputError("There is no proposed revision to accept or dismiss.")
        cand = self.store.candidate(candidate_id)
        if cand is None or cand["origin"] != "inloop" or cand["session_id"] != session_id:
            raise ChatInputError("That revision is not yours.")
        if cand["status"] != "offered":
            raise ChatInputError("That revision was already accepted or dismissed.")
        return cand

    def accept_revision(self, session_id: str, candidate_id: str, text: str | None = None,
                        user: str | None = None) -> str:
        """Store an offered revision (or the user's edit of it) as a correction of the critiqued reply,
        recording the critique it came from. Returns the correction's feedback id."""
        with self._decide:  # a double click must not store two corrections
            cand = self._own_candidate(session_id, candidate_id)
            text = self._check_text(text if text is not None else cand["text"], "revision",
                                    self.settings.max_feedback_chars)
            self.limiter.check(session_id)
            try:
                fid = self.store.log_feedback(cand["message_id"], "correction", text=text, user_name=user,
                                              session_id=session_id, derived_from=cand["feedback_id"])
            except StoreError as e:
                raise ChatInputError(str(e).capitalize() + ".") from None
            self.store.set_candidate_status(candidate_id, "accepted")
        return fid

    def reject_revision(self, session_id: str, candidate_id: str, status: str = "rejected") -> None:
        """Dismiss an offered revision: kept as a negative (DPO rejected / KTO undesirable). "Try again"
        passes status "dropped": the user asked for another, which says less than a dismissal."""
        with self._decide:
            self._own_candidate(session_id, candidate_id)
            self.store.set_candidate_status(candidate_id, status)

    # -- guidelines -------------------------------------------------------------------------
    def save_guideline(self, session_id: str, text: str, user: str | None = None, for_everyone: bool = False,
                       source_feedback_id: str | None = None) -> str:
        """Keep a standing preference: it applies to this user's next replies at once; with
        `for_everyone` a copy also waits for an admin's approval before it applies to all chats."""
        text = self._check_text(text, "guideline", self.settings.max_guideline_chars)
        self.limiter.check(session_id)
        if len(self.store.owned_guidelines(session_id, user)) >= self.settings.max_guidelines_per_user:
            raise ChatInputError(f"You already keep {self.settings.max_guidelines_per_user} guidelines; "
                                 "remove one first.")
        gid = self.store.add_guideline(text, "user", "active", session_id, user, source_feedback_id)
        if for_everyone:
            self.store.add_guideline(text, "global", "pending", session_id, user, source_feedback_id)
        return gid

    def my_guidelines(self, session_id: str, user: str | None = None) -> list[dict]:
        return [g for g in self.store.guidelines_for(session_id, user) if g["scope"] == "user"]

    def remove_guideline(self, session_id: str, guideline_id: str, user: str | None = None) -> None:
        if guideline_id not in {g["id"] for g in self.my_guidelines(session_id, user)}:
            raise ChatInputError("That guideline is not yours.")
        self.store.update_guideline(guideline_id, status="retired")
