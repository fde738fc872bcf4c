"""The Space test's fresh virtual environment, installed while the unit tests run.

`pip install -r requirements.txt` into a new venv takes about two minutes here, nearly all of it on one core (it
unpacks wheels). The unit tests run first (tests/integration/conftest.py orders the integration tests last) and
use about one core, so the install starts as soon as the session knows it will run the Space test, in a thread,
and test_space.py waits for it. What it installs, and how, is exactly what the test did itself."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TEST_ID = "tests/integration/test_space.py::test_space_start_in_a_fresh_venv"


class SpaceVenv:
    """`python -m venv` + `pip install --no-compile -r requirements.txt` in a thread of its own."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.python = folder / "venv" / "bin" / "python"
        self.error: str | None = None
        self._proc: subprocess.Popen | None = None
        self._stopped = False
        self._thread = threading.Thread(target=self._install, name="space-venv", daemon=True)

    def start(self) -> SpaceVenv:
        self._thread.start()
        return self

    def _run(self, args: list[str]) -> tuple[int, str]:
        with subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as proc:
            self._proc = proc
            if self._stopped:  # stop() came between two commands
                proc.kill()
            try:
                _, err = proc.communicate(timeout=1800)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
            return proc.returncode, err

    def _install(self) -> None:
        try:
            code, err = self._run([sys.executable, "-m", "venv", str(self.python.parents[1])])
            if code == 0:
                # --no-compile: the packages are the same; byte-compiling all of them (torch, vLLM) took about
                # 75 s of the install, and the app compiles what it imports when it starts
                code, err = self._run([str(self.python), "-m", "pip", "install", "-q", "--no-compile", "-r",
                                       str(ROOT / "requirements.txt")])
            if code != 0:
                self.error = f"making the venv or pip install -r requirements.txt failed ({code}):\n{err[-3000:]}"
        except OSError as e:
            self.error = f"the Space venv could not be made: {e}"

    def wait(self, timeout: float = 1900) -> Path:
        """The venv's python once the install ended; AssertionError with pip's own words when it failed."""
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"the Space venv's install ran past {timeout} s"
        assert self.error is None, self.error
        return self.python

    def remove(self) -> None:
        """Stop an install still running (a session that ended before the Space test) and delete the venv."""
        self._stopped = True
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
        self._thread.join(60)
        shutil.rmtree(self.folder, ignore_errors=True)


_venv: SpaceVenv | None = None


def start() -> SpaceVenv:
    """Start the install (once per session)."""
    global _venv
    if _venv is None:
        _venv = SpaceVenv(Path(tempfile.mkdtemp(prefix="chatfb-space-venv-"))).start()
    return _venv


def started() -> SpaceVenv | None:
    return _venv
