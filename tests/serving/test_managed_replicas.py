"""Managed replicas: CHATFB_VLLM_REPLICAS=2 starts two replicas (tests/fake_openai.py stands in for vLLM)
with the LoRA resolver's environment, and a real vllm-router on the managed port in front of them;
stop() leaves no process behind."""

from __future__ import annotations

import sys

import httpx
import pytest

from chatfb.config import load_settings
from chatfb.serving.managed_replicas import ManagedReplicas
from chatfb.serving.process_group import _group_alive
from tests.serving.test_vllm_server import FAKE, free_port


def test_two_replicas_behind_the_router_and_all_gone_after_stop(tmp_path):
    port = free_port()
    settings = load_settings({}, data_dir=tmp_path / "data", vllm_port=port, vllm_replicas=2)
    model = tmp_path / "models" / "SmolLM2"
    pool = ManagedReplicas(model, "chatfb-base", port, settings.data_dir, 2, settings.shared_adapters_dir,
                           startup_timeout_s=20)
    assert [r.url for r in pool.replicas] == list(settings.replica_url_list)
    for r in pool.replicas:
        assert r.extra_env["VLLM_LORA_RESOLVER_CACHE_DIR"] == str(settings.data_dir / "shared-adapters")
        r.cmd = [sys.executable, str(FAKE), str(r.port), "3", "0", str(model)]
    try:
        pool.start()
        assert pool.ready and pool.url == settings.base_url
        answered = []
        for _ in range(4):
            r = httpx.post(pool.url + "/v1/chat/completions", timeout=10,
                           json={"model": "chatfb-v0001", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
            answered.append(r.status_code)
        assert answered == [200] * 4
        assert all((settings.data_dir / "logs" / f"vllm-{i}.log").exists() for i in range(2))
    finally:
        pool.stop(grace_s=2)
    groups = [pool.router._proc.pid] + [r._proc.pid for r in pool.replicas]
    assert not any(_group_alive(g) for g in groups)
    with pytest.raises(httpx.HTTPError):
        httpx.get(pool.url + "/health", timeout=1)


def test_several_replicas_need_managed_mode_and_urls_need_a_router():
    with pytest.raises(ValueError, match="CHATFB_VLLM_REPLICA_URLS instead"):
        load_settings({"CHATFB_VLLM_URL": "http://router:8000", "CHATFB_VLLM_REPLICAS": "2"})
    with pytest.raises(ValueError, match="needs CHATFB_VLLM_URL"):
        load_settings({"CHATFB_VLLM_REPLICA_URLS": "http://a:1"})
    s = load_settings({"CHATFB_VLLM_URL": "http://router:8000", "CHATFB_VLLM_REPLICA_URLS": "http://a:1/, http://b:2"})
    assert s.replica_url_list == ("http://a:1", "http://b:2") and s.shared_adapters_dir is None
    assert load_settings({}).replica_url_list == ()


def test_vllm_router_is_found_beside_the_interpreter_when_not_on_path(tmp_path, monkeypatch):
    """A service manager runs the virtual environment's python without activating it: PATH lacks its bin."""
    from chatfb.serving.managed_replicas import ManagedRouter, router_binary

    venv_bin = tmp_path / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    router = venv_bin / "vllm-router"
    router.write_text("#!/bin/sh\n")
    router.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(venv_bin / "python"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert router_binary() == str(router)
    assert ManagedRouter(free_port(), ["http://127.0.0.1:1"], tmp_path / "data").cmd[0] == str(router)


def test_a_missing_vllm_router_error_says_where_it_was_looked_for(tmp_path, monkeypatch):
    from chatfb.serving.managed_replicas import router_binary
    from chatfb.serving.vllm_server import ServerStartError

    monkeypatch.setattr(sys, "executable", str(tmp_path / "venv" / "bin" / "python"))
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    with pytest.raises(ServerStartError) as e:
        router_binary()
    assert str(tmp_path / "venv" / "bin") in str(e.value) and str(tmp_path / "nowhere") in str(e.value)
    assert "pip install vllm-router" in str(e.value)
