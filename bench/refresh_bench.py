"""Refresh benchmark: how fast a new adapter answers chats, and what a swap costs the chats running meanwhile.

While a steady chat load runs (a few threads sending requests back to back through
`chatfb.serving.model_client.ModelClient`, routed by an `AdapterRouter` like the app's chats), a new
adapter version is saved and `chatfb.serving.adapters.AdapterRegistry.activate` hot-loads it. Measured per
swap: time from "adapter saved" to the first token and the first full reply from it, for a new chat
that arrives the moment the swap returns (a probe request) and for the load's own chats (which
first finish the request they have in flight), beside the time to first token of chats under the
same load before the swap (the floor any request pays); failed requests, and replies the previous
version finished after the switch (drained, not dropped).
For comparison the same load runs while the vLLM server is restarted (stop + start until healthy),
the other way to pick up a new model.

The swaps run twice (--modes): with each version served as a LoRA, and merged into the server's weights
(chatfb.serving.merged: the registry reloads the weights in place, as the app's own server does by default).
Then the tokens/s of concurrent chats on the base model, on one adapter served as a LoRA and on the same
adapter merged into the weights, interleaved round by round (what a promotion costs every chat after it).

The adapter is a random-initialised PEFT LoRA (rank 8, q/k/v/o/gate/up/down projections, PEFT's
default init), saved with `get_peft_model(...).save_pretrained`; no training needed. Each swap
copies it to a new folder (temp name + rename, like the trainer) and activates it under a new name.

    python -m bench.refresh_bench                               # own vLLM: hot swaps, then a restart
    python -m bench.refresh_bench --vllm-url URL --model-dir DIR  # hot swaps on that server; no restart
    python -m bench.refresh_bench --vllm-url URL --model-dir DIR --restart-own-server
    python -m bench.refresh_bench --smoke ...                   # 1 swap, 2 load threads, 8 tokens

The merged swaps and the tokens/s rounds reload the server's weights (back to the base model's at the end):
point --vllm-url only at a server no running chatfb app has merged a version into (or pass --modes lora
--throughput-rounds 0).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from bench.report import (add_output_flags, default_out_dir, fmt, machine, markdown_table, publish, pyplot, save_figure,
                          target, targets_table)
from bench.server import SERVED_NAME, add_server_flags, managed_vllm, vllm_server

NAME = "refresh_bench"
TARGET_SWAP_S = 1.0
PROMPTS = ["Hi! What can you help me with?", "Give me one tip for sleeping better.",
           "What is the capital of France?", "Name three colours of the rainbow."]


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.refresh_bench", description=__doc__.split("\n")[0])
    add_server_flags(p)
    p.add_argument("--swaps", type=int, default=3, help="adapter versions to hot-load one after another")
    p.add_argument("--load-threads", type=int, default=4, help="chat threads sending requests during the swaps")
    p.add_argument("--max-tokens", type=int, default=16, help="max new tokens per load request")
    p.add_argument("--settle-s", type=float, default=2.0, help="steady load before and between swaps (seconds)")
    p.add_argument("--restart-own-server", action="store_true",
                   help="with --vllm-url: measure the restart on a vLLM server of our own (never restarts yours)")
    p.add_argument("--skip-restart", action="store_true", help="leave out the restart comparison")
    p.add_argument("--modes", nargs="+", choices=["lora", "merged"], default=["lora", "merged"],
                   help="how each promoted version is served during the swaps: a LoRA, or merged into the weights "
                        "(the server must offer /collective_rpc: VLLM_SERVER_DEV_MODE=1, as chatfb's managed servers do)")
    p.add_argument("--throughput-rounds", type=int, default=3,
                   help="interleaved rounds of base / LoRA / merged tokens/s (0: leave them out)")
    p.add_argument("--throughput-threads", type=int, default=8, help="concurrent chats in the tokens/s rounds")
    p.add_argument("--throughput-tokens", type=int, default=64, help="tokens per reply in the tokens/s rounds")
    add_output_flags(p, smoke_help="tiny run: 1 swap per mode, 2 load threads, 8 tokens, 1 tokens/s round")
    return p


def make_adapter(model_dir: Path, dest: Path, rank: int = 8, seed: int = 0, init=True) -> Path:
    """A random-initialised LoRA adapter for `model_dir`, saved as PEFT files in `dest` (`init` False: B random too,
    so the adapter changes the model, instead of PEFT's default B = 0)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from chatfb.learning.train import TARGET_MODULES

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGET_MODULES, task_type="CAUSAL_LM",
                      init_lora_weights=init)
    get_peft_model(base, lora).save_pretrained(str(dest))
    return dest


