"""Managed mode with several replicas: N local vLLM servers behind one vllm-router (CHATFB_VLLM_REPLICAS=N).

The router listens on CHATFB_VLLM_PORT, where one managed server would, so the rest of chatfb talks to
one URL either way; the replicas listen on CHATFB_VLLM_PORT + 2, + 3, ... (+ 1 is a CLI learning
cycle's own server). Every replica runs vLLM's filesystem LoRA resolver on the shared adapters folder,
so one restarted by its watchdog serves the live version again the first time a chat names it.
For tests here and for one big box with several GPUs; on a CPU the replicas share the cores.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable

import httpx

from chatfb.layout import DataLayout
from chatfb.serving.process_group import stop_groups
from chatfb.serving.replicas import resolver_env
from chatfb.serving.wait import wait_until
from chatfb.serving.vllm_server import ManagedVLLM, PortInUse, ServerStartError, port_in_use, vllm_options

log = logging.getLogger(__name__)

ROUTER_POLICY = "round_robin"  # every replica can serve every version (shared storage), so any policy works


def router_binary(name: str = "vllm-router") -> str:
    """The vllm-router executable: beside the running interpreter (a virtual environment's bin, which is
    not on PATH when a service manager runs its python without activating it), else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise ServerStartError(f"{name} is not installed (pip install vllm-router); it is needed for "
                               f"CHATFB_VLLM_REPLICAS > 1. Looked in {beside.parent} (beside {sys.executable}) "
                               f"and on PATH ({os.environ.get('PATH', '')})")
    return found


def router_command(binary: str, port: int, worker_urls: list[str]) -> list[str]:
    return [binary, "--host", "127.0.0.1", "--port", str(port), "--policy", ROUTER_POLICY,
            "--worker-urls", *worker_urls,
            # find a replica that died and came back within seconds, not the default minute
            "--health-check-interval-secs", "5"]


class ManagedRouter:
    """A `vllm-router` process on 127.0.0.1 in front of the replicas; its log is <data_dir>/logs/router.log."""

    def __init__(self, port: int, worker_urls: list[str], data_dir: Path, startup_timeout_s: float = 60.0):
        self.cmd = router_command(router_binary(), port, worker_urls)
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = DataLayout(Path(data_dir)).router_log
        self.startup_timeout_s = startup_timeout_s
        self._proc: subprocess.Popen | None = None

    def start(self) -> None:
        if port_in_use(self.port):
            raise PortInUse(self.port)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as logfile:
            self._proc = subprocess.Popen(self.cmd, stdout=logfile, stderr=subprocess.STDOUT, start_new_session=True)

        def up() -> bool:
            if self._proc.poll() is not None:
                raise ServerStartError(f"vllm-router exited with code {self._proc.returncode}; see {self.log_path}")
            try:
                return httpx.get(self.url + "/health", timeout=2.0).status_code == 200
            except httpx.HTTPError:
                return False

        if wait_until(up, self.startup_timeout_s, every_s=0.5):
            log.info("vllm-router ready at %s", self.url)
            return
        raise ServerStartError(f"vllm-router did not become healthy in {self.startup_timeout_s:.0f}s; see {self.log_path}")

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, grace_s: float = 5.0) -> None:
        stop_groups([self._proc], grace_s)


class ManagedReplicas:
    """N ManagedVLLM replicas and a ManagedRouter, started and stopped as one (the Runtime's model server)."""

    def __init__(self, model_path: Path, served_name: str, port: int, data_dir: Path, replicas: int,
                 shared_dir: Path, **vllm_kwargs):
        Path(shared_dir).mkdir(parents=True, exist_ok=True)  # the resolver refuses a missing folder
        self.replicas = [ManagedVLLM(model_path, served_name, port + 2 + i, data_dir, env=resolver_env(shared_dir),
                                     log_role=str(i), **vllm_kwargs) for i in range(replicas)]
        self.router = ManagedRouter(port, [r.url for r in self.replicas], data_dir)
        self.url = self.router.url

    @classmethod
    def from_settings(cls, settings, model_path: Path) -> "ManagedReplicas":
        """CHATFB_VLLM_REPLICAS servers for the model folder `model_path`, as `settings` describe them."""
        return cls(model_path, settings.served_model_name, settings.vllm_port, settings.data_dir, settings.vllm_replicas,
                   settings.shared_adapters_dir, **vllm_options(settings))

    @property
    def on_restart(self) -> Callable[[], None] | None:
        return self.replicas[0].on_restart

    @on_restart.setter
    def on_restart(self, callback: Callable[[], None] | None) -> None:
        for r in self.replicas:  # not needed with the resolver, but checks the restarted replica at once
            r.on_restart = callback

    @property
    def ready(self) -> bool:
        return self.router.alive() and all(r.serving() for r in self.replicas)

    @property
    def up(self) -> bool:
        """The router runs and at least one replica is proven ours and alive (no request made)."""
        return self.router.alive() and any(r.up for r in self.replicas)

    @property
    def error(self) -> str | None:
        return next((r.error for r in self.replicas if r.error), None)

    def start(self) -> None:
        """Launch every replica at once, wait for all, then put the router in front of them."""
        for r in self.replicas:
            r.start(wait=False)
        for r in self.replicas:
            r.wait_ready()
        self.router.start()

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop the router and every replica together, within `grace_s` plus a moment."""
        stopping = [threading.Thread(target=p.stop, args=(grace_s,)) for p in (self.router, *self.replicas)]
        for t in stopping:
            t.start()
        for t in stopping:
            t.join()
