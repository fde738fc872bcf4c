"""Soak benchmark: many adapter swaps on one vLLM server under a light chat load; does it leak?

Months of nightly cycles mean hundreds of LoRA loads and unloads on one long-lived vLLM server.
Some vLLM versions never free an unloaded adapter's slot or memory, so this runs `--rounds`
nightly-sized rounds back to back against ONE server, through chatfb's own path
(`chatfb.serving.adapters.AdapterRegistry` with a real `Store`), while `--chat-threads` chats send
requests back to back through the registry's router, as the app's chats do. One round:

    load      a new version (a copy of a small random LoRA under a new name) beside the live one
    promote   AdapterRegistry.promote: new chats go to it, the previous live version drains and unloads
    compare   one request to the new version and one to the base model, both must answer
    rollback  AdapterRegistry.rollback: the previous version is loaded again and serves, the new one unloads

Recorded: the RSS of the vLLM process tree (server + engine core) every second and after each
round, every failed request, the adapters the server lists after each round, and at the end
whether the server still takes a new adapter and answers with it. Adapters are PEFT LoRAs (rank 8,
random init, `bench.refresh_bench.make_adapter`), made once and copied under a new name per round,
since vLLM refuses a name it has loaded.

    python -m bench.soak_bench                                # own managed vLLM, 60 rounds
    python -m bench.soak_bench --vllm-url URL --model-dir DIR # on that server (finds its PID by port)
    python -m bench.soak_bench --smoke ...                    # 2 rounds, 8 tokens
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

from bench.refresh_bench import PROMPTS, ChatLoad, make_adapter, wait_unloaded
from bench.report import (RESULTS, add_output_flags, fmt, machine, markdown_table, publish, pyplot, save_figure, target,
                          targets_table)
from bench.server import SERVED_NAME, add_server_flags, vllm_server

NAME = "soak_bench"
TARGET_RSS_GROWTH = 0.10


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.soak_bench", description=__doc__.split("\n")[0])
    add_server_flags(p)
    p.add_argument("--rounds", type=int, default=60, help="load -> promote -> compare -> rollback rounds")
    p.add_argument("--chat-threads", type=int, default=2, help="chats sending requests back to back meanwhile")
    p.add_argument("--max-tokens", type=int, default=16, help="max new tokens per chat request")
    p.add_argument("--templates", type=int, default=3, help="distinct random adapters, copied round by round")
    add_output_flags(p, smoke_help="2 rounds, 8 tokens (writes to bench/results/raw)")
    return p


# -- memory of the server's process tree ----------------------------------------------------------
def listening_pid(url: str) -> int | None:
    """The PID listening on the server's port (our own user's processes only)."""
    import psutil

    port = urlparse(url).port
    for c in psutil.net_connections(kind="tcp"):
        if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN and c.pid:
            return c.pid
    return None


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (vLLM's API server + engine core)."""
    import psutil

    proc = psutil.Process(pid)
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


class RSSSampler:
    """Samples tree_rss(pid) every `every_s` seconds in a thread."""

    def __init__(self, pid: int, every_s: float = 1.0):
        self.pid, self.every_s, self.samples, self.t0 = pid, every_s, [], time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "RSSSampler":
        self._thread.start()
        return self

    def now(self) -> int:
        rss = tree_rss(self.pid)
        self.samples.append((time.perf_counter() - self.t0, rss))
        return rss

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.now()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


