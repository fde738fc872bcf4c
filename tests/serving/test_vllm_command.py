from pathlib import Path

import pytest

import chatfb.serving.vllm_server as vs
from chatfb.config import load_settings

ZEN4 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
OLD_XEON = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n"
SAPPHIRE = "processor\t: 0\nflags\t\t: fpu avx512f amx_bf16 amx_tile\n"


def test_cpu_bf16_detection_reads_the_flags_line():
    assert vs.cpu_has_bf16(ZEN4) and vs.cpu_has_bf16(SAPPHIRE)
    assert not vs.cpu_has_bf16(OLD_XEON)
    assert not vs.cpu_has_bf16("model name\t: avx512_bf16 in a name, not a flag\n")


@pytest.mark.parametrize("cpuinfo, expected", [(ZEN4, "bfloat16"), (OLD_XEON, "float32")])
def test_auto_dtype_on_a_cpu_follows_its_instructions(monkeypatch, cpuinfo, expected):
    monkeypatch.setattr(vs, "has_cuda", lambda: False)
    real = vs.cpu_has_bf16
    monkeypatch.setattr(vs, "cpu_has_bf16", lambda: real(cpuinfo))
    cmd = vs.vllm_command(Path("/m"), "chatfb-base", 8011, 16, 2048)
    assert cmd[cmd.index("--dtype") + 1] == expected
    cmd = vs.vllm_command(Path("/m"), "chatfb-base", 8011, 16, 2048, dtype="float32")  # a setting wins
    assert cmd[cmd.index("--dtype") + 1] == "float32"


def test_auto_dtype_on_a_gpu_is_vllms_own(monkeypatch):
    monkeypatch.setattr(vs, "has_cuda", lambda: True)
    assert vs.serving_dtype("auto") == "auto" and vs.serving_dtype("float16") == "float16"


def test_dtype_setting_is_checked():
    assert load_settings({"CHATFB_VLLM_DTYPE": "bfloat16"}).vllm_dtype == "bfloat16"
    with pytest.raises(ValueError, match="vllm_dtype"):
        load_settings({"CHATFB_VLLM_DTYPE": "int4"})


def test_every_managed_server_is_built_from_the_settings_alike(settings, tmp_path):
    from chatfb.serving.managed_replicas import ManagedReplicas
    from chatfb.serving.vllm_server import ManagedVLLM

    s = settings.with_(max_lora_rank=32, max_model_len=1024, vllm_dtype="float32", vllm_kvcache_gib=3,
                       vllm_startup_timeout_s=7.0, vllm_port=9100, vllm_replicas=2, vllm_cpu_reserved=1)
    one = ManagedVLLM.from_settings(s, tmp_path / "model")
    cycles = ManagedVLLM.from_settings(s, tmp_path / "model", 9101, log_role="nightly")
    pool = ManagedReplicas.from_settings(s, tmp_path / "model")
    for server in (one, cycles, *pool.replicas):
        flags = [server.cmd[server.cmd.index(f) + 1] for f in ("--max-lora-rank", "--max-model-len", "--dtype")]
        assert flags == ["32", "1024", "float32"], server.cmd
        assert (server.kvcache_gib, server.startup_timeout_s, server.cpu_reserved) == (3, 7.0, 1)
    assert [p.port for p in (one, cycles, *pool.replicas)] == [9100, 9101, 9102, 9103] and pool.router.port == 9100
    assert one.log_path == s.layout.logs / "vllm.log" and cycles.log_path == s.layout.logs / "vllm-nightly.log"
    assert [r.log_path.name for r in pool.replicas] == ["vllm-0.log", "vllm-1.log"]


def test_only_the_apps_own_single_server_offers_the_weight_reload(settings, tmp_path):
    """VLLM_SERVER_DEV_MODE (vLLM's development endpoints, /collective_rpc) only where merged weights are used."""
    from chatfb.serving.managed_replicas import ManagedReplicas
    from chatfb.serving.vllm_server import ManagedVLLM

    def dev(server):
        return server.extra_env.get("VLLM_SERVER_DEV_MODE") == "1"

    merged = settings.with_(serve_merged=True)
    assert dev(ManagedVLLM.from_settings(merged, tmp_path / "model"))
    assert not dev(ManagedVLLM.from_settings(settings, tmp_path / "model"))  # off by default
    assert not dev(ManagedVLLM.from_settings(merged, tmp_path / "model", 9101, log_role="nightly"))
    assert dev(ManagedVLLM.from_settings(settings, tmp_path / "model", 9101, log_role="bench", weight_reload=True))
    pool = ManagedReplicas.from_settings(merged.with_(vllm_replicas=2), tmp_path / "model")
    assert not any(dev(r) for r in pool.replicas)
    assert not dev(ManagedVLLM.from_settings(merged.with_(vllm_replicas=2), tmp_path / "model"))


def test_vllm_on_a_two_core_machine_runs_the_model_on_both_cores():
    """vLLM keeps one core per process off the model's threads; on 2 CPUs that ran the model on one core (8 chats
    0.79x the tokens/s, bench/results/cpu_reserved). Auto: none kept on at most 2 CPUs, vLLM's own choice on more;
    a number given, or one the operator set in the environment, stands."""
    from chatfb.serving.vllm_server import RESERVED_CPU_ENV, cpu_env

    assert cpu_env(-1, cpus=2, environ={}) == {RESERVED_CPU_ENV: "0"} == cpu_env(-1, cpus=1, environ={})
    assert cpu_env(-1, cpus=8, environ={}) == {}
    assert cpu_env(1, cpus=2, environ={}) == {RESERVED_CPU_ENV: "1"} and cpu_env(0, cpus=16, environ={}) == {RESERVED_CPU_ENV: "0"}
    assert cpu_env(-1, cpus=2, environ={RESERVED_CPU_ENV: "1"}) == {}  # the operator's own value is left alone


def test_a_containers_cpu_quota_counts(tmp_path):
    from chatfb.serving.vllm_server import usable_cpus

    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")  # docker --cpus=1.5
    assert usable_cpus(quota) == min(2, usable_cpus(tmp_path / "none"))
    quota.write_text("50000 100000\n")  # docker --cpus=0.5: one CPU, whatever the machine has
    assert usable_cpus(quota) == 1
    quota.write_text("max 100000\n")
    assert usable_cpus(quota) == usable_cpus(tmp_path / "none") >= 1


def test_the_server_chatfb_starts_gets_the_cpu_setting(settings, tmp_path, monkeypatch):
    import subprocess

    from chatfb.serving import vllm_server as vs

    started = {}

    class Proc:
        pid = 1

        def poll(self):
            return None

    def popen(cmd, **kw):
        started.update(kw["env"])
        return Proc()

    monkeypatch.setattr(subprocess, "Popen", popen)
    monkeypatch.setattr(vs, "port_in_use", lambda port: False)
    monkeypatch.delenv(vs.RESERVED_CPU_ENV, raising=False)
    vs.ManagedVLLM.from_settings(settings.with_(vllm_cpu_reserved=3), tmp_path / "model", 9100)._launch()
    assert started[vs.RESERVED_CPU_ENV] == "3"