# -- the chat load --------------------------------------------------------------------------------
@dataclass
class Request:
    start: float
    first_token: float | None
    end: float
    model: str
    error: str | None


class ChatLoad:
    """`threads` chats sending requests back to back; after a failure a chat waits `retry_s` and
    sends again (a user pressing Retry), so a dead server is counted, not spun on."""

    def __init__(self, url: str, api_key: str | None, router, threads: int, max_tokens: int, retry_s: float = 0.1,
                 client=None):
        from chatfb.serving.model_client import ModelClient

        # `client`: the registry's own (as in the app: chats and promotions share one, so chats follow what is merged)
        self._own_client = client is None
        self.client = client or ModelClient(url, api_key, timeout_s=120.0)
        self.router, self.threads, self.max_tokens, self.retry_s = router, threads, max_tokens, retry_s
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> "ChatLoad":
        self._threads = [threading.Thread(target=self._chat, args=(i,), daemon=True) for i in range(self.threads)]
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=180)
        if self._own_client:
            self.client.close()

    def _chat(self, index: int) -> None:
        n = index
        while not self._stop.is_set():
            r = self.send(PROMPTS[n % len(PROMPTS)])
            n += 1
            with self._lock:
                self.requests.append(r)
            if r.error:
                self._stop.wait(self.retry_s)

    def send(self, prompt: str) -> Request:
        """One chat request routed like the app's; also the probe: a new chat arriving now."""
        from chatfb.serving.model_client import ModelError, StreamResult

        model = self.router.acquire()
        result, error = StreamResult(), None
        try:
            for _ in self.client.stream_chat([{"role": "user", "content": prompt}], model, self.max_tokens, 0.0, 1.0,
                                             result):
                pass
        except ModelError as e:
            error = str(e)
        except Exception as e:  # anything else is a failed request too, not a silently dead chat
            error = f"{type(e).__name__}: {e}"
        finally:
            self.router.release(model)
        first = None if result.ttft_ms is None else result.started + result.ttft_ms / 1000
        return Request(result.started, first, time.perf_counter(), model, error)

    def ttft_between(self, t0: float, t1: float) -> float | None:
        """Median time to first token (ms) of successful requests sent between t0 and t1."""
        with self._lock:
            xs = [(r.first_token - r.start) * 1000 for r in self.requests
                  if r.error is None and r.first_token is not None and t0 <= r.start <= t1]
        return statistics.median(xs) if xs else None

    def first_reply(self, model: str, started_after: float, timeout_s: float) -> Request | None:
        """The first successful request to `model` sent after `started_after` (waits for it)."""
        deadline = time.perf_counter() + timeout_s
        while time.perf_counter() < deadline:
            with self._lock:
                done = [r for r in self.requests if r.model == model and r.error is None and r.start >= started_after]
            if done:
                return min(done, key=lambda r: r.end)
            time.sleep(0.01)
        return None

    def finished_after(self, model: str, t: float) -> int:
        """Successful replies from `model` that finished after `t`."""
        with self._lock:
            return sum(1 for r in self.requests if r.model == model and r.error is None and r.end > t)

    def failed_between(self, t0: float, t1: float) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.error and r.end >= t0 and r.start <= t1]


def wait_unloaded(client, name: str, timeout_s: float) -> float | None:
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        if name not in client.models():
            return time.perf_counter()
        time.sleep(0.05)
    return None


def ms(t: float | None, since: float) -> float | None:
    return None if t is None else (t - since) * 1000


