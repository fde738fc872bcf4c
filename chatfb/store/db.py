"""The chatfb log store: conversations, messages, feedback and adapter versions in one DuckDB file.

All SQL lives here, always parameterised. One `Store` owns the file read-write (DuckDB allows one
writer process and no readers beside it); within the process one writer thread owns the write
connection and commits the queued writes of all chat sessions in batches, one transaction each (see
`Store._tx`), and reads run on pooled reader cursors (see `Store._q`). Other processes get
consistent copies through `snapshot()` (see chatfb.app.control).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from contextlib import nullcontext
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

import duckdb

from chatfb.store.migrations import MIGRATIONS
from chatfb.store.records import (CANDIDATE_STATUSES, CUT_OFF_SQL, FEEDBACK_KINDS, GUIDELINE_STATUSES, REVIEW_DECISIONS,
                                  FeedbackRecord, StoreError, StoreLocked, new_id, utcnow)

log = logging.getLogger(__name__)

def _keep_unclean_wal(db: Path) -> Path | None:
    """Copy a non-empty write-ahead log found before opening (a clean close leaves none) to
    <db>.wal.unclean-<UTC time>: DuckDB replays what it can and deletes the log, even one it could
    not read, so without the copy a damaged log's rows would be gone without a trace."""
    wal = Path(f"{db}.wal")
    try:
        if wal.stat().st_size == 0:
            return None
    except FileNotFoundError:
        return None
    copy = wal.with_name(f"{wal.name}.unclean-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S%f')}")
    shutil.copy2(wal, copy)
    return copy


class _Memo:
    """Answers of one kind of read, remembered until `forget()`, which a write that may change them calls once
    it has committed. A read that ran while a write committed is not kept: it may be from before it."""

    def __init__(self, max_answers: int = 10_000):
        self.max_answers = max_answers
        self._answers: dict = {}
        self._forgotten = 0  # counts forget() calls
        self._lock = threading.Lock()

    def get(self, key, read: Callable[[], Any], keep: Callable[[Any], bool] = lambda answer: True):
        with self._lock:
            if key in self._answers:
                return self._answers[key]
            forgotten = self._forgotten
        answer = read()
        with self._lock:
            if forgotten == self._forgotten and keep(answer) and len(self._answers) < self.max_answers:
                self._answers[key] = answer
        return answer

    def forget(self) -> None:
        with self._lock:
            self._answers.clear()
            self._forgotten += 1


