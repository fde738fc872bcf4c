"""The running app's parts, wired once: store, model server (managed or external), adapter
registry, chat service, control API and the optional nightly schedule.

`Runtime.start(settings)` returns at once; the model server comes up in the background and
`runtime.status` says how far it got (the UI shows it). `Runtime.close()` leaves no child behind:
the managed vLLM server and a running learning cycle (with its trainer) are each a process group
it ends within seconds, whether the server was starting or serving.

A learning cycle (schedule, "Train now", `python -m chatfb nightly` through the control API) runs in
a thread here with chatfb.learning.cycle.run_cycle, as the CLI runs one when no app does: the app owns
the store, so it prepares the job, the child process `python -m chatfb.learning.worker` computes (and
starts the trainer, `python -m chatfb.learning.train`), and the app records the result and promotes
through its registry.
"""

from __future__ import annotations

import logging
import subprocess
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

from chatfb.serving.adapters import AdapterRegistry, AdapterRouter
from chatfb.app.chat_service import ChatService
from chatfb.config import Settings
from chatfb.app.admin import AdminService
from chatfb.app.control import ControlServer
from chatfb.learning.cycle import CycleResult, apply_retention, child_command, launch, run_cycle, server_for_the_cycle
from chatfb.critique.judge import judge_for
from chatfb.serving.model_client import ModelClient
from chatfb.serving.process_group import stop_groups
from chatfb.serving.replicas import replica_set_for
from chatfb.store.db import Store
from chatfb.serving.vllm_server import ServerStartError
from chatfb.serving.wait import wait_until

log = logging.getLogger(__name__)


