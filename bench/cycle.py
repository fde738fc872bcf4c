"""Running chatfb's own CLI from a benchmark: wall time and peak memory of the whole process tree."""

from __future__ import annotations

import signal
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
        try:
            out, _ = proc.communicate()
        except BaseException:  # the benchmark is stopped: Ctrl-C stops the cycle and its trainer too
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    peak = mem.stop() if mem else 0
    return proc.returncode, out.decode(), time.perf_counter() - t0, peak


def learning_cycle(label: str, data_dir: Path, rows: list[dict], server, api_key: str | None,
                   setup: list[list[str]] = (), trusted: bool = True, **env_extra: str) -> dict:
    """Import `rows` into a fresh chatfb data folder, run the `setup` commands (each `python -m chatfb ...`
    arguments, e.g. ["guidelines", "add", TEXT]) and `python -m chatfb nightly --no-promote` there against the
    benchmark's server (external mode). `trusted`: import the rows with `--trusted` (the operator vouches
    for them); no `rows`: no import (a benchmark that wrote the store itself). Returns the cycle's JSON
    summary (or a failure reason), the import and cycle wall times, the cycle's peak RSS and the log path."""
    import json
    import os

    data_dir.mkdir(parents=True, exist_ok=True)
    feedback = data_dir / "feedback.jsonl"
    feedback.write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = dict(os.environ, CHATFB_DATA_DIR=str(data_dir), CHATFB_VLLM_URL=server.url, CHATFB_MODEL=str(server.model_dir),
               CHATFB_SERVED_MODEL_NAME="chatfb-base", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **env_extra)
    if api_key:
        env["CHATFB_API_KEY"] = api_key
    log_path = data_dir / "cycle.log"
    # the benchmark's own data, by default vouched for by its operator: it may teach the shared adapter
    # (chatfb.learning.trust)
    import_s = 0.0
    if rows:
        code, _, import_s, _ = run_cli(["import-feedback", str(feedback), *(["--trusted"] if trusted else [])], env, log_path)
        if code != 0:
            raise RuntimeError(f"{label}: import-feedback failed ({code}); see {log_path}")
    for command in setup:
        if run_cli(command, env, log_path)[0] != 0:
            raise RuntimeError(f"{label}: {' '.join(command[:2])} failed; see {log_path}")
    print(f"[{label}] learning cycle (log: {log_path}) ...", flush=True)
    code, out, wall, peak = run_cli(["nightly", "--no-promote"], env, log_path, measure=True)
    try:
        summary = json.loads(out)
    except ValueError:
        summary = {"ok": False, "reason": f"no summary (exit {code})"}
    return {"summary": summary, "import_s": import_s, "wall_s": wall, "peak_bytes": peak, "log_path": log_path}
