import time
from datetime import timedelta

import subprocess
import sys

import duckdb
import pytest

from chatfb.store.migrations import MIGRATIONS
from chatfb.store.db import Store
from chatfb.store.records import StoreError, cut_off, utcnow


def test_migrations_run_once_and_are_recorded(settings):
    with Store(settings.db_path) as s:
        assert s.applied_migrations() == [name for name, _ in MIGRATIONS]
    with Store(settings.db_path) as s:  # reopening applies nothing twice
        assert s.applied_migrations() == [name for name, _ in MIGRATIONS]
        schema = schema_of(s)
    # a new migration changes this on purpose: update SCHEMA with it
    assert sorted(schema) == sorted(SCHEMA), "the store's tables are not the ones SCHEMA lists"
    for table, expected in SCHEMA.items():
        assert schema[table] == expected, f"table {table}: columns, keys or indexes differ from SCHEMA"


def schema_of(store) -> dict[str, list[str]]:
    """Every table of the store: its columns in order (type, NOT NULL, default), then its keys and its indexes."""
    schema: dict[str, list[str]] = {}
    for table, column, kind, nullable, default in store._q(
            "SELECT table_name, column_name, data_type, is_nullable, column_default FROM information_schema.columns"
            " WHERE table_schema = 'main' ORDER BY table_name, ordinal_position"):
        schema.setdefault(table, []).append(f"{column} {kind}" + ("" if nullable == "YES" else " NOT NULL")
                                            + ("" if default is None else f" DEFAULT {default}"))
    for table, kind, columns in store._q(
            "SELECT table_name, constraint_type, constraint_column_names FROM duckdb_constraints()"
            " WHERE schema_name = 'main' AND constraint_type <> 'NOT NULL' ORDER BY ALL"):
        schema.setdefault(table, []).append(f"{kind} ({', '.join(columns)})")
    for table, sql in store._q("SELECT table_name, sql FROM duckdb_indexes() WHERE schema_name = 'main' ORDER BY ALL"):
        schema.setdefault(table, []).append(sql.rstrip(";"))
    return schema


# The store's whole schema after every migration: each table, each column with its type and default in order,
# then its keys and indexes.
SCHEMA = {
    "_migrations": ["name VARCHAR NOT NULL", "applied_at TIMESTAMP", "PRIMARY KEY (name)"],
    "api_keys": ["id VARCHAR NOT NULL", "user_name VARCHAR NOT NULL", "key_hash VARCHAR NOT NULL", "prefix VARCHAR NOT NULL",
                 "created_at TIMESTAMP NOT NULL", "revoked_at TIMESTAMP", "PRIMARY KEY (id)", "UNIQUE (key_hash)"],
    "adapters": ["name VARCHAR NOT NULL", "parent VARCHAR", "status VARCHAR NOT NULL", "path VARCHAR",
                 "created_at TIMESTAMP NOT NULL", "promoted_at TIMESTAMP", "metrics JSON", "data_counts JSON",
                 "timings JSON", "recipe JSON", "error VARCHAR", "deleted_users INTEGER DEFAULT 0", "owner VARCHAR",
                 "PRIMARY KEY (name)"],
    "candidates": ["id VARCHAR NOT NULL", "feedback_id VARCHAR NOT NULL", "message_id VARCHAR", "origin VARCHAR NOT NULL",
                   "text VARCHAR NOT NULL", "score DOUBLE", "verdict VARCHAR NOT NULL", "status VARCHAR NOT NULL",
                   "session_id VARCHAR", "cycle VARCHAR", "details JSON", "created_at TIMESTAMP NOT NULL",
                   "PRIMARY KEY (id)", "CREATE INDEX candidates_feedback ON candidates(feedback_id)"],
    "conversations": ["id VARCHAR NOT NULL", "session_id VARCHAR NOT NULL", "user_name VARCHAR",
                      "system_prompt VARCHAR NOT NULL DEFAULT ''", "source VARCHAR NOT NULL DEFAULT 'chat'",
                      "created_at TIMESTAMP NOT NULL", "client VARCHAR", "title VARCHAR", "PRIMARY KEY (id)"],
    "feedback": ["id VARCHAR NOT NULL", "message_id VARCHAR NOT NULL", "kind VARCHAR NOT NULL", "rating INTEGER",
                 "text VARCHAR", "user_name VARCHAR", "session_id VARCHAR", "created_at TIMESTAMP NOT NULL",
                 "superseded_at TIMESTAMP", "derived_from VARCHAR", "origin VARCHAR", "trusted BOOLEAN DEFAULT false",
                 "PRIMARY KEY (id)", "CREATE INDEX feedback_message ON feedback(message_id)"],
    "flagged_authors": ["author VARCHAR NOT NULL", "reason VARCHAR", "flagged_at TIMESTAMP NOT NULL", "PRIMARY KEY (author)"],
    "guidelines": ["id VARCHAR NOT NULL", "text VARCHAR NOT NULL", "scope VARCHAR NOT NULL", "status VARCHAR NOT NULL",
                   "session_id VARCHAR", "user_name VARCHAR", "source_feedback_id VARCHAR",
                   "created_at TIMESTAMP NOT NULL", "approved_at TIMESTAMP", "retired_at TIMESTAMP", "PRIMARY KEY (id)"],
    "messages": ["id VARCHAR NOT NULL", "conversation_id VARCHAR NOT NULL", "seq INTEGER NOT NULL", "role VARCHAR NOT NULL",
                 "content VARCHAR NOT NULL", "status VARCHAR NOT NULL DEFAULT 'ok'", "error VARCHAR", "model VARCHAR",
                 "adapter VARCHAR", "replaces VARCHAR", "replaced BOOLEAN NOT NULL DEFAULT false",
                 "created_at TIMESTAMP NOT NULL", "ttft_ms DOUBLE", "latency_ms DOUBLE", "prompt_tokens INTEGER",
                 "completion_tokens INTEGER", "guidelines JSON", "finish_reason VARCHAR", "PRIMARY KEY (id)",
                 "CREATE INDEX messages_conversation ON messages(conversation_id)"],
    "reviews": ["feedback_id VARCHAR NOT NULL", "decision VARCHAR NOT NULL", "decided_at TIMESTAMP NOT NULL",
                "question VARCHAR", "taught VARCHAR", "PRIMARY KEY (feedback_id)"],
    "uptake": ["feedback_id VARCHAR NOT NULL", "adapter VARCHAR NOT NULL", "learned BOOLEAN NOT NULL",
               "measure VARCHAR NOT NULL", "score DOUBLE", "answer VARCHAR NOT NULL", "checked_at TIMESTAMP NOT NULL",
               "PRIMARY KEY (feedback_id, adapter)"],
}


