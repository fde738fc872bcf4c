from datetime import timedelta

import subprocess
import sys

import duckdb
import pytest

from chatfb.migrations import MIGRATIONS
from chatfb.store import Store, StoreError, utcnow


def test_migrations_run_once_and_are_recorded(settings):
    with Store(settings.db_path) as s:
        assert s.applied_migrations() == [name for name, _ in MIGRATIONS]
    with Store(settings.db_path) as s:  # reopening applies nothing twice
        assert s.applied_migrations() == [name for name, _ in MIGRATIONS]
        rows = s._q("SELECT table_name, column_name, data_type, is_nullable FROM information_schema.columns"
                    " WHERE table_schema = 'main' ORDER BY table_name, ordinal_position")
    schema: dict[str, list[str]] = {}
    for table, column, kind, nullable in rows:
        schema.setdefault(table, []).append(f"{column} {kind}" + ("" if nullable == "YES" else " NOT NULL"))
    assert schema == SCHEMA  # a new migration changes this on purpose: update SCHEMA with it


# The store's schema after every migration: each table, each column with its type, in order.
SCHEMA = {
    "_migrations": ["name VARCHAR NOT NULL", "applied_at TIMESTAMP"],
    "adapters": ["name VARCHAR NOT NULL", "parent VARCHAR", "status VARCHAR NOT NULL", "path VARCHAR",
                 "created_at TIMESTAMP NOT NULL", "promoted_at TIMESTAMP", "metrics JSON", "data_counts JSON",
                 "timings JSON", "recipe JSON", "error VARCHAR"],
    "candidates": ["id VARCHAR NOT NULL", "feedback_id VARCHAR NOT NULL", "message_id VARCHAR", "origin VARCHAR NOT NULL",
                   "text VARCHAR NOT NULL", "score DOUBLE", "verdict VARCHAR NOT NULL", "status VARCHAR NOT NULL",
                   "session_id VARCHAR", "cycle VARCHAR", "details JSON", "created_at TIMESTAMP NOT NULL"],
    "conversations": ["id VARCHAR NOT NULL", "session_id VARCHAR NOT NULL", "user_name VARCHAR",
                      "system_prompt VARCHAR NOT NULL", "source VARCHAR NOT NULL", "created_at TIMESTAMP NOT NULL"],
    "feedback": ["id VARCHAR NOT NULL", "message_id VARCHAR NOT NULL", "kind VARCHAR NOT NULL", "rating INTEGER",
                 "text VARCHAR", "user_name VARCHAR", "session_id VARCHAR", "created_at TIMESTAMP NOT NULL",
                 "superseded_at TIMESTAMP", "derived_from VARCHAR"],
    "guidelines": ["id VARCHAR NOT NULL", "text VARCHAR NOT NULL", "scope VARCHAR NOT NULL", "status VARCHAR NOT NULL",
                   "session_id VARCHAR", "user_name VARCHAR", "source_feedback_id VARCHAR",
                   "created_at TIMESTAMP NOT NULL", "approved_at TIMESTAMP", "retired_at TIMESTAMP"],
    "messages": ["id VARCHAR NOT NULL", "conversation_id VARCHAR NOT NULL", "seq INTEGER NOT NULL", "role VARCHAR NOT NULL",
                 "content VARCHAR NOT NULL", "status VARCHAR NOT NULL", "error VARCHAR", "model VARCHAR",
                 "adapter VARCHAR", "replaces VARCHAR", "replaced BOOLEAN NOT NULL", "created_at TIMESTAMP NOT NULL",
                 "ttft_ms DOUBLE", "latency_ms DOUBLE", "prompt_tokens INTEGER", "completion_tokens INTEGER",
                 "guidelines JSON"],
}


def test_turn_and_history(store):
    cid = store.create_conversation("s1", "ann", "Be brief.")
    u = store.add_message(cid, "user", "hi")
    a = store.add_message(cid, "assistant", "", status="pending", model="m")
    store.finish_message(a, "hello there", "ok", ttft_ms=5, latency_ms=9, prompt_tokens=3, completion_tokens=2)
    u2 = store.add_message(cid, "user", "again")
    a2 = store.add_message(cid, "assistant", "", status="pending")
    assert store.message(a)["status"] == "ok" and store.message(a)["completion_tokens"] == 2
    assert store.history_before(a2) == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello there"}, {"role": "user", "content": "again"}]
    assert [m["id"] for m in store.messages(cid)] == [u, a, u2, a2]


