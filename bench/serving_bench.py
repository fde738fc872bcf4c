"""Serving benchmark: what chatfb's chat path costs on top of vLLM, and what vLLM buys over plain transformers.

Three ways to answer the same fixed prompts (temperature 0), measured in one run:
  (a) chatfb  - `chatfb.app.chat_service.ChatService` with a real Store (temp DuckDB file), a real ModelClient
                and an AdapterRouter, consuming the reply stream: the app's own path;
  (b) direct  - the same requests straight to vLLM's /v1/chat/completions, streamed with httpx;
  (c) transformers - `generate` on the same model folder, one stream at a time.
(a) and (b) run at each concurrency, interleaved round by round (alternating which goes first) so
a noisy machine hurts both alike. With --compare-dtype a second managed server serves the same model
in that dtype and (d) "direct, <dtype>" joins the rounds (what the default dtype buys). With --compare-adapter
one adapter (random weights, rank 8, every target module) is live the two ways chatfb can serve a promoted shared
adapter: (e) "direct LoRA", the same server answering through it as a LoRA, and (f) "direct merged", a second
server on the weights with it merged in (chatfb.serving.merged.merge_checkpoint, what CHATFB_SERVE_MERGED
reloads into the app's server). Throughput = completion tokens / wall time; TTFT = time from the
call to the first text of the reply (for chatfb it includes logging the turn).

    python -m bench.serving_bench                               # starts its own vLLM on the embedded model
    python -m bench.serving_bench --vllm-url http://127.0.0.1:8011 --model-dir data/models/SmolLM2-135M-Instruct
    python -m bench.serving_bench --compare-dtype float32       # also the same server in float32, side by side
    python -m bench.serving_bench --compare-adapter --skip-transformers   # a live adapter: LoRA vs merged, side by side
    python -m bench.serving_bench --smoke --vllm-url ...        # 8 tokens, concurrency 1 and 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from bench.report import (add_output_flags, default_out_dir, machine, markdown_table, percentile, publish, pyplot,
                          save_figure, target, targets_table)
from bench.server import SERVED_NAME, add_server_flags, managed_vllm, vllm_server
from chatfb.config import VLLM_DTYPES

NAME = "serving_bench"
SYSTEM = "You are a helpful assistant."
PROMPTS = [
    "Explain in a few sentences why the sky is blue.",
    "Write a short poem about a lighthouse.",
    "What are three tips for learning a new language?",
    "Describe how a bicycle works to a ten-year-old.",
    "Give me a simple recipe for pancakes.",
    "What is the difference between weather and climate?",
    "Summarise the plot of Romeo and Juliet in a paragraph.",
    "How do I write a polite e-mail asking for a deadline extension?",
]
TARGET_RATIO_DIRECT = 0.95
TARGET_TTFT_OVERHEAD_MS = 20.0
TARGET_RATIO_TRANSFORMERS = 6.0
TARGET_RATIO_MERGED = 0.9  # issue 24: a promoted shared adapter serves >= 0.9x the base model's tokens/s
LIVE_ADAPTER = "bench-live-adapter"  # and the process id: a name is loaded once per server


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.serving_bench", description=__doc__.split("\n")[0])
    add_server_flags(p)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16], help="concurrent chats to try")
    p.add_argument("--max-tokens", type=int, default=64, help="max new tokens per reply")
    p.add_argument("--requests-per-worker", type=int, default=4, help="requests each concurrent chat sends per round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of chatfb and direct runs")
    p.add_argument("--transformers-prompts", type=int, default=4, help="prompts for the transformers single stream")
    p.add_argument("--skip-transformers", action="store_true", help="leave out the transformers comparison")
    p.add_argument("--compare-dtype", default=None, choices=[d for d in VLLM_DTYPES if d != "auto"],
                   help="also start a managed server in this dtype and run it direct in the same rounds")
    p.add_argument("--compare-adapter", action="store_true",
                   help="also serve one adapter as a LoRA (same server) and merged into the weights (a second "
                        "server), direct, in the same rounds")
    add_output_flags(p, smoke_help="tiny run: concurrency 1 and 2, 8 tokens, 1 round; transformers on 1 prompt, 4 tokens")
    return p


@dataclass
class Sample:
    ttft_ms: float | None
    latency_ms: float
    tokens: int
    error: str | None = None


# -- (a) chatfb's own path ----------------------------------------------------------------------
def chatfb_service(url: str, api_key: str | None, data_dir: Path, max_tokens: int):
    from chatfb.serving.adapters import AdapterRouter
    from chatfb.app.chat_service import ChatService
    from chatfb.config import load_settings
    from chatfb.serving.model_client import ModelClient
    from chatfb.store.db import Store

    settings = load_settings({}, data_dir=data_dir, vllm_url=url, served_model_name=SERVED_NAME, max_tokens=max_tokens,
                             temperature=0.0, top_p=1.0, rate_limit_per_minute=10**9, request_timeout_s=600.0)
    store = Store(settings.db_path)
    client = ModelClient(url, api_key, settings.request_timeout_s)
    return ChatService(settings, store, client, AdapterRouter(SERVED_NAME))


def chatfb_request(service, prompt: str) -> Sample:
    t0 = time.perf_counter()
    first, last = None, None
    _, updates = service.send(f"bench-{uuid.uuid4().hex}", None, prompt, SYSTEM)
    for update in updates:
        if first is None and update.text:
            first = time.perf_counter()
        last = update
    latency = (time.perf_counter() - t0) * 1000
    msg = service.store.message(last.message_id)
    error = last.error or (None if msg["status"] == "ok" else f"reply stored as {msg['status']}")
    return Sample(None if first is None else (first - t0) * 1000, latency, msg["completion_tokens"] or 0, error)


# -- (b) straight to vLLM -----------------------------------------------------------------------
def direct_client(url: str, api_key: str | None):
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    # the same pool and timeouts as chatfb's ModelClient
    return httpx.Client(base_url=url, headers=headers, timeout=httpx.Timeout(600.0, connect=5.0),
                        limits=httpx.Limits(max_connections=256, max_keepalive_connections=64))


def direct_request(http, prompt: str, max_tokens: int, model: str = SERVED_NAME) -> Sample:
    body = {"model": model, "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}],
            "max_tokens": max_tokens, "temperature": 0.0, "top_p": 1.0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, tokens, error = None, 0, None
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            r.read()
            error = f"HTTP {r.status_code}: {r.text[:200]}"
        else:
            for line in r.iter_lines():
                if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                    continue
                chunk = json.loads(line[5:])
                if chunk.get("usage"):
                    tokens = chunk["usage"].get("completion_tokens") or 0
                if first is None and any((c.get("delta") or {}).get("content") for c in chunk.get("choices", [])):
                    first = time.perf_counter()
    return Sample(None if first is None else (first - t0) * 1000, (time.perf_counter() - t0) * 1000, tokens, error)


# -- running one concurrency level --------------------------------------------------------------
def run_level(request: Callable[[str], Sample], concurrency: int, per_worker: int) -> tuple[list[Sample], float]:
    """`concurrency` chats, each sending `per_worker` requests back to back; returns samples and wall time."""
    samples: list[Sample] = []
    lock = threading.Lock()
    start = threading.Barrier(concurrency + 1)

    def worker(w: int) -> None:
        start.wait()
        for k in range(per_worker):
            prompt = PROMPTS[(w * per_worker + k) % len(PROMPTS)]
            try:
                s = request(prompt)
            except Exception as e:  # a failed request is a result, not a crash
                s = Sample(None, 0.0, 0, f"{type(e).__name__}: {e}")
            with lock:
                samples.append(s)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(concurrency)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return samples, time.perf_counter() - t0


def summarise(samples: list[Sample], wall_s: float) -> dict:
    ok = [s for s in samples if s.error is None]
    ttfts = [s.ttft_ms for s in ok if s.ttft_ms is not None]
    tokens = sum(s.tokens for s in ok)
    return {"requests": len(samples), "failures": len(samples) - len(ok),
            "errors": sorted({s.error for s in samples if s.error})[:5], "tokens": tokens, "wall_s": round(wall_s, 3),
            "tokens_per_s": tokens / wall_s if wall_s > 0 else 0.0, "ttft_p50_ms": percentile(ttfts, 50),
            "ttft_p99_ms": percentile(ttfts, 99), "latency_p50_ms": percentile([s.latency_ms for s in ok], 50)}


# -- (c) plain transformers, one stream ---------------------------------------------------------
def transformers_single_stream(model_dir: Path, prompts: list[str], max_tokens: int, cpu_dtype: str = "float32") -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    class FirstToken(BaseStreamer):
        """generate() puts the prompt first, then each new token: the second put is the first token."""

        def __init__(self):
            self.puts, self.at = 0, None

        def put(self, value):
            self.puts += 1
            if self.puts == 2 and self.at is None:
                self.at = time.perf_counter()

        def end(self):
            pass

    gpu = torch.cuda.is_available()
    # on a CPU the dtype the vLLM server uses (like for like); half precision on a GPU like vLLM's "auto"
    dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if gpu else getattr(torch, cpu_dtype)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to("cuda" if gpu else "cpu").eval()

    def generate(prompt: str, n: int) -> Sample:
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]
        inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                         return_dict=True).to(model.device)
        streamer = FirstToken()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=n, do_sample=False, streamer=streamer,
                                 pad_token_id=tok.eos_token_id)
        if gpu:
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        new = int(out.shape[1] - inputs["input_ids"].shape[1])
        return Sample(None if streamer.at is None else (streamer.at - t0) * 1000, (t1 - t0) * 1000, new)

    generate(prompts[0], 2)  # warm-up
    samples = [generate(p, max_tokens) for p in prompts]
    wall_s = sum(s.latency_ms for s in samples) / 1000
    return {**summarise(samples, wall_s), "device": "cuda" if gpu else "cpu", "dtype": str(dtype).replace("torch.", "")}


# -- the run ------------------------------------------------------------------------------------
def plot(levels: list[dict], hf: dict | None, path: Path) -> None:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for way, style in (("chatfb", "o-"), ("direct", "s--")):
        rows = [lv for lv in levels if lv["way"] == way]
        xs = [lv["concurrency"] for lv in rows]
        left.plot(xs, [lv["tokens_per_s"] for lv in rows], style, label=way)
        right.plot(xs, [lv["ttft_p50_ms"] for lv in rows], style, label=way)
    if hf:
        left.axhline(hf["tokens_per_s"], color="gray", linewidth=0.8, label="transformers, 1 stream")
    left.set(xlabel="concurrent chats", ylabel="completion tokens / s", title="throughput")
    right.set(xlabel="concurrent chats", ylabel="median TTFT (ms)", title="time to first token")
    for ax in (left, right):
        ax.legend(fontsize=8)
    save_figure(fig, path)


def live_adapter(server, client, tmp: Path, name: str) -> Path:
    """One adapter live two ways: loaded into `server` as `name` (through `client`, a ModelClient on it), and
    merged into a copy of its model folder (merged weights beside the base model's config and tokenizer),
    returned for a second server."""
    import shutil

    from bench.refresh_bench import make_adapter
    from chatfb.serving.merged import merge_checkpoint

    adapter = make_adapter(server.model_dir, tmp / name, init=False)  # B random too: it changes the model
    client.load_adapter(name, str(adapter))
    merged = merge_checkpoint(server.model_dir, adapter, tmp / "merged")
    for f in Path(server.model_dir).iterdir():
        if f.is_file() and f.suffix != ".safetensors" and not (merged / f.name).exists():
            shutil.copy2(f, merged / f.name)
    return merged


def main(argv: list[str] | None = None) -> dict:
    args = make_parser().parse_args(argv)
    if args.smoke:
        args.concurrency, args.max_tokens, args.rounds, args.requests_per_worker = [1, 2], 8, 1, 1
        hf_prompts, hf_tokens = PROMPTS[:1], 4
    else:
        hf_prompts, hf_tokens = PROMPTS[:args.transformers_prompts], args.max_tokens
    out_dir = args.out_dir or default_out_dir(args.smoke)
    results = {"benchmark": NAME, "smoke": args.smoke, "machine": machine(), "max_tokens": args.max_tokens,
               "rounds": args.rounds, "requests_per_worker": args.requests_per_worker}

    from chatfb.serving.vllm_server import serving_dtype

    if args.compare_dtype and args.vllm_url:
        raise SystemExit("--compare-dtype starts its own servers: leave out --vllm-url")
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(vllm_server(args))
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="chatfb-serving-bench-"))
        results["vllm_url"], results["model_dir"] = server.url, str(server.model_dir)
        results["dtype"] = serving_dtype(args.dtype) if server.managed else "the server's own"
        service = chatfb_service(server.url, args.api_key, Path(tmp) / "data", args.max_tokens)
        http = direct_client(server.url, args.api_key)
        ways = {"chatfb": lambda p: chatfb_request(service, p),
                "direct": lambda p: direct_request(http, p, args.max_tokens)}
        other_http = None
        if args.compare_dtype:
            other = stack.enter_context(managed_vllm(server.model_dir, argparse.Namespace(**{**vars(args), "dtype": args.compare_dtype})))
            other_http = direct_client(other.url, None)
            ways[f"direct {args.compare_dtype}"] = lambda p: direct_request(other_http, p, args.max_tokens)
        merged_http = None
        if args.compare_adapter:
            from chatfb.serving.model_client import ModelClient

            live, live_client = f"{LIVE_ADAPTER}-{os.getpid()}", ModelClient(server.url, args.api_key)
            stack.callback(live_client.close)
            # unloaded first (callbacks run last in, first out): the server may be someone's (--vllm-url)
            stack.callback(live_client.unload_adapter_quietly, live)
            merged_dir = live_adapter(server, live_client, Path(tmp), live)
            merged = stack.enter_context(managed_vllm(merged_dir, args))
            merged_http = direct_client(merged.url, None)
            ways["direct LoRA"] = lambda p: direct_request(http, p, args.max_tokens, live)
            ways["direct merged"] = lambda p: direct_request(merged_http, p, args.max_tokens)
        for way in ways.values():  # warm-up: compile graphs, open connections, create tables
            way(PROMPTS[0])
        raw = {(w, c): ([], 0.0) for w in ways for c in args.concurrency}
        for r in range(args.rounds):
            for i, c in enumerate(args.concurrency):
                order = list(ways) if (r + i) % 2 == 0 else list(ways)[::-1]
                for way in order:
                    samples, wall = run_level(ways[way], c, args.requests_per_worker)
                    prev_samples, prev_wall = raw[(way, c)]
                    raw[(way, c)] = (prev_samples + samples, prev_wall + wall)
                    s = summarise(samples, wall)
                    print(f"round {r + 1}/{args.rounds} {way:>6} x{c:<3} {s['tokens_per_s']:8.1f} tok/s"
                          f"  ttft p50 {s['ttft_p50_ms']:7.1f} ms  failures {s['failures']}", flush=True)
        http.close()
        for extra in (other_http, merged_http):
            if extra is not None:
                extra.close()
        service.client.close()
        service.store.close()
        results["levels"] = [{"way": w, "concurrency": c, **summarise(*raw[(w, c)])} for w in ways for c in args.concurrency]

        hf = None
        if args.skip_transformers:
            results["transformers"] = {"skipped": "--skip-transformers"}
        elif server.model_dir is None:
            results["transformers"] = {"skipped": "the server's model folder is unknown; pass --model-dir"}
        else:
            like = results["dtype"] if results["dtype"] in ("float32", "bfloat16") else "float32"
            print(f"transformers single stream on {server.model_dir} ({like}) ...", flush=True)
            hf = results["transformers"] = transformers_single_stream(server.model_dir, hf_prompts, hf_tokens, like)
            if like != "float32" and hf["device"] == "cpu":  # also transformers' own default on a CPU
                results["transformers_float32"] = transformers_single_stream(server.model_dir, hf_prompts, hf_tokens)

    level = {(lv["way"], lv["concurrency"]): lv for lv in results["levels"]}
    ref = 8 if 8 in args.concurrency else max(args.concurrency)
    a, b = level[("chatfb", ref)], level[("direct", ref)]
    results["ratios"] = {
        "reference_concurrency": ref,
        "chatfb_over_direct_tokens_per_s": a["tokens_per_s"] / b["tokens_per_s"] if b["tokens_per_s"] else None,
        "ttft_overhead_ms": a["ttft_p50_ms"] - b["ttft_p50_ms"],
        "chatfb_over_transformers_tokens_per_s": a["tokens_per_s"] / hf["tokens_per_s"] if hf and hf["tokens_per_s"] else None,
    }
    ratios = results["ratios"]
    results["targets"] = [
        target(f"chatfb / direct throughput at {ref} chats", ratios["chatfb_over_direct_tokens_per_s"], ">=",
               TARGET_RATIO_DIRECT),
        target(f"median TTFT overhead chatfb - direct at {ref} chats (ms)", ratios["ttft_overhead_ms"], "<=",
               TARGET_TTFT_OVERHEAD_MS, "ms"),
        target(f"chatfb at {ref} chats / transformers single stream", ratios["chatfb_over_transformers_tokens_per_s"],
               ">=", TARGET_RATIO_TRANSFORMERS),
    ]
    rows = []
    for c in args.concurrency:
        a, b = level[("chatfb", c)], level[("direct", c)]
        rows.append([c, a["tokens_per_s"], b["tokens_per_s"], a["tokens_per_s"] / b["tokens_per_s"] if b["tokens_per_s"] else None,
                     a["ttft_p50_ms"], b["ttft_p50_ms"], a["ttft_p50_ms"] - b["ttft_p50_ms"],
                     f"{a['failures']} / {b['failures']}"])
    table = markdown_table(["chats", "chatfb tok/s", "direct tok/s", "chatfb / direct", "chatfb TTFT p50 ms",
                            "direct TTFT p50 ms", "TTFT overhead ms", "failures chatfb / direct"], rows)
    if args.compare_dtype:
        alt = f"direct {args.compare_dtype}"
        alt_rows = [[c, level[("direct", c)]["tokens_per_s"], level[(alt, c)]["tokens_per_s"],
                     level[("direct", c)]["tokens_per_s"] / level[(alt, c)]["tokens_per_s"] if level[(alt, c)]["tokens_per_s"] else None,
                     level[("direct", c)]["ttft_p50_ms"], level[(alt, c)]["ttft_p50_ms"], level[(alt, c)]["failures"]]
                    for c in args.concurrency]
        results["dtype_ratio_at_reference"] = alt_rows[args.concurrency.index(ref)][3]
        table += (f"\n\nThe same model served in {results['dtype']} (above) and in {args.compare_dtype}, direct, in the same rounds:\n\n"
                  + markdown_table(["chats", f"{results['dtype']} tok/s", f"{args.compare_dtype} tok/s",
                                    f"{results['dtype']} / {args.compare_dtype}", f"{results['dtype']} TTFT p50 ms",
                                    f"{args.compare_dtype} TTFT p50 ms", f"failures {args.compare_dtype}"], alt_rows))
    if args.compare_adapter:
        def over_base(way: str, c: int):
            base = level[("direct", c)]["tokens_per_s"]
            return level[(way, c)]["tokens_per_s"] / base if base else None

        live_rows = [[c, level[("direct", c)]["tokens_per_s"], level[("direct LoRA", c)]["tokens_per_s"],
                      level[("direct merged", c)]["tokens_per_s"], over_base("direct LoRA", c),
                      over_base("direct merged", c),
                      f"{level[('direct LoRA', c)]['failures']} / {level[('direct merged', c)]['failures']}"]
                     for c in args.concurrency]
        results["adapter_ratios_at_reference"] = {"lora_over_base": over_base("direct LoRA", ref),
                                                  "merged_over_base": over_base("direct merged", ref)}
        results["targets"].append(target(f"a live adapter merged / the base model, tokens/s at {ref} chats",
                                         over_base("direct merged", ref), ">=", TARGET_RATIO_MERGED))
        table += ("\n\nOne live adapter (rank 8, random weights), direct, in the same rounds: as a LoRA on the same server, "
                  "and merged into the weights of a second server:\n\n"
                  + markdown_table(["chats", "base model tok/s", "adapter as a LoRA tok/s", "adapter merged tok/s",
                                    "LoRA / base", "merged / base", "failures LoRA / merged"], live_rows))
    a_ref = level[("chatfb", ref)]
    hf_line = (f"transformers `generate`, 1 stream ({hf['device']}, {hf['dtype']}, {len(hf_prompts)} prompts x {hf_tokens}"
               f" tokens): {hf['tokens_per_s']:.1f} tok/s, TTFT p50 {hf['ttft_p50_ms']:.1f} ms"
               if hf else f"transformers: skipped: {results['transformers']['skipped']}")
    if results.get("transformers_float32"):
        f32 = results["transformers_float32"]
        hf_line += (f"; in float32 (its default on a CPU): {f32['tokens_per_s']:.1f} tok/s, TTFT p50 {f32['ttft_p50_ms']:.1f} ms"
                    f" (chatfb at {ref} chats / that: {a_ref['tokens_per_s'] / f32['tokens_per_s']:.2f})")
    m = results["machine"]
    markdown = (f"## chatfb serving benchmark{' (smoke)' if args.smoke else ''}\n\n"
                f"{args.rounds} interleaved rounds x {args.requests_per_worker} requests per chat, max_tokens"
                f" {args.max_tokens}, temperature 0, fixed prompts. Server: {results['vllm_url']}, dtype {results['dtype']}.\n"
                f"Machine: {m['host_cpus']} CPUs, 1-min load average {m['load_avg_1m_at_start']} at start.\n\n"
                f"{table}\n\n{hf_line}\n\n{targets_table(results['targets'])}")
    publish(out_dir, NAME, results, markdown,
            None if args.no_plot else lambda path: plot(results["levels"], hf, path))
    failed = sum(lv["failures"] for lv in results["levels"])
    if failed:
        raise SystemExit(f"{failed} requests failed: {[e for lv in results['levels'] for e in lv['errors']][:3]}")
    return results


if __name__ == "__main__":
    main()