def test_api_keys_are_found_by_hash_until_revoked_and_go_with_their_user(store):
    k1 = store.add_api_key("ann", "hash-1", "cfb_abc")
    store.add_api_key("ann", "hash-2", "cfb_def")
    store.add_api_key("bob", "hash-3", "cfb_ghi")
    assert store.api_key_user("hash-1") == "ann" and store.api_key_user("nope") is None
    assert [k["prefix"] for k in store.api_keys("ann")] == ["cfb_abc", "cfb_def"]
    assert all("key_hash" not in k for k in store.api_keys()), "a key's hash is listed"
    assert store.revoke_api_keys("ann", k1) == 1 and store.api_key_user("hash-1") is None
    assert store.api_key_user("hash-2") == "ann"
    assert store.revoke_api_keys("bob", k1) == 0  # another user's key id revokes nothing
    store.delete_user("ann")
    assert [k["user_name"] for k in store.api_keys()] == ["bob"]


def test_a_remembered_api_key_ends_at_once_when_revoked_or_its_user_deleted(store, monkeypatch):
    """The API asks for a request's key every time: a live key is answered from memory, no query, but a
    revocation or a deleted user ends it for the very next request."""
    store.add_api_key("ann", "hash-1", "cfb_abc")
    store.add_api_key("bob", "hash-2", "cfb_def")
    assert store.api_key_user("hash-1") == "ann" and store.api_key_user("hash-2") == "bob"
    reads = []
    read = store._q
    monkeypatch.setattr(store, "_q", lambda sql, params=(): reads.append(sql) or read(sql, params))
    assert store.api_key_user("hash-1") == "ann" and not reads, "a live key's user was read again"
    store.revoke_api_keys("ann")
    assert store.api_key_user("hash-1") is None
    assert store.api_key_user("hash-2") == "bob"
    store.delete_user("bob")
    assert store.api_key_user("hash-2") is None


def test_a_key_read_while_it_is_revoked_is_not_remembered_as_live(store, monkeypatch):
    store.add_api_key("ann", "hash-1", "cfb_abc")
    read = store._q

    def read_then_revoke(sql, params=()):
        rows = read(sql, params)
        if "key_hash" in sql:  # the row was read live; the revocation commits before the answer is kept
            monkeypatch.setattr(store, "_q", read)
            store.revoke_api_keys("ann")
        return rows

    monkeypatch.setattr(store, "_q", read_then_revoke)
    assert store.api_key_user("hash-1") == "ann"  # the request under way got in
    assert store.api_key_user("hash-1") is None


