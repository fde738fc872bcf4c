"""The benchmarks' smoke modes, run as a user runs them: serving, refresh, efficacy, scale and soak against the
session's real vLLM; the app benchmark on its own app, a plain gr.ChatInterface beside it and tests/fake_openai.py (no vLLM).

The refresh benchmark hot-swaps adapters on the shared server (under its own names, removed again)
and measures a restart only on a vLLM server of its own (--restart-own-server).
"""

import json
import os
import subprocess
import sys

import pytest

from chatfb.serving.model_client import ModelClient
from chatfb.store.db import Store

from .conftest import ROOT

pytestmark = pytest.mark.integration


def run_bench(name: str, *args: str, timeout: int, **settings: str) -> str:
    """`python -m bench.NAME --smoke ARGS`; `settings`: environment on top (CHATFB_ settings its cycles inherit)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **settings)
    out = subprocess.run([sys.executable, "-m", f"bench.{name}", "--smoke", *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"bench.{name} failed ({out.returncode}):\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    return out.stdout


def test_serving_bench_smoke_measures_all_three_ways(vllm_url, embedded_model, tmp_path):
    stdout = run_bench("serving_bench", "--vllm-url", vllm_url, "--model-dir", str(embedded_model),
                       "--out-dir", str(tmp_path), timeout=900)

    r = json.loads((tmp_path / "serving_bench.json").read_text())
    assert {(lv["way"], lv["concurrency"]) for lv in r["levels"]} == {
        (way, c) for way in ("chatfb", "direct") for c in (1, 2)}
    for lv in r["levels"]:
        assert lv["failures"] == 0, lv["errors"]
        assert lv["requests"] == lv["concurrency"], lv
        assert lv["tokens"] > 0 and lv["tokens_per_s"] > 0, lv
        assert 0 < lv["ttft_p50_ms"] <= lv["latency_p50_ms"], lv
    hf = r["transformers"]
    assert hf["tokens"] > 0 and hf["tokens_per_s"] > 0 and hf["ttft_p50_ms"] > 0, hf
    assert r["ratios"]["reference_concurrency"] == 2
    assert r["ratios"]["chatfb_over_direct_tokens_per_s"] > 0, r["ratios"]
    assert r["ratios"]["chatfb_over_transformers_tokens_per_s"] > 0, r["ratios"]
    assert "chatfb / direct" in stdout, "the ratio table is not printed:\n" + stdout[-3000:]
    assert "| chats | chatfb tok/s | direct tok/s |" in (tmp_path / "serving_bench.md").read_text(), "no table in the .md"
    assert (tmp_path / "serving_bench.png").stat().st_size > 0, "empty chart"


def test_refresh_bench_smoke_hot_swap_and_restart(vllm_url, embedded_model, tmp_path):
    # the shared app's server serves LoRAs (CHATFB_SERVE_MERGED off): the merged swaps and tokens/s need one that
    # reloads weights (tests/serving/test_merged.py has their logic; bench/results/refresh_bench.md, a real run)
    run_bench("refresh_bench", "--vllm-url", vllm_url, "--model-dir", str(embedded_model), "--restart-own-server",
              "--modes", "lora", "--throughput-rounds", "0",
              "--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path / "out"), timeout=1800)

    r = json.loads((tmp_path / "out" / "refresh_bench.json").read_text())
    swap = r["swap"]
    assert len(swap["swaps"]) == 1 and swap["load_requests"] > 0, swap
    s = swap["swaps"][0]
    assert s["activate_ms"] > 0, s
    assert 0 < s["saved_to_first_token_ms"] <= s["saved_to_first_reply_ms"], s
    assert s["probe_model"] == s["adapter"] and s["probe_error"] is None, f"a new chat did not go to the new version: {s}"
    assert s["saved_to_active_ms"] < s["new_chat_first_token_ms"] < s["new_chat_reply_ms"], s
    assert s["load_ttft_before_ms"] > 0, s
    assert s["failed_requests"] == 0 and swap["load_failures"] == 0, swap["errors"]
    assert list(r["swaps_by_mode"]) == ["lora"] and "throughput" not in r, list(r)
    # the shared server is left serving the base model only
    client = ModelClient(vllm_url)
    try:
        assert not [m for m in client.models() if m.startswith("bench-")], f"bench adapters left loaded: {client.models()}"
    finally:
        client.close()

    restart = r["restart"]
    assert restart["stop_to_healthy_ms"] > 0, restart
    assert 0 < restart["stop_to_first_token_ms"] <= restart["stop_to_first_reply_ms"], restart
    assert restart["load_requests"] > 0, restart
    assert (tmp_path / "out" / "refresh_bench.png").stat().st_size > 0, "empty chart"


# The bench's critique cycles may answer 2 critiques again (CHATFB_REFINE_MAX_CRITIQUES): of the smoke's 4, one
# or so is held out whole, so the bound usually holds one more back; the test checks it is never exceeded.
SMOKE_REFINE_BOUND = 2


def test_efficacy_bench_smoke_runs_real_cycles(vllm_url, embedded_model, tmp_path):
    """The efficacy bench's smoke, and in it the critique-only nightly recipe on the real server (the bench's
    critique mode is `python -m chatfb nightly --no-promote` on critiques alone, in a data folder of its own):
    each critique held out whole, answered again with it as an instruction, or counted beyond the bound; every
    candidate recorded with its verdict; what is kept trains WITHOUT the critique in the prompt."""
    stdout = run_bench("efficacy_bench", "--vllm-url", vllm_url, "--model-dir", str(embedded_model),
                       "--work-dir", str(tmp_path / "work"), "--out-dir", str(tmp_path / "out"), timeout=1800,
                       CHATFB_REFINE_MAX_CRITIQUES=str(SMOKE_REFINE_BOUND))

    r = json.loads((tmp_path / "out" / "efficacy_bench.json").read_text())
    assert list(r["modes"]) == ["base", "critique"]
    assert r["chatfb_env"].get("CHATFB_REFINE_MAX_CRITIQUES") == str(SMOKE_REFINE_BOUND), r["chatfb_env"]
    base = r["modes"]["base"]
    # the base row's retention is not measured (base vs base): never published as 1.0
    assert base["retention"] is None and base["control_cosine"] is None and base["leak"] is None, base
    for mode, m in r["modes"].items():
        assert m["n_runs"] == 1 and set(m["uptake"]) == {"support_email", "house_signoff"}, (mode, m)
        assert all(0 <= v <= 1 for v in m["uptake"].values()), (mode, m["uptake"])
    (run,) = r["modes"]["critique"]["runs"]
    why = {k: run.get(k) for k in ("trained", "reason", "counts", "cycle_wall_s", "peak_rss_gib", "selection")}
    # the critique mode trains when a candidate survived selection, and a candidate request the server
    # failed is counted, never silently dropped
    assert run["trained"] or run["reason"] == "no usable training examples", why
    assert (run["retention"] is not None) == run["trained"], why  # measured exactly when something trained
    assert not run["counts"].get("refine_errors"), why
    # the trainer, or the embedding model that scored the candidates, held a model in memory
    assert run["cycle_wall_s"] > 0 and run["peak_rss_gib"] > 0.1, why
    c = run["counts"] or {}
    assert c.get("feedback") == 4, why  # a cycle that failed says why in `reason`
    # every critique is held out whole, turned into candidates, counted as beyond the bound, or (answered
    # again) without an example
    assert c["critiques"] == 4 == (c["critiques_heldout"] + c["critiques_with_example"] + c["critiques_without_example"]
                                   + c.get("critiques_not_refined", 0)), c
    assert c["critiques_with_example"] + c["critiques_without_example"] <= SMOKE_REFINE_BOUND, \
        f"more critiques answered than the bound: {c}"
    for fam, sel in run["selection"].items():  # read back from the cycle's own candidates rows
        assert sel["example_share"] is None or 0 <= sel["example_share"] <= 1, (fam, sel)
        assert (sel["precision"] is None) == (sel["kept_examples"] == 0), \
            f"{fam}: a precision exactly when some example was kept: {sel}"
    kept_n = sum(sel["kept_examples"] for sel in run["selection"].values())
    assert kept_n == c["candidates_kept"], (kept_n, c)
    assert "| mode |" in (tmp_path / "out" / "efficacy_bench.md").read_text(), "no table in the .md"
    assert "mean uptake" in stdout and "| base | 1 |" in stdout and "n/a" in stdout, \
        "the printed table lacks its uptake column, base row or n/a:\n" + stdout[-3000:]
    assert (tmp_path / "out" / "efficacy_bench.png").stat().st_size > 0, "empty chart"
    # every candidate was taken off the shared server again
    client = ModelClient(vllm_url)
    try:
        assert not [m for m in client.models() if m.startswith("bench-eff-") or m.startswith("bencheff")], \
            f"candidate adapters left loaded: {client.models()}"
    finally:
        client.close()

    # The cycle's own records, in the data folder the bench left (no process holds its DuckDB file now).
    data = tmp_path / "work" / "critique-0"
    (name,) = [p.name for p in (data / "work").iterdir() if p.is_dir()]
    critiques = {f["critique"] for f in r["families"]}
    with Store(data / "chatfb.duckdb", read_only=True) as s:
        cands = s.candidates(where="origin = ? AND cycle = ?", params=("nightly", name))
        adapter = s.adapter(name)
    assert cands and {x["status"] for x in cands} <= {"kept", "dropped"}, cands
    kept = [x for x in cands if x["status"] == "kept"]
    assert (len(kept), len(cands) - len(kept)) == (c["candidates_kept"], c["candidates_dropped"]), \
        "the rows recorded (kept, dropped) differ from the cycle's counts"
    assert all(x["verdict"] == "ok" for x in kept), [x["verdict"] for x in kept]
    assert {x["details"]["critique"] for x in cands} <= critiques, "a candidate recorded with another critique"
    assert all(x["verdict"] != "ok" for x in cands if x["status"] == "dropped" and x["details"]["task"] == "critique"
               and not any(k["feedback_id"] == x["feedback_id"] for k in kept)), \
        "a task with no kept candidate had one whose verdict was ok"
    if not kept:  # every candidate failed: no example, no training, and the cycle says so
        assert not run["trained"] and adapter["status"] == "failed", (run["reason"], adapter)
        return
    sft = [json.loads(line) for line in (data / "work" / name / "sft.jsonl").read_text().splitlines()]
    targets = {row["completion"][0]["content"]: row["prompt"] for row in sft}
    for x in kept:
        assert x["text"] in targets, f"a kept candidate is not a training target: {x['text']!r}"
        said = " ".join(m["content"] for m in targets[x["text"]])
        assert not any(q in said for q in critiques), f"trained WITH the critique in the prompt: {said!r}"
    assert run["trained"] and adapter["status"] in ("candidate", "rejected") and run["timings"]["train_s"] > 0, \
        (run["reason"], adapter["status"])
    m = adapter["metrics"]
    if c["critiques_heldout"]:  # judged by the selection on the held-out critiques, beside the incumbent
        assert 0 <= m["candidate_critique_pass"] <= 1 and 0 <= m["incumbent_critique_pass"] <= 1, m
        assert m["heldout_critiques_n"] == c["critiques_heldout"]


def test_scale_bench_smoke_measures_a_cycle_and_the_database(vllm_url, embedded_model, tmp_path):
    run_bench("scale_bench", "--vllm-url", vllm_url, "--model-dir", str(embedded_model),
              "--work-dir", str(tmp_path / "work"), "--out-dir", str(tmp_path / "out"), timeout=1200)

    r = json.loads((tmp_path / "out" / "scale_bench.json").read_text())
    (cycle,) = r["cycles"]
    assert cycle["feedback"] == 12 and cycle["counts"]["feedback"] == 12, cycle
    assert cycle["sft_steps"] == 2, "the step cap did not hold"
    assert cycle["cycle_wall_s"] >= cycle["timings"]["train_s"] > 0 and cycle["peak_rss_gib"] > 0.1, cycle
    d = r["duckdb"]
    assert d["turns"] == 500 and d["bytes"] > 500 * 600, f"not every reply is in the file: {d}"
    assert (tmp_path / "out" / "scale_bench.png").stat().st_size > 0, "empty chart"


def test_soak_bench_smoke_swaps_through_the_registry_and_measures_vllm_memory(vllm_url, embedded_model, tmp_path):
    run_bench("soak_bench", "--vllm-url", vllm_url, "--model-dir", str(embedded_model), "--out-dir", str(tmp_path),
              timeout=600)

    r = json.loads((tmp_path / "soak_bench.json").read_text())
    s = r["soak"]
    assert [row["round"] for row in s["rounds"]] == [1, 2]
    for row in s["rounds"]:
        assert "error" not in row, row
        assert row["compare_error"] is None and row["base_error"] is None, row
        assert row["compare_model"].endswith(f"-r{row['round']:03d}"), f"a new chat missed the promoted version: {row}"
        assert row["rolled_back_to"].endswith("-stable"), row
        assert row["rss_bytes"] > 200 * 2**20, f"the vLLM process tree's memory was not measured: {row}"
    assert s["load_failures"] == 0 and s["load_requests"] > 0, s["errors"]
    assert s["final_adapter"]["answered"] and not s["problems"], (s["final_adapter"], s["problems"])
    assert r["rss"]["growth_from_start"] is not None and len(s["rss_samples"]) >= 5, (r["rss"], s["rss_samples"])
    client = ModelClient(vllm_url)  # every soak adapter was taken off the shared server again
    try:
        assert not [m for m in client.models() if m.startswith("soak-")], f"soak adapters left loaded: {client.models()}"
    finally:
        client.close()
    assert "| round | seconds | vLLM RSS MiB |" in (tmp_path / "soak_bench.md").read_text(), "no table in the .md"
    assert (tmp_path / "soak_bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", "the chart is not a PNG"


def test_app_bench_smoke_drives_the_real_app_and_finds_every_turn_in_its_file(tmp_path):
    """No vLLM: the models are tests/fake_openai.py. One fresh app at the default chat concurrency, driven
    through its UI (/send) and its OpenAI-compatible API, beside a plain gr.ChatInterface (the anchor)."""
    stdout = run_bench("app_bench", "--out-dir", str(tmp_path), timeout=300)

    r = json.loads((tmp_path / "app_bench.json").read_text())
    assert [a["chat_concurrency"] for a in r["apps"]] == [16]
    for a in r["apps"]:
        assert [lv["sessions"] for lv in a["levels"]] == [1, 2]
        for lv in a["levels"]:
            for path in ("plain", "ui", "api"):
                run = lv[path]
                assert run["failures"] == 0, (path, run["errors"])
                assert run["turns"] == 2 * lv["sessions"], (path, run)
                assert run["turns_per_s"] > 0 and 0 < run["turn_p50_ms"] <= run["turn_p99_ms"] < run["wall_s"] * 1000, \
                    (path, run)
                assert run["server_cpu_cores"] > 0, (path, run)
            assert lv["ui_vs_plain"] == lv["ui"]["turns_per_s"] / lv["plain"]["turns_per_s"], lv
        # a warm-up turn on the UI and on the API, and 2 turns per session on each, every one a user message and
        # its reply in the file (the anchor stores nothing)
        assert a["turns_acknowledged"] == a["turns_in_file"] == a["messages_in_file"] // 2 == 2 * (1 + 2 + 4), \
            {k: a[k] for k in ("turns_acknowledged", "turns_in_file", "messages_in_file")}
    # the throughput targets are set at 8 and 32 sessions: not judged on the smoke levels
    assert {t["name"]: t["ok"] for t in r["targets"]} == {"failed turns": True, "turns in file / turns acknowledged": True}
    assert "| chat concurrency | sessions | plain turns/s | UI turns/s | UI / plain | API turns/s |" in stdout, \
        "the table is not printed:\n" + stdout[-3000:]
    assert (tmp_path / "app_bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", "the chart is not a PNG"
