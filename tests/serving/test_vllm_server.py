"""ManagedVLLM uses only a server it started: a taken port is refused before anything starts, a
foreign server on its port is never taken for its own, and a dead server whose port someone else
took is not restarted in a loop. The "server" here is tests/fake_openai.py; no vLLM runs."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from chatfb.app.chat_service import MODEL_UNAVAILABLE
from chatfb.app.runtime import Runtime
from chatfb.serving.model_client import served_root
from chatfb.serving.vllm_server import ManagedVLLM, PortInUse, ServerStartError, port_in_use

FAKE = Path(__file__).parents[1] / "fake_openai.py"
SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]  # "our vLLM": alive, never answers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_fake(port: int, root: str = "/another/chatfb/models/SmolLM2") -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, str(FAKE), str(port), "5", "0", root])
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError("the fake model server did not start")


@pytest.fixture
def servers():
    started = []
    yield started
    for p in started:
        if isinstance(p, ManagedVLLM):
            p.stop(grace_s=1)
        else:
            p.kill()
            p.wait()


def managed(tmp_path, port, cmd=SLEEPER, timeout_s=5.0) -> ManagedVLLM:
    server = ManagedVLLM(tmp_path / "models" / "SmolLM2", "chatfb-base", port, tmp_path, startup_timeout_s=timeout_s)
    server.cmd = list(cmd)
    return server


def test_a_taken_port_is_refused_at_once_and_nothing_starts(tmp_path, servers):
    port = free_port()
    servers.append(start_fake(port))
    server = managed(tmp_path, port)
    servers.append(server)
    t0 = time.monotonic()
    with pytest.raises(PortInUse, match="CHATFB_VLLM_PORT") as err:
        server.start(wait=True)
    assert time.monotonic() - t0 < 2
    assert str(port) in str(err.value)
    assert server._proc is None  # no process was started


def test_the_app_says_the_port_is_taken_and_does_not_chat_through_it(settings, tmp_path, servers):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    port = free_port()
    servers.append(start_fake(port))
    rt = Runtime(settings.with_(model=str(model), vllm_port=port))
    try:
        rt._bring_up_model()  # what Runtime.start runs in its startup thread
        if rt.server is not None:
            servers.append(rt.server)
        assert "CHATFB_VLLM_PORT" in rt.status and f"Port {port}" in rt.status
        assert not rt.ready.is_set() and rt.server._proc is None
        cid, stream = rt.chat.send("s1", None, "hello")
        last = list(stream)[-1]
        assert last.error == MODEL_UNAVAILABLE and "word0" not in last.text  # the foreign server was not asked
        reply = rt.store.messages(cid)[-1]
        assert (reply["status"], reply["error"]) == ("failed", MODEL_UNAVAILABLE)
        assert f"Port {port}" in rt.model_unavailable()  # what the log (and the status line) says
    finally:
        rt.store.close()


def test_no_chat_goes_to_the_port_once_our_server_died(settings, tmp_path, servers):
    port = free_port()
    root = tmp_path / "models" / "SmolLM2"
    server = managed(tmp_path, port, cmd=[sys.executable, str(FAKE), str(port), "5", "0", str(root)])
    servers.append(server)
    server.start(wait=True)
    rt = Runtime(settings.with_(model=str(root), vllm_port=port))
    try:
        rt.server = server
        rt.ready.set()
        assert server.up and rt.model_unavailable() is None
        server._proc.kill()
        server._proc.wait()
        assert not server.up and rt.model_unavailable()
        cid, stream = rt.chat.send("s1", None, "hello")
        assert list(stream)[-1].error == MODEL_UNAVAILABLE
    finally:
        rt.store.close()


def test_a_foreign_server_that_takes_the_port_after_the_check_is_never_ours(tmp_path, servers):
    port = free_port()
    server = managed(tmp_path, port, timeout_s=3)
    servers.append(server)
    server.start(wait=False)  # our process runs (and never binds); then someone else takes the port
    servers.append(start_fake(port))
    time.sleep(3)  # past the watchdog's check interval: it must not call the foreign server ours
    with pytest.raises(ServerStartError):
        server.wait_ready()


def test_our_own_server_is_ready(tmp_path, servers):
    port = free_port()
    server = managed(tmp_path, port, cmd=[sys.executable, str(FAKE), str(port), "5", "0",
                                          str(tmp_path / "models" / "SmolLM2")])
    servers.append(server)
    server.start(wait=True)
    assert server._proc.poll() is None and served_root(server.url) == str(tmp_path / "models" / "SmolLM2")


def test_no_restart_loop_when_someone_else_takes_the_port_of_a_dead_server(tmp_path, servers):
    port = free_port()
    ours = [sys.executable, str(FAKE), str(port), "5", "0", str(tmp_path / "models" / "SmolLM2")]
    server = managed(tmp_path, port, cmd=ours)
    servers.append(server)
    restored = []
    server.on_restart = lambda: restored.append(1)
    server.start(wait=True)
    launches, launch = [], server._launch
    server._launch = lambda: (launches.append(1), launch())[1]
    server._proc.kill()
    server._proc.wait()
    servers.append(start_fake(port))  # another instance's server, on the port ours had
    deadline = time.monotonic() + 10
    while server.error is None and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(3)  # long enough for a second restart, if there were a loop
    assert server.error is not None and "CHATFB_VLLM_PORT" in server.error
    assert len(launches) == 1 and not restored


def test_port_check():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.listen()
        assert port_in_use(port)
    assert not port_in_use(port)