def test_the_guidelines_for_a_user_are_remembered_until_a_guideline_changes(store, monkeypatch):
    """Asked before every reply, so answered from memory; every change applies to the very next reply."""
    texts = lambda: [g["text"] for g in store.guidelines_for("s1", "ann")]
    mine = store.add_guideline("Be brief.", "user", "active", "s1", "ann")
    assert texts() == ["Be brief."]
    reads = []
    read = store._q
    monkeypatch.setattr(store, "_q", lambda sql, params=(): reads.append(sql) or read(sql, params))
    store.guidelines_for("s1", "ann")[0]["text"] = "changed by a caller"
    assert texts() == ["Be brief."] and not reads, reads
    everyone = store.add_guideline("Be kind.", "global", "pending", "s2", "bob")
    assert texts() == ["Be brief."]
    store.update_guideline(everyone, status="active")
    assert texts() == ["Be brief.", "Be kind."]
    store.update_guideline(mine, text="Be very brief.")
    assert texts() == ["Be very brief.", "Be kind."]
    store.update_guideline(mine, status="retired")
    assert texts() == ["Be kind."]
    store.add_guideline("Use metric units.", "user", "active", "s1", "ann")
    assert texts() == ["Be kind.", "Use metric units."]
    store.delete_user("ann")
    assert texts() == ["Be kind."]
    store.add_guideline("Use metric units.", "user", "active", "s1", "ann")
    assert texts() == ["Be kind.", "Use metric units."]
    store.apply_retention(0)
    assert texts() == ["Be kind."]


def test_m004_gives_old_feedback_its_origin_and_old_rows_defaults(settings):
    """A store made before m004: written, accepted and edited corrections get their origin; other rows
    their kind; nothing is trusted; adapters carry no deleted user's rows."""
    settings.db_path.parent.mkdir(parents=True)
    db = duckdb.connect(str(settings.db_path))
    db.execute("CREATE TABLE _migrations (name VARCHAR PRIMARY KEY, applied_at TIMESTAMP)")
    for name, statements in MIGRATIONS[:3]:
        for sql in statements:
            db.execute(sql)
        db.execute("INSERT INTO _migrations VALUES (?, ?)", (name, utcnow()))
    now = utcnow()
    db.execute("INSERT INTO adapters (name, status, created_at) VALUES ('chatfb-v0001', 'live', ?)", (now,))
    db.execute("INSERT INTO candidates (id, feedback_id, message_id, origin, text, verdict, status, created_at)"
               " VALUES ('c1', 'crit', 'm1', 'inloop', 'the revision', 'ok', 'accepted', ?)", (now,))
    for fid, kind, text, derived in (("w", "correction", "my own", None), ("a", "correction", "the revision", "crit"),
                                     ("e", "correction", "the revision, edited", "crit"), ("r", "rating", None, None)):
        db.execute("INSERT INTO feedback (id, message_id, kind, rating, text, created_at, derived_from)"
                   " VALUES (?, 'm1', ?, 1, ?, ?, ?)", (fid, kind, text, now, derived))
    db.close()
    with Store(settings.db_path) as s:
        assert "m004_provenance_and_review" in s.applied_migrations()
        rows = dict(s._q("SELECT id, origin FROM feedback"))
        assert rows == {"w": "written_correction", "a": "accepted_revision", "e": "edited_revision", "r": "rating"}
        assert s._q("SELECT DISTINCT trusted FROM feedback") == [(False,)]
        assert s.adapters()[0]["deleted_users"] == 0


def test_turn_and_history(store):
    cid = store.create_conversation("s1", "ann", "Be brief.")
    u = store.add_message(cid, "user", "hi")
    a = store.add_message(cid, "assistant", "", status="pending", model="m")
    store.finish_message(a, "hello there", "ok", ttft_ms=5, latency_ms=9, prompt_tokens=3, completion_tokens=2,
                         finish_reason="length")
    u2 = store.add_message(cid, "user", "again")
    a2 = store.add_message(cid, "assistant", "", status="pending")
    assert store.message(a)["status"] == "ok" and store.message(a)["completion_tokens"] == 2
    assert store.message(a)["finish_reason"] == "length" and store.message(a2)["finish_reason"] is None
    assert store.history_before(a2) == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello there"}, {"role": "user", "content": "again"}]
    assert [m["id"] for m in store.messages(cid)] == [u, a, u2, a2]