# -- hot swaps ------------------------------------------------------------------------------------
def measure_swaps(url: str, api_key: str | None, model_dir: Path, args, workdir: Path, mode: str = "lora") -> dict:
    from chatfb.serving.adapters import AdapterRegistry, AdapterRouter
    from chatfb.serving.model_client import ModelClient, ModelError
    from chatfb.store.db import Store

    data_dir = workdir / f"data-{mode}"
    template = workdir / "adapter-template"
    if not template.exists():
        make_adapter(model_dir, template)
    store = Store(data_dir / "chatfb.duckdb")
    admin = ModelClient(url, api_key, timeout_s=120.0)
    router = AdapterRouter(SERVED_NAME)
    registry = AdapterRegistry(store, [admin], router, data_dir, base_model_dir=model_dir)
    registry.merging = mode == "merged"
    names = [f"bench-{os.getpid()}-{mode}-v{i:02d}" for i in range(1, args.swaps + 1)]
    since = time.perf_counter()  # TTFT under load: requests sent since the load started or the last swap
    load = ChatLoad(url, api_key, router, args.load_threads, args.max_tokens, client=admin).start()
    t_load = time.perf_counter()
    swaps = []
    try:
        time.sleep(args.settle_s)
        for i, name in enumerate(names):
            partial = data_dir / "adapters" / f"{name}.partial"
            shutil.copytree(template, partial)
            partial.rename(data_dir / "adapters" / name)
            saved = time.perf_counter()  # the adapter folder is complete on disk
            previous = router.current
            store.add_adapter(name, None if previous == SERVED_NAME else previous, "candidate", name)
            registry.activate(name)  # load into vLLM, route new chats, drain + unload the previous one
            active = time.perf_counter()
            probe = load.send(PROMPTS[i % len(PROMPTS)])  # a new chat arriving as the swap returns
            first = load.first_reply(name, saved, timeout_s=120)
            # the swap is over once the new version answered and the previous one is unloaded (merged: it never was loaded)
            unloaded = wait_unloaded(admin, previous, timeout_s=180) if previous != SERVED_NAME and mode == "lora" else None
            failed = load.failed_between(saved, time.perf_counter())
            drained = load.finished_after(previous, active)
            # TTFT under the same load just before the swap (those requests have finished by now)
            load_ttft = load.ttft_between(since, saved)
            swaps.append({
                "adapter": name, "previous": previous, "saved_at_s": saved - t_load,
                "activate_ms": registry.last_swap_ms, "saved_to_active_ms": ms(active, saved),
                **(registry.last_merge_timings if mode == "merged" else {}),
                "load_ttft_before_ms": load_ttft,
                "probe_model": probe.model, "probe_error": probe.error,
                "new_chat_first_token_ms": ms(probe.first_token if probe.error is None else None, saved),
                "new_chat_reply_ms": ms(probe.end if probe.error is None else None, saved),
                "saved_to_first_token_ms": ms(first.first_token if first else None, saved),
                "saved_to_first_reply_ms": ms(first.end if first else None, saved),
                "previous_unloaded_ms": ms(unloaded, saved),
                "failed_requests": len(failed) + (probe.error is not None),
                "aborted_in_flight": sum(1 for r in failed if r.start < saved),
                "previous_replies_finished_after_switch": drained,
            })
            s = swaps[-1]
            print(f"swap to {name}: activate {fmt(s['activate_ms'])} ms; after save, a new chat's first token"
                  f" {fmt(s['new_chat_first_token_ms'])} ms (TTFT under this load {fmt(load_ttft)} ms), the load's"
                  f" first token {fmt(s['saved_to_first_token_ms'])} ms; failed {s['failed_requests']}", flush=True)
            since = time.perf_counter()
            time.sleep(args.settle_s)
    finally:
        load.stop()
        try:  # leave the server as we found it: base model only
            registry.activate(None, background_unload=False)
            for name in names:
                if wait_unloaded(admin, name, timeout_s=60) is None:
                    registry.unload(name)
        except ModelError as e:
            print(f"cleanup: could not unload the benchmark's adapters: {e}", flush=True)
        admin.close()
        store.close()
    return {"mode": mode, "swaps": swaps, "load_requests": len(load.requests),
            "load_failures": sum(1 for r in load.requests if r.error),
            "errors": sorted({r.error for r in load.requests if r.error})[:5],
            "timeline": [[r.start - t_load, r.end - t_load, r.model, r.error is None] for r in load.requests]}


