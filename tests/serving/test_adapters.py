import json
import threading
from pathlib import Path

import pytest

from chatfb.serving.adapters import AdapterError, AdapterRegistry, AdapterRouter, confined_path, next_adapter_name
from chatfb.cli import main as cli
from chatfb.app.admin import AdminService
from chatfb.app.control import ControlServer, RemoteBackend, open_backend, running_app


def make_adapter(store, data_dir, name, status="candidate"):
    path = Path(data_dir) / "adapters" / name
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text("{}")
    store.add_adapter(name, None, status, name)


@pytest.fixture
def registry(store, settings, fake_client):
    return AdapterRegistry(store, [fake_client], AdapterRouter("chatfb-base"), settings.data_dir, drain_timeout_s=5)


def test_paths_are_confined_to_the_data_dir(tmp_path):
    assert confined_path(tmp_path, "chatfb-v0001") == (tmp_path / "adapters" / "chatfb-v0001").resolve()
    for bad in ("../etc", "/etc/passwd", "a/../../b"):
        with pytest.raises(AdapterError):
            confined_path(tmp_path, bad)


def test_versions_get_new_names(store, settings):
    assert next_adapter_name(store) == "chatfb-v0001"
    make_adapter(store, settings.data_dir, "chatfb-v0001")
    assert next_adapter_name(store) == "chatfb-v0002"
    # another install sharing the server counts its own versions under its own prefix
    assert next_adapter_name(store, "team-b") == "team-b-v0001"
    make_adapter(store, settings.data_dir, "team-b-v0001")
    assert next_adapter_name(store, "team-b") == "team-b-v0002" and next_adapter_name(store) == "chatfb-v0002"


def test_promote_swaps_after_inflight_requests_finish(registry, store, settings, fake_client):
    make_adapter(store, settings.data_dir, "chatfb-v0001")
    make_adapter(store, settings.data_dir, "chatfb-v0002")
    registry.promote("chatfb-v0001")
    assert registry.router.current == "chatfb-v0001" and "chatfb-v0001" in fake_client.loaded
    held = registry.router.acquire()  # a reply still streaming from v0001
    registry.promote("chatfb-v0002")
    assert registry.router.current == "chatfb-v0002"
    assert "chatfb-v0001" in fake_client.loaded, "unloaded under a running request"
    done = threading.Event()
    threading.Thread(target=lambda: (registry.router.wait_idle("chatfb-v0001", 5), done.set())).start()
    registry.router.release(held)
    assert done.wait(5), "the router never went idle after the last request was released"
    for _ in range(50):
        if "chatfb-v0001" not in fake_client.loaded:
            break
        threading.Event().wait(0.05)
    assert "chatfb-v0001" not in fake_client.loaded, "the old version was not unloaded once idle"
    assert store.live_adapter()["name"] == "chatfb-v0002"


def test_refused_adapter_leaves_the_current_one_serving(registry, store, settings, fake_client):
    make_adapter(store, settings.data_dir, "chatfb-v0001")
    make_adapter(store, settings.data_dir, "chatfb-v0002")
    registry.promote("chatfb-v0001")
    fake_client.refuse_load = True
    with pytest.raises(AdapterError, match="refused adapter chatfb-v0002"):
        registry.promote("chatfb-v0002")
    assert registry.router.current == "chatfb-v0001" and store.live_adapter()["name"] == "chatfb-v0001"


def test_rollback_and_restore(registry, store, settings, fake_client):
    for n in ("chatfb-v0001", "chatfb-v0002"):
        make_adapter(store, settings.data_dir, n)
        registry.activate(n, background_unload=False)
    assert registry.rollback() == "chatfb-v0001"
    assert registry.router.current == "chatfb-v0001" and store.adapter("chatfb-v0002")["status"] == "rolled_back"
    assert registry.rollback() is None and registry.router.current == "chatfb-base"
    with pytest.raises(AdapterError, match="nothing to roll back"):
        registry.rollback()
    registry.promote("chatfb-v0002")
    fake_client.loaded.clear()  # the server restarted and lost its adapters
    registry.router.switch("chatfb-base")
    assert registry.restore() == "chatfb-v0002"
    assert "chatfb-v0002" in fake_client.loaded and registry.router.current == "chatfb-v0002"