def test_feedback_records_say_which_replies_were_cut_off(store):
    """By the token limit (the finish reason stored with the reply) or by the user's Stop; not a reply that ended
    on its own, nor one from before finish reasons were stored."""
    cid = store.create_conversation("s1", "ann")
    cut = {}
    for name, status, finish in (("length", "ok", "length"), ("stop", "ok", "stop"), ("stopped", "stopped", None),
                                 ("older", "ok", None), ("whole when stopped", "stopped", "stop"), ("abort", "ok", "abort")):
        store.add_message(cid, "user", name)
        mid = store.add_message(cid, "assistant", "", status="pending")
        store.finish_message(mid, f"reply {name}", status, finish_reason=finish)
        cut[store.log_feedback(mid, "critique", text="too long", session_id="s1")] = name
    expected = {"length": True, "stop": False, "stopped": True, "older": False, "whole when stopped": False, "abort": True}
    assert {cut[r.feedback_id]: r.reply_cut_off for r in store.feedback_records()} == expected
    assert {name: cut_off(finish, status) for name, status, finish in (  # the chat's rule is the query's
        ("length", "ok", "length"), ("stop", "ok", "stop"), ("stopped", "stopped", None), ("older", "ok", None),
        ("whole when stopped", "stopped", "stop"), ("abort", "ok", "abort"))} == expected


def test_failed_and_replaced_replies_leave_the_history(store):
    cid = store.create_conversation("s1")
    store.add_message(cid, "user", "q")
    bad = store.add_message(cid, "assistant", "", status="pending")
    store.finish_message(bad, "", "failed", error="down")
    again = store.add_message(cid, "assistant", "", status="pending", replaces=bad)
    assert store.message(bad)["replaced"] is True
    assert [m["id"] for m in store.messages(cid)][-1] == again
    assert store.history_before(again) == [{"role": "user", "content": "q"}]


