"""How the CLI and the nightly job reach the data while the app owns the DuckDB file.

DuckDB lets one process open a file read-write and no other process open it at all meanwhile.
So the running app serves a small control API on 127.0.0.1 (random port, a random token, both in
<data_dir>/run/control.json readable only by its owner). `open_backend()` returns:

- `RemoteBackend` when the app is running: every operation is done by the app, in its process,
  through its single writer (imports, snapshots, adapter promotion into the live vLLM);
- `LocalBackend` otherwise: the CLI opens the store itself.

Both offer the same methods, so CLI commands do not care which one they got.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

from chatfb.adapters import ADAPTER_PREFIX
from chatfb.store import Store, StoreError

log = logging.getLogger(__name__)

# Operations the control API accepts; each is a method of both backends.
OPS = ("import_feedback", "snapshot", "counts", "adapters", "add_adapter", "update_adapter", "next_adapter_name",
       "load_candidate", "unload_adapter", "promote", "rollback", "delete_user", "live_adapter", "record_candidates",
       "guidelines", "add_guideline", "set_guideline_status")


class ControlError(RuntimeError):
    """A control operation failed; str(e) is the reason."""


def control_file(data_dir: Path) -> Path:
    return Path(data_dir) / "run" / "control.json"


def snapshot_path(data_dir: Path) -> Path:
    return Path(data_dir) / "snapshots" / "latest.duckdb"


def _jsonable(obj):
    if isinstance(obj, datetime):
        return obj.isoformat()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot encode {type(obj).__name__}")


class LocalBackend:
    """Operations on a store this process owns (the app itself, or the CLI when the app is down)."""

    def __init__(self, store: Store, data_dir: Path, registry=None, adapter_prefix: str = ADAPTER_PREFIX):
        self.store = store
        self.data_dir = Path(data_dir)
        self.registry = registry  # AdapterRegistry when vLLM servers are attached
        self.adapter_prefix = adapter_prefix
        self.server = None  # without a registry: the model server a CLI cycle uses (see attach_server)

    def close(self):
        pass

    def import_feedback(self, records: list[dict]) -> int:
        from chatfb.feedback_io import parse_record

        # Validated again here: the records may come over the control API. Sizes were checked by the CLI.
        return self.store.import_feedback([parse_record(r, 10**9) for r in records])

    def snapshot(self) -> str:
        return str(self.store.snapshot(snapshot_path(self.data_dir)))

    def counts(self) -> dict:
        return self.store.counts()

    def adapters(self) -> list[dict]:
        return self.store.adapters()

    def live_adapter(self) -> dict | None:
        return self.store.live_adapter()

    def add_adapter(self, name, parent, status, path, recipe=None) -> None:
        self.store.add_adapter(name, parent, status, path, recipe)

    def update_adapter(self, name, **fields) -> None:
        self.store.update_adapter(name, **fields)

    def next_adapter_name(self) -> str:
        from chatfb.adapters import next_adapter_name

        return next_adapter_name(self.store, self.adapter_prefix)

    def load_candidate(self, name) -> None:
        if self.registry is None:
            raise ControlError("no model server is attached")
        self.registry.load_candidate(name)

    def attach_server(self, client) -> None:
        """The model server a learning cycle evaluates on. Without an app (no registry) nobody else
        manages that server's adapters, so unload_adapter takes them off it directly."""
        if self.registry is None:
            self.server = client

    def unload_adapter(self, name) -> None:
        if self.registry is not None:
            if name != self.registry.router.current:
                self.registry.unload(name)
        elif self.server is not None:
            self.server.unload_adapter(name)

    def promote(self, name) -> None:
        if self.registry is not None:
            self.registry.promote(name)
        else:  # the app loads it when it starts
            if self.store.adapter(name) is None:
                raise ControlError(f"no adapter named {name!r}")
            self.store.set_live(name)

    def rollback(self) -> str | None:
        if self.registry is not None:
            return self.registry.rollback()
        live = self.store.live_adapter()
        if live is None:
            raise ControlError("nothing to roll back: the base model is serving")
        earlier = sorted((a for a in self.store.adapters() if a["status"] == "retired" and a["promoted_at"]),
                         key=lambda a: a["promoted_at"])
        target = earlier[-1]["name"] if earlier else None
        self.store.set_live(target)
        self.store.update_adapter(live["name"], status="rolled_back")
        return target

    def delete_user(self, user_name) -> int:
        return self.store.delete_user(user_name)

    def guidelines(self) -> list[dict]:
        return self.store.guidelines()

    def add_guideline(self, text) -> str:
        """A guideline for everyone, approved at once (the operator is the admin)."""
        return self.store.add_guideline(text, "global", "active")

    def set_guideline_status(self, guideline_id, status) -> None:
        g = self.store.guideline(guideline_id)
        if g is None:
            raise ControlError(f"no guideline with id {guideline_id!r} (see: python -m chatfb guidelines list)")
        if status == "active" and g["scope"] != "global":
            raise ControlError("only guidelines suggested for everyone need approval")
        self.store.update_guideline(guideline_id, status=status)

    def record_candidates(self, rows: list[dict]) -> int:
        """Store a learning cycle's candidates (store.add_candidates rows); returns how many."""
        return len(self.store.add_candidates(rows))


