"""The OpenAI-compatible API on the app's own port, beside the Gradio UI (docs/api.md).

- `GET /v1/models`, `POST /v1/chat/completions` (streamed as server-sent events, or one JSON reply):
  each request is one turn of the key's user, through the chat service like a UI turn (logged,
  rate-limited, answered by the model live for that user with their guidelines; chatfb.app.api_chat).
- A feedback API by chatfb's message ids (every completion carries them in its `chatfb` field and in
  the X-Chatfb-Conversation-Id / X-Chatfb-Message-Id headers): `POST /v1/chatfb/messages/{id}/rate`,
  `/critique` (answers the proposed revision), `/correct`, `POST /v1/chatfb/revisions/{id}/accept`,
  `/dismiss`.

Every route needs `Authorization: Bearer KEY` with a key an admin issued (chatfb.app.api_keys); wrong
keys are throttled like admin password guesses. Errors are OpenAI-shaped JSON without internals.
`api_routes(runtime)` returns the routes; chatfb.serve puts them in front of Gradio's own.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import AsyncIterator, Callable, Iterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from chatfb.app.api_chat import api_session, sampling_of, start_turn
from chatfb.app.api_keys import user_for_key
from chatfb.app.chat_service import MODEL_UNAVAILABLE, ChatInputError, RateLimited, ReplyUpdate
from chatfb.ui.throttle import GuessThrottle

log = logging.getLogger(__name__)

MODEL_ID = "chatfb"  # the one model listed; whatever a request names, the user's live model answers
BAD_KEY = ("Invalid or missing API key. Send `Authorization: Bearer KEY` with a key an admin made with "
           "`python -m chatfb api-key create USER`.")


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.headers = status, message, kind, code, headers

    def response(self, extra_headers: dict | None = None) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "code": self.code, "param": None}}
        return JSONResponse(body, status_code=self.status, headers={**(self.headers or {}), **(extra_headers or {})})


def refused(e: ChatInputError) -> ApiError:
    if isinstance(e, RateLimited):
        return ApiError(429, str(e), "rate_limit_error", "rate_limited", {"Retry-After": "60"})
    return ApiError(400, str(e))


def failure_code(error: str) -> str:
    return "model_unavailable" if error == MODEL_UNAVAILABLE else "model_failed"


def id_headers(cid: str, mid: str) -> dict:
    return {"X-Chatfb-Conversation-Id": cid, "X-Chatfb-Message-Id": mid}


def api_routes(rt) -> list:
    """The API's routes for the app of runtime `rt` (its chat service, store and settings)."""
    chat, store = rt.chat, rt.store
    guesses = GuessThrottle()
    router = APIRouter()

    def authenticate(request: Request) -> str:
        """The key's user. A wrong key is answered 401, and after a few from one address 429 with a
        growing wait (chatfb.ui.throttle); a right key always gets in, so wrong guesses from others on
        the same address (a proxy) or everywhere never lock out users who hold keys."""
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        user = user_for_key(store, key.strip()) if scheme.lower() == "bearer" else None
        client = request.client.host if request.client else "?"
        if user is not None:
            guesses.succeeded(client)
            return user
        guesses.failed(client)
        wait = guesses.wait_s(client)
        if wait > 0:
            raise ApiError(429, f"Too many wrong API keys; try again in {wait:.0f} s.", "rate_limit_error",
                           "rate_limited", {"Retry-After": str(max(1, round(wait)))})
        raise ApiError(401, BAD_KEY, "invalid_request_error", "invalid_api_key", {"WWW-Authenticate": "Bearer"})

    async def body_of(request: Request) -> dict:
        try:
            body = json.loads(await request.body() or b"{}")
        except ValueError:
            raise ApiError(400, "The request body is not valid JSON.") from None
        if not isinstance(body, dict):
            raise ApiError(400, "The request body must be a JSON object.")
        return body

    def guarded(handler):
        """Run a handler off the event loop; answer its ApiError / refusal as JSON, anything else as a
        500 without details (the trace goes to the log)."""
        async def route(request: Request):
            try:
                user = await run_in_threadpool(authenticate, request)
                body = await body_of(request) if request.method == "POST" else {}
                return await run_in_threadpool(handler, user, body, **request.path_params)
            except ApiError as e:
                return e.response()
            except ChatInputError as e:
                return refused(e).response()
            except Exception:  # noqa: BLE001 - the client gets no internals; the log gets the trace
                log.exception("API %s %s failed", request.method, request.url.path)
                return ApiError(500, "The server failed to answer this request.", "server_error").response()
        route.__name__ = handler.__name__
        return route

    # -- OpenAI-compatible ------------------------------------------------------------------
    def models(user: str, body: dict) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [
            {"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "chatfb"}]})

    def completions(user: str, body: dict):
        if body.get("n", 1) != 1:
            raise ApiError(400, "Only n=1 is supported.", code="unsupported_parameter")
        cid, stream = start_turn(chat, user, body.get("messages"), body.get("conversation_id"), sampling_of(body))
        first = next(stream)  # the reply is logged by now: its id goes into the headers
        ids = {"conversation_id": cid, "message_id": first.message_id}
        if first.done and first.error:  # nothing was said: an HTTP error, not an empty stream
            raise ApiError(503, first.error, "server_error", failure_code(first.error), id_headers(cid, first.message_id))
        if body.get("stream"):
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
            events = sse(first, stream, ids, usage)
            return StreamingResponse(until_hangup(events, lambda: chat.stop(api_session(user), cid)),
                                     media_type="text/event-stream",
                                     headers={**id_headers(cid, first.message_id), "Cache-Control": "no-cache"})
        last = first
        for last in stream:
            pass
        if last.error:
            raise ApiError(503, last.error, "server_error", failure_code(last.error), id_headers(cid, last.message_id))
        usage, finish = ending(last.message_id)
        return JSONResponse({
            "id": f"chatcmpl-{last.message_id}", "object": "chat.completion", "created": int(time.time()),
            "model": last.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": last.text}, "finish_reason": finish}],
            "usage": usage, "chatfb": ids}, headers=id_headers(cid, last.message_id))

    def ending(mid: str) -> tuple[dict, str]:
        """A finished reply's token usage and finish reason, the model server's: "length" where the token limit
        cut it off (a client asks for more, or shows it was cut), "stop" where it ended on its own ("stop" too for
        a reply stored without one)."""
        m = store.message(mid) or {}
        prompt, completion = m.get("prompt_tokens") or 0, m.get("completion_tokens") or 0
        return ({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
                m.get("finish_reason") or "stop")

    def sse(first: ReplyUpdate, stream: Iterator[ReplyUpdate], ids: dict, include_usage: bool) -> Iterator[str]:
        created = int(time.time())
        base = {"id": f"chatcmpl-{first.message_id}", "object": "chat.completion.chunk", "created": created,
                "model": first.model}

        def event(payload: dict) -> str:
            return f"data: {json.dumps({**base, **payload})}\n\n"

        # The events of one update go out as one piece, the first update's with the opening one: each piece
        # is a step in a worker thread (until_hangup) and a write to the socket.
        out = [event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
                      "chatfb": ids})]
        sent = ""
        try:
            for upd in _chain(first, stream):
                if upd.text.startswith(sent) and len(upd.text) > len(sent):
                    out.append(event({"choices": [{"index": 0, "delta": {"content": upd.text[len(sent):]},
                                                   "finish_reason": None}]}))
                    sent = upd.text
                if upd.done:
                    if upd.error:  # the openai client raises an APIError for an event with "error"
                        out.append(f"data: {json.dumps({'error': {'message': upd.error, 'type': 'server_error'}})}\n\n")
                        yield "".join(out)
                        return
                    usage, finish = ending(upd.message_id)
                    out.append(event({"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}))
                    if include_usage:
                        out.append(event({"choices": [], "usage": usage}))
                    break
                if out:
                    yield "".join(out)
                    out = []
            yield "".join(out) + "data: [DONE]\n\n"
        finally:
            stream.close()  # ends the model's request when the client hung up (see until_hangup)

    # -- feedback by chatfb message id --------------------------------------------------------
    def rate(user: str, body: dict, message_id: str) -> JSONResponse:
        rating = body.get("rating")
        if rating not in (1, -1) or isinstance(rating, bool):
            raise ApiError(400, "`rating` is 1 (good) or -1 (bad).", code="invalid_rating")
        return JSONResponse({"feedback_id": chat.rate(api_session(user), message_id, rating, user),
                             "message_id": message_id})

    def critique(user: str, body: dict, message_id: str) -> JSONResponse:
        text = body.get("critique")
        if not isinstance(text, str):
            raise ApiError(400, "`critique` is the text of your critique.", code="missing_critique")
        fid, stream = chat.revise(api_session(user), message_id, text, user)
        last = None
        for last in stream:
            pass
        revision = {"candidate_id": last.candidate_id, "text": last.text} if last and last.candidate_id else None
        return JSONResponse({"critique_id": fid, "message_id": message_id, "revision": revision,
                             "error": last.error if last else None})

    def correct(user: str, body: dict, message_id: str) -> JSONResponse:
        text = body.get("text")
        if not isinstance(text, str):
            raise ApiError(400, "`text` is what the reply should have said.", code="missing_text")
        return JSONResponse({"feedback_id": chat.correct(api_session(user), message_id, text, user),
                             "message_id": message_id})

    def accept(user: str, body: dict, candidate_id: str) -> JSONResponse:
        text = body.get("text")
        if text is not None and not isinstance(text, str):
            raise ApiError(400, "`text`, when given, is your edit of the revision.", code="invalid_text")
        cand = store.candidate(candidate_id)
        fid = chat.accept_revision(api_session(user), candidate_id, text, user)
        return JSONResponse({"feedback_id": fid, "message_id": cand["message_id"] if cand else None})

    def dismiss(user: str, body: dict, candidate_id: str) -> JSONResponse:
        chat.reject_revision(api_session(user), candidate_id)
        return JSONResponse({"dismissed": candidate_id})

    router.add_api_route("/v1/models", guarded(models), methods=["GET"], include_in_schema=False)
    router.add_api_route("/v1/chat/completions", guarded(completions), methods=["POST"], include_in_schema=False)
    for name, handler in (("rate", rate), ("critique", critique), ("correct", correct)):
        router.add_api_route(f"/v1/chatfb/messages/{{message_id}}/{name}", guarded(handler), methods=["POST"],
                             include_in_schema=False)
    for name, handler in (("accept", accept), ("dismiss", dismiss)):
        router.add_api_route(f"/v1/chatfb/revisions/{{candidate_id}}/{name}", guarded(handler), methods=["POST"],
                             include_in_schema=False)
    return router.routes


async def until_hangup(events: Iterator[str], stop: Callable[[], None]) -> AsyncIterator[str]:
    """Send `events` (made in worker threads: each step may wait for the model). When the client hangs
    up first, `stop()` stores the reply as stopped at once, as the UI's Stop does, and `events` is
    closed, ending the model's request, once the step under way is done."""
    lock = threading.Lock()  # a generator cannot be closed while another thread runs it

    def step() -> str | None:
        with lock:
            return next(events, None)

    def hang_up() -> None:
        stop()
        with lock:
            events.close()

    finished = False
    try:
        while (chunk := await run_in_threadpool(step)) is not None:
            yield chunk
        finished = True
    finally:
        if not finished:  # no awaiting here (the task may be cancelled): a thread does it
            threading.Thread(target=hang_up, name="api-hangup", daemon=True).start()


def _chain(first: ReplyUpdate, rest: Iterator[ReplyUpdate]) -> Iterator[ReplyUpdate]:
    yield first
    yield from rest
