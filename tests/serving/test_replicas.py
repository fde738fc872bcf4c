"""Several replicas: a version goes live only when every replica answered with it, by shared storage (the
replicas' filesystem resolver) or explicit loading. The replicas are tests/fake_openai.py ReplicaHandler
servers in this process; no vLLM runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chatfb.serving.adapters import AdapterError, AdapterRegistry, AdapterRouter
from chatfb.serving.replicas import ReplicaSet, publish_adapter, resolver_env
from tests.fake_openai import start_replica

ROOT = "/models/SmolLM2"


def make_adapter(store, data_dir, name):
    path = Path(data_dir) / "adapters" / name
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "/train/copy"}))
    (path / "adapter_model.safetensors").write_bytes(b"weights")
    store.add_adapter(name, None, "candidate", name)


@pytest.fixture
def replicas():
    started = []

    def start(root=ROOT, lora_dir=None):
        server, handler = start_replica(root, lora_dir)
        started.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}", handler

    yield start
    for s in started:
        s.shutdown()
        s.server_close()


def registry_for(store, settings, urls, shared_dir):
    rs = ReplicaSet(urls, "chatfb-base", shared_dir)
    return AdapterRegistry.for_replicas(store, rs, AdapterRouter("chatfb-base"), settings.data_dir, drain_timeout_s=1)


def test_publish_names_the_replicas_base_model_and_never_rewrites_a_published_version(tmp_path):
    src = tmp_path / "a"
    src.mkdir()
    (src / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "/x"}))
    (src / "adapter_model.safetensors").write_bytes(b"w1")
    dest = publish_adapter(src, tmp_path / "shared", "chatfb-v0001", ROOT)
    assert json.loads((dest / "adapter_config.json").read_text())["base_model_name_or_path"] == ROOT
    assert (dest / "adapter_model.safetensors").read_bytes() == b"w1"
    (src / "adapter_model.safetensors").write_bytes(b"w2")
    publish_adapter(src, tmp_path / "shared", "chatfb-v0001", ROOT)
    assert (dest / "adapter_model.safetensors").read_bytes() == b"w1"  # replicas may be reading it
    assert sorted(p.name for p in (tmp_path / "shared").iterdir()) == ["chatfb-v0001"]  # no temp folder left
    assert resolver_env(tmp_path)["VLLM_PLUGINS"] == "lora_filesystem_resolver"


def test_promote_by_shared_storage_is_live_once_every_replica_answered(store, settings, replicas, tmp_path):
    shared = tmp_path / "shared"
    (url1, r1), (url2, r2) = replicas(lora_dir=shared), replicas(lora_dir=shared)
    registry = registry_for(store, settings, [url1, url2], shared)
    make_adapter(store, settings.data_dir, "chatfb-v0001")
    registry.promote("chatfb-v0001")
    assert registry.router.current == "chatfb-v0001" and store.live_adapter()["name"] == "chatfb-v0001"
    # nothing was pushed: each replica resolved the name from shared storage when chatfb checked it
    assert r1.served.get("chatfb-v0001") == 1 and r2.served.get("chatfb-v0001") == 1
    assert r1.loaded["chatfb-v0001"] == str(shared / "chatfb-v0001")
    # a replica started after the promotion serves the live version from shared storage too
    url3, _ = replicas(lora_dir=shared)
    assert ReplicaSet([url3], "chatfb-base").check("chatfb-v0001") == {url3: None}
    states = registry.replica_states()
    assert [(s.url, s.up, s.adapters, s.serves_live) for s in states] == [
        (url1, True, ["chatfb-v0001"], True), (url2, True, ["chatfb-v0001"], True)]


def test_a_replica_that_cannot_serve_the_version_keeps_the_old_one_live(store, settings, replicas, tmp_path):
    shared = tmp_path / "shared"
    (url1, _), (url2, _) = replicas(lora_dir=shared), replicas(lora_dir=None)  # the second has no resolver
    registry = registry_for(store, settings, [url1, url2], shared)
    make_adapter(store, settings.data_dir, "chatfb-v0001")
    with pytest.raises(AdapterError, match=r"1 of 2 replicas did not answer with chatfb-v0001 .*" + url2):
        registry.promote("chatfb-v0001")
    assert registry.router.current == "chatfb-base" and store.live_adapter() is None


def test_replicas_on_different_base_models_are_refused(store, settings, replicas, tmp_path):
    shared = tmp_path / "shared"
    (url1, _), (url2, _) = replicas(lora_dir=shared), replicas(root="/other/model", lora_dir=shared)
    registry = registry_for(store, settings, [url1, url2], shared)
    make_adapter(store, settings.data_dir, "chatfb-v0001")
    with pytest.raises(AdapterError, match="do not report one base model"):
        registry.promote("chatfb-v0001")
    assert not (shared / "chatfb-v0001").exists() and store.live_adapter() is None


def test_rollback_serves_the_previous_version_from_shared_storage(store, settings, replicas, tmp_path):
    shared = tmp_path / "shared"
    (url1, r1), (url2, r2) = replicas(lora_dir=shared), replicas(lora_dir=shared)
    registry = registry_for(store, settings, [url1, url2], shared)
    for name in ("chatfb-v0001", "chatfb-v0002"):
        make_adapter(store, settings.data_dir, name)
        registry.activate(name, background_unload=False)
    assert "chatfb-v0001" not in r1.loaded and "chatfb-v0001" not in r2.loaded  # unloaded after the swap
    assert registry.rollback() == "chatfb-v0001"
    assert registry.router.current == "chatfb-v0001"
    assert "chatfb-v0001" in r1.loaded and "chatfb-v0001" in r2.loaded  # resolved again from shared storage
    assert [s.serves_live for s in registry.replica_states()] == [True, True]


def test_explicit_loading_without_shared_storage_leaves_no_replica_half_promoted(store, settings, replicas):
    (url1, r1), (url2, r2) = replicas(), replicas()
    registry = registry_for(store, settings, [url1, url2], None)
    make_adapter(store, settings.data_dir, "chatfb-v0001")
    registry.promote("chatfb-v0001")
    assert set(r1.loaded) == set(r2.loaded) == {"chatfb-v0001"}
    assert r1.loaded["chatfb-v0001"] == str((settings.data_dir / "adapters" / "chatfb-v0001").resolve())
    make_adapter(store, settings.data_dir, "chatfb-v0002")
    r2.refuse_load = True
    with pytest.raises(AdapterError, match=f"refused adapter chatfb-v0002 at {url2}"):
        registry.promote("chatfb-v0002")
    assert "chatfb-v0002" not in r1.loaded  # the first replica's copy was unloaded again
    assert registry.router.current == "chatfb-v0001" and store.live_adapter()["name"] == "chatfb-v0001"


def test_a_down_replica_is_shown_down(store, settings, replicas, tmp_path):
    (url1, _) = replicas()
    registry = registry_for(store, settings, [url1, "http://127.0.0.1:9"], None)
    assert [(s.up, s.serves_live) for s in registry.replica_states()] == [(True, None), (False, None)]


def test_admin_view_lists_each_replica_and_the_version_it_serves(store, settings, replicas, tmp_path):
    from chatfb.app.admin import AdminService
    from chatfb.ui.admin_tab import replicas_frame

    shared = tmp_path / "shared"
    (url1, _), (url2, r2) = replicas(lora_dir=shared), replicas(lora_dir=shared)
    make_adapter(store, settings.data_dir, "chatfb-v0001")
    registry_for(store, settings, [url1, url2], shared).promote("chatfb-v0001")
    r2.loaded.clear()
    r2.lora_dir = None  # the second replica lost the version and cannot resolve it
    registry = registry_for(store, settings, [url1, url2, "http://127.0.0.1:9"], shared)  # a third one is down
    frame = replicas_frame(AdminService(store, registry, settings=settings))
    assert frame.to_dict("records") == [
        {"replica": url1, "up": "yes", "versions loaded": "chatfb-v0001", "answers with the live version": "yes"},
        {"replica": url2, "up": "yes", "versions loaded": "-", "answers with the live version": "NO"},
        {"replica": "http://127.0.0.1:9", "up": "DOWN", "versions loaded": "-", "answers with the live version": "-"}]
