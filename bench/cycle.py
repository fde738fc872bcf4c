"""Running chatfb's own CLI from a benchmark: wall time and peak memory of the whole process tree."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path


class TreeMemory:
    """Peak RSS summed over a process and its descendants, sampled in a thread."""

    def __init__(self, pid: int, every_s: float = 0.2):
        import psutil

        self.proc, self.every_s, self.peak, self._stop = psutil.Process(pid), every_s, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
                total = 0
                for p in procs:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak = max(self.peak, total)
            except psutil.Error:
                pass
            self._stop.wait(self.every_s)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def run_cli(args: list[str], env: dict, log_path: Path, measure: bool = False) -> tuple[int, str, float, int]:
    """(exit code, stdout, wall seconds, peak tree RSS bytes) of `python -m chatfb ...`; stderr goes to log_path."""
    t0 = time.perf_counter()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "chatfb", *args], env=env, stdout=subprocess.PIPE, stderr=log)
        mem = TreeMemory(proc.pid) if measure else None
        out, _ = proc.communicate()
    peak = mem.stop() if mem else 0
    return proc.returncode, out.decode(), time.perf_counter() - t0, peak
