"""A personal adapter whose job fails (or the choice of owners itself) never takes the shared job's result with
it: the cycle's summary keeps the shared counts and says why the personal one failed."""

from chatfb.learning import cycle as cycle_module
from tests.learning.test_personal import cycle, give_corrections, settings_for_cycle


def fail(*args, **kwargs):
    raise RuntimeError("disk full")


def test_a_failing_personal_job_keeps_the_shared_result_and_says_why(store, settings, fake_client, monkeypatch):
    settings = settings_for_cycle(settings)
    give_corrections(store, "ann", 12)
    monkeypatch.setattr(cycle_module, "prepare_personal", fail)
    _, result = cycle(store, settings, fake_client, monkeypatch, True, [])
    assert result is not None and "train_examples" in result.counts, result  # the shared job's own counts
    (personal,) = result.personal
    assert not personal["ok"] and "RuntimeError: disk full" in personal["reason"], personal


def test_failing_to_choose_owners_keeps_the_shared_result(store, settings, fake_client, monkeypatch):
    settings = settings_for_cycle(settings)
    give_corrections(store, "ann", 12)
    monkeypatch.setattr(cycle_module, "personal_owners", fail)
    _, result = cycle(store, settings, fake_client, monkeypatch, True, [])
    assert "train_examples" in result.counts, result
    assert [p["reason"] for p in result.personal] == ["choosing personal adapters failed: RuntimeError: disk full"]


def test_a_gate_refusal_before_loading_keeps_what_the_cycle_counted(store, settings, fake_client, monkeypatch):
    from chatfb.learning import gate

    settings = settings_for_cycle(settings).with_(trusted_users="ann", personal_min_feedback=0)
    give_corrections(store, "ann", 12)

    def taken(*args, **kwargs):
        raise gate.GateError("the model server already has an adapter named chatfb-v0002")

    monkeypatch.setattr(gate, "evaluate", taken)
    _, result = cycle(store, settings, fake_client, monkeypatch, True, [])
    assert not result.ok and "already has an adapter" in result.reason, result
    assert result.counts.get("train_correction", 0) > 0, f"the cycle's counts were lost: {result.counts}"
