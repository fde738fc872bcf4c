"""Replay (the base model's own answers trained beside the feedback) against a small OpenAI-compatible server."""

import threading
from http.server import ThreadingHTTPServer

import pytest

from chatfb.serving.model_client import ModelClient
from chatfb.learning.worker import REPLAY_PROMPTS, replay_examples
from tests.fake_openai import Handler


@pytest.fixture
def server():
    class Five(Handler):
        words = 5

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Five)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    client = ModelClient(f"http://127.0.0.1:{srv.server_address[1]}", None, 10)
    yield client
    srv.shutdown()
    client.close()


def test_replay_keeps_finished_answers_with_their_prompts(server):
    rows = replay_examples(server, "chatfb-base", "Be kind.", count=6, max_tokens=50)
    assert len(rows) == 6
    assert rows[0]["prompt"] == [{"role": "system", "content": "Be kind."}, {"role": "user", "content": REPLAY_PROMPTS[0]}]
    assert rows[0]["completion"] == [{"role": "assistant", "content": "word0 word1 word2 word3 word4"}]


def test_replay_leaves_out_answers_cut_by_max_tokens(server):
    """An answer cut off mid-sentence would teach the model to stop mid-sentence."""
    assert replay_examples(server, "chatfb-base", "Be kind.", count=6, max_tokens=3) == []


def test_replay_count_zero_means_none(server):
    assert replay_examples(server, "chatfb-base", "Be kind.", count=0) == []
