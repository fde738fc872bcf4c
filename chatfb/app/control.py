"""How the CLI reaches the data while the app owns the DuckDB file.

DuckDB lets one process open a file read-write and no other process open it at all meanwhile.
So the running app serves a small control API on 127.0.0.1 (random port, a random token, both in
<data_dir>/run/control.json readable only by its owner). `open_backend()` returns:

- `RemoteBackend` when the app is running: the CLI's commands are done by the app, in its process,
  through its single writer (imports, snapshots, promotion into the live vLLM, learning cycles);
- `LocalBackend` otherwise: the CLI opens the store itself (adapters promoted without a server:
  the app loads the live one when it starts).

Both offer the CLI's commands as the same methods (`OPS`). A learning cycle's child process uses
none of this: its owner hands it everything (chatfb.learning.cycle).
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

from chatfb.serving.adapters import AdapterError, AdapterRegistry
from chatfb.layout import DataLayout
from chatfb.store.db import Store
from chatfb.store.records import StoreError

log = logging.getLogger(__name__)

# The CLI's operations: each is a method of both backends, and what the control API accepts.
OPS = ("import_feedback", "snapshot", "adapters", "add_adapter", "promote", "rollback", "delete_user", "guidelines",
       "add_guideline", "set_guideline_status", "start_cycle", "cycle_status", "review_queue", "review", "flag_author",
       "unflag_author")


class ControlError(RuntimeError):
    """A control operation failed; str(e) is the reason."""


def _jsonable(obj):
    if isinstance(obj, datetime):
        return obj.isoformat()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot encode {type(obj).__name__}")


class LocalBackend:
    """The CLI's operations on a store this process owns (the app itself, or the CLI when the app is down).
    `cycles` is the app's Runtime (start_training, cycle_status); without an app the CLI runs cycles itself."""

    def __init__(self, store: Store, registry: AdapterRegistry, cycles=None):
        self.store = store
        self.registry = registry
        self.cycles = cycles

    def close(self):
        pass

    def import_feedback(self, records: list[dict], trusted: bool = False) -> int:
        """`trusted`: the operator vouches for the file, so it may train the shared adapter (chatfb.learning.trust)."""
        from chatfb.learning.exports import parse_record

        # Validated again here: the records may come over the control API. Sizes were checked by the CLI.
        return self.store.import_feedback([parse_record(r, 10**9) for r in records], trusted=bool(trusted))

    def snapshot(self) -> str:
        return str(self.store.snapshot(DataLayout(self.registry.data_dir).latest_snapshot))

    def adapters(self) -> list[dict]:
        return self.store.adapters()

    def add_adapter(self, name: str, path: str) -> None:
        """Register an adapter folder trained elsewhere (under <data_dir>/adapters) as a candidate."""
        self.store.add_adapter(name, None, "candidate", path)

    def promote(self, name: str) -> None:
        self.registry.promote(name)

    def rollback(self) -> str | None:
        return self.registry.rollback()

    def delete_user(self, user_name: str) -> int:
        """Delete a user's conversations and feedback, their rows in every training and export file
        (chatfb.learning.forget), and mark each adapter trained on them (`deleted_users`: it carries their
        data until a cycle retrains). Returns conversations removed."""
        from chatfb.learning.forget import forget_user

        records = self.store.feedback_records(user_name=user_name)  # read first: the files are matched by them
        removed = self.store.delete_user(user_name)
        layout = DataLayout(Path(self.registry.data_dir))
        trained = set(forget_user(layout, user_name, records)) - {"exports"}
        if records:  # an adapter whose cycle files are gone, trained after their first feedback, may carry it
            first = min(r.created_at for r in records)
            trained |= {a["name"] for a in self.store.adapters() if a["status"] != "failed" and a["created_at"] >= first
                        and not (layout.work(a["name"]) / "sft.jsonl").exists()}
        self.store.mark_deleted_user(sorted(n for n in trained if self.store.adapter(n)))
        return removed

    def guidelines(self) -> list[dict]:
        return self.store.guidelines()

    def add_guideline(self, text: str) -> str:
        """A guideline for everyone, approved at once (the operator is the admin)."""
        return self.store.add_guideline(text, "global", "active")

    def set_guideline_status(self, guideline_id: str, status: str) -> None:
        g = self.store.guideline(guideline_id)
        if g is None:
            raise ControlError(f"no guideline with id {guideline_id!r} (see: python -m chatfb guidelines list)")
        if status == "active" and g["scope"] != "global":
            raise ControlError("only guidelines suggested for everyone need approval")
        self.store.update_guideline(guideline_id, status=status)

    def review_queue(self, settings_json: str) -> list[dict]:
        """Feedback waiting for an admin's review under the trust policy of these settings, grouped by what
        it would teach (chatfb.learning.trust.queue_view)."""
        from chatfb.config import settings_from_json
        from chatfb.learning.training_data import review_queue

        return review_queue(self.store.feedback_records(), settings_from_json(settings_json), self.store.reviews(),
                            self.store.flagged_authors())

    def review(self, feedback_ids: list[str], decision: str) -> int:
        """Approve (it may train the shared adapter) or reject (it never does, nor anything on its question)
        feedback rows; a row that no longer exists is an error and nothing is decided."""
        ids = [i.strip() for i in feedback_ids if i.strip()]
        if not ids:
            raise ControlError("name the feedback ids to decide on (see: python -m chatfb review list)")
        try:
            self.store.set_review(ids, decision)
        except StoreError as e:
            raise ControlError(f"{e} (see: python -m chatfb review list)") from None
        return len(set(ids))

    def flag_author(self, author: str, reason: str = "") -> None:
        """Flag a user name or anonymous session (as `review list` shows it): nothing of theirs trains."""
        self.store.flag_author(author.strip(), reason)

    def unflag_author(self, author: str) -> None:
        self.store.unflag_author(author.strip())

    def start_cycle(self, settings_json: str, promote: bool) -> int:
        """Start a learning cycle in the app with the CLI's settings; returns its number (see cycle_status)."""
        from chatfb.config import settings_from_json

        if self.cycles is None:
            raise ControlError("no app runs here to start a learning cycle in")
        number = self.cycles.start_training(settings_from_json(settings_json), promote)
        if number is None:
            raise ControlError("a learning cycle is already running (started from the admin tab or the schedule)")
        return number

    def cycle_status(self) -> dict:
        """{"running": bool, "finished": number of the last finished cycle, "result": its summary or None}."""
        if self.cycles is None:
            raise ControlError("no app runs here")
        return self.cycles.cycle_status()