def test_failed_and_replaced_replies_leave_the_history(store):
    cid = store.create_conversation("s1")
    store.add_message(cid, "user", "q")
    bad = store.add_message(cid, "assistant", "", status="pending")
    store.finish_message(bad, "", "failed", error="down")
    again = store.add_message(cid, "assistant", "", status="pending", replaces=bad)
    assert store.message(bad)["replaced"] is True
    assert [m["id"] for m in store.messages(cid)][-1] == again
    assert store.history_before(again) == [{"role": "user", "content": "q"}]


def test_feedback_kinds_revision_and_refusals(store):
    cid = store.create_conversation("s1", "ann")
    u = store.add_message(cid, "user", "q")
    a = store.add_message(cid, "assistant", "answer")
    store.log_feedback(a, "critique", text="too long", session_id="s1")
    store.log_feedback(a, "critique", text="far too long", session_id="s1")  # revision
    store.log_feedback(a, "rating", rating=-1, session_id="s1")
    active = store.feedback_for(a)
    assert [(f["kind"], f["text"]) for f in active] == [("critique", "far too long"), ("rating", None)]
    assert len(store.feedback_for(a, active_only=False)) == 3
    with pytest.raises(StoreError, match="unknown message"):
        store.log_feedback("nope", "rating", rating=1)
    with pytest.raises(StoreError, match="unknown message"):
        store.log_feedback(a, "rating", rating=1, session_id="someone-else")
    with pytest.raises(StoreError, match="only replies"):
        store.log_feedback(u, "rating", rating=1)
    with pytest.raises(StoreError):
        store.log_feedback(a, "rating", rating=5)
    with pytest.raises(StoreError):
        store.log_feedback(a, "correction", text="  ")


def test_sql_in_feedback_is_just_text(store):
    cid = store.create_conversation("s1")
    store.add_message(cid, "user", "q")
    a = store.add_message(cid, "assistant", "x")
    evil = "'); DROP TABLE feedback; --"
    store.log_feedback(a, "critique", text=evil)
    assert store.feedback_for(a)[0]["text"] == evil
    assert store.counts()["feedback"] == 1


def test_feedback_records_carry_prompt_and_reply(store):
    cid = store.create_conversation("s1", system_prompt="sys")
    store.add_message(cid, "user", "What is 2+2?")
    a = store.add_message(cid, "assistant", "5")
    store.log_feedback(a, "correction", text="4")
    (r,) = store.feedback_records()
    assert r.prompt == [{"role": "system", "content": "sys"}, {"role": "user", "content": "What is 2+2?"}]
    assert (r.reply, r.kind, r.text) == ("5", "correction", "4")


