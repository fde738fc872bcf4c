"""HTTP client for a vLLM OpenAI-compatible server: streaming chat, plain completions, LoRA admin.

Errors become `ModelError` with a message that is safe to show a chat user (no URLs, no traces).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Iterator

import httpx


class ModelError(RuntimeError):
    """The model server failed a request; str(e) is safe to show a user.

    `status` is the HTTP status the server answered with, None when it did not answer (down or
    restarting) and "timeout" when it answered too slowly. `unavailable` tells batch work that
    the same request may succeed once the server is back (down, or a 5xx while its engine restarts)."""

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

    def close(self) -> None:
        self._http.close()

    # -- health and models --------------------------------------------------------------
    def healthy(self) -> bool:
        try:
            return self._http.get("/health", timeout=3.0).status_code == 200
        except httpx.HTTPError:
            return False

    def models(self) -> list[str]:
        r = self._call("GET", "/v1/models")
        return [m["id"] for m in r.json().get("data", [])]

    # -- generation -----------------------------------------------------------------------
    def stream_chat(self, messages: list[dict], model: str, max_tokens: int = 256, temperature: float = 0.7,
                    top_p: float = 0.95, result: StreamResult | None = None, seed: int | None = None) -> Iterator[str]:
        """Yield text deltas; fills `result` (timings, token counts) as it goes."""
        result = result if result is not None else StreamResult()
        body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature,
                "top_p": top_p, "stream": True, "stream_options": {"include_usage": True}}
        if seed is not None:
            body["seed"] = seed
        try:
            with self._http.stream("POST", "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    r.read()
                    raise ModelError(_http_message(r), r.status_code)
                for line in r.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if chunk.get("usage"):
                        result.prompt_tokens = chunk["usage"].get("prompt_tokens")
                        result.completion_tokens = chunk["usage"].get("completion_tokens")
                    for choice in chunk.get("choices", []):
                        delta = (choice.get("delta") or {}).get("content") or ""
                        if choice.get("finish_reason"):
                            result.finish_reason = choice["finish_reason"]
                        if delta:
                            if result.ttft_ms is None:
                                result.ttft_ms = (time.perf_counter() - result.started) * 1000
                            result.text += delta
                            yield delta
        except httpx.TimeoutException:
            raise ModelError("The model took too long to answer. Please try again.", "timeout") from None
        except (httpx.HTTPError, json.JSONDecodeError):
            raise ModelError("The model server is not reachable right now. Please try again in a moment.") from None
        finally:
            result.latency_ms = (time.perf_counter() - result.started) * 1000

    def complete(self, messages: list[dict], model: str, max_tokens: int = 256, temperature: float = 0.0,
                  top_p: float = 1.0, n: int = 1, seed: int | None = None) -> list[str]:
        """Non-streaming chat completion; returns the n choices' texts."""
        body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature,
                "top_p": top_p, "n": n}
        if seed is not None:
            body["seed"] = seed
        r = self._call("POST", "/v1/chat/completions", json=body)
        return [c["message"]["content"] or "" for c in r.json()["choices"]]

    def complete_finished(self, messages: list[dict], model: str, max_tokens: int = 256) -> str | None:
        """Greedy reply, or None when max_tokens cut it off (finish_reason "length")."""
        r = self._call("POST", "/v1/chat/completions", json={"model": model, "messages": messages,
                                                               "max_tokens": max_tokens, "temperature": 0.0})
        choice = r.json()["choices"][0]
        return None if choice.get("finish_reason") == "length" else (choice["message"]["content"] or "")

    # -- LoRA adapters --------------------------------------------------------------------
    def load_adapter(self, name: str, path: str) -> None:
        self._call("POST", "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})

    def unload_adapter(self, name: str) -> None:
        self._call("POST", "/v1/unload_lora_adapter", json={"lora_name": name})

    def _call(self, method: str, url: str, **kw) -> httpx.Response:
        try:
            r = self._http.request(method, url, **kw)
        except httpx.TimeoutException:
            raise ModelError("The model server timed out.", "timeout") from None
        except httpx.HTTPError:
            raise ModelError("The model server is not reachable right now.") from None
        if r.status_code != 200:
            raise ModelError(_http_message(r), r.status_code)
        return r

    def wait_healthy(self, timeout_s: float, every_s: float = 2.0) -> bool:
        """Poll /health until it answers 200 (True) or timeout_s passes (False)."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.healthy():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(every_s)


def _http_message(r: httpx.Response) -> str:
    try:
        detail = r.json()
        detail = detail.get("error", {}).get("message") if isinstance(detail.get("error"), dict) else detail.get("message", "")
    except ValueError:
        detail = r.text
    detail = " ".join(str(detail or "").split())[:300]
    return f"The model server refused the request ({r.status_code}): {detail}" if detail else \
        f"The model server refused the request ({r.status_code})."