class RemoteBackend:
    """The same operations, carried out by the running app."""

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

    def import_feedback(self, records: list[dict], trusted: bool = False) -> int:
        return self.call("import_feedback", records=records, trusted=trusted)

    def snapshot(self) -> str:
        return self.call("snapshot")

    def adapters(self) -> list[dict]:
        return self.call("adapters")

    def add_adapter(self, name: str, path: str) -> None:
        self.call("add_adapter", name=name, path=path)

    def promote(self, name: str) -> None:
        self.call("promote", name=name)

    def rollback(self) -> str | None:
        return self.call("rollback")

    def delete_user(self, user_name: str) -> int:
        return self.call("delete_user", user_name=user_name)

    def guidelines(self) -> list[dict]:
        return self.call("guidelines")

    def add_guideline(self, text: str) -> str:
        return self.call("add_guideline", text=text)

    def set_guideline_status(self, guideline_id: str, status: str) -> None:
        self.call("set_guideline_status", guideline_id=guideline_id, status=status)

    def review_queue(self, settings_json: str) -> list[dict]:
        return self.call("review_queue", settings_json=settings_json)

    def review(self, feedback_ids: list[str], decision: str) -> int:
        return self.call("review", feedback_ids=feedback_ids, decision=decision)

    def flag_author(self, author: str, reason: str = "") -> None:
        self.call("flag_author", author=author, reason=reason)

    def unflag_author(self, author: str) -> None:
        self.call("unflag_author", author=author)

    def start_cycle(self, settings_json: str, promote: bool) -> int:
        return self.call("start_cycle", settings_json=settings_json, promote=promote)

    def cycle_status(self) -> dict:
        return self.call("cycle_status")


class ControlServer:
    """The app's side: a loopback HTTP server that runs OPS on its LocalBackend."""

    def __init__(self, backend: LocalBackend, data_dir: Path):
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
                except (StoreError, ControlError, AdapterError, ValueError, TypeError) as e:
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


def open_backend(data_dir: Path, model: str | None = None):
    """RemoteBackend if the app runs on this data dir, else a LocalBackend on the store file (its adapters
    checked against `model`'s folder when that is on disk)."""
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
    backend = LocalBackend(store, AdapterRegistry.without_servers(store, data_dir, base))
    backend.close = store.close
    return backend
