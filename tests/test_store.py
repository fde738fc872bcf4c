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
        cols = {r[0] for r in s._q("SELECT column_name FROM information_schema.columns WHERE table_name = 'messages'")}
    assert {"id", "conversation_id", "role", "content", "status", "model", "adapter", "ttft_ms", "latency_ms",
            "prompt_tokens", "completion_tokens"} <= cols


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
