"""Shared fixtures: a temp data dir per test, a real DuckDB store, and a fake model client.

Integration fixtures (a real app with a managed vLLM server) live in tests/integration/conftest.py.
"""

from __future__ import annotations

import os

import pytest

from chatfb.config import load_settings
from chatfb.serving.model_client import ModelClient, ModelError
from chatfb.store.db import Store


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    """Every test starts without the developer's CHATFB_* settings and with its data in a temp folder,
    so a CLI or settings test reads only what it sets itself. CHATFB_TEST_* (harness options such as the
    model cache) stay. The session app starts from the environment as collection left it (tests/integration/
    conftest.py), and its environment is kept in `RunningApp.env`, so integration tests keep their own settings."""
    for name in list(os.environ):
        if name.startswith("CHATFB_") and not name.startswith("CHATFB_TEST_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("CHATFB_DATA_DIR", str(tmp_path / "data"))


@pytest.fixture
def settings(tmp_path):
    # stream_every_s=0: every word of a fake reply is its own update, so tests can step through a reply
    return load_settings({}, data_dir=tmp_path / "data", rate_limit_per_minute=1000, stream_every_s=0)


@pytest.fixture
def store(settings):
    s = Store(settings.db_path)
    yield s
    s.close()


class FakeModelClient:
    """Replies with queued texts (or raises a queued ModelError); remembers every request."""

    base_url = "http://127.0.0.1:9/fake-vllm"

    def __init__(self):
        self.queue: list = []
        self.history: list[dict] = []
        self.loaded: dict[str, str] = {}
        self.refuse_load = False
        self.health_waits = 0
        self.follows: tuple = ()
        # Replies for requests held to a regex (structured outputs): the in-loop revision asks them while it
        # streams the sampled drafts, so they have a queue of their own; empty, such a request is refused (400)
        # like a server without structured outputs.
        self.held: list = []
        self.stream_finish: str | None = None  # the finish reason a streamed reply reports ("length": cut off)

    def enqueue(self, *replies):
        self.queue.extend(replies)

    def _next(self):
        item = self.queue.pop(0) if self.queue else "ok"
        if isinstance(item, Exception):
            raise item
        return item

    def stream_chat(self, messages, model, max_tokens=256, temperature=0.7, top_p=0.95, result=None, regex=None):
        """A queued reply, word by word. With `regex`, as a server honouring structured outputs (see complete_choices)."""
        import re

        self.history.append({"messages": messages, "model": model, "regex": regex})
        text = self._next()
        if regex is not None and not re.fullmatch(regex, text):
            raise AssertionError(f"a server holding to {regex!r} could not reply {text!r}")
        words = text.split(" ")
        for i, word in enumerate(words):
            piece = word if not result.text else " " + word
            result.text += piece
            if result.ttft_ms is None:
                result.ttft_ms = 1.0
            if i == len(words) - 1 and self.stream_finish is not None:
                result.finish_reason = self.stream_finish  # with the last piece, as vLLM's last chunk says it
            yield piece

    def complete(self, messages, model, max_tokens=256, temperature=0.0, top_p=1.0, n=1):
        # One queue with the drafts' requests: the nightly asks a critique's plain answer (this) beside its drafts,
        # so a test of the real chatfb.learning.worker.select_all cannot know which takes a queued reply first
        # (tests/learning/test_gate.py scripts chatfb.critique.candidates instead).
        self.history.append({"messages": messages, "model": model, "n": n})
        return [self._next() for _ in range(n)]

    def complete_choices(self, messages, model, max_tokens=256, temperature=0.8, top_p=0.95, n=1, regex=None):
        """n queued replies. With `regex`, as a server honouring structured outputs: each reply matches
        it, or the test queued a reply the server could never have sent."""
        self.history.append({"messages": messages, "model": model, "n": n, "regex": regex})
        return [(text, "stop") for text in self._choices(n, regex)]

    def _choices(self, n, regex):
        import re

        if regex is not None:
            if not self.held:
                raise ModelError("The model server refused the request (400): structured outputs", 400)
            texts = [self.held.pop(0) for _ in range(n)]
            for item in texts:
                if isinstance(item, Exception):
                    raise item
        else:
            texts = [self._next() for _ in range(n)]
        for text in texts:
            if regex is not None and not re.fullmatch(regex, text):
                raise AssertionError(f"a server holding to {regex!r} could not reply {text!r}")
        return texts

    def stream_choices(self, messages, model, n=1, max_tokens=256, temperature=0.8, top_p=0.95, finish_reasons=None,
                       regex=None):
        """n queued replies, streamed word by word, interleaved like vLLM's choices (with `regex`, the held
        ones, as `complete_choices`)."""
        self.history.append({"messages": messages, "model": model, "n": n, "regex": regex})
        texts = self._choices(n, regex)
        words = [t.split(" ") for t in texts]
        for step in range(max(len(w) for w in words)):
            for i, w in enumerate(words):
                if step < len(w):
                    yield i, (" " if step else "") + w[step]
        for i in range(n):
            if finish_reasons is not None:
                finish_reasons[i] = "stop"

    def completion_logprobs(self, messages, completion, model):
        """Canned judge: a reply is likelier with the critique in the prompt when it contains one of
        `self.follows` (words the critique asked for); otherwise the critique changes nothing."""
        from chatfb.critique.candidates import INSTRUCTION

        marker = INSTRUCTION.split("{question}")[1].split("{critique}")[0].strip(' \n"')
        instructed = marker in messages[-1]["content"]
        follows = any(w in completion for w in self.follows)
        return [-1.0 if instructed and follows else -2.0]

    def models(self):
        return ["chatfb-base", *self.loaded]

    names = None  # served under their own names (chatfb.serving.merged)
    served = ModelClient.served
    has = ModelClient.has

    def load_adapter(self, name, path, names=None):
        if self.refuse_load:
            raise ModelError("The model server refused the request (400): bad adapter")
        if name in self.loaded:
            raise ModelError("The model server refused the request (400): already loaded")
        self.loaded[name] = path

    def unload_adapter(self, name, names=None):
        self.loaded.pop(name, None)

    unload_adapter_quietly = ModelClient.unload_adapter_quietly  # the real one, over this unload_adapter

    def healthy(self):
        return True

    def wait_healthy(self, timeout_s, every_s=2.0):
        self.health_waits += 1
        return self.healthy()

    def close(self):
        pass


@pytest.fixture
def fake_client():
    return FakeModelClient()