def test_an_edited_message_starts_a_branch_and_the_old_one_stays_stored(store):
    cid = store.create_conversation("s1")
    u1, a1 = store.add_turn(cid, "name a fruit")
    store.finish_message(a1, "apple", "ok")
    u2, a2 = store.add_turn(cid, "and a colour?")
    store.finish_message(a2, "red", "ok")
    a2b = store.add_message(cid, "assistant", "", status="pending", replaces=a2)  # Retry on the old branch
    store.finish_message(a2b, "blue", "ok")
    e1, r1 = store.add_turn(cid, "name a vegetable", replaces=u1)  # the first message, edited and sent again
    store.finish_message(r1, "leek", "ok")
    assert [m["id"] for m in store.messages(cid)] == [e1, r1]  # the branch in view
    everything = store.messages(cid, include_replaced=True)
    assert [m["id"] for m in everything] == [u1, a1, u2, a2, a2b, e1, r1]  # nothing deleted
    assert [m["id"] for m in everything if m["replaced"]] == [u1, a1, u2, a2, a2b]
    assert store.message(e1)["replaces"] == u1
    # each reply keeps the history it was answered from
    assert store.history_before(r1) == [{"role": "user", "content": "name a vegetable"}]
    assert store.history_before(a2b) == [{"role": "user", "content": "name a fruit"},
                                         {"role": "assistant", "content": "apple"},
                                         {"role": "user", "content": "and a colour?"}]
    e2, r2 = store.add_turn(cid, "a green one?", replaces=None)
    assert [m["id"] for m in store.messages(cid)] == [e1, r1, e2, r2]
    assert store.conversations_of("s1")[0]["title"] == "name a vegetable"  # the branch's first message


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
    code = ("from chatfb.store.db import Store, StoreLocked\n"
            f"try:\n    Store({str(store.path)!r})\nexcept StoreLocked as e:\n    print('LOCKED', e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "LOCKED" in out.stdout and "app running" in out.stdout, f"a second process was not locked out: {out}"
    snap = store.snapshot(tmp_path / "snap" / "latest.duckdb")
    with Store(snap, read_only=True) as s:
        assert s.counts()["messages"] == 1
    assert not list((tmp_path / "snap").glob(".*tmp")), "the snapshot's temporary file was left behind"
    # a snapshot an older chatfb wrote is not upgraded by a reader: a clear error, the file as it was
    con = duckdb.connect(str(snap))
    con.execute("DELETE FROM _migrations WHERE name = ?", (MIGRATIONS[-1][0],))
    con.close()
    with pytest.raises(StoreError, match=f"older chatfb .*{MIGRATIONS[-1][0]}.*restart the app"):
        Store(snap, read_only=True)


def test_snapshot_failure_keeps_previous_snapshot(store, tmp_path, monkeypatch):
    dest = tmp_path / "snap.duckdb"
    store.snapshot(dest)
    before = dest.read_bytes()
    import chatfb.store.db as st

    monkeypatch.setattr(st.os, "replace", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(OSError):
        store.snapshot(dest)
    assert dest.read_bytes() == before, "a failed snapshot changed the previous one"
    assert not list(tmp_path.glob(".snap*")), "a failed snapshot left its temporary file"
    duckdb.connect(str(dest), read_only=True).close()


def test_import_is_all_or_nothing(store):
    good = {"prompt": [{"role": "user", "content": "q"}], "reply": "r", "kind": "rating", "rating": 1}
    bad = dict(good, kind="nonsense")
    with pytest.raises(StoreError):
        store.import_feedback([good, bad])
    assert store.counts()["feedback"] == 0
    assert store.import_feedback([good, good]) == 2
    assert store.counts()["feedback"] == 2


def test_delete_user_and_retention(store, monkeypatch):
    for user in ("ann", "bob"):
        cid = store.create_conversation("s-" + user, user)
        store.add_message(cid, "user", "q")
        a = store.add_message(cid, "assistant", "r")
        store.log_feedback(a, "rating", rating=1, user_name=user)
    assert store.delete_user("ann") == 1
    assert store.counts()["conversations"] == 1 and store.counts()["feedback"] == 1
    with monkeypatch.context() as m:  # written 40 days ago, by the store's own clock
        m.setattr("chatfb.store.db.utcnow", lambda: utcnow() - timedelta(days=40))
        old = store.create_conversation("s-old", "cat")
        store.add_message(old, "user", "an old question")
    assert store.apply_retention(30) == 1
    assert store.conversation(old) is None
    assert [m["content"] for m in store.messages(cid)] == ["q", "r"]  # bob's, not 30 days old yet


def test_concurrent_writers_group_commit_keeps_every_row_exact(settings):
    """32 threads write turns at once: same-shaped writes of one batch run as one executemany; each
    row must still get exactly its own values, NULLs included, and every conversation's messages
    must keep their order."""
    import threading

    def writer(w, out):
        cid = store.create_conversation(f"s{w}", f"user{w}")
        for t in range(15):
            store.add_message(cid, "user", f"q{w}-{t}")
            mid = store.add_message(cid, "assistant", "", status="pending", model="m")
            done = t % 3 != 0
            store.finish_message(mid, f"a{w}-{t}" if done else "", "ok" if done else "error",
                                 error=None if done else "boom", ttft_ms=float(t) if done else None,
                                 latency_ms=t + 0.5, prompt_tokens=t if done else None, completion_tokens=w,
                                 finish_reason=("length" if t % 2 else "stop") if done else None)
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
        counts = store.counts()
        assert (counts["messages"], counts["feedback"]) == (32 * 30, 32 * 10), "rows lost or doubled (messages, feedback)"
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
                assert a["finish_reason"] == (("length" if t % 2 else "stop") if done else None)
                ratings = [f["rating"] for f in store.feedback_for(a["id"])]
                assert ratings == ([1 if t % 2 else -1] if done else [])


def test_batch_runs_same_shaped_writes_together_and_keeps_each_write_in_order():
    """One executemany per shape: single-statement writes of one shape together; independent writes
    of several statements statement by statement across their shape; any other write alone, in order."""
    from chatfb.store.db import _Write, _batch_statements

    ins, upd, other = "INSERT INTO t VALUES (?, ?)", "UPDATE t SET v = ? WHERE id = ?", "INSERT INTO u VALUES (?)"
    live = [("UPDATE a SET s = 'retired' WHERE s = 'live'", ()), ("UPDATE a SET s = 'live' WHERE n = ?", ("x",))]
    batch = [_Write([(ins, ("a", 1))]), _Write([(upd, (1, "x"))]), _Write(live),
             _Write([(ins, ("b", 2)), (other, ("o",))], independent=True), _Write([(ins, ("c", 3))]),
             _Write([(ins, ("d", 4)), (other, ("p",))], independent=True), _Write([(upd, (2, "x"))]),
             _Write([live[0], (live[1][0], ("y",))])]
    assert _batch_statements(batch) == [
        (ins, [("a", 1), ("c", 3)]),
        (upd, [(1, "x"), (2, "x")]),  # the same key twice: both, in the order they came
        (live[0][0], [()]), (live[1][0], [("x",)]),  # not independent: its statements stay together
        (ins, [("b", 2), ("d", 4)]), (other, [("o",), ("p",)]),
        (live[0][0], [()]), (live[1][0], [("y",)])]


def test_replies_finished_in_one_batch_keep_their_own_values(store):
    """Replies finished in one batch are one UPDATE over lists (db._AS_LISTS): each row gets its own values, its finish
    reason included, whichever parameter is the key."""
    from chatfb.store.db import _FINISH_MESSAGE, _Write

    cid = store.create_conversation("s1", "ann")
    a, b = (store.add_message(cid, "assistant", "", status="pending") for _ in range(2))
    ran = []
    run = store._run
    store._run = lambda batch: (ran.extend(_batch_statements_of(batch)), run(batch))
    store._on_writer(lambda db: store._run([
        _Write([(_FINISH_MESSAGE, ("whole", "ok", None, 1.0, 2.0, 3, 4, "stop", a))]),
        _Write([(_FINISH_MESSAGE, ("cut", "ok", None, 5.0, 6.0, 7, 8, "length", b))])]))
    assert ran == [(_FINISH_MESSAGE, 2)]  # one statement for both rows
    got = [store.message(m) for m in (a, b)]
    assert [(m["content"], m["ttft_ms"], m["completion_tokens"], m["finish_reason"]) for m in got] == [
        ("whole", 1.0, 4, "stop"), ("cut", 5.0, 8, "length")]


def _batch_statements_of(batch):
    from chatfb.store.db import _batch_statements

    return [(sql, len(rows)) for sql, rows in _batch_statements(batch)]


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


def test_a_bad_write_fails_alone_and_no_rolled_back_write_is_acknowledged(settings):
    """Writes queued while the writer is busy go into one batch; one of them breaks a primary key,
    so the batch is rolled back. Every caller told "done" must find its rows in the file afterwards,
    the failing caller gets the error, and the batch really was tried as one transaction first."""
    import threading

    store = Store(settings.db_path)
    cid = store.create_conversation("s1")
    store.add_message(cid, "user", "hi")
    replies = [store.add_message(cid, "assistant", f"hello{i}") for i in range(4)]
    busy, release = threading.Event(), threading.Event()
    blocker = threading.Thread(target=store._on_writer, args=(lambda db: (busy.set(), release.wait(90)),))
    blocker.start()
    assert busy.wait(5), "the writer thread never ran the blocking call"
    batches = []
    run = store._run
    store._run = lambda batch: (batches.append(len(batch)), run(batch))
    outcome = {}

    def write(key, fn):
        try:
            outcome[key] = ("ok", fn())
        except Exception as e:  # noqa: BLE001 - what the caller saw
            outcome[key] = ("error", e)

    calls = {f"adapter{i}": (lambda i=i: store.add_adapter(f"a{i}", None, "candidate", None)) for i in range(4)}
    calls.update({f"turn{i}": (lambda i=i: store.add_turn(cid, f"q{i}")) for i in range(4)})
    calls.update({f"feedback{i}": (lambda i=i: store.log_feedback(replies[i], "critique", text=f"c{i}")) for i in range(4)})
    calls["duplicate"] = lambda: store.add_adapter("a2", None, "x", None)
    threads = [threading.Thread(target=write, args=item) for item in calls.items()]
    for t in threads[:-1]:
        t.start()
    _wait_for_queue(store, len(calls) - 1)  # the duplicate queues last, behind the a2 it collides with
    threads[-1].start()
    _wait_for_queue(store, len(calls))
    release.set()
    for t in threads + [blocker]:
        t.join(10)
    store.close()

    assert batches[0] == len(calls), "the writes were not tried as one transaction first"
    assert outcome.pop("duplicate")[0] == "error"
    assert {k: v[0] for k, v in outcome.items()} == {k: "ok" for k in outcome}, "a good write failed with the bad one"
    with Store(settings.db_path) as s:
        assert sorted(a["name"] for a in s.adapters()) == ["a0", "a1", "a2", "a3"]
        assert [a["status"] for a in s.adapters() if a["name"] == "a2"] == ["candidate"]
        for i in range(4):
            user_id, reply_id = outcome[f"turn{i}"][1]
            assert s.message(user_id)["content"] == f"q{i}" and s.message(reply_id)["status"] == "pending"
            assert s.feedback(outcome[f"feedback{i}"][1])["text"] == f"c{i}"


def _wait_for_queue(store, n, timeout=60.0):
    """Until n writes wait in the writer's queue (the writer is held busy by the test)."""
    deadline = time.monotonic() + timeout  # 60 s: generous, threads start slowly on a loaded 2-core machine
    while len(store._queue) < n:
        assert time.monotonic() < deadline, f"{len(store._queue)} of {n} writes queued"
        time.sleep(0.001)


def test_a_batch_of_replies_finished_twice_keeps_the_last_write(store):
    """A batch's finish_message UPDATEs run as one statement over lists of values, unless an id repeats:
    then they run one by one, in order, so the write queued last wins (as if committed one after the other)."""
    import threading

    cid = store.create_conversation("s1")
    replies = [store.add_turn(cid, f"q{i}")[1] for i in range(3)]
    busy, release = threading.Event(), threading.Event()
    blocker = threading.Thread(target=store._on_writer, args=(lambda db: (busy.set(), release.wait(90)),))
    blocker.start()
    assert busy.wait(5), "the writer thread never ran the blocking call"
    writes = [(replies[0], "first"), (replies[1], "other"), (replies[0], "second"), (replies[2], None)]
    threads = []
    for n, (mid, text) in enumerate(writes, 1):
        threads.append(threading.Thread(target=store.finish_message, args=(mid, text or "", "ok" if text else "error"),
                                        kwargs={"error": None if text else "boom", "ttft_ms": 1.5 if text else None,
                                                "completion_tokens": n}))
        threads[-1].start()
        _wait_for_queue(store, n)
    release.set()
    for t in threads + [blocker]:
        t.join(10)
    got = [store.message(m) for m in replies]
    assert [(m["content"], m["status"], m["error"], m["ttft_ms"], m["completion_tokens"]) for m in got] == [
        ("second", "ok", None, 1.5, 3), ("other", "ok", None, 1.5, 2), ("", "error", "boom", None, 4)]


def test_ids_go_back_to_the_writer_that_asked(store):
    """Many threads write at once through every call that hands back ids: each id must name the row
    that thread wrote, with its own values, and message numbers must be unique per conversation."""
    import threading

    cid = store.create_conversation("shared")
    store.add_message(cid, "user", "q")
    reply = store.add_message(cid, "assistant", "a")
    go = threading.Barrier(12)
    got, errors = {}, []

    def writer(w):
        try:
            go.wait()
            for t in range(5):
                own = store.create_conversation(f"s{w}", f"u{w}")
                user_id, reply_id = store.add_turn(own, f"q{w}-{t}", model=f"m{w}")
                mid = store.add_message(cid, "user", f"shared{w}-{t}")
                fid = store.log_feedback(reply, "critique", text=f"c{w}-{t}")
                (cand,) = store.add_candidates([{"feedback_id": fid, "message_id": reply, "origin": "inloop",
                                                 "text": f"r{w}-{t}", "verdict": "v", "status": "offered"}])
                got[(w, t)] = (own, user_id, reply_id, mid, fid, cand)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for (w, t), (own, user_id, reply_id, mid, fid, cand) in got.items():
        assert store.conversation(own)["session_id"] == f"s{w}"
        assert [(m["id"], m["content"]) for m in store.messages(own)] == [(user_id, f"q{w}-{t}"), (reply_id, "")]
        assert store.message(reply_id)["model"] == f"m{w}"
        assert store.message(mid)["content"] == f"shared{w}-{t}"
        assert store.feedback(fid)["text"] == f"c{w}-{t}"
        assert store.candidate(cand)["text"] == f"r{w}-{t}" and store.candidate(cand)["feedback_id"] == fid
    assert [m["seq"] for m in store.messages(cid)] == list(range(1, 12 * 5 + 3))


def test_reads_after_a_write_see_it_from_the_same_thread(store):
    cid = store.create_conversation("s1")
    for i in range(50):
        user_id, reply_id = store.add_turn(cid, f"q{i}")
        store.finish_message(reply_id, f"a{i}", "ok")
        assert store.message(reply_id)["content"] == f"a{i}"
        fid = store.log_feedback(reply_id, "rating", rating=1)
        assert [f["id"] for f in store.feedback_for(reply_id)] == [fid]


def test_close_commits_queued_writes_and_refuses_later_ones(settings):
    import threading

    store = Store(settings.db_path)
    cid = store.create_conversation("s1")
    busy, release = threading.Event(), threading.Event()
    blocker = threading.Thread(target=store._on_writer, args=(lambda db: (busy.set(), release.wait(90)),))
    blocker.start()
    assert busy.wait(5), "the writer thread never ran the blocking call"
    acked = []
    writers = [threading.Thread(target=lambda i=i: acked.append(store.add_turn(cid, f"q{i}"))) for i in range(8)]
    for t in writers:
        t.start()
    _wait_for_queue(store, 8)
    closer = threading.Thread(target=store.close)
    closer.start()
    deadline = time.monotonic() + 10
    while not store._closed and time.monotonic() < deadline:
        time.sleep(0.001)
    with pytest.raises(StoreError, match="closed"):
        store.add_turn(cid, "too late")
    release.set()
    for t in writers + [blocker, closer]:
        t.join(10)
    assert len(acked) == 8, f"{len(acked)} of the 8 queued writes were acknowledged"
    assert not store._writer.is_alive(), "the writer thread outlived close()"
    with Store(settings.db_path) as s:
        assert sorted(m["content"] for m in s.messages(cid) if m["role"] == "user") == sorted(f"q{i}" for i in range(8))


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
    assert (len(store.feedback_for(mid)), len(store.feedback_for(mid, active_only=False))) == (1, 8), \
        "one active rating of 8 (active, all)"


def test_reads_do_not_wait_for_a_commit_under_way(store):
    """Reads run on pooled reader cursors, not on the writer's connection: while the writer thread is
    busy (held in a call on its connection), a reply's history and feedback checks still answer."""
    import threading

    cid = store.create_conversation("s1", "ann", "Be brief.")
    store.add_message(cid, "user", "hi")
    a = store.add_message(cid, "assistant", "", status="pending")
    store.finish_message(a, "hello", "ok")
    holding, release = threading.Event(), threading.Event()
    t = threading.Thread(target=store._on_writer, args=(lambda db: (holding.set(), release.wait(90)),))
    t.start()
    try:
        assert holding.wait(5), "the writer thread never ran the blocking call"
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
    assert len(s._all_readers) == 1, "threads one after another must reuse one reader cursor"
    s.close()
    with pytest.raises(StoreError, match="closed"):
        s.messages(cid)
    with Store(settings.db_path) as again:  # every connection closed: the file opens read-write again
        assert again.conversation(cid)["id"] == cid


def test_feedback_origin_reviews_and_flags(store):
    cid = store.create_conversation("k:browser", None, "", client="addr-hash")
    store.add_message(cid, "user", "q")
    a = store.add_message(cid, "assistant", "a")
    crit = store.log_feedback(a, "critique", text="shorter", session_id="k:browser")
    store.add_candidates([{"feedback_id": crit, "message_id": a, "origin": "inloop", "text": "b", "verdict": "ok",
                           "status": "offered"}])
    accepted = store.log_feedback(a, "correction", text="b", session_id="k:browser", derived_from=crit)
    edited = store.log_feedback(a, "correction", text="b!", derived_from=crit)
    written = store.log_feedback(a, "correction", text="c")
    origins = {r.feedback_id: (r.origin, r.session_id, r.client) for r in store.feedback_records()}
    assert origins[accepted] == ("accepted_revision", "k:browser", "addr-hash")
    assert origins[edited][0] == "edited_revision" and origins[written][0] == "written_correction"
    assert origins[crit][0] == "critique"

    store.set_review([accepted], "approved")
    store.set_review([accepted, written], "rejected")  # a later decision replaces an earlier one
    assert store.reviews() == {accepted: "rejected", written: "rejected"}
    with pytest.raises(StoreError, match="no feedback with id gone"):
        store.set_review([edited, "gone"], "approved")
    assert edited not in store.reviews(), "a review of several ids with one unknown was partly stored"
    store.flag_author("k:browser", "spam")
    assert store.flagged_authors() == {"k:browser"}
    store.unflag_author("k:browser")
    with pytest.raises(StoreError, match="not flagged"):
        store.unflag_author("k:browser")


def test_trusted_import_is_marked(store):
    store.import_feedback([{"prompt": [{"role": "user", "content": "q"}], "reply": "a", "kind": "correction",
                            "text": "b", "user": "ops"}], trusted=True)
    store.import_feedback([{"prompt": [{"role": "user", "content": "q"}], "reply": "a", "kind": "rating", "rating": 1}])
    assert sorted((r.kind, r.trusted, r.origin) for r in store.feedback_records()) == [
        ("correction", True, "written_correction"), ("rating", False, "rating")]


def test_feedback_that_revises_nothing_never_waits_behind_another_write(settings):
    """Feedback without a session revises nothing: it takes no stripe of log_feedback's lock, so two such writes
    whose stripes collide both queue while the writer is busy (in test_a_bad_write_... one of four critiques
    landed on another's stripe in about one run in eleven, and waited behind its commit)."""
    import threading

    store = Store(settings.db_path)
    cid = store.create_conversation("s1")
    store.add_message(cid, "user", "hi")
    stripe = {}
    while True:  # two replies whose (message, kind, session) hash onto one stripe
        mid = store.add_message(cid, "assistant", "hello")
        k = hash((mid, "critique", None)) % len(store._stripes)
        if k in stripe:
            pair = [stripe[k], mid]
            break
        stripe[k] = mid
    busy, release = threading.Event(), threading.Event()
    blocker = threading.Thread(target=store._on_writer, args=(lambda db: (busy.set(), release.wait(30)),))
    blocker.start()
    assert busy.wait(5)
    threads = [threading.Thread(target=store.log_feedback, args=(m, "critique"), kwargs={"text": "c"}) for m in pair]
    for t in threads:
        t.start()
    try:
        _wait_for_queue(store, 2, timeout=10)
    finally:  # the writer goes on either way, so a failure leaves no thread waiting
        release.set()
        for t in threads + [blocker]:
            t.join(10)
        store.close()