class RemoteBackend:
    """The same operations, carried out by the running app."""

    def __init__(self, port: int, token: str):
        self._http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600.0,
                                  headers={"Authorization": f"Bearer {token}"})

    def close(self):
        self._http.close()

    def attach_server(self, client) -> None:
        """Nothing to do: the running app manages its model server's adapters."""

    def call(self, op: str, **kwargs):
        try:
            r = self._http.post(f"/{op}", content=json.dumps(kwargs, default=_jsonable))
        except httpx.HTTPError as e:
            raise ControlError(f"the running app did not answer ({type(e).__name__})") from None
        body = r.json()
        if r.status_code != 200:
            raise ControlError(body.get("error", f"control API error {r.status_code}"))
        return body["result"]

    def __getattr__(self, op):
        if op not in OPS:
            raise AttributeError(op)
        return lambda *args, **kwargs: self.call(op, **_positional(op, args), **kwargs)


def _positional(op: str, args: tuple) -> dict:
    names = {"import_feedback": ("records",), "add_adapter": ("name", "parent", "status", "path", "recipe"),
             "update_adapter": ("name",), "load_candidate": ("name",), "unload_adapter": ("name",),
             "promote": ("name",), "delete_user": ("user_name",), "record_candidates": ("rows",),
             "add_guideline": ("text",), "set_guideline_status": ("guideline_id", "status")}.get(op, ())
    return dict(zip(names, args))


class ControlServer:
    """The app's side: a loopback HTTP server that runs OPS on its LocalBackend."""

    def __init__(self, backend: LocalBackend, data_dir: Path):
        self.backend = backend
        self.token = secrets.token_urlsafe(32)
        self.file = control_file(data_dir)
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
                except (StoreError, ControlError, ValueError, TypeError) as e:
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
        self._server.shutdown()
        try:
            if json.loads(self.file.read_text()).get("pid") == os.getpid():
                self.file.unlink()
        except (OSError, ValueError):
            pass


def running_app(data_dir: Path) -> dict | None:
    """control.json of a live app on this data dir, or None."""
    try:
        info = json.loads(control_file(data_dir).read_text())
        os.kill(int(info["pid"]), 0)
        return info
    except (OSError, ValueError, KeyError):
        return None


def open_backend(data_dir: Path, adapter_prefix: str = ADAPTER_PREFIX):
    """RemoteBackend if the app runs on this data dir, else a LocalBackend on the store file."""
    info = running_app(data_dir)
    if info is not None:
        return RemoteBackend(info["port"], info["token"])
    from chatfb.store import StoreLocked

    try:
        store = Store(Path(data_dir) / "chatfb.duckdb")
    except StoreLocked:
        raise ControlError("the database is in use by another process that is not a chatfb app "
                           "on this data folder; stop it and try again") from None
    backend = LocalBackend(store, data_dir, adapter_prefix=adapter_prefix)
    backend.close = store.close
    return backend
