"""How the CLI reaches the data while the app owns the DuckDB file.

DuckDB lets one process open a file read-write and no other process open it at all meanwhile.
So the running app serves a small control API on 127.0.0.1 (random port, a random token, both in
<data_dir>/run/control.json readable only by its owner). `open_backend()` returns:

- `RemoteBackend` when the app is running: the CLI's commands are done by the app, in its process,
  through its single writer (imports, snapshots, promotion into the live vLLM, learning cycles);
- an `AdminService` (chatfb.app.admin) otherwise: the CLI opens the store itself (adapters promoted
  without a server: the app loads the live one when it starts).

Both offer the admin operations named in `OPS` as the same methods: the app's control server runs them
on its own AdminService. A learning cycle's child process uses none of this: its owner hands it
everything (chatfb.learning.cycle).
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import secrets
import threading
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

from chatfb.app.admin import OPS, AdminError, AdminService
from chatfb.config import Settings
from chatfb.layout import DataLayout
from chatfb.serving.adapters import AdapterError, AdapterRegistry
from chatfb.store.db import Store
from chatfb.store.records import StoreError

log = logging.getLogger(__name__)


class ControlError(AdminError):
    """A control operation failed (or the app did not answer); str(e) is the reason."""


def _jsonable(obj):
    if isinstance(obj, datetime):
        return obj.isoformat()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot encode {type(obj).__name__}")


class RemoteBackend:
    """The admin operations in `OPS`, carried out by the running app."""

    def __init__(self, port: int, token: str):
        self._http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600.0,
                                  headers={"Authorization": f"Bearer {token}"})

    def close(self):
        self._http.close()

    def call(self, op: str, **kwargs):
        try:
            r = self._http.post(f"/{op}", content=json.dumps(kwargs, default=_jsonable))
        except httpx.HTTPError as e:
            raise ControlError(f"the running app did not answer ({type(e).__name__})") from None
        body = r.json()
        if r.status_code != 200:
            raise ControlError(body.get("error", f"control API error {r.status_code}"))
        return body["result"]

    def __getattr__(self, op: str):
        """The operation `op` of AdminService, carried out by the app: same arguments, same result."""
        if op not in OPS:
            raise AttributeError(op)
        signature = inspect.signature(getattr(AdminService, op))

        def remote(*args, **kwargs):
            bound = signature.bind(None, *args, **kwargs)
            bound.apply_defaults()
            return self.call(op, **{k: v for k, v in bound.arguments.items() if k != "self"})

        return remote


class ControlServer:
    """The app's side: a loopback HTTP server that runs OPS on its AdminService."""

    def __init__(self, backend: AdminService, data_dir: Path):
        self.backend = backend
        self.token = secrets.token_urlsafe(32)
        self.file = DataLayout(Path(data_dir)).control_file
        backend_ref, token = backend, self.token

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                op = self.path.strip("/")
                if not secrets.compare_digest(self.headers.get("Authorization", ""), f"Bearer {token}"):
                    return self._send(403, {"error": "bad control token"})
                if op not in OPS:
                    return self._send(404, {"error": f"unknown operation {op!r}"})
                try:
                    kwargs = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                    result = getattr(backend_ref, op)(**kwargs)
                except (StoreError, AdminError, AdapterError, ValueError, TypeError) as e:
                    return self._send(400, {"error": str(e)})
                except Exception as e:  # noqa: BLE001 - report, keep serving
                    log.exception("control op %s failed", op)
                    return self._send(500, {"error": f"{type(e).__name__}: {e}"})
                self._send(200, {"result": result})

            def _send(self, code, body):
                data = json.dumps(body, default=_jsonable).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="control-api", daemon=True)

    def start(self, extra: dict | None = None) -> None:
        self._thread.start()
        self.file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.file.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump({"port": self._server.server_address[1], "token": self.token, "pid": os.getpid(), **(extra or {})}, fh)
        os.replace(tmp, self.file)

    def stop(self) -> None:
        if self._thread.is_alive():  # shutdown() waits for serve_forever, forever if it never started
            self._server.shutdown()
        self._server.server_close()
        try:
            if json.loads(self.file.read_text()).get("pid") == os.getpid():
                self.file.unlink()
        except (OSError, ValueError):
            pass


def running_app(data_dir: Path) -> dict | None:
    """control.json of a live app on this data dir, or None."""
    try:
        info = json.loads(DataLayout(Path(data_dir)).control_file.read_text())
        os.kill(int(info["pid"]), 0)
        return info
    except (OSError, ValueError, KeyError):
        return None


def open_backend(data_dir: Path, model: str | None = None, settings: Settings | None = None):
    """RemoteBackend if the app runs on this data dir, else an AdminService on the store file (its adapters
    checked against `model`'s folder when that is on disk; its limits from `settings`, default the defaults)."""
    info = running_app(data_dir)
    if info is not None:
        return RemoteBackend(info["port"], info["token"])
    from chatfb.store.records import StoreLocked

    try:
        store = Store(DataLayout(Path(data_dir)).db)
    except StoreLocked:
        raise ControlError("the database is in use by another process that is not a chatfb app "
                           "on this data folder; stop it and try again") from None
    from chatfb.serving.model_files import model_on_disk

    base = model_on_disk(model, data_dir) if model else None
    backend = AdminService(store, AdapterRegistry.without_servers(store, data_dir, base),
                           settings=(settings or Settings()).with_(data_dir=Path(data_dir)))
    backend.close = store.close
    return backend
