"""Throttling for guesses at a secret (the admin password).

A few wrong guesses are free; after that each wrong guess doubles the wait before the next one
is even checked (1 s, 2 s, 4 s, ... up to `max_delay_s`), counted per client and, with a larger
free allowance, for all clients together (guesses spread over many addresses). A client's
failures are forgotten after `forget_after_s` without one, or when it gets the secret right.
With the defaults, 30 guesses from one client take about 3 hours instead of 3 seconds.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable

EVERYONE = "*"  # the key all failures also count against


@dataclass
class _Failures:
    count: int = 0
    last: float = 0.0


class GuessThrottle:
    def __init__(self, free_per_client: int = 5, free_overall: int = 50, base_delay_s: float = 1.0,
                 max_delay_s: float = 600.0, forget_after_s: float = 3600.0, max_clients: int = 10_000,
                 clock: Callable[[], float] = time.monotonic):
        self.free = {EVERYONE: free_overall}
        self.free_per_client = free_per_client
        self.base_delay_s = base_delay_s
        self.max_delay_s = max_delay_s
        self.forget_after_s = forget_after_s
        self.max_clients = max_clients
        self.clock = clock
        self._failures: dict[str, _Failures] = {}
        self._lock = threading.Lock()

    def wait_s(self, client: str) -> float:
        """Seconds before `client` may try again (0 = now): the longer of its own wait and everyone's."""
        now = self.clock()
        with self._lock:
            return max(self._wait(client, now), self._wait(EVERYONE, now))

    def failed(self, client: str) -> int:
        """Count a wrong guess by `client`; returns how many it has made (since it was last forgotten)."""
        now = self.clock()
        with self._lock:
            if len(self._failures) > self.max_clients:
                self._forget_old(now)
            for key in (client, EVERYONE):
                f = self._current(key, now)
                f.count += 1
                f.last = now
            return self._failures[client].count

    def succeeded(self, client: str) -> None:
        with self._lock:
            self._failures.pop(client, None)

    def _wait(self, key: str, now: float) -> float:
        f = self._failures.get(key)
        if f is None or now - f.last > self.forget_after_s:
            return 0.0
        over = f.count - self.free.get(key, self.free_per_client)
        if over < 0:
            return 0.0
        delay = min(self.base_delay_s * 2 ** min(over, 60), self.max_delay_s)
        return max(0.0, f.last + delay - now)

    def _current(self, key: str, now: float) -> _Failures:
        f = self._failures.get(key)
        if f is None or now - f.last > self.forget_after_s:
            f = self._failures[key] = _Failures()
        return f

    def _forget_old(self, now: float) -> None:
        for key in [k for k, f in self._failures.items() if now - f.last > self.forget_after_s]:
            del self._failures[key]
        excess = len(self._failures) - self.max_clients
        if excess > 0:  # a flood of addresses: drop the oldest clients (everyone's count stays)
            clients = sorted((k for k in self._failures if k != EVERYONE), key=lambda k: self._failures[k].last)
            for key in clients[:excess]:
                del self._failures[key]