class Store:
    def __init__(self, path: Path | str, read_only: bool = False):
        self.path = Path(path)
        self.read_only = read_only
        self._cond = threading.Condition(threading.Lock())  # guards the write queue and _closed
        self._queue: list[_Write] = []
        self._seq: dict[str, int] = {}  # conversation id -> last message seq (see _next_seq)
        self._seq_lock = threading.Lock()
        self._stripes = [threading.Lock() for _ in range(64)]  # see log_feedback
        self._readers: list = []  # idle reader cursors, see _q
        self._all_readers: list = []
        self._readers_lock = threading.Lock()
        # Reads asked on every API request or reply, answered from memory: the file has one writer, this
        # process, and each write that may change an answer forgets them all (see _Memo).
        self._key_users = _Memo()  # key hash -> the user of a live API key
        self._rules = _Memo()  # (session id, user name) -> guidelines_for
        self._closed = False
        if not read_only:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        wal_copy = None if read_only else _keep_unclean_wal(self.path)
        try:
            self._db = duckdb.connect(str(self.path), read_only=read_only)
        except duckdb.IOException as e:
            if "lock" in str(e).lower():
                if wal_copy:
                    wal_copy.unlink(missing_ok=True)  # the app holds the file: its log, not a crash's
                raise StoreLocked(f"{self.path} is in use by another process (is the app running?)") from None
            raise StoreError(f"cannot open {self.path}: {e}") from None
        except duckdb.Error as e:
            if "WAL" not in str(e):
                raise
            raise StoreError(
                f"cannot open {self.path}: its write-ahead log {self.path}.wal (writes not yet in the file, left by a "
                f"crash) is damaged ({str(e).split(': ', 1)[-1]}). Nothing was changed. To open the file without those "
                f"writes, move {self.path}.wal aside (a copy is at {wal_copy}); keep it for recovery.") from None
        if wal_copy:
            log.warning("%s had a write-ahead log left by a crash; DuckDB replayed it. A copy of the log as found is "
                        "kept at %s (DuckDB drops a torn or zeroed log without a word; compare counts if in doubt).",
                        self.path, wal_copy)
        self._spawner = self._db.cursor()  # makes reader cursors (see _q)
        if not read_only:
            self._migrate()  # before the writer thread starts: nothing else uses the connection yet
        else:
            self._require_schema()
        self._writer = threading.Thread(target=self._write_loop, name=f"chatfb-store-writer:{self.path.name}", daemon=True)
        self._writer.start()

    # -- plumbing -------------------------------------------------------------------------
    def close(self) -> None:
        """Stop taking writes, let the writer commit every write already queued, then close the file.
        A write after this raises StoreError("the store is closed"); none is dropped silently."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._writer.join()
        with self._readers_lock:
            readers, self._all_readers, self._readers = self._all_readers, [], []
        for cur in readers + [self._spawner]:
            cur.close()
        self._db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _q(self, sql: str, params=()) -> list[tuple]:
        """Run a read on a reader cursor (a second connection to the same database), not on the
        writer's connection: a read neither waits for the batch being committed nor holds the next
        one up, and it sees every transaction committed before it started. Cursors are pooled (one
        per read running at once), so threads that come and go do not leave connections behind."""
        with self._readers_lock:
            if self._closed:
                raise StoreError("the store is closed")
            if self._readers:
                cur = self._readers.pop()
            else:  # made by a connection of its own, so never behind the writer
                cur = self._spawner.cursor()
                self._all_readers.append(cur)
        try:
            return cur.execute(sql, params).fetchall()
        finally:
            with self._readers_lock:
                if not self._closed:
                    self._readers.append(cur)

    def _tx(self, statements: list[tuple[str, tuple]], independent: bool = False) -> None:
        """Run statements as one transaction; return once it is committed (or raise its error).

        The write joins a queue that the writer thread drains: every write queued while it commits
        the previous batch goes into the next one, in one transaction, so 32 concurrent writers pay
        for one commit, not 32. Within a batch, same-shaped writes run as one `executemany` per
        statement (see _batch_statements), or as one statement over lists of values (_AS_LISTS).
        If a batch fails it is rolled back and each write is retried alone, so a bad write fails
        only its own caller and no caller hears "done" for a write that was rolled back.

        `independent`: the statements touch only rows that no other write in flight touches (fresh
        ids, or keys the caller holds a lock on), so same-shaped writes of this kind may run
        statement by statement across writes (all first statements, then all second ones)."""
        self._submit(_Write(statements, independent))

    def _write_loop(self) -> None:
        """The writer thread: the only user of the write connection. Drains the queue batch by batch;
        after close() it commits what is left and stops."""
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                batch, self._queue = self._queue, []
            if not batch:
                return  # closed and drained
            try:
                self._commit(batch)
            finally:
                for job in batch:
                    job.done.set()

    def _commit(self, batch: list["_Write"]) -> None:
        calls = [job for job in batch if job.call is not None]
        batch = [job for job in batch if job.call is None]
        for job in calls:  # outside a transaction (ATTACH, for a snapshot, refuses to run in one)
            try:
                job.result = job.call(self._db)
            except Exception as e:  # noqa: BLE001 - handed to the caller
                job.error = e
        if not batch:
            return
        try:
            self._run(batch)
        except Exception as e:  # noqa: BLE001 - handed to the writers that asked
            if len(batch) == 1:
                batch[0].error = e
                return
            for job in batch:
                try:
                    self._run([job])
                except Exception as e:  # noqa: BLE001
                    job.error = e

    def _run(self, batch: list["_Write"]) -> None:
        """One transaction for the batch: committed whole, or rolled back and raised."""
        db = self._db
        db.execute("BEGIN TRANSACTION")
        try:
            for sql, rows in _batch_statements(batch):
                as_lists, key = _AS_LISTS.get(sql, (None, 0))
                if len(rows) == 1:
                    db.execute(sql, rows[0])
                elif as_lists and len({row[key] for row in rows}) == len(rows):
                    db.execute(as_lists, [list(column) for column in zip(*rows)])
                else:
                    db.executemany(sql, rows)
            db.execute("COMMIT")
        except BaseException:
            try:
                db.execute("ROLLBACK")
            except duckdb.Error:
                pass  # the transaction is gone already; the original error is the one to report
            raise

    def _on_writer(self, call):
        """Run `call(connection)` on the writer thread, between two batches' transactions."""
        return self._submit(_Write([], call=call)).result

    def _submit(self, job: "_Write") -> "_Write":
        """Queue a job for the writer thread and wait until it is done; raise its error, if any."""
        with self._cond:
            if self._closed:
                raise StoreError("the store is closed")
            self._queue.append(job)
            self._cond.notify()
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job

    def _migrate(self) -> None:
        db = self._db
        db.execute("CREATE TABLE IF NOT EXISTS _migrations (name VARCHAR PRIMARY KEY, applied_at TIMESTAMP)")
        done = {r[0] for r in db.execute("SELECT name FROM _migrations").fetchall()}
        for name, statements in MIGRATIONS:
            if name in done:
                continue
            self._run([_Write([(s, ()) for s in statements] + [("INSERT INTO _migrations VALUES (?, ?)", (name, utcnow()))])])

    def _require_schema(self) -> None:
        """A file opened read-only is not migrated: one an older chatfb wrote (a snapshot of an app not restarted
        since an upgrade) gets a clear error, not a query naming a column it lacks."""
        try:
            done = {r[0] for r in self._db.execute("SELECT name FROM _migrations").fetchall()}
        except duckdb.Error:
            done = set()
        missing = [name for name, _ in MIGRATIONS if name not in done]
        if missing:
            self._spawner.close()
            self._db.close()
            raise StoreError(f"{self.path} was written by an older chatfb (it lacks {', '.join(missing)}): restart the "
                             "app on this version, which upgrades it, then try again")

    def applied_migrations(self) -> list[str]:
        return [r[0] for r in self._q("SELECT name FROM _migrations ORDER BY name")]

    def snapshot(self, dest: Path) -> Path:
        """Write a consistent copy of the whole store to `dest` atomically (temp file + rename)."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        tmp.unlink(missing_ok=True)
        try:
            self._on_writer(lambda db: _copy_database(db, tmp))  # between batches: nothing half-written
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            Path(str(tmp) + ".wal").unlink(missing_ok=True)
            raise
        return dest

    # -- conversations and messages ---------------------------------------------------------
    def create_conversation(self, session_id: str, user_name: str | None = None, system_prompt: str = "",
                            client: str | None = None) -> str:
        """`client`: a salted hash of the client's address (never the address), when known."""
        cid = new_id()
        self._tx([("INSERT INTO conversations (id, session_id, user_name, system_prompt, source, created_at, client)"
                   " VALUES (?, ?, ?, ?, ?, ?, ?)", (cid, session_id, user_name, system_prompt or "", "chat", utcnow(), client))])
        with self._seq_lock:
            self._seq.setdefault(cid, 0)
        return cid

    def conversation(self, conversation_id: str) -> dict | None:
        rows = self._q("SELECT id, session_id, user_name, system_prompt, source, created_at FROM conversations WHERE id = ?",
                       (conversation_id,))
        if not rows:
            return None
        return dict(zip(("id", "session_id", "user_name", "system_prompt", "source", "created_at"), rows[0]))

    def latest_conversation(self, session_id: str) -> str | None:
        """The session's newest conversation that has messages (to show it again after a page reload)."""
        rows = self._q("SELECT c.id FROM conversations c WHERE c.session_id = ? AND EXISTS"
                       " (SELECT 1 FROM messages m WHERE m.conversation_id = c.id) ORDER BY c.created_at DESC LIMIT 1",
                       (session_id,))
        return rows[0][0] if rows else None

    def conversations_of(self, session_id: str, limit: int = 100) -> list[dict]:
        """A session's conversations that have messages, the most recently active first: id, title (the
        one given, else the first message), created_at, last_at (its newest message)."""
        rows = self._q("SELECT c.id, COALESCE(c.title, (SELECT m.content FROM messages m WHERE m.conversation_id = c.id"
                       " AND NOT m.replaced ORDER BY m.seq LIMIT 1)), c.created_at, (SELECT max(m.created_at) FROM messages m"
                       " WHERE m.conversation_id = c.id) AS last_at FROM conversations c WHERE c.session_id = ? AND"
                       " EXISTS (SELECT 1 FROM messages m WHERE m.conversation_id = c.id)"
                       " ORDER BY last_at DESC, c.id LIMIT ?", (session_id, limit))
        return [dict(zip(("id", "title", "created_at", "last_at"), r)) for r in rows]

    def set_title(self, conversation_id: str, title: str) -> None:
        self._tx([("UPDATE conversations SET title = ? WHERE id = ?", (title, conversation_id))])

    def delete_conversation(self, conversation_id: str) -> None:
        """Remove one conversation with its messages, feedback and candidates."""
        self._delete_conversations([conversation_id])

    def set_system_prompt(self, conversation_id: str, system_prompt: str) -> None:
        self._tx([("UPDATE conversations SET system_prompt = ? WHERE id = ?", (system_prompt, conversation_id))])

    def add_message(self, conversation_id: str, role: str, content: str, status: str = "ok",
                    model: str | None = None, adapter: str | None = None, replaces: str | None = None,
                    guidelines: list[str] | None = None) -> str:
        """`guidelines`: ids of the guidelines a reply is generated under (kept with it, for audit)."""
        if role not in ("user", "assistant"):
            raise StoreError(f"unknown role {role!r}")
        mid = new_id()
        seq = self._next_seq(conversation_id)
        stmts = [(_INSERT_MESSAGE, (mid, conversation_id, seq, role, content, status, model, adapter, replaces, utcnow(),
                                    json.dumps(guidelines) if guidelines else None))]
        if replaces:
            stmts.append(("UPDATE messages SET replaced = TRUE WHERE id = ?", (replaces,)))
        self._tx(stmts, independent=True)  # a fresh id; marking a reply replaced twice changes nothing
        return mid

    def add_turn(self, conversation_id: str, user_text: str, model: str | None = None,
                 adapter: str | None = None, guidelines: list[str] | None = None,
                 replaces: str | None = None) -> tuple[str, str]:
        """Log a user message and the pending reply to it as one transaction (one commit, not two,
        before the model is asked). Returns (user message id, reply id).

        `replaces`: a user message this one edits. The conversation goes on from the edit (a new
        branch): that message and every message after it are marked replaced, kept, and no longer shown."""
        now = utcnow()
        ids = new_id(), new_id()
        stmts = [(_INSERT_MESSAGE, (ids[0], conversation_id, self._next_seq(conversation_id), "user", user_text, "ok",
                                    None, None, replaces, now, None)),
                 (_INSERT_MESSAGE, (ids[1], conversation_id, self._next_seq(conversation_id), "assistant", "", "pending",
                                    model, adapter, None, now, json.dumps(guidelines) if guidelines else None))]
        if replaces:  # first, so the new turn (numbered after the old branch) is not marked with it
            stmts.insert(0, ("UPDATE messages SET replaced = TRUE WHERE conversation_id = ? AND NOT replaced AND seq >="
                             " (SELECT seq FROM messages WHERE id = ? AND conversation_id = ?)",
                             (conversation_id, replaces, conversation_id)))
        self._tx(stmts, independent=not replaces)  # fresh ids; an edit also marks older rows: alone
        return ids

    def _next_seq(self, conversation_id: str) -> int:
        """The next message number of a conversation. This process is the file's only writer, so the
        counter lives in memory (seeded by create_conversation, or read once for a conversation of an
        earlier run): numbering a message neither queries nor waits for the connection lock, so its
        insert joins the batch being queued. A failed insert leaves a gap; seq only orders."""
        with self._seq_lock:
            if conversation_id in self._seq:
                self._seq[conversation_id] += 1
                return self._seq[conversation_id]
        last = self._q("SELECT coalesce(max(seq), 0) FROM messages WHERE conversation_id = ?", (conversation_id,))[0][0]
        with self._seq_lock:
            self._seq[conversation_id] = max(self._seq.get(conversation_id, 0), last) + 1
            return self._seq[conversation_id]

    def finish_message(self, message_id: str, content: str, status: str, error: str | None = None,
                       ttft_ms: float | None = None, latency_ms: float | None = None,
                       prompt_tokens: int | None = None, completion_tokens: int | None = None,
                       only_if_pending: bool = False, finish_reason: str | None = None) -> None:
        """Write a reply's outcome. `only_if_pending`: leave a reply that finished meanwhile as it is (Stop
        racing the stream's own end). `finish_reason`: the model server's ("length": the token limit cut it off)."""
        where = " AND status = 'pending'" if only_if_pending else ""
        self._tx([(_FINISH_MESSAGE + where, (content, status, error, ttft_ms, latency_ms, prompt_tokens,
                                             completion_tokens, finish_reason, message_id))])

    def message(self, message_id: str) -> dict | None:
        rows = self._q(f"SELECT {_MSG_COLS} FROM messages WHERE id = ?", (message_id,))
        return _msg(rows[0]) if rows else None

    def messages(self, conversation_id: str, include_replaced: bool = False) -> list[dict]:
        where = "" if include_replaced else " AND NOT replaced"
        rows = self._q(f"SELECT {_MSG_COLS} FROM messages WHERE conversation_id = ?{where} ORDER BY seq", (conversation_id,))
        return [_msg(r) for r in rows]

    def history_before(self, message_id: str) -> list[dict]:
        """The chat messages a reply was generated from: system prompt + the earlier ok turns of its own
        branch. The conversation is replayed up to the reply: a regenerated reply drops the one it
        replaces, an edited user message drops the message it edits and what followed it, so a reply
        of an old branch keeps the history it was answered from."""
        # one read (asked before every reply): the reply's conversation up to it, with its system prompt
        cols = ", ".join(f"r.{c.strip()}" for c in _MSG_COLS.split(","))
        rows = self._q(f"SELECT {cols}, c.system_prompt FROM messages m JOIN messages r ON r.conversation_id ="
                       " m.conversation_id AND r.seq <= m.seq JOIN conversations c ON c.id = m.conversation_id"
                       " WHERE m.id = ? ORDER BY r.seq", (message_id,))
        if not rows:
            raise StoreError("unknown message")
        system_prompt = rows[0][-1]
        branch: list[dict] = []
        for r in (_msg(row[:-1]) for row in rows):
            cut = next((i for i, b in enumerate(branch) if b["id"] == r["replaces"]), None) if r["replaces"] else None
            if cut is not None:
                del branch[cut:]
            branch.append(r)
        out = [{"role": "system", "content": system_prompt}] if system_prompt else []
        return out + [{"role": r["role"], "content": r["content"]} for r in branch[:-1] if r["status"] == "ok"]

    # -- feedback ---------------------------------------------------------------------------
    def log_feedback(self, message_id: str, kind: str, rating: int | None = None, text: str | None = None,
                     user_name: str | None = None, session_id: str | None = None,
                     derived_from: str | None = None) -> str:
        """Store feedback on an assistant message; a second one of the same kind by the same
        session revises (supersedes) the first. `session_id`, when given, must own the message."""
        if kind not in FEEDBACK_KINDS:
            raise StoreError(f"unknown feedback kind {kind!r}")
        if kind == "rating" and rating not in (1, -1):
            raise StoreError("a rating is +1 or -1")
        if kind in ("critique", "correction") and not (text or "").strip():
            raise StoreError(f"a {kind} needs text")
        fid = new_id()
        revises = session_id is not None and kind != "implicit"
        # A revision is written one at a time with the feedback of the same (message, kind, session) (a striped
        # lock), so it always sees the one it supersedes; all other feedback joins the writer's batches freely (it
        # takes no stripe: two writes that only shared one would queue one behind the other's commit).
        stripe = self._stripes[hash((message_id, kind, session_id)) % len(self._stripes)] if revises else nullcontext()
        with stripe:
            rows = self._q(
                "SELECT m.role, c.session_id, EXISTS (SELECT 1 FROM feedback f WHERE f.message_id = m.id AND"
                " f.kind = ? AND f.session_id = ? AND f.superseded_at IS NULL)"
                " FROM messages m JOIN conversations c ON c.id = m.conversation_id WHERE m.id = ?",
                (kind, session_id, message_id))
            if not rows or (session_id is not None and rows[0][1] != session_id):
                raise StoreError("feedback refused: unknown message")
            if rows[0][0] != "assistant":
                raise StoreError("feedback refused: only replies can get feedback")
            now = utcnow()
            origin = _origin(kind, derived_from, derived_from is not None and bool(self._q(
                "SELECT 1 FROM candidates WHERE feedback_id = ? AND message_id = ? AND text = ?",
                (derived_from, message_id, text))))
            stmts = []
            if revises and rows[0][2]:
                stmts.append(("UPDATE feedback SET superseded_at = ? WHERE message_id = ? AND kind = ? AND session_id = ?"
                              " AND superseded_at IS NULL", (now, message_id, kind, session_id)))
            stmts.append((_INSERT_FEEDBACK, (fid, message_id, kind, rating, text, user_name, session_id, now, derived_from,
                                             origin)))
            self._tx(stmts, independent=True)  # a fresh id; the superseded rows are this stripe's key
        return fid

    def feedback(self, feedback_id: str) -> dict | None:
        rows = self._q("SELECT id, message_id, kind, rating, text, user_name, session_id, created_at, superseded_at,"
                       " derived_from, origin, trusted FROM feedback WHERE id = ?", (feedback_id,))
        keys = ("id", "message_id", "kind", "rating", "text", "user_name", "session_id", "created_at", "superseded_at",
                "derived_from", "origin", "trusted")
        return dict(zip(keys, rows[0])) if rows else None

    def conversation_feedback(self, conversation_id: str) -> list[dict]:
        """Every active feedback row on a conversation's messages, oldest first (one query)."""
        rows = self._q("SELECT f.id, f.message_id, f.kind, f.rating, f.text, f.session_id FROM feedback f JOIN messages m"
                       " ON m.id = f.message_id WHERE m.conversation_id = ? AND f.superseded_at IS NULL"
                       " ORDER BY f.created_at, f.id", (conversation_id,))
        return [dict(zip(("id", "message_id", "kind", "rating", "text", "session_id"), r)) for r in rows]

    def feedback_for(self, message_id: str, active_only: bool = True) -> list[dict]:
        where = " AND superseded_at IS NULL" if active_only else ""
        rows = self._q("SELECT id, kind, rating, text, user_name, session_id, created_at, superseded_at FROM feedback"
                       f" WHERE message_id = ?{where} ORDER BY created_at", (message_id,))
        keys = ("id", "kind", "rating", "text", "user_name", "session_id", "created_at", "superseded_at")
        return [dict(zip(keys, r)) for r in rows]

    def feedback_records(self, since: datetime | None = None, user_name: str | None = None) -> list[FeedbackRecord]:
        """Every active feedback row with its prompt history, original reply and provenance, oldest first
        (`user_name`: only that user's)."""
        params: list = []
        where = "f.superseded_at IS NULL"
        if since is not None:
            where += " AND f.created_at >= ?"
            params.append(since)
        if user_name is not None:
            where += " AND f.user_name = ?"
            params.append(user_name)
        rows = self._q(
            "SELECT f.id, f.message_id, f.kind, f.rating, f.text, f.user_name, f.created_at, m.content, f.derived_from,"
            " f.session_id, c.client, f.origin, coalesce(f.trusted, FALSE), m.guidelines,"
            f" {CUT_OFF_SQL}"
            " FROM feedback f JOIN messages m ON m.id = f.message_id JOIN conversations c ON c.id = m.conversation_id"
            f" WHERE {where} ORDER BY f.created_at, f.id", tuple(params))
        private = {r[0] for r in self._q("SELECT id FROM guidelines WHERE scope = 'user'")}
        histories: dict[str, list[dict]] = {}
        out = []
        for (fid, mid, kind, rating, text, user, created, reply, derived_from, session, client, origin, trusted, rules,
             cut_off) in rows:
            if mid not in histories:
                histories[mid] = self.history_before(mid)
            out.append(FeedbackRecord(fid, mid, kind, rating, text, user, created, histories[mid], reply, derived_from,
                                      session, client, origin or _origin(kind, derived_from, True), bool(trusted),
                                      bool(private.intersection(json.loads(rules) if rules else [])), bool(cut_off)))
        return out

    def import_feedback(self, records: list[dict], session_id: str = "import", trusted: bool = False) -> int:
        """Insert parsed import records (see chatfb.learning.exports) all-or-nothing; returns the count.
        One transaction that inserts each table from an Arrow table: 100k records take seconds,
        where one INSERT per row held the writer (and so every chat's write) for many minutes."""
        import pyarrow as pa

        conversations, messages, feedback = [], [], []
        now = utcnow()
        for r in records:
            if r["kind"] not in FEEDBACK_KINDS:
                raise StoreError(f"unknown feedback kind {r['kind']!r}")
            cid, ts = new_id(), r.get("ts") or now
            system = "".join(m["content"] for m in r["prompt"] if m["role"] == "system")
            conversations.append((cid, session_id, r.get("user"), system, "import", ts))
            turns = [m for m in r["prompt"] if m["role"] != "system"] + [{"role": "assistant", "content": r["reply"]}]
            mid = None
            for seq, m in enumerate(turns, 1):
                mid = new_id()
                messages.append((mid, cid, seq, m["role"], m["content"], "ok", "import", ts))
            origin = "written_correction" if r["kind"] == "correction" else r["kind"]
            feedback.append((new_id(), mid, r["kind"], r.get("rating"), r.get("text"), r.get("user"), session_id, ts, None,
                             origin, trusted))
        text, ts_type = pa.string(), pa.timestamp("us")
        tables = [
            ("conversations", conversations, {"id": text, "session_id": text, "user_name": text, "system_prompt": text,
                                              "source": text, "created_at": ts_type}),
            ("messages", messages, {"id": text, "conversation_id": text, "seq": pa.int64(), "role": text,
                                    "content": text, "status": text, "model": text, "created_at": ts_type}),
            ("feedback", feedback, {"id": text, "message_id": text, "kind": text, "rating": pa.int64(), "text": text,
                                    "user_name": text, "session_id": text, "created_at": ts_type, "derived_from": text,
                                    "origin": text, "trusted": pa.bool_()}),
        ]

        def insert_all(db) -> None:  # on the writer thread, between batches (like snapshot())
            db.execute("BEGIN TRANSACTION")
            try:
                for table, rows, schema in tables:
                    arrow = pa.table({c: pa.array([row[i] for row in rows], type=t) for i, (c, t) in enumerate(schema.items())})
                    db.register("import_rows", arrow)
                    cols = ", ".join(schema)
                    db.execute(f"INSERT INTO {table} ({cols}) SELECT {cols} FROM import_rows")
                    db.unregister("import_rows")
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

        self._on_writer(insert_all)
        return len(records)

    # -- candidates (replies made from a critique) and guidelines -----------------------------
    def add_candidates(self, rows: list[dict]) -> list[str]:
        """Store candidate replies made from a critique (keys: feedback_id, message_id, origin, text,
        score, verdict, status; optional session_id, cycle, details). Returns their ids, in order."""
        ids, stmts, now = [], [], utcnow()
        for r in rows:
            cid = r.get("id") or new_id()
            ids.append(cid)
            stmts.append(("INSERT INTO candidates (id, feedback_id, message_id, origin, text, score, verdict, status,"
                          " session_id, cycle, details, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                          (cid, r["feedback_id"], r.get("message_id"), r["origin"], r["text"], r.get("score"),
                           r["verdict"], r["status"], r.get("session_id"), r.get("cycle"),
                           json.dumps(r.get("details") or {}), now)))
        if stmts:
            self._tx(stmts)
        return ids

    def set_candidate_status(self, candidate_id: str, status: str) -> None:
        if status not in CANDIDATE_STATUSES:
            raise StoreError(f"unknown candidate status {status!r}")
        self._tx([("UPDATE candidates SET status = ? WHERE id = ?", (status, candidate_id))])

    def candidate(self, candidate_id: str) -> dict | None:
        rows = self.candidates(where="id = ?", params=(candidate_id,))
        return rows[0] if rows else None

    def candidates(self, where: str = "TRUE", params: tuple = (), limit: int = 100000) -> list[dict]:
        """Candidate rows, newest first. `where` is a fixed SQL condition written by callers in this
        package (never user text); values go in `params`."""
        rows = self._q(f"SELECT {_CAND_COLS} FROM candidates WHERE {where} ORDER BY created_at DESC, id LIMIT ?",
                       (*params, limit))
        out = []
        for r in rows:
            d = dict(zip([c.strip() for c in _CAND_COLS.split(",")], r))
            d["details"] = json.loads(d["details"]) if d["details"] else {}
            out.append(d)
        return out

    def offered_candidates(self, conversation_id: str, session_id: str) -> list[dict]:
        """In-loop revisions still offered to a session (not accepted or dismissed) on a conversation's
        replies, newest first: the chat shows the newest under the reply it revises."""
        return self.candidates("origin = 'inloop' AND status = 'offered' AND session_id = ? AND message_id IN"
                               " (SELECT id FROM messages WHERE conversation_id = ?)", (session_id, conversation_id))

    def rejected_candidates(self) -> dict[str, list[str]]:
        """Message id -> texts of candidates a user dismissed (DPO/KTO negatives)."""
        out: dict[str, list[str]] = {}
        for mid, text in self._q("SELECT message_id, text FROM candidates WHERE status = 'rejected' AND message_id IS NOT NULL"
                                 " ORDER BY created_at, id"):
            out.setdefault(mid, []).append(text)
        return out

    def add_guideline(self, text: str, scope: str, status: str, session_id: str | None = None,
                      user_name: str | None = None, source_feedback_id: str | None = None) -> str:
        if scope not in ("user", "global") or status not in GUIDELINE_STATUSES:
            raise StoreError("a guideline's scope is user or global; its status active, pending or retired")
        gid = new_id()
        now = utcnow()
        try:
            self._tx([("INSERT INTO guidelines (id, text, scope, status, session_id, user_name, source_feedback_id,"
                       " created_at, approved_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (gid, text, scope, status, session_id, user_name, source_feedback_id, now,
                        now if scope == "global" and status == "active" else None))])
        finally:
            self._rules.forget()
        return gid

    def guideline(self, guideline_id: str) -> dict | None:
        rows = self.guidelines(where="id = ?", params=(guideline_id,))
        return rows[0] if rows else None

    def guidelines(self, where: str = "TRUE", params: tuple = ()) -> list[dict]:
        """Guideline rows, oldest first; `where` as in `candidates`."""
        rows = self._q(f"SELECT {_GUIDE_COLS} FROM guidelines WHERE {where} ORDER BY created_at, id", params)
        return [dict(zip([c.strip() for c in _GUIDE_COLS.split(",")], r)) for r in rows]

    def approved_guidelines(self) -> list[dict]:
        """Guidelines an admin approved for everyone (what applies to all chats and the cycle distils)."""
        return self.guidelines("scope = 'global' AND status = 'active'")

    def nightly_candidates(self, limit: int = 100000) -> list[dict]:
        """The learning cycles' candidates (kept and dropped), newest first: the admin's audit view."""
        return self.candidates("origin = 'nightly'", limit=limit)

    def global_guidelines(self) -> list[dict]:
        """Guidelines for everyone: suggested (pending), approved (active) and retired."""
        return self.guidelines("scope = 'global'")

    def owned_guidelines(self, session_id: str | None, user_name: str | None) -> list[dict]:
        """Every guideline one user keeps or suggested, retired ones excepted (what their cap counts)."""
        return self.guidelines("status != 'retired' AND ((user_name IS NOT NULL AND user_name = ?) OR"
                               " (user_name IS NULL AND session_id = ?))", (user_name, session_id))

    def guidelines_for(self, session_id: str | None, user_name: str | None) -> list[dict]:
        """What applies to one user's requests: their own active guidelines and every approved global one
        (asked before every reply: remembered until a guideline changes)."""
        rules = self._rules.get((session_id, user_name), lambda: self.guidelines(
            "status = 'active' AND (scope = 'global' OR (scope = 'user' AND ((user_name IS NOT NULL AND user_name = ?)"
            " OR (user_name IS NULL AND session_id = ?))))", (user_name, session_id)))
        return [dict(g) for g in rules]  # the caller's to change

    def update_guideline(self, guideline_id: str, text: str | None = None, status: str | None = None) -> None:
        if status is not None and status not in GUIDELINE_STATUSES:
            raise StoreError(f"unknown guideline status {status!r}")
        if self.guideline(guideline_id) is None:
            raise StoreError(f"no guideline with id {guideline_id!r}")
        now = utcnow()
        stmts = []
        if text is not None:
            stmts.append(("UPDATE guidelines SET text = ? WHERE id = ?", (text, guideline_id)))
        if status == "active":
            stmts.append(("UPDATE guidelines SET status = 'active', approved_at = ? WHERE id = ?", (now, guideline_id)))
        elif status == "retired":
            stmts.append(("UPDATE guidelines SET status = 'retired', retired_at = ? WHERE id = ?", (now, guideline_id)))
        elif status is not None:
            stmts.append(("UPDATE guidelines SET status = ? WHERE id = ?", (status, guideline_id)))
        if stmts:
            try:
                self._tx(stmts)
            finally:
                self._rules.forget()

    # -- adapters ---------------------------------------------------------------------------
    def add_adapter(self, name: str, parent: str | None, status: str, path: str | None, recipe: dict | None = None,
                    owner: str | None = None) -> None:
        """`owner`: None for the shared adapter, else whose personal adapter it is (chatfb.learning.trust.who)."""
        self._tx([("INSERT INTO adapters (name, parent, status, path, created_at, recipe, owner)"
                   " VALUES (?, ?, ?, ?, ?, ?, ?)", (name, parent, status, path, utcnow(), json.dumps(recipe or {}), owner))])

    def update_adapter(self, name: str, **fields_) -> None:
        allowed = {"status", "path", "metrics", "data_counts", "timings", "error", "promoted_at", "parent"}
        bad = set(fields_) - allowed
        if bad:
            raise StoreError(f"cannot update adapter fields {sorted(bad)}")
        sets, params = [], []
        for k, v in fields_.items():
            sets.append(f"{k} = ?")
            params.append(json.dumps(v) if k in ("metrics", "data_counts", "timings") else v)
        self._tx([(f"UPDATE adapters SET {', '.join(sets)} WHERE name = ?", (*params, name))])

    def adapters(self) -> list[dict]:
        rows = self._q("SELECT name, parent, status, path, created_at, promoted_at, metrics, data_counts, timings, recipe, error,"
                       " coalesce(deleted_users, 0), owner FROM adapters ORDER BY created_at, name")
        keys = ("name", "parent", "status", "path", "created_at", "promoted_at", "metrics", "data_counts", "timings", "recipe", "error",
                "deleted_users", "owner")
        out = []
        for r in rows:
            d = dict(zip(keys, r))
            for k in ("metrics", "data_counts", "timings", "recipe"):
                d[k] = json.loads(d[k]) if d[k] else {}
            out.append(d)
        return out

    def adapter(self, name: str) -> dict | None:
        return next((a for a in self.adapters() if a["name"] == name), None)

    def live_adapter(self) -> dict | None:
        """The live shared adapter (None: the base model serves everyone without a personal one)."""
        return next((a for a in self.adapters() if a["status"] == "live" and a["owner"] is None), None)

    def set_live(self, name: str | None) -> None:
        """Make `name` the one live shared adapter (None = serve the base model); the old one is retired."""
        stmts = [("UPDATE adapters SET status = 'retired' WHERE status = 'live' AND owner IS NULL", ())]
        if name is not None:
            stmts.append(("UPDATE adapters SET status = 'live', promoted_at = ? WHERE name = ?", (utcnow(), name)))
        self._tx(stmts)

    # -- personal adapters (one live per owner, beside the shared one) ------------------------
    def personal_adapters(self, owner: str | None = None) -> list[dict]:
        """Every personal adapter, oldest first; only `owner`'s when given."""
        return [a for a in self.adapters() if a["owner"] is not None and (owner is None or a["owner"] == owner)]

    def live_personal_adapters(self) -> dict[str, str]:
        """Owner -> the name of their live personal adapter."""
        return {a["owner"]: a["name"] for a in self.personal_adapters() if a["status"] == "live"}

    def set_live_personal(self, owner: str, name: str | None) -> None:
        """Make `name` `owner`'s one live personal adapter (None = they are served the shared one again)."""
        stmts = [("UPDATE adapters SET status = 'retired' WHERE status = 'live' AND owner = ?", (owner,))]
        if name is not None:
            stmts.append(("UPDATE adapters SET status = 'live', promoted_at = ? WHERE name = ? AND owner = ?",
                          (utcnow(), name, owner)))
        self._tx(stmts)

    def delete_personal_adapters(self, owner: str) -> list[dict]:
        """Remove `owner`'s personal adapter rows; returns them (their files are the caller's to remove)."""
        rows = self.personal_adapters(owner)
        self._tx([("DELETE FROM uptake WHERE adapter IN (SELECT name FROM adapters WHERE owner = ?)", (owner,)),
                  ("DELETE FROM adapters WHERE owner = ?", (owner,))])
        return rows

    # -- uptake: what a promoted adapter answers to the feedback it trained on (chatfb.learning.uptake) ----
    def add_uptake(self, adapter: str, rows: list[dict]) -> None:
        """Record `adapter`'s answers to trained feedback items (keys: feedback_id, learned, measure, score,
        answer); an item checked on this adapter before is replaced."""
        now = utcnow()
        stmts = [("INSERT OR REPLACE INTO uptake (feedback_id, adapter, learned, measure, score, answer, checked_at)"
                  " VALUES (?, ?, ?, ?, ?, ?, ?)", (r["feedback_id"], adapter, bool(r["learned"]), r["measure"],
                                                    r.get("score"), r.get("answer") or "", now)) for r in rows]
        if stmts:
            self._tx(stmts)

    def uptake(self, adapter: str | None = None, feedback_ids: list[str] | None = None) -> list[dict]:
        """Uptake rows, newest check first, each with its adapter's `owner` (None: the shared adapter);
        only `adapter`'s, or only these feedback ids', when given."""
        where, params = ["TRUE"], []
        if adapter is not None:
            where.append("u.adapter = ?")
            params.append(adapter)
        if feedback_ids is not None:
            if not feedback_ids:
                return []
            where.append(f"u.feedback_id IN ({', '.join('?' * len(feedback_ids))})")
            params += list(feedback_ids)
        rows = self._q("SELECT u.feedback_id, u.adapter, a.owner, u.learned, u.measure, u.score, u.answer, u.checked_at"
                       " FROM uptake u LEFT JOIN adapters a ON a.name = u.adapter"
                       f" WHERE {' AND '.join(where)} ORDER BY u.checked_at DESC, u.adapter DESC", tuple(params))
        keys = ("feedback_id", "adapter", "owner", "learned", "measure", "score", "answer", "checked_at")
        return [dict(zip(keys, r)) for r in rows]

    # -- API keys ---------------------------------------------------------------------------
    def add_api_key(self, user_name: str, key_hash: str, prefix: str) -> str:
        kid = new_id()
        self._tx([("INSERT INTO api_keys VALUES (?, ?, ?, ?, ?, NULL)", (kid, user_name, key_hash, prefix, utcnow()))])
        return kid

    def api_keys(self, user_name: str | None = None) -> list[dict]:
        """Keys (never their hashes), oldest first; one user's when `user_name` is given."""
        where, params = ("WHERE user_name = ?", (user_name,)) if user_name is not None else ("", ())
        rows = self._q(f"SELECT id, user_name, prefix, created_at, revoked_at FROM api_keys {where} ORDER BY created_at, id",
                       params)
        return [dict(zip(("id", "user_name", "prefix", "created_at", "revoked_at"), r)) for r in rows]

    def api_key_user(self, key_hash: str) -> str | None:
        """The user an unrevoked key with this hash belongs to, or None. Live keys are remembered (the API
        asks on every request) until the next revocation or deletion, which ends a key at once."""
        def read() -> str | None:
            rows = self._q("SELECT user_name FROM api_keys WHERE key_hash = ? AND revoked_at IS NULL", (key_hash,))
            return rows[0][0] if rows else None

        return self._key_users.get(key_hash, read, keep=lambda user: user is not None)

    def revoke_api_keys(self, user_name: str, key_id: str | None = None) -> int:
        """Revoke one user's keys (or only `key_id` of theirs). Returns how many were live."""
        where, params = "user_name = ? AND revoked_at IS NULL", (user_name,)
        if key_id is not None:
            where, params = where + " AND id = ?", params + (key_id,)
        n = self._q(f"SELECT count(*) FROM api_keys WHERE {where}", params)[0][0]
        try:
            self._tx([(f"UPDATE api_keys SET revoked_at = ? WHERE {where}", (utcnow(), *params))])
        finally:
            self._key_users.forget()
        return n

    def find_api_conversation(self, session_id: str, last_reply: str, limit: int = 5) -> list[str]:
        """The session's newest conversations with a visible reply that reads `last_reply` (an API client
        sends the whole history each time; the caller compares it with each candidate's)."""
        rows = self._q("SELECT m.conversation_id FROM messages m JOIN conversations c ON c.id = m.conversation_id"
                       " WHERE c.session_id = ? AND m.role = 'assistant' AND m.content = ? AND NOT m.replaced"
                       " GROUP BY m.conversation_id ORDER BY max(m.created_at) DESC LIMIT ?",
                       (session_id, last_reply, limit))
        return [r[0] for r in rows]

    def mark_deleted_user(self, adapter_names: list[str]) -> None:
        """Count one more deleted user's rows in each of these adapters (they keep them until retrained)."""
        if adapter_names:
            self._tx([("UPDATE adapters SET deleted_users = coalesce(deleted_users, 0) + 1 WHERE name = ?", (n,))
                      for n in adapter_names])

    # -- review queue and flagged authors (chatfb.learning.trust) ----------------------------
    def set_review(self, feedback_ids: list[str], decision: str,
                   content: dict[str, tuple[str, str]] | None = None) -> None:
        """An admin's decision on feedback rows (a later decision replaces an earlier one). Every id must
        name an existing row, else nothing is recorded. `content`: feedback id -> (the question it answered, the
        text it teaches), kept with the decision (a rejection outlives its row: `rejected_content`)."""
        if decision not in REVIEW_DECISIONS:
            raise StoreError(f"a review decision is one of {', '.join(REVIEW_DECISIONS)}")
        ids = list(dict.fromkeys(feedback_ids))
        if not ids:
            raise StoreError("no feedback ids given")
        found = {r[0] for r in self._q("SELECT id FROM feedback WHERE id IN (SELECT unnest(?::VARCHAR[]))", (ids,))}
        missing = [i for i in ids if i not in found]
        if missing:
            raise StoreError(f"no feedback with id {', '.join(missing)} (deleted, or never there); nothing was decided")
        now, content = utcnow(), content or {}
        self._tx([("INSERT OR REPLACE INTO reviews (feedback_id, decision, decided_at, question, taught)"
                   " VALUES (?, ?, ?, ?, ?)", (i, decision, now, *content.get(i, (None, None)))) for i in ids])

    def reviews(self) -> dict[str, str]:
        """Feedback id -> the admin's decision (approved | rejected)."""
        return dict(self._q("SELECT feedback_id, decision FROM reviews"))

    def rejected_content(self) -> list[tuple[str, str]]:
        """(question, taught text) of every rejection that recorded them, its row still there or not."""
        return [(q, t or "") for q, t in self._q("SELECT question, taught FROM reviews WHERE decision = 'rejected'"
                                                 " AND question IS NOT NULL ORDER BY decided_at, feedback_id")]

    def flag_author(self, author: str, reason: str = "") -> None:
        """Flag a user name or anonymous session id: nothing of theirs trains any more."""
        self._tx([("INSERT OR REPLACE INTO flagged_authors (author, reason, flagged_at) VALUES (?, ?, ?)",
                   (author, reason, utcnow()))])

    def unflag_author(self, author: str) -> None:
        if not self._q("SELECT 1 FROM flagged_authors WHERE author = ?", (author,)):
            raise StoreError(f"{author!r} is not flagged")
        self._tx([("DELETE FROM flagged_authors WHERE author = ?", (author,))])

    def flagged_authors(self) -> set[str]:
        return {r[0] for r in self._q("SELECT author FROM flagged_authors")}

    # -- counts, privacy --------------------------------------------------------------------
    def counts(self) -> dict:
        out = {t: self._q(f"SELECT count(*) FROM {t}")[0][0] for t in ("conversations", "messages", "feedback", "adapters")}
        for kind, n in self._q("SELECT kind, count(*) FROM feedback WHERE superseded_at IS NULL GROUP BY kind"):
            out[f"feedback_{kind}"] = n
        return out

    def feedback_per_day(self) -> list[tuple]:
        return self._q("SELECT CAST(created_at AS DATE) AS day, kind, count(*) FROM feedback WHERE superseded_at IS NULL"
                       " GROUP BY day, kind ORDER BY day, kind")

    def critique_texts(self, limit: int = 5000) -> list[str]:
        return [r[0] for r in self._q("SELECT text FROM feedback WHERE kind = 'critique' AND superseded_at IS NULL"
                                      " ORDER BY created_at DESC LIMIT ?", (limit,))]

    def delete_user(self, user_name: str) -> int:
        """Remove every conversation, message and feedback row of one user. Returns conversations removed."""
        cids = [r[0] for r in self._q("SELECT id FROM conversations WHERE user_name = ?", (user_name,))]
        self._delete_conversations(cids)
        # Their own guidelines and suggestions go; ones an admin approved for everyone stay, with the user's
        # name removed: everyone's prompt must not change unannounced (an admin retires them if need be).
        # an admin's rejection stays (its question and text, no name): deleting the author must not undo it
        self._tx([("DELETE FROM reviews WHERE decision <> 'rejected' AND feedback_id IN (SELECT id FROM feedback"
                   " WHERE user_name = ?)", (user_name,)),
                  ("DELETE FROM uptake WHERE feedback_id IN (SELECT id FROM feedback WHERE user_name = ?)", (user_name,)),
                  ("DELETE FROM feedback WHERE user_name = ?", (user_name,)),
                  ("DELETE FROM guidelines WHERE user_name = ? AND (scope = 'user' OR status = 'pending')", (user_name,)),
                  ("UPDATE guidelines SET user_name = NULL, session_id = NULL WHERE user_name = ?", (user_name,)),
                  ("DELETE FROM api_keys WHERE user_name = ?", (user_name,))])
        self._key_users.forget()
        self._rules.forget()
        return len(cids)

    def apply_retention(self, days: int) -> int:
        """Delete conversations (and users' own guidelines) older than `days`. Returns conversations removed."""
        cutoff = utcnow() - timedelta(days=days)
        cids = [r[0] for r in self._q("SELECT id FROM conversations WHERE created_at < ?", (cutoff,))]
        self._delete_conversations(cids)
        try:
            self._tx([("DELETE FROM guidelines WHERE scope = 'user' AND created_at < ?", (cutoff,))])
        finally:
            self._rules.forget()
        return len(cids)

    def _delete_conversations(self, cids: list[str]) -> None:
        stmts = []
        for cid in cids:
            stmts += [
                ("DELETE FROM candidates WHERE message_id IN (SELECT id FROM messages WHERE conversation_id = ?)", (cid,)),
                # a rejection outlives the conversation: its user deleting it must not undo the admin's decision
                ("DELETE FROM reviews WHERE decision <> 'rejected' AND feedback_id IN (SELECT f.id FROM feedback f"
                 " JOIN messages m ON m.id = f.message_id WHERE m.conversation_id = ?)", (cid,)),
                ("DELETE FROM uptake WHERE feedback_id IN (SELECT f.id FROM feedback f JOIN messages m ON m.id = f.message_id"
                 " WHERE m.conversation_id = ?)", (cid,)),
                ("DELETE FROM feedback WHERE message_id IN (SELECT id FROM messages WHERE conversation_id = ?)", (cid,)),
                ("DELETE FROM messages WHERE conversation_id = ?", (cid,)),
                ("DELETE FROM conversations WHERE id = ?", (cid,)),
            ]
        if stmts:
            self._tx(stmts)
        with self._seq_lock:
            for cid in cids:
                self._seq.pop(cid, None)