def test_second_process_is_locked_out_and_snapshot_is_readable(store, tmp_path):
    cid = store.create_conversation("s1")
    store.add_message(cid, "user", "hello")
    code = ("from chatfb.store import Store, StoreLocked\n"
            f"try:\n    Store({str(store.path)!r})\nexcept StoreLocked as e:\n    print('LOCKED', e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "LOCKED" in out.stdout and "app running" in out.stdout
    snap = store.snapshot(tmp_path / "snap" / "latest.duckdb")
    with Store(snap, read_only=True) as s:
        assert s.counts()["messages"] == 1
    assert not list((tmp_path / "snap").glob(".*tmp"))


def test_snapshot_failure_keeps_previous_snapshot(store, tmp_path, monkeypatch):
    dest = tmp_path / "snap.duckdb"
    store.snapshot(dest)
    before = dest.read_bytes()
    import chatfb.store as st

    monkeypatch.setattr(st.os, "replace", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(OSError):
        store.snapshot(dest)
    assert dest.read_bytes() == before
    assert not list(tmp_path.glob(".snap*"))
    duckdb.connect(str(dest), read_only=True).close()


def test_import_is_all_or_nothing(store):
    good = {"prompt": [{"role": "user", "content": "q"}], "reply": "r", "kind": "rating", "rating": 1}
    bad = dict(good, kind="nonsense")
    with pytest.raises(StoreError):
        store.import_feedback([good, bad])
    assert store.counts()["feedback"] == 0
    assert store.import_feedback([good, good]) == 2
    assert store.counts()["feedback"] == 2


def test_delete_user_and_retention(store):
    for user in ("ann", "bob"):
        cid = store.create_conversation("s-" + user, user)
        store.add_message(cid, "user", "q")
        a = store.add_message(cid, "assistant", "r")
        store.log_feedback(a, "rating", rating=1, user_name=user)
    assert store.delete_user("ann") == 1
    assert store.counts()["conversations"] == 1 and store.counts()["feedback"] == 1
    store._q("UPDATE conversations SET created_at = ?", (utcnow() - timedelta(days=40),))
    assert store.apply_retention(30) == 1
    assert store.counts()["messages"] == 0


def test_concurrent_writers_group_commit_keeps_every_row_exact(settings):
    """32 threads write turns at once: same-shaped writes of one group commit are merged into one
    multi-row INSERT / UPDATE ... FROM VALUES; each row must still get exactly its own values, NULLs
    included, and every conversation's messages must keep their order."""
    import threading

    def writer(w, out):
        cid = store.create_conversation(f"s{w}", f"user{w}")
        for t in range(15):
            store.add_message(cid, "user", f"q{w}-{t}")
            mid = store.add_message(cid, "assistant", "", status="pending", model="m")
            done = t % 3 != 0
            store.finish_message(mid, f"a{w}-{t}" if done else "", "ok" if done else "error",
                                 error=None if done else "boom", ttft_ms=float(t) if done else None,
                                 latency_ms=t + 0.5, prompt_tokens=t if done else None, completion_tokens=w)
            if done:
                store.log_feedback(mid, "rating", rating=1 if t % 2 else -1, session_id=f"s{w}")
        out[w] = cid

    cids = {}
    with Store(settings.db_path) as store:
        threads = [threading.Thread(target=writer, args=(w, cids)) for w in range(32)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    with Store(settings.db_path) as store:  # what is in the file after closing
        assert store.counts()["messages"] == 32 * 30 and store.counts()["feedback"] == 32 * 10
        for w, cid in cids.items():
            msgs = store.messages(cid)
            assert [m["seq"] for m in msgs] == list(range(1, 31))
            for t in range(15):
                q, a = msgs[2 * t], msgs[2 * t + 1]
                done = t % 3 != 0
                assert (q["role"], q["content"]) == ("user", f"q{w}-{t}")
                assert (a["content"], a["status"], a["error"]) == ((f"a{w}-{t}", "ok", None) if done else ("", "error", "boom"))
                assert (a["ttft_ms"], a["latency_ms"], a["prompt_tokens"], a["completion_tokens"]) == \
                    ((float(t), t + 0.5, t, w) if done else (None, t + 0.5, None, w))
                ratings = [f["rating"] for f in store.feedback_for(a["id"])]
                assert ratings == ([1 if t % 2 else -1] if done else [])


def test_coalesce_merges_only_independent_single_writes():
    from chatfb.store import _Write, _coalesce

    ins = "INSERT INTO t (id, v) VALUES (?, ?)"
    upd = "UPDATE t SET v = ?, w = ? WHERE id = ?"
    batch = [_Write([(ins, ("a", 1))]), _Write([(upd, (1, 2, "x"))]), _Write([(ins, ("b", 2))]),
             _Write([("UPDATE t SET v = 0 WHERE id = ?", ("z",)), (ins, ("c", 3))]),  # two statements: as they are
             _Write([(upd, (3, 4, "y"))]), _Write([(upd, (5, 6, "x"))])]  # key x again: not merged, stays after
    out = _coalesce(batch)
    assert out[0] == ("INSERT INTO t (id, v) VALUES (?, ?), (?, ?)", ("a", 1, "b", 2))
    assert out[1][0].startswith("UPDATE t SET v = _v.c0, w = _v.c1 FROM (VALUES (?, ?, ?), (?, ?, ?)) AS _v(c0, c1, _k)")
    assert out[1][1] == (1, 2, "x", 3, 4, "y")
    assert out[2:] == [("UPDATE t SET v = 0 WHERE id = ?", ("z",)), (ins, ("c", 3)), (upd, (5, 6, "x"))]


def test_coalesce_merges_turns_of_inserts_only():
    """A transaction of a few single-row INSERTs (a turn) joins the batch's multi-row INSERTs; one with
    an UPDATE in it, or a long one (an import), keeps its statements as they are."""
    from chatfb.store import _Write, _coalesce

    ins, other = "INSERT INTO t (id, v) VALUES (?, ?)", "INSERT INTO u VALUES (?)"
    batch = [_Write([(ins, ("a", 1))]), _Write([(ins, ("b", 2)), (ins, ("c", 3)), (other, ("o",))]),
             _Write([("UPDATE t SET v = 0 WHERE id = ?", ("z",)), (ins, ("d", 4))]), _Write([(other, ("p",))]),
             _Write([(ins, (f"i{n}", n)) for n in range(5)])]
    assert _coalesce(batch) == [
        ("INSERT INTO t (id, v) VALUES (?, ?), (?, ?), (?, ?)", ("a", 1, "b", 2, "c", 3)),
        ("INSERT INTO u VALUES (?), (?)", ("o", "p")),
        ("UPDATE t SET v = 0 WHERE id = ?", ("z",)), (ins, ("d", 4)),
        *[(ins, (f"i{n}", n)) for n in range(5)]]


def test_add_turn_logs_message_and_pending_reply_in_one_commit(store):
    cid = store.create_conversation("s1", "ann")
    before = store.add_message(cid, "user", "first")
    commits = []
    run = store._run
    store._run = lambda batch: (commits.append(len(batch)), run(batch))
    user_id, reply_id = store.add_turn(cid, "how do I reset it?", model="m", adapter="chatfb-v0001")
    assert commits == [1]
    assert [(m["id"], m["role"], m["status"], m["seq"]) for m in store.messages(cid)] == [
        (before, "user", "ok", 1), (user_id, "user", "ok", 2), (reply_id, "assistant", "pending", 3)]
    reply = store.message(reply_id)
    assert (reply["model"], reply["adapter"], reply["content"]) == ("m", "chatfb-v0001", "")
    assert store.history_before(reply_id)[-1] == {"role": "user", "content": "how do I reset it?"}


def test_a_bad_write_in_a_merged_batch_fails_alone(store):
    """A merged statement that fails is retried write by write: the bad one gets the error, the
    others land."""
    from chatfb.store import _INSERT_FEEDBACK, _Write

    cid = store.create_conversation("s1")
    mid = store.add_message(cid, "user", "hi")
    sql = _INSERT_FEEDBACK
    good = [_Write([(sql, (f"f{i}", mid, "rating", 1, None, None, None, utcnow(), None))]) for i in range(3)]
    bad = _Write([(sql, ("f1", mid, "rating", 1, None, None, None, utcnow(), None))])  # same primary key as good[1]
    with store._lock:
        store._commit(good + [bad])
    assert [j.error for j in good] == [None, None, None] and bad.error is not None
    assert store._q("SELECT count(*) FROM feedback")[0][0] == 3


def test_message_numbers_continue_after_reopening(settings):
    with Store(settings.db_path) as s:
        cid = s.create_conversation("s1")
        for i in range(3):
            s.add_message(cid, "user", f"m{i}")
    with Store(settings.db_path) as s:
        s.add_message(cid, "user", "later")
        assert [m["seq"] for m in s.messages(cid)] == [1, 2, 3, 4]


def test_concurrent_revisions_of_one_rating_leave_exactly_one_active(store):
    """A double click sends two ratings of one reply at once: one must supersede the other."""
    import threading

    cid = store.create_conversation("s1")
    store.add_message(cid, "user", "hi")
    mid = store.add_message(cid, "assistant", "hello")
    go = threading.Barrier(8)

    def rate(i):
        go.wait()
        store.log_feedback(mid, "rating", rating=1 if i % 2 else -1, session_id="s1")

    threads = [threading.Thread(target=rate, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store.feedback_for(mid)) == 1 and len(store.feedback_for(mid, active_only=False)) == 8


def test_reads_do_not_wait_for_a_commit_under_way(store):
    """Reads run on pooled reader cursors, not on the writer's connection: while a group commit holds
    the writer (simulated by holding its lock), a reply's history and feedback checks still answer."""
    import threading

    cid = store.create_conversation("s1", "ann", "Be brief.")
    store.add_message(cid, "user", "hi")
    a = store.add_message(cid, "assistant", "", status="pending")
    store.finish_message(a, "hello", "ok")
    holding, release = threading.Event(), threading.Event()

    def commit_under_way():
        with store._lock:
            holding.set()
            release.wait(10)

    t = threading.Thread(target=commit_under_way)
    t.start()
    try:
        assert holding.wait(5)
        answers = []
        reader = threading.Thread(target=lambda: answers.append(
            (store.history_before(a), store.message(a)["content"], store.counts()["messages"])))
        reader.start()
        reader.join(5)
        assert not reader.is_alive(), "a read waited for the writer's connection"
        assert answers == [([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}], "hello", 2)]
    finally:
        release.set()
        t.join()


def test_reader_cursors_are_pooled_and_closed(settings):
    import threading

    s = Store(settings.db_path)
    cid = s.create_conversation("s1")
    for _ in range(20):  # threads that come and go, one at a time, reuse one cursor
        t = threading.Thread(target=lambda: s.messages(cid))
        t.start()
        t.join()
    assert len(s._all_readers) == 1
    s.close()
    with pytest.raises(StoreError, match="closed"):
        s.messages(cid)
    with Store(settings.db_path) as again:  # every connection closed: the file opens read-write again
        assert again.conversation(cid)["id"] == cid