class Runtime:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.store = Store(settings.db_path)
        apply_retention(self.store, settings)
        self.router = AdapterRouter(settings.served_model_name)
        self.client = ModelClient(settings.base_url, settings.api_key, settings.request_timeout_s)
        self.replicas = replica_set_for(settings)  # None: one model server
        if self.replicas is None:
            self.registry = AdapterRegistry(self.store, [self.client], self.router, settings.data_dir)
        else:
            self.registry = AdapterRegistry.for_replicas(self.store, self.replicas, self.router, settings.data_dir)
        self.chat = ChatService(settings, self.store, self.client, self.router,
                                judge_for(settings.scorer, self.client, self._model_dir),
                                model_unavailable=self.model_unavailable)
        self.admin = AdminService(self.store, self.registry, cycles=self, settings=settings, client=self.client)
        self.control = ControlServer(self.admin, settings.data_dir)
        self.server = None
        self.status = "Preparing the model…"
        self.ready = threading.Event()
        self.training: subprocess.Popen | None = None  # a learning cycle's child process
        self._cycle_thread: threading.Thread | None = None
        self._cycles_started = 0
        self._last_cycle: tuple[int, dict] | None = None  # (number, CycleResult as a dict) of the last finished
        self._stop = threading.Event()
        self._children_lock = threading.Lock()  # close() and starting a child never interleave

    def _model_dir(self) -> Path:
        from chatfb.serving.model_files import resolve_model

        return resolve_model(self.settings.model, self.settings.data_dir)

    @classmethod
    def start(cls, settings: Settings) -> "Runtime":
        rt = cls(settings)
        rt.control.start({"vllm_url": settings.base_url, "served_model_name": settings.served_model_name})
        threading.Thread(target=rt._bring_up_model, name="model-startup", daemon=True).start()
        if settings.nightly_at:
            threading.Thread(target=rt._nightly_loop, name="nightly", daemon=True).start()
        return rt

    def _bring_up_model(self) -> None:
        s = self.settings
        t0 = time.perf_counter()
        try:
            if s.managed:
                from chatfb.serving.model_files import resolve_model
                from chatfb.serving.vllm_server import ManagedVLLM

                self.status = "Preparing the model files (first start converts the embedded model, ~1 min)…"
                path = resolve_model(s.model, s.data_dir)
                self.registry.base_model_dir = path  # adapters are checked against it before loading
                # the live shared adapter merged into the weights of our own single server (chatfb.serving.merged)
                self.registry.merging = s.serve_merged and s.vllm_replicas <= 1
                self.status = "Starting the model server (about a minute on a CPU)…"
                with self._children_lock:
                    if self._stop.is_set():
                        return
                    if s.vllm_replicas > 1:  # N replicas behind vllm-router on the same port
                        from chatfb.serving.managed_replicas import ManagedReplicas

                        self.server = ManagedReplicas.from_settings(s, path)
                    else:
                        self.server = ManagedVLLM.from_settings(s, path)
                self.server.on_restart = self.registry.restore
                self.server.start()  # waits until it serves; refuses to launch once close() has stopped it
            else:
                self.status = "Connecting to the model server…"
                if not wait_until(self.client.healthy, None, every_s=2.0, stop=self._stop):
                    return
            live = self.registry.restore()
            self.status = f"Model ready ({live or s.served_model_name})."
            self.ready.set()
            log.info("model ready in %.1fs", time.perf_counter() - t0)
        except ServerStartError as e:  # its message says what to do (e.g. a taken port: CHATFB_VLLM_PORT)
            log.error("model startup failed: %s", e)
            self.status = f"The model server could not start: {e}"
        except Exception as e:  # noqa: BLE001 - shown in the UI, details in the log
            log.exception("model startup failed")
            self.status = f"The model server could not start: {type(e).__name__}. See the app log."

    def model_unavailable(self) -> str | None:
        """Why a chat must not be sent to the managed model server now, for the log and the admin (None:
        it may be). Only a server this app started and proved its own takes chats; another process on
        its port never does. An external server is not ours to check: a request that fails says so."""
        if not self.settings.managed:
            return None
        if not self.ready.is_set():
            return self.status
        server = self.server
        if server is None or not server.up:
            return (server and server.error) or "the managed model server is not running (it is restarting or stopped)"
        return None

    # -- learning cycles --------------------------------------------------------------------
    def start_training(self, settings: Settings | None = None, promote: bool = True) -> int | None:
        """Start one learning cycle (None = one is running already); returns its number (cycle_status).
        `settings` are the cycle's (default: the app's), e.g. a CLI's; the model server stays the app's."""
        settings = (settings or self.settings).with_(
            data_dir=self.settings.data_dir, model=self.settings.model, served_model_name=self.settings.served_model_name,
            api_key=self.settings.api_key)
        with self._children_lock:
            if self._stop.is_set() or self.training_running():
                return None
            self._cycles_started += 1
            number = self._cycles_started
            log_path = self.training_log_path
            log_path.parent.mkdir(parents=True, exist_ok=True)
            log_path.write_bytes(b"")  # the admin tab and a waiting CLI read this cycle's log from its start
            self._cycle_thread = threading.Thread(target=self._run_cycle, args=(number, settings, promote),
                                                  name="learning-cycle", daemon=True)
            self._cycle_thread.start()
        return number

    def _run_cycle(self, number: int, settings: Settings, promote: bool) -> None:
        try:
            with open(self.training_log_path, "ab") as fh:
                result = run_cycle(self.store, self.registry, settings, promote, fh, server_for_the_cycle(self.settings),
                                   self.training_command, self._launch, self._stop.is_set)
            if result is None:  # the app is closing: its store with it
                return
        except Exception as e:  # noqa: BLE001 - the app keeps serving; the log says why
            log.exception("learning cycle %d failed", number)
            result = CycleResult(False, reason=f"the cycle failed in the app: {type(e).__name__}: {e}")
        with open(self.training_log_path, "a") as fh:
            fh.write(result.summary() + "\n")
        self._last_cycle = (number, result.__dict__)

    def _launch(self, command: list[str], output) -> subprocess.Popen | None:
        with self._children_lock:
            if self._stop.is_set():
                return None
            self.training = launch(command, output)  # close() ends its process group
            return self.training

    def training_command(self, *works: Path) -> list[str]:
        return child_command(*works)

    def cycle_status(self) -> dict:
        finished, result = self._last_cycle or (0, None)
        return {"running": self.training_running(), "finished": finished, "result": result}

    @property
    def training_log_path(self) -> Path:
        return self.settings.layout.nightly_log

    def training_running(self) -> bool:
        return self._cycle_thread is not None and self._cycle_thread.is_alive()

    def _nightly_loop(self) -> None:
        hh, mm = (int(x) for x in self.settings.nightly_at.split(":"))
        while True:
            now = datetime.now()
            nxt = now.replace(hour=hh, minute=mm, second=0, microsecond=0)
            if nxt <= now:
                nxt += timedelta(days=1)
            if self._stop.wait((nxt - now).total_seconds()):
                return
            if self.ready.is_set():
                log.info("scheduled learning cycle starting")
                self.start_training()

    def close(self, grace_s: float = 4.0) -> None:
        """Stop everything; the model server's and the learning cycle's process groups are ended
        together (SIGTERM, SIGKILL after `grace_s`), so no vLLM or trainer outlives the app."""
        with self._children_lock:
            self._stop.set()
            server, training = self.server, self.training
        stopping = []
        if server is not None:
            stopping.append(threading.Thread(target=server.stop, args=(grace_s,), name="vllm-stop"))
            stopping[-1].start()
        if training is not None:
            stop_groups([training], grace_s)
        for t in stopping:
            t.join()
        self.control.stop()
        self.client.close()
        if self.replicas is not None:
            self.replicas.close()
        self.store.close()