class _Write:
    """One job for the writer thread: a transaction's statements, or a call on the connection."""

    __slots__ = ("statements", "independent", "call", "result", "error", "done")

    def __init__(self, statements, independent=False, call=None):
        self.statements, self.independent, self.call = statements, independent, call
        self.result = self.error = None
        self.done = threading.Event()


_INSERT_MESSAGE = ("INSERT INTO messages (id, conversation_id, seq, role, content, status, model, adapter, replaces, created_at,"
                   " guidelines) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
_INSERT_FEEDBACK = ("INSERT INTO feedback (id, message_id, kind, rating, text, user_name, session_id, created_at, derived_from,"
                    " origin) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")

_FINISH_MESSAGE = ("UPDATE messages SET content = ?, status = ?, error = ?, ttft_ms = ?, latency_ms = ?, prompt_tokens = ?,"
                   " completion_tokens = ?, finish_reason = ? WHERE id = ?")

# The statements every chat turn makes, each also written once over lists of values (one list per
# column), with the position of its key: DuckDB runs an executemany one row at a time, ~0.2 ms per
# INSERT and ~0.7 ms per UPDATE here (20 ms for 32 replies' UPDATEs), while one statement over lists
# costs about one row's time. Rows whose key repeats in a batch run as executemany instead, in order,
# so the write queued last wins.
_AS_LISTS = {
    _INSERT_MESSAGE: ("INSERT INTO messages (id, conversation_id, seq, role, content, status, model, adapter, replaces,"
                     " created_at, guidelines) SELECT unnest(?::VARCHAR[]), unnest(?::VARCHAR[]), unnest(?::INTEGER[]),"
                     " unnest(?::VARCHAR[]), unnest(?::VARCHAR[]), unnest(?::VARCHAR[]), unnest(?::VARCHAR[]),"
                     " unnest(?::VARCHAR[]), unnest(?::VARCHAR[]), unnest(?::TIMESTAMP[]), unnest(?::VARCHAR[])", 0),
    _INSERT_FEEDBACK: ("INSERT INTO feedback (id, message_id, kind, rating, text, user_name, session_id, created_at,"
                      " derived_from, origin) SELECT unnest(?::VARCHAR[]), unnest(?::VARCHAR[]), unnest(?::VARCHAR[]),"
                      " unnest(?::INTEGER[]), unnest(?::VARCHAR[]), unnest(?::VARCHAR[]), unnest(?::VARCHAR[]),"
                      " unnest(?::TIMESTAMP[]), unnest(?::VARCHAR[]), unnest(?::VARCHAR[])", 0),
    _FINISH_MESSAGE: ("UPDATE messages SET content = r.content, status = r.status, error = r.error, ttft_ms = r.ttft_ms,"
                     " latency_ms = r.latency_ms, prompt_tokens = r.prompt_tokens, completion_tokens = r.completion_tokens,"
                     " finish_reason = r.finish_reason"
                     " FROM (SELECT unnest(?::VARCHAR[]) AS content, unnest(?::VARCHAR[]) AS status,"
                     " unnest(?::VARCHAR[]) AS error, unnest(?::DOUBLE[]) AS ttft_ms, unnest(?::DOUBLE[]) AS latency_ms,"
                     " unnest(?::INTEGER[]) AS prompt_tokens, unnest(?::INTEGER[]) AS completion_tokens,"
                     " unnest(?::VARCHAR[]) AS finish_reason, unnest(?::VARCHAR[]) AS id) AS r WHERE messages.id = r.id", 8),
}


def _batch_statements(batch: list[_Write]) -> list[tuple[str, list[tuple]]]:
    """A batch's statements as (sql, rows of parameters), one `executemany` each.

    DuckDB spends most of a small write on the statement, not the row, so same-shaped writes run
    together. Every write in a batch was queued while none of them was committed, so running them in
    any order is a valid serial order: writes of one shape (the same statements, in order) move up
    to the first of them. A write of one statement then joins its shape's executemany. Writes marked
    `independent` run statement by statement across the shape (all first statements, then all
    second ones); any other write of several statements runs alone, in its own order."""
    shapes: dict = {}
    for job in batch:
        shape = tuple(sql for sql, _ in job.statements)
        key = shape if len(shape) == 1 or job.independent else id(job)
        shapes.setdefault(key, []).append(job)
    out = []
    for jobs in shapes.values():
        for i, (sql, _) in enumerate(jobs[0].statements):
            out.append((sql, [job.statements[i][1] for job in jobs]))
    return out


def _origin(kind: str, derived_from: str | None, same_as_candidate: bool) -> str:
    """The provenance kind of a feedback row (m004's backfill says the same in SQL)."""
    if kind != "correction":
        return kind
    if derived_from is None:
        return "written_correction"
    return "accepted_revision" if same_as_candidate else "edited_revision"


def _copy_database(db, dest: Path) -> None:
    """Copy the whole database into a new file `dest` and flush it to disk."""
    db.execute(f"ATTACH '{_sql_path(dest)}' AS snap")
    try:
        db.execute(_copy_sql(db))
    finally:
        db.execute("DETACH snap")
    with open(dest, "rb+") as fh:
        os.fsync(fh.fileno())


_MSG_COLS = ("id, conversation_id, seq, role, content, status, error, model, adapter, replaces, replaced, created_at,"
             " ttft_ms, latency_ms, prompt_tokens, completion_tokens, guidelines, finish_reason")


_CAND_COLS = ("id, feedback_id, message_id, origin, text, score, verdict, status, session_id, cycle, details, created_at")
_GUIDE_COLS = ("id, text, scope, status, session_id, user_name, source_feedback_id, created_at, approved_at, retired_at")


def _msg(row) -> dict:
    d = dict(zip([c.strip() for c in _MSG_COLS.split(",")], row))
    d["guidelines"] = json.loads(d["guidelines"]) if d["guidelines"] else []
    return d


def _sql_path(p: Path) -> str:
    # ATTACH takes no bound parameters; the path is ours (inside the data dir), quotes doubled anyway.
    return str(p).replace("'", "''")


def _copy_sql(db) -> str:
    name = db.execute("SELECT current_database()").fetchone()[0]
    return f'COPY FROM DATABASE "{name}" TO snap'
