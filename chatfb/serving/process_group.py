"""Child process trees the app owns (the managed vLLM server, a learning cycle and its trainer).

Each child is started as the leader of its own session (`start_new_session=True`), so its whole
tree (vLLM's engine-core process, the cycle's trainer) shares one process group. `stop_groups`
ends those groups together within a deadline: SIGTERM first, SIGKILL for what is left.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess

from chatfb.serving.wait import wait_until

log = logging.getLogger(__name__)


def stop_groups(procs: list[subprocess.Popen], grace_s: float = 5.0) -> None:
    """SIGTERM each process's group, wait up to `grace_s` for all of them, then SIGKILL the rest.

    A group can outlive its leader (vLLM's engine core after the API server exited), so the
    wait is for the group to be empty, not for the leader."""
    groups = [p.pid for p in procs if p is not None]
    for pgid in groups:
        _signal_group(pgid, signal.SIGTERM)

    def empty() -> bool:
        for p in procs:
            if p is not None:
                p.poll()  # reap the leader, or it counts as a member while a zombie
        return not any(_group_alive(g) for g in groups)

    if wait_until(empty, grace_s, every_s=0.1):
        return
    for pgid in groups:
        if _group_alive(pgid):
            log.warning("process group %d did not stop in %.0fs; killing it", pgid, grace_s)
            _signal_group(pgid, signal.SIGKILL)
    for p in procs:
        if p is not None:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                log.error("process %d did not die after SIGKILL", p.pid)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:  # the group id was reused by someone else's process: ours is gone
        return False