# -- tokens/s: base, LoRA, merged ------------------------------------------------------------------
def blast(url: str, api_key: str | None, model: str, threads: int, tokens: int) -> tuple[float, int]:
    """(tokens/s, failed requests) of `threads` concurrent chats, two replies each, `tokens` long (ignore_eos)."""
    import httpx

    done, failed, lock = [0], [0], threading.Lock()
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def chat(i: int) -> None:
        with httpx.Client(base_url=url, headers=headers, timeout=300) as http:
            for j in range(2):
                r = http.post("/v1/chat/completions", json={
                    "model": model, "max_tokens": tokens, "temperature": 0.7, "ignore_eos": True,
                    "messages": [{"role": "user", "content": f"Tell me a story about the number {i * 2 + j}."}]})
                with lock:
                    if r.status_code == 200:
                        done[0] += r.json()["usage"]["completion_tokens"]
                    else:
                        failed[0] += 1

    t0 = time.perf_counter()
    workers = [threading.Thread(target=chat, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return done[0] / (time.perf_counter() - t0), failed[0]


def measure_throughput(url: str, api_key: str | None, model_dir: Path, args, workdir: Path) -> dict:
    """Tokens/s on the base model, on one adapter served as a LoRA, and on the same adapter merged into the weights
    (the registry's merged activation), interleaved round by round, the order turning each round."""
    from chatfb.serving.adapters import AdapterRegistry, AdapterRouter
    from chatfb.serving.model_client import ModelClient
    from chatfb.store.db import Store

    data_dir = workdir / "data-throughput"
    name = f"bench-{os.getpid()}-tokens"
    make_adapter(model_dir, data_dir / "adapters" / name, seed=1, init=False)  # B random: it changes the model
    store = Store(data_dir / "chatfb.duckdb")
    store.add_adapter(name, None, "candidate", name)
    admin = ModelClient(url, api_key, timeout_s=300.0)
    registry = AdapterRegistry(store, [admin], AdapterRouter(SERVED_NAME), data_dir, base_model_dir=model_dir)
    registry.merging = True
    ways = ["base", "lora", "merged"]
    rates: dict[str, list[float]] = {w: [] for w in ways}
    failed = {w: 0 for w in ways}
    try:
        for r in range(args.throughput_rounds):
            for way in ways[r % 3:] + ways[:r % 3]:
                registry.activate(name if way == "merged" else None, background_unload=False)
                if way == "lora":  # the base weights, the adapter as a LoRA on them
                    admin.load_adapter(name, str(data_dir / "adapters" / name))
                rate, bad = blast(url, api_key, admin.served(SERVED_NAME if way == "base" else name),
                                  args.throughput_threads, args.throughput_tokens)
                if way == "lora":
                    admin.unload_adapter(name)
                rates[way].append(rate)
                failed[way] += bad
                print(f"tokens/s round {r + 1}, {way}: {rate:.1f} ({bad} failed)", flush=True)
    finally:
        registry.activate(None, background_unload=False)  # leave the server as we found it: the base weights
        admin.close()
        store.close()
    med = {w: statistics.median(xs) if xs else None for w, xs in rates.items()}
    return {"rounds": args.throughput_rounds, "threads": args.throughput_threads, "tokens": args.throughput_tokens,
            "tokens_per_s": rates, "median_tokens_per_s": med, "failed": failed,
            "merged_over_base": med["merged"] / med["base"] if med["merged"] and med["base"] else None,
            "lora_over_base": med["lora"] / med["base"] if med["lora"] and med["base"] else None}


# -- restart --------------------------------------------------------------------------------------
def measure_restart(server, api_key: str | None, args) -> dict:
    """Stop the managed vLLM and start a fresh one on the same port while the load runs."""
    from chatfb.serving.adapters import AdapterRouter

    load = ChatLoad(server.url, api_key, AdapterRouter(SERVED_NAME), args.load_threads, args.max_tokens).start()
    t_load = time.perf_counter()
    try:
        time.sleep(args.settle_s)
        stop_at = time.perf_counter()
        server.managed.stop()
        server.managed = server.relaunch()  # returns once /health answers
        healthy = time.perf_counter()
        first = load.first_reply(SERVED_NAME, stop_at, timeout_s=120)
        time.sleep(args.settle_s)
    finally:
        load.stop()
    failed = load.failed_between(stop_at, time.perf_counter())
    return {
        "stop_to_healthy_ms": ms(healthy, stop_at),
        "stop_to_first_token_ms": ms(first.first_token if first else None, stop_at),
        "stop_to_first_reply_ms": ms(first.end if first else None, stop_at),
        "failed_requests": len(failed),
        "aborted_in_flight": sum(1 for r in failed if r.start < stop_at),
        "retry_interval_s": load.retry_s,
        "load_requests": len(load.requests),
        "stopped_at_s": stop_at - t_load,
        "timeline": [[r.start - t_load, r.end - t_load, r.model, r.error is None] for r in load.requests],
    }


# -- the run --------------------------------------------------------------------------------------
def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    parts = [(f"hot swap, {mode} (AdapterRegistry.activate)", part, [s["saved_at_s"] for s in part["swaps"]])
             for mode, part in results.get("swaps_by_mode", {"lora": results["swap"]}).items()]
    if "stop_to_healthy_ms" in results.get("restart", {}):
        parts.append(("vLLM restart", results["restart"], [results["restart"]["stopped_at_s"]]))
    fig, axes = plt.subplots(len(parts), 1, figsize=(9, 3.2 * len(parts)), squeeze=False)
    for ax, (title, part, marks) in zip(axes[:, 0], parts):
        models = sorted({m for _, _, m, _ in part["timeline"]})
        for m in models:
            done = [(s, e) for s, e, mm, ok in part["timeline"] if mm == m and ok]
            ax.plot([e for _, e in done], [(e - s) * 1000 for s, e in done], ".", label=m)
        bad = [(s, e) for s, e, _, ok in part["timeline"] if not ok]
        if bad:
            ax.plot([e for _, e in bad], [(e - s) * 1000 for s, e in bad], "rx", label="failed")
        for x in marks:
            ax.axvline(x, color="gray", linewidth=0.8)
        ax.set(title=title, xlabel="seconds since the load started", ylabel="request latency (ms)")
        ax.legend(fontsize=7)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    args = make_parser().parse_args(argv)
    if args.smoke:
        args.swaps, args.load_threads, args.max_tokens, args.settle_s = 1, 2, 8, 1.0
        args.throughput_rounds = min(args.throughput_rounds, 1)  # 0 stays 0: no tokens/s rounds asked for
        args.throughput_threads, args.throughput_tokens = 2, 8
    out_dir = args.out_dir or default_out_dir(args.smoke)
    results = {"benchmark": NAME, "smoke": args.smoke, "machine": machine(), "load_threads": args.load_threads,
               "max_tokens": args.max_tokens}

    with vllm_server(args) as server, tempfile.TemporaryDirectory(prefix="chatfb-refresh-bench-") as tmp:
        if server.model_dir is None:
            raise SystemExit("the server's model folder is unknown here; pass --model-dir")
        results["vllm_url"], results["model_dir"] = server.url, str(server.model_dir)
        by_mode = {mode: measure_swaps(server.url, args.api_key, server.model_dir, args, Path(tmp), mode)
                   for mode in args.modes}
        results["swap"] = by_mode[args.modes[0]]  # the first mode's, as before; each mode's in "swaps_by_mode"
        results["swaps_by_mode"] = by_mode
        if args.throughput_rounds > 0:
            results["throughput"] = measure_throughput(server.url, args.api_key, server.model_dir, args, Path(tmp))
        if args.skip_restart:
            results["restart"] = {"skipped": "--skip-restart"}
        elif server.managed is not None:
            results["restart"] = measure_restart(server, args.api_key, args)
        elif args.restart_own_server:
            with managed_vllm(server.model_dir, args) as own:
                results["restart"] = measure_restart(own, None, args)
        else:
            results["restart"] = {"skipped": "external server; pass --restart-own-server to restart one of our own"}

    restart = results["restart"]

    def median(swaps: list, key: str) -> float | None:
        xs = [s[key] for s in swaps if s[key] is not None]
        return statistics.median(xs) if len(xs) == len(swaps) and xs else None

    def worst(swaps: list, key: str) -> float | None:
        xs = [s[key] for s in swaps]
        return max(xs) / 1000 if xs and None not in xs else None

    rows, swap_rows, targets = [], [], []
    for mode, part in results["swaps_by_mode"].items():
        swaps = part["swaps"]
        way = "merged into the weights" if mode == "merged" else "as a LoRA"
        swap_failed = sum(s["failed_requests"] for s in swaps)
        rows.append([f"hot swap {way}, median of {len(swaps)}", median(swaps, "saved_to_active_ms"),
                     median(swaps, "new_chat_first_token_ms"), median(swaps, "new_chat_reply_ms"),
                     median(swaps, "saved_to_first_token_ms"), median(swaps, "saved_to_first_reply_ms"),
                     median(swaps, "load_ttft_before_ms"), swap_failed, sum(s["aborted_in_flight"] for s in swaps)])
        swap_rows += [[f"{s['adapter']} ({mode})", s["activate_ms"],
                       f"{fmt(s['merge_ms'])} / {fmt(s['reload_ms'])}" if "merge_ms" in s else None,
                       s["new_chat_first_token_ms"],
                       s["saved_to_first_token_ms"], s["load_ttft_before_ms"], s["previous_unloaded_ms"],
                       s["failed_requests"], s["previous_replies_finished_after_switch"]] for s in swaps]
        if mode == "lora":  # a merged swap writes and reloads the whole model: its time is reported, not targeted
            targets += [
                target(f"saved -> first token of a new chat, worst swap, {way} (s)", worst(swaps, "new_chat_first_token_ms"),
                       "<", TARGET_SWAP_S, "s"),
                target(f"saved -> first token in a running chat (after its request in flight), worst swap, {way} (s)",
                       worst(swaps, "saved_to_first_token_ms"), "<", TARGET_SWAP_S, "s")]
        targets += [
            target(f"failed requests during hot swaps {way}", swap_failed, "==", 0),
            target(f"failed requests during the whole load, swaps {way}", part["load_failures"], "==", 0),
        ]
    first_swaps = results["swap"]["swaps"]
    if "stop_to_healthy_ms" in restart:
        rows.append(["vLLM restart", restart["stop_to_healthy_ms"], None, None, restart["stop_to_first_token_ms"],
                     restart["stop_to_first_reply_ms"], None, restart["failed_requests"], restart["aborted_in_flight"]])
        first_swap = median(first_swaps, "saved_to_first_token_ms")
        results["restart_over_swap_first_token"] = (
            restart["stop_to_first_token_ms"] / first_swap if first_swap and restart["stop_to_first_token_ms"] else None)
        rows.append([f"restart / hot swap ({args.modes[0]})", None, None, None, results["restart_over_swap_first_token"],
                     None, None, None, None])
    table = markdown_table(["way", "until serving ms", "new chat first token ms", "new chat reply ms",
                            "running chats first token ms", "running chats first reply ms", "TTFT under load ms",
                            "failed requests", "aborted in flight"], rows)
    swap_table = markdown_table(
        ["adapter", "activate ms", "of it: merge / reload ms", "new chat first token ms", "running chats first token ms",
         "TTFT under load ms", "previous unloaded ms", "failed", "previous replies finished after switch"], swap_rows)
    tput = results.get("throughput")
    tput_md = ""
    if tput:
        med = tput["median_tokens_per_s"]
        tput_md = (f"\n\nTokens/s, {tput['threads']} concurrent chats x 2 replies of {tput['tokens']} tokens (ignore_eos),"
                   f" median of {tput['rounds']} interleaved round(s); one random-initialised rank-8 adapter (B random"
                   f" too, so it changes the model):\n\n" + markdown_table(
                       ["served", "tokens/s", "x base", "failed"],
                       [["base model", med["base"], 1.0, tput["failed"]["base"]],
                        ["adapter as a LoRA", med["lora"], tput["lora_over_base"], tput["failed"]["lora"]],
                        ["adapter merged into the weights", med["merged"], tput["merged_over_base"],
                         tput["failed"]["merged"]]]))
        targets.append(target("tokens/s of a promoted shared adapter (merged) / the base model's", tput["merged_over_base"],
                              ">=", 0.9))
    results["targets"] = targets
    restart_note = ("" if "stop_to_healthy_ms" in restart else f"\nRestart: skipped: {restart['skipped']}.\n") + (
        f"\nRestart: failed requests are counted with each chat retrying every {restart['retry_interval_s']} s while"
        " the server is down." if "retry_interval_s" in restart else "")
    m = results["machine"]
    markdown = (f"## chatfb adapter refresh benchmark{' (smoke)' if args.smoke else ''}\n\n"
                f"{args.load_threads} chat threads sending requests back to back (max_tokens {args.max_tokens});"
                f" times from the adapter folder being complete on disk (hot swap) or from the stop call (restart)."
                f" New chat: a request sent the moment the swap returned. Running chats: the load's own threads, each"
                f" first finishing the request it had in flight. TTFT under load: median first token of the load's"
                f" requests sent between the previous swap (or the load's start) and the save."
                f" Server: {results['vllm_url']}.\nMachine: {m['host_cpus']} CPUs, 1-min load average"
                f" {m['load_avg_1m_at_start']} at start.\n\n{table}\n{restart_note}\n\n{swap_table}{tput_md}\n\n"
                f"{targets_table(results['targets'])}")
    publish(out_dir, NAME, results, markdown,
            None if args.no_plot else lambda path: plot(results, path))
    return results


if __name__ == "__main__":
    main()
