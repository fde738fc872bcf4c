"""SIGTERM to `python app.py` while its real managed vLLM is still starting: within 10 s nothing of
that data folder runs any more, vLLM's engine core included. (Serving and training, and Ctrl-C,
are covered with fakes in tests/test_shutdown.py; the stop path is the same process-group stop.)"""

import os
import signal
from pathlib import Path

import pytest

from tests.app.test_shutdown import processes_mentioning, wait_for

from .conftest import launch_app, stop_app

pytestmark = pytest.mark.integration


def group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def test_sigterm_while_vllm_starts_leaves_nothing_behind(tmp_path, embedded_model):
    data_dir = tmp_path / "data"
    (data_dir / "models").mkdir(parents=True)
    os.symlink(embedded_model, data_dir / "models" / embedded_model.name)
    app = launch_app(data_dir, wait_ready=False)
    try:
        def vllm_pids():
            return [p for p in processes_mentioning(str(data_dir)) if p != app.proc.pid]
        assert wait_for(vllm_pids, 120), "vLLM did not start:\n" + app.log.read_text()[-3000:]
        vllm_group = os.getpgid(vllm_pids()[0])
        wait_for(lambda: len(group_members(vllm_group)) > 1, 20)  # its engine core, if it gets that far
        os.kill(app.proc.pid, signal.SIGTERM)  # the app only: its children are in their own groups
        assert wait_for(lambda: app.proc.poll() is not None and not processes_mentioning(str(data_dir))
                        and not group_members(vllm_group), 10), app.log.read_text()[-3000:]
    finally:
        stop_app(app)