# -- the rounds -----------------------------------------------------------------------------------
def soak(url: str, pid: int, api_key: str | None, model_dir: Path, args, workdir: Path) -> dict:
    from chatfb.serving.adapters import AdapterRegistry, AdapterRouter
    from chatfb.serving.model_client import ModelClient, ModelError
    from chatfb.store.db import Store

    data_dir = workdir / "data"
    (data_dir / "adapters").mkdir(parents=True)
    templates = [make_adapter(model_dir, workdir / f"template-{k}", seed=k) for k in range(args.templates)]
    prefix = f"soak-{os.getpid()}"
    store = Store(data_dir / "chatfb.duckdb")
    admin = ModelClient(url, api_key, timeout_s=120.0)
    registry = AdapterRegistry(store, [admin], AdapterRouter(SERVED_NAME), data_dir)
    used: list[str] = []

    def new_version(label: str, k: int) -> str:
        name = f"{prefix}-{label}"
        partial = data_dir / "adapters" / f"{name}.partial"
        shutil.copytree(templates[k % len(templates)], partial)
        partial.rename(data_dir / "adapters" / name)
        store.add_adapter(name, None, "candidate", name)
        used.append(name)
        return name

    rss = RSSSampler(pid).start()
    stable = new_version("stable", 0)  # the live version every round rolls back to
    registry.promote(stable)
    load = ChatLoad(url, api_key, registry.router, args.chat_threads, args.max_tokens).start()
    t_load = time.perf_counter()
    rounds, problems = [], []
    try:
        time.sleep(1.0)
        rss_start = rss.now()
        for i in range(1, args.rounds + 1):
            t0 = time.perf_counter()
            row = {"round": i, "started_s": t0 - t_load}
            try:
                name = new_version(f"r{i:03d}", i)
                registry.load_candidate(name)
                registry.promote(name)
                ours = load.send(PROMPTS[i % len(PROMPTS)])  # a new chat: routed to the new version
                base = _ask(admin, SERVED_NAME, PROMPTS[(i + 1) % len(PROMPTS)], args.max_tokens)
                row.update(compare_model=ours.model, compare_error=ours.error, base_error=base)
                back_to = registry.rollback()
                row["rolled_back_to"] = back_to
                if wait_unloaded(admin, name, timeout_s=180) is None:
                    problems.append(f"round {i}: {name} still loaded 180 s after rollback")
                row["loaded_after"] = sorted(m for m in admin.models() if m != SERVED_NAME)
            except Exception as e:  # noqa: BLE001 - a round that fails is the finding; recorded, soak goes on
                row["error"] = f"{type(e).__name__}: {e}"
                problems.append(f"round {i}: {row['error']}")
            row["seconds"] = time.perf_counter() - t0
            row["rss_bytes"] = rss.now()
            row["failed_requests_so_far"] = sum(1 for r in load.requests if r.error)
            rounds.append(row)
            print(f"round {i}/{args.rounds}: {row['seconds']:.1f} s, vLLM RSS {row['rss_bytes'] / 2**20:.0f} MiB,"
                  f" loaded {row.get('loaded_after')}, failed requests {row['failed_requests_so_far']}"
                  f"{'; ' + row['error'] if 'error' in row else ''}", flush=True)
    finally:
        load.stop()
        rss.stop()

    # still takes a new adapter, and answers with it?
    final = {"name": None, "loaded": False, "answered": False, "error": None}
    try:
        final["name"] = name = new_version("final", args.rounds + 1)
        registry.load_candidate(name)
        final["loaded"] = True
        final["error"] = _ask(admin, name, PROMPTS[0], args.max_tokens)
        final["answered"] = final["error"] is None
    except Exception as e:  # noqa: BLE001 - recorded as the finding
        final["error"] = f"{type(e).__name__}: {e}"
    finally:
        try:  # leave the server as we found it: base model only
            registry.activate(None, background_unload=False)
            for n in used:
                if n in admin.models():
                    registry.unload(n)
        except ModelError as e:
            problems.append(f"cleanup: {e}")
        admin.close()
        store.close()
    return {"rounds": rounds, "final_adapter": final, "load_offset_s": t_load - rss.t0, "problems": problems, "rss_start_bytes": rss_start,
            "rss_samples": rss.samples, "load_requests": len(load.requests),
            "load_failures": sum(1 for r in load.requests if r.error),
            "errors": sorted({r.error for r in load.requests if r.error})[:5],
            "timeline": [[r.start - t_load, r.end - t_load, r.error is None] for r in load.requests]}


def _ask(client, model: str, prompt: str, max_tokens: int) -> str | None:
    """One non-streamed request; the error text, or None when it answered."""
    try:
        client.complete([{"role": "user", "content": prompt}], model, max_tokens)
        return None
    except Exception as e:  # noqa: BLE001 - counted as a failed request
        return f"{type(e).__name__}: {e}"


