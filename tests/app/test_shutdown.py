"""Shutdown leaves nothing behind: the managed server's and a learning cycle's whole process trees
are gone within 10 s of `Runtime.close()`, of SIGTERM and of Ctrl-C (SIGINT) to the app. The
children here are fakes that ignore SIGTERM and have a child of their own, like a busy vLLM with
its engine core or a cycle with its trainer; the real vLLM is in tests/integration/test_shutdown.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chatfb.app.runtime import Runtime
from chatfb.serving.vllm_server import ManagedVLLM

ROOT = Path(__file__).resolve().parents[2]

# A parent that ignores SIGTERM and keeps a child: both carry `mark` in their command line.
STUBBORN_TREE = ("import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                 "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)', sys.argv[1]]); time.sleep(300)")


def stubborn_tree(mark: str) -> list[str]:
    return [sys.executable, "-c", STUBBORN_TREE, mark]


def processes_mentioning(text: str) -> list[int]:
    """Live (not zombie) processes whose command line contains `text`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def wait_for(predicate, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


@pytest.fixture
def mark(tmp_path):
    m = f"chatfb-shutdown-test-{tmp_path.name}"
    yield m
    for pid in processes_mentioning(m):  # whatever a failing test left behind
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_starting_server_is_stopped_with_its_whole_group_in_seconds(tmp_path, mark):
    server = ManagedVLLM(tmp_path / "model", "chatfb-base", 1, tmp_path)  # port 1: never answers
    server.cmd = stubborn_tree(mark)
    server.port = 0  # any free port passes the bind check
    server.start(wait=False)
    assert wait_for(lambda: len(processes_mentioning(mark)) == 2, 20), "the fake server tree did not start"
    t0 = time.monotonic()
    server.stop()
    assert wait_for(lambda: not processes_mentioning(mark), 10 - (time.monotonic() - t0))
    assert time.monotonic() - t0 < 10


def some_feedback(store) -> None:
    cid = store.create_conversation("s1", "ann")
    store.add_message(cid, "user", "q")
    store.log_feedback(store.add_message(cid, "assistant", "r"), "correction", text="better r", user_name="ann")


def test_close_ends_a_running_learning_cycle_and_its_trainer(settings, mark):
    rt = Runtime.start(settings.with_(vllm_url="http://127.0.0.1:1"))
    rt.training_command = lambda work: stubborn_tree(mark)
    some_feedback(rt.store)  # else the cycle has nothing to do and starts no child
    assert rt.start_training()
    assert wait_for(lambda: len(processes_mentioning(mark)) == 2, 20), "the fake cycle did not start"
    t0 = time.monotonic()
    rt.close()
    assert wait_for(lambda: not processes_mentioning(mark), 10 - (time.monotonic() - t0))
    assert not rt.start_training()  # nothing new starts once closed


APP = """
import os, sys, time
from pathlib import Path
from chatfb.serve import install_shutdown_handlers
from chatfb.config import load_settings
from chatfb.app.runtime import Runtime
rt = Runtime.start(load_settings({}, data_dir=Path(sys.argv[1]), vllm_url="http://127.0.0.1:1"))
rt.training_command = lambda work: [sys.executable, "-c", sys.argv[2], os.environ["TREE_MARK"]]
cid = rt.store.create_conversation("s1", "ann")
rt.store.add_message(cid, "user", "q")
rt.store.log_feedback(rt.store.add_message(cid, "assistant", "r"), "correction", text="better r", user_name="ann")
install_shutdown_handlers(rt)
rt.start_training()
print("ready", flush=True)
time.sleep(300)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_app_leaves_no_learning_cycle_behind(tmp_path, mark, sig):
    app = subprocess.Popen([sys.executable, "-c", APP, str(tmp_path / "data"), STUBBORN_TREE], cwd=ROOT,
                           env=dict(os.environ, TREE_MARK=mark), stdout=subprocess.PIPE, text=True)
    try:
        assert app.stdout.readline().strip() == "ready"
        assert wait_for(lambda: len(processes_mentioning(mark)) == 2, 20), "the fake cycle did not start"
        t0 = time.monotonic()
        app.send_signal(sig)  # to the app only, as `kill PID` or a supervisor would
        app.wait(10)
        assert wait_for(lambda: not processes_mentioning(mark), 10 - (time.monotonic() - t0))
    finally:
        app.kill()