def test_cli_goes_through_the_running_app(store, settings, tmp_path, capsys, monkeypatch):
    """While the 'app' (a ControlServer over the store) owns the DuckDB file, the CLI still works."""
    server = ControlServer(AdminService(store, AdapterRegistry.without_servers(store, settings.data_dir)), settings.data_dir)
    server.start({"vllm_url": "http://127.0.0.1:1"})
    monkeypatch.setenv("CHATFB_DATA_DIR", str(settings.data_dir))
    try:
        assert running_app(settings.data_dir)["vllm_url"] == "http://127.0.0.1:1"
        assert oct(server.file.stat().st_mode)[-3:] == "600"
        src = tmp_path / "fb.jsonl"
        src.write_text(json.dumps({"prompt": "q", "reply": "r", "kind": "correction", "text": "better r"}) + "\n")
        assert cli(["import-feedback", str(src)]) == 0
        assert store.counts()["feedback"] == 1  # written by the app's own connection
        assert cli(["export", "--format", "sft", "--out", str(tmp_path / "out")]) == 0
        assert json.loads((tmp_path / "out" / "sft.jsonl").read_text())["messages"][-1]["content"] == "better r"
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"prompt": "q"}\n')
        assert cli(["import-feedback", str(bad)]) == 2
        assert "line 1" in capsys.readouterr().err, "the refusal does not name the bad line"
        assert store.counts()["feedback"] == 1, "a refused import stored rows"
        backend = open_backend(settings.data_dir)
        assert isinstance(backend, RemoteBackend)
        wrong = RemoteBackend(json.loads(server.file.read_text())["port"], "wrong-token")
        with pytest.raises(Exception, match="bad control token"):
            wrong.adapters()
        backend.close()
    finally:
        server.stop()
    assert not server.file.exists(), "the control server's address file outlived it"


def test_cli_delete_user_without_the_app(settings, capsys, monkeypatch):
    from chatfb.store.db import Store

    with Store(settings.db_path) as s:
        for user in ("ann", "bob"):
            cid = s.create_conversation("s-" + user, user)
            s.add_message(cid, "user", "q")
            a = s.add_message(cid, "assistant", "r")
            s.log_feedback(a, "critique", text="meh", user_name=user)
    monkeypatch.setenv("CHATFB_DATA_DIR", str(settings.data_dir))
    assert cli(["delete-user", "ann"]) == 0
    assert "deleted 1 conversations of 'ann'" in capsys.readouterr().out
    with Store(settings.db_path) as s:
        assert [r[0] for r in s._q("SELECT user_name FROM conversations")] == ["bob"]
        assert [r[0] for r in s._q("SELECT user_name FROM feedback")] == ["bob"]


def test_cli_promote_without_the_app_checks_the_base_model_on_disk(settings, capsys, monkeypatch):
    """With no app running the CLI still refuses an adapter made for another base model, when the base
    model's folder is on disk (here the converted embedded model's place in the data folder)."""
    from test_hostile_input import lora_folder

    from chatfb.serving.model_files import EMBEDDED_DIR_NAME
    from chatfb.store.db import Store

    base = settings.data_dir / "models" / EMBEDDED_DIR_NAME
    base.mkdir(parents=True)
    (base / "config.json").write_text(json.dumps({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}))
    lora_folder(settings.data_dir / "adapters" / "chatfb-v0001", 64, 128, 2)
    lora_folder(settings.data_dir / "adapters" / "chatfb-v0002", 96, 128, 2)
    with Store(settings.db_path) as s:
        s.add_adapter("chatfb-v0001", None, "candidate", "chatfb-v0001")
        s.add_adapter("chatfb-v0002", None, "candidate", "chatfb-v0002")
    monkeypatch.setenv("CHATFB_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("CHATFB_MODEL", "embedded")
    assert cli(["adapters", "promote", "chatfb-v0001"]) == 0
    assert cli(["adapters", "promote", "chatfb-v0002"]) != 0
    assert "chatfb-v0002 was made for another base model" in capsys.readouterr().err
    with Store(settings.db_path) as s:
        assert s.live_adapter()["name"] == "chatfb-v0001"


@pytest.mark.parametrize("with_app", [True, False])
def test_cli_guidelines_with_and_without_the_app(settings, capsys, monkeypatch, with_app):
    from chatfb.store.db import Store

    monkeypatch.setenv("CHATFB_DATA_DIR", str(settings.data_dir))
    store = Store(settings.db_path)
    suggested = store.add_guideline("Never use emoji.", "global", "pending", "s1", "ann")
    server = None
    if with_app:
        server = ControlServer(AdminService(store, AdapterRegistry.without_servers(store, settings.data_dir)),
                               settings.data_dir)
        server.start({"vllm_url": "http://127.0.0.1:1"})
    else:
        store.close()
    try:
        assert cli(["guidelines", "add", "Always answer in British English."]) == 0
        assert cli(["guidelines", "approve", suggested]) == 0
        assert cli(["guidelines", "approve", "no-such-id"]) == 2
        assert "no guideline with id" in capsys.readouterr().err
        assert cli(["guidelines", "list"]) == 0
        listing = capsys.readouterr().out
        assert "British English" in listing and "Never use emoji." in listing
    finally:
        if server is not None:
            server.stop()
            store.close()
    with Store(settings.db_path) as s:
        active = {g["text"] for g in s.guidelines_for("someone-else", None)}
    assert active == {"Always answer in British English.", "Never use emoji."}


def test_a_control_server_never_started_stops_at_once(store, settings):
    """Runtime.close() on a runtime that was never started (tests, a failed startup) must not hang in
    socketserver's shutdown(), which waits for a serve_forever loop that never ran."""
    server = ControlServer(AdminService(store, AdapterRegistry.without_servers(store, settings.data_dir)), settings.data_dir)
    stopper = threading.Thread(target=server.stop, daemon=True)
    stopper.start()
    stopper.join(5)
    assert not stopper.is_alive()
