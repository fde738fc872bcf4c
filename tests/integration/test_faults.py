"""Faults with real processes and a real DuckDB file. The model here is tests/fake_openai.py (a
process we can flood and kill cheaply); faults of the real vLLM server are in test_vllm_faults.py."""

import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from gradio_client import Client

from chatfb.store.db import Store

from .conftest import ROOT, free_port, launch_app, stop_app, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def fake_model():
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fake_openai.py"), str(port), "5", "0.01"])
    import httpx

    wait_until(lambda: _ok(httpx, f"http://127.0.0.1:{port}/health"), 20, "the fake model server", 0.2)
    yield f"http://127.0.0.1:{port}"
    proc.kill()


def _ok(httpx, url):
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_fifty_concurrent_sessions_keep_their_own_rows(tmp_path, fake_model):
    app = launch_app(tmp_path / "data", CHATFB_VLLM_URL=fake_model)
    try:
        def session(i):
            c = Client(app.url, verbose=False)
            shown = c.predict(f"message from session {i}", "", api_name="/send")[0]
            assert shown[-1]["content"][0]["text"].startswith("word0"), f"session {i} got {shown[-1]}"
            note = c.predict(f"critique {i}", api_name="/critique")[0]
            assert note.startswith("✅"), f"session {i}'s critique refused: {note!r}"
            return i

        with ThreadPoolExecutor(50) as pool:
            assert sorted(pool.map(session, range(50))) == list(range(50))
    finally:
        stop_app(app)
    with Store(tmp_path / "data" / "chatfb.duckdb") as s:
        counts = s.counts()
        assert (counts["conversations"], counts["messages"], counts["feedback"]) == (50, 100, 50), \
            "50 sessions of one turn and one critique each: (conversations, messages, feedback)"
        rows = s._q("SELECT c.session_id, list(m.content ORDER BY m.seq), any_value(f.text) FROM conversations c"
                    " JOIN messages m ON m.conversation_id = c.id JOIN feedback f ON f.session_id = c.session_id"
                    " GROUP BY c.session_id")
        assert len(rows) == 50, f"{len(rows)} sessions have a conversation with feedback, not 50"
        for session, contents, critique in rows:
            n = contents[0].rsplit(" ", 1)[1]
            assert critique == f"critique {n}" and contents[1] == "word0 word1 word2 word3 word4", \
                f"session {session}'s rows are mixed with another's: {contents} / {critique!r}"


def test_kill_9_during_feedback_burst_loses_no_acknowledged_row(tmp_path, fake_model):
    app = launch_app(tmp_path / "data", CHATFB_VLLM_URL=fake_model)
    acked, stop = [], threading.Event()
    clients = []
    for i in range(4):
        c = Client(app.url, verbose=False)
        c.predict(f"hello {i}", "", api_name="/send")
        clients.append(c)

    def burst(i, c):
        n = 0
        while not stop.is_set():
            text = f"critique {i}-{n}"
            try:
                if c.predict(text, api_name="/critique")[0].startswith("✅"):
                    acked.append(text)
            except Exception:  # the app died under us: this one was not acknowledged
                return
            n += 1

    threads = [threading.Thread(target=burst, args=(i, c)) for i, c in enumerate(clients)]
    for t in threads:
        t.start()
    wait_until(lambda: len(acked) >= 40, 60, "a burst of acknowledged feedback", 0.05)
    app.proc.send_signal(signal.SIGKILL)
    app.proc.wait(10)
    stop.set()
    for t in threads:
        t.join(30)
    with Store(tmp_path / "data" / "chatfb.duckdb") as s:  # opening replays the WAL
        stored = {r[0] for r in s._q("SELECT text FROM feedback")}
        assert set(acked) <= stored, f"lost {len(set(acked) - stored)} acknowledged rows"
        pending = s._q("SELECT count(*) FROM messages WHERE role = 'assistant' AND status = 'pending'")[0][0]
        assert pending == 0, f"{pending} replies left pending after the crash"
        assert s.counts()["messages"] == 8, "4 turns before the burst: 8 messages"
    stop_app(app)
    # and the app starts again on the same file
    app2 = launch_app(tmp_path / "data", CHATFB_VLLM_URL=fake_model)
    try:
        shown = Client(app2.url, verbose=False).predict("still here?", "", api_name="/send")[0]
        assert shown[-1]["role"] == "assistant", f"no reply after restarting on the crashed file: {shown}"
    finally:
        stop_app(app2)


def test_model_server_down_then_back(tmp_path):
    port = free_port()
    start = lambda: subprocess.Popen([sys.executable, str(ROOT / "tests" / "fake_openai.py"), str(port), "5", "0.01"])
    model = start()
    app = launch_app(tmp_path / "data", CHATFB_VLLM_URL=f"http://127.0.0.1:{port}", CHATFB_REQUEST_TIMEOUT_S="5")
    try:
        c = Client(app.url, verbose=False)
        text = c.predict("first", "", api_name="/send")[0][-1]["content"][0]["text"]
        assert text.startswith("word0"), f"no reply with the model server up: {text!r}"
        model.kill()
        model.wait()
        text = c.predict("second", "", api_name="/send")[0][-1]["content"][0]["text"]
        assert "not reachable" in text and "Traceback" not in text and str(port) not in text, \
            f"the model server down must be one plain line, no trace or address: {text!r}"
        model = start()
        import httpx

        wait_until(lambda: _ok(httpx, f"http://127.0.0.1:{port}/health"), 20, "the model server again", 0.2)
        text = c.predict("third", "", api_name="/send")[0][-1]["content"][0]["text"]
        assert text.startswith("word0"), f"no reply once the model server is back: {text!r}"
    finally:
        stop_app(app)
        model.kill()
    with Store(tmp_path / "data" / "chatfb.duckdb") as s:
        assert [r[0] for r in s._q("SELECT status FROM messages WHERE role = 'assistant' ORDER BY created_at")] == \
            ["ok", "failed", "ok"]
