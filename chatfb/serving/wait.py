"""`wait_until`: the one polling loop (a server coming up, a process group emptying, a cycle finishing)."""

from __future__ import annotations

import threading
import time
from typing import Callable


def wait_until(predicate: Callable[[], bool], timeout_s: float | None, every_s: float = 1.0,
               stop: threading.Event | None = None) -> bool:
    """Call `predicate` every `every_s` until it is true (True), `timeout_s` passed (None = never) or
    `stop` was set (False). The predicate may raise to end the wait early."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        if predicate():
            return True
        if deadline is not None and time.monotonic() >= deadline:
            return False
        pause = every_s if deadline is None else max(0.0, min(every_s, deadline - time.monotonic()))
        if stop is not None:
            if stop.wait(pause):
                return False
        else:
            time.sleep(pause)
