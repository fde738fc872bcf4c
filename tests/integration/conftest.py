"""A real chatfb app for integration tests: `python app.py` in a temp data dir, which starts a
managed vLLM CPU server on the embedded model. One app per test session (startup takes ~1 min)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from . import space_venv  # the same module test_space.py imports

ROOT = Path(__file__).resolve().parents[2]
# Debian's chromium, driven by Playwright (tests/integration/test_browser.py, scripts/screenshots.py)
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
ADMIN_PASSWORD = "test-admin-pw"


@pytest.hookimpl(trylast=True)  # after -m/-k deselected what will not run
def pytest_collection_modifyitems(config, items):
    """Integration tests run after every unit test, in their own order (a stable sort). What they wait for
    starts now, while the unit tests run on about one core: the Space test's fresh venv (space_venv) and the
    session app (its model converted once, `python app.py` and its vLLM starting; the `app` fixture waits)."""
    items.sort(key=lambda item: item.get_closest_marker("integration") is not None)
    if config.option.collectonly:
        return
    if any(item.nodeid == space_venv.TEST_ID for item in items):
        space_venv.start()
    # this file's `app` (tests/ui/test_openai_api.py has one of its own)
    if any(item.get_closest_marker("integration") is not None and "app" in getattr(item, "fixturenames", ()) for item in items):
        _early.start(config._tmp_path_factory)


def pytest_sessionfinish(session, exitstatus):
    venv = space_venv.started()
    if venv is not None:
        venv.remove()
    _early.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningApp:
    def __init__(self, data_dir: Path, env: dict, proc: subprocess.Popen, url: str, log: Path):
        self.data_dir, self.env, self.proc, self.url, self.log = data_dir, env, proc, url, log

    @property
    def control(self) -> dict:
        return json.loads((self.data_dir / "run" / "control.json").read_text())

    def cli(self, *args, timeout=900, check=True, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
        """`chatfb *args` with the app's environment, and `env` (settings of this command alone) on top."""
        out = subprocess.run([sys.executable, "-m", "chatfb", *args], cwd=ROOT, env=dict(self.env, **(env or {})),
                             capture_output=True, text=True, timeout=timeout, **kw)
        if check and out.returncode != 0:
            raise AssertionError(f"chatfb {' '.join(args)} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        return out

    def snapshot_store(self):
        """A fresh consistent copy of the app's DuckDB file, opened read-only."""
        from chatfb.app.control import open_backend
        from chatfb.store.db import Store

        backend = open_backend(self.data_dir)
        try:
            return Store(backend.snapshot(), read_only=True)
        finally:
            backend.close()


def listen_addresses(port: int) -> list[str]:
    """The local addresses ("127.0.0.1:8000", "0.0.0.0:8000", "[::]:8000") of TCP listeners on `port`, from `ss`.
    Fails rather than returning nothing when `ss` is missing: an empty answer must not pass a check."""
    if shutil.which("ss") is None:
        pytest.fail("`ss` (Debian iproute2) is needed to see which address a server listens on")
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    return sorted({line.split()[3] for line in out.splitlines() if line.strip()})


def wait_until(predicate, timeout: float, what: str, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _embedded_model(cache: Path) -> Path:
    from chatfb.serving.model_files import resolve_model

    return resolve_model("embedded", cache)


def _model_cache(tmp_path_factory, environ=os.environ) -> Path:
    return Path(environ["CHATFB_TEST_MODEL_CACHE"]) if "CHATFB_TEST_MODEL_CACHE" in environ else tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def embedded_model(tmp_path_factory) -> Path:
    """The embedded model converted once (GGUF -> safetensors) for the whole session."""
    return _early.model() or _embedded_model(_model_cache(tmp_path_factory))


def launch_app(data_dir: Path, wait_ready: bool = True, own_cycles: dict | None = None, environ: dict | None = None,
               **extra_env) -> RunningApp:
    """Start `python app.py` on data_dir and (unless not `wait_ready`) wait until its model is ready.
    `own_cycles`: settings the app process alone gets (not RunningApp.env, which the tests' CLI commands use):
    those of the learning cycles the app starts itself (the admin tab's Train now, the schedule). A CLI's cycle
    runs in the app with the CLI's own settings (chatfb.cli.cycle_in_app), so these never reach it.
    `environ`: the environment to start from (default: this process's, now)."""
    port = free_port()
    env = dict(os.environ if environ is None else environ, CHATFB_DATA_DIR=str(data_dir), GRADIO_SERVER_PORT=str(port),
               CHATFB_VLLM_PORT=str(free_port()), CHATFB_ADMIN_PASSWORD=ADMIN_PASSWORD,
               CHATFB_RATE_LIMIT_PER_MINUTE="1000", CHATFB_MAX_TOKENS="64", CHATFB_REQUEST_TIMEOUT_S="60",
               GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               # The embedded 135M model's greedy answers flip on any training: the support-email adapter
               # answered 11 of 16 known-answer controls right against the base model's 10, yet lost 2
               # ("How many legs does a dog have?" became nonsense); with other rows beside it in the
               # store (another test order) the same recipe lost more. These tests are about promotion,
               # hot loading and rollback, so they let 4 of 16 through (the nonsense adapter loses far
               # more); the default (0) refuses it, and tests/learning/test_gate.py holds that rule.
               CHATFB_GATE_MAX_CONTROL_LOST="4")
    env.update(extra_env)
    log = data_dir.parent / f"app-{port}.log"
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=dict(env, **(own_cycles or {})), stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    running = RunningApp(data_dir, env, proc, f"http://127.0.0.1:{port}", log)
    running.t0 = t0
    if wait_ready:
        wait_until_ready(running)
    return running


def wait_until_ready(running: RunningApp) -> None:
    """Wait until a launched app's model and web server answer (600 s, 60 s); stop it and fail with its log if not."""
    proc, log = running.proc, running.log
    try:
        wait_until(lambda: proc.poll() is None and b"model ready" in log.read_bytes(), 600, "the app's model")
        wait_until(lambda: _answers(running.url), 60, "the app's web server", 0.2)
    except AssertionError:
        stop_app(running)
        raise AssertionError("app did not start:\n" + log.read_text()[-5000:])
    running.startup_s = time.perf_counter() - running.t0


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def stop_app(running: RunningApp, sig=signal.SIGTERM) -> None:
    try:
        os.killpg(running.proc.pid, sig)
        running.proc.wait(30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(running.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    # a managed vLLM runs in its own session: make sure it is gone too
    subprocess.run(["pkill", "-f", f"api_server.*--port {running.env['CHATFB_VLLM_PORT']}"], check=False)


# The cycles the session app starts itself are small. Only test_learning.py's Train now test starts one: it checks
# that the admin tab starts a cycle, shows its training progress and ends it evaluated, with the adapter's state
# matching the gate's decision; none of that depends on the size of the training (at the defaults, on every
# earlier test's feedback, it took 242 s of a CI run). A few steps, a little replay, a small held-out sample.
SMALL_APP_CYCLES = dict(CHATFB_TRAIN_MAX_STEPS="4", CHATFB_REPLAY_EXAMPLES="4", CHATFB_EVAL_MAX_EXAMPLES="4",
                        CHATFB_UPTAKE_MAX_ITEMS="4")


def _app_dir(root: Path, model: Path) -> Path:
    data_dir = root / "data"
    data_dir.mkdir()
    # reuse the converted model: the app finds it where it would have converted it
    (data_dir / "models").mkdir()
    os.symlink(model, data_dir / "models" / model.name)
    return data_dir


class EarlyApp:
    """The session app, started in a thread when collection ends (the model converted, `python app.py`
    launched without waiting) while the unit tests run; the `app` fixture waits until it is ready. It starts
    from the environment as collection left it: the unit tests' own settings (tests/conftest.py isolated_env)
    never reach it."""

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._model: Path | None = None
        self.running: RunningApp | None = None
        self.error: BaseException | None = None
        self._stopped = False

    def start(self, tmp_path_factory) -> None:
        environ = dict(os.environ)
        cache = _model_cache(tmp_path_factory, environ)  # temp folders made here, not beside the tests' own
        root = tmp_path_factory.mktemp("app")

        def run():
            try:
                self._model = _embedded_model(cache)
                if not self._stopped:
                    self.running = launch_app(_app_dir(root, self._model), wait_ready=False,
                                              own_cycles=SMALL_APP_CYCLES, environ=environ)
            except BaseException as e:  # raised again to the fixture that needs it
                self.error = e

        self._thread = threading.Thread(target=run, name="session-app", daemon=True)
        self._thread.start()

    def _join(self) -> bool:
        if self._thread is None:
            return False
        self._thread.join()
        if self.error is not None:
            raise self.error
        return True

    def model(self) -> Path | None:
        return self._model if self._join() else None

    def app(self) -> RunningApp | None:
        return self.running if self._join() else None

    def stop(self) -> None:
        """At the session's end: stop the app if no fixture did (a session that ended before it was needed)."""
        self._stopped = True
        if self._thread is not None:
            self._thread.join(600)
        if self.running is not None and self.running.proc.poll() is None:
            stop_app(self.running)


_early = EarlyApp()


@pytest.fixture(scope="session")
def app(tmp_path_factory, embedded_model):
    running = _early.app()
    if running is not None:
        wait_until_ready(running)
    else:
        running = launch_app(_app_dir(tmp_path_factory.mktemp("app"), embedded_model), own_cycles=SMALL_APP_CYCLES)
    yield running
    stop_app(running)


@pytest.fixture(scope="session")
def vllm_url(app) -> str:
    return app.control["vllm_url"]


@pytest.fixture
def http():
    with httpx.Client(timeout=30) as c:
        yield c