# -- the run --------------------------------------------------------------------------------------
def growth(rss_from: int | None, rss_to: int | None) -> float | None:
    return None if not rss_from or rss_to is None else (rss_to - rss_from) / rss_from


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    s = results["soak"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6.4), sharex=True)
    top.plot([t for t, _ in s["rss_samples"]], [b / 2**20 for _, b in s["rss_samples"]], "-", linewidth=0.8,
             label="vLLM process tree RSS (every second)")
    done = [r for r in s["rounds"] if "rss_bytes" in r]
    offset = s["load_offset_s"]  # chat and round times count from the load's start, RSS from the sampler's
    top.plot([r["started_s"] + r["seconds"] + offset for r in done], [r["rss_bytes"] / 2**20 for r in done], "o",
             markersize=3, label="after each round")
    top.set(ylabel="MiB", title=f"{len(done)} load -> promote -> compare -> rollback rounds on one vLLM server")
    top.legend(fontsize=7)
    ok = [(st, en) for st, en, good in s["timeline"] if good]
    bad = [(st, en) for st, en, good in s["timeline"] if not good]
    bottom.plot([en + offset for _, en in ok], [(en - st) * 1000 for st, en in ok], ".", markersize=2,
                label="chat request")
    if bad:
        bottom.plot([en + offset for _, en in bad], [(en - st) * 1000 for st, en in bad], "rx", label="failed")
    bottom.set(xlabel="seconds", ylabel="chat latency (ms)")
    bottom.legend(fontsize=7)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    args = make_parser().parse_args(argv)
    if args.smoke:
        args.rounds, args.max_tokens, args.templates = 2, 8, 2
    out_dir = args.out_dir or (RESULTS / "raw" if args.smoke else RESULTS / "soak")
    results = {"benchmark": NAME, "smoke": args.smoke, "machine": machine(), "rounds": args.rounds,
               "chat_threads": args.chat_threads, "max_tokens": args.max_tokens}
    with vllm_server(args) as server, tempfile.TemporaryDirectory(prefix="chatfb-soak-bench-") as tmp:
        if server.model_dir is None:
            raise SystemExit("the server's model folder is unknown here; pass --model-dir")
        pid = listening_pid(server.url)  # the API server; its engine core is a child
        if pid is None:
            raise SystemExit(f"no process of ours listens at {server.url}; cannot measure its memory")
        results.update(vllm_url=server.url, model_dir=str(server.model_dir), vllm_pid=pid)
        results["soak"] = s = soak(server.url, pid, args.api_key, server.model_dir, args, Path(tmp))

    rounds = s["rounds"]
    compare_failed = sum((r.get("compare_error") is not None) + (r.get("base_error") is not None) for r in rounds)
    failed = s["load_failures"] + compare_failed
    done = [r for r in rounds if "error" not in r]
    after_first = rounds[0]["rss_bytes"] if rounds else None
    last = rounds[-1]["rss_bytes"] if rounds else None
    results["rss"] = {"before_round_1_mib": s["rss_start_bytes"] / 2**20,
                      "after_round_1_mib": after_first / 2**20 if after_first else None,
                      "after_last_round_mib": last / 2**20 if last else None,
                      "max_mib": max(b for _, b in s["rss_samples"]) / 2**20 if s["rss_samples"] else None,
                      "growth_from_start": growth(s["rss_start_bytes"], last),
                      "growth_from_round_1": growth(after_first, last)}
    g = results["rss"]
    results["targets"] = [
        target("rounds completed", len(done), ">=", args.rounds),
        target("failed requests (chat load + compare)", failed, "==", 0),
        target("vLLM RSS growth, before round 1 -> after the last (%)",
               None if g["growth_from_start"] is None else 100 * g["growth_from_start"], "<", 100 * TARGET_RSS_GROWTH,
               "%"),
        target("server takes and answers with a new adapter at the end (1 = yes)",
               int(s["final_adapter"]["answered"]), "==", 1),
    ]
    every = max(1, len(rounds) // 12)
    shown = [r for r in rounds if r["round"] % every == 0 or r["round"] in (1, len(rounds))]
    table = markdown_table(["round", "seconds", "vLLM RSS MiB", "adapters loaded after it", "failed requests so far",
                            "error"],
                           [[r["round"], r["seconds"], r["rss_bytes"] / 2**20, len(r.get("loaded_after", [])),
                             r["failed_requests_so_far"], r.get("error", "")] for r in shown])
    m = results["machine"]
    markdown = (
        f"## chatfb soak benchmark{' (smoke)' if args.smoke else ''}\n\n"
        f"{args.rounds} rounds of load -> promote -> compare -> rollback through `AdapterRegistry` on one vLLM"
        f" server ({results['vllm_url']}), {args.chat_threads} chats sending requests back to back"
        f" (max_tokens {args.max_tokens}) throughout. Each round loads 2 adapters (the new version, and the previous"
        f" one again on rollback) and unloads 2. RSS: the vLLM process tree (PID {pid} and its children).\n"
        f"Machine: {m['host_cpus']} CPUs, 1-min load average {m['load_avg_1m_at_start']} at start.\n\n"
        f"vLLM RSS: {fmt(g['before_round_1_mib'], 0)} MiB before round 1, {fmt(g['after_round_1_mib'], 0)} after it,"
        f" {fmt(g['after_last_round_mib'], 0)} after the last (max {fmt(g['max_mib'], 0)}); growth"
        f" {fmt(None if g['growth_from_start'] is None else 100 * g['growth_from_start'], 1)} % from the start,"
        f" {fmt(None if g['growth_from_round_1'] is None else 100 * g['growth_from_round_1'], 1)} % from round 1.\n"
        f"Chat requests: {s['load_requests']}, failed {s['load_failures']}; compare requests failed {compare_failed}."
        f" New adapter at the end: loaded {s['final_adapter']['loaded']}, answered {s['final_adapter']['answered']}"
        f"{' (' + s['final_adapter']['error'] + ')' if s['final_adapter']['error'] else ''}.\n"
        f"Problems: {'; '.join(s['problems']) or 'none'}.\n\n{table}\n\n{targets_table(results['targets'])}")
    publish(out_dir, NAME, results, markdown,
            None if args.no_plot else lambda path: plot(results, path))
    return results


if __name__ == "__main__":
    main()
