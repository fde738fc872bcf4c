"""Router benchmark: two vLLM replicas behind vllm-router against one replica directly, side by side.

chatfb's managed replicas (chatfb/serving/managed_replicas.py: two vLLM servers with the LoRA resolver and
vllm-router in front) serve the embedded model; the same streamed requests go (a) through the router
and (b) straight to replica 0, interleaved round by round (alternating which goes first) so a noisy
machine hurts both alike. On a CPU the replicas share the cores, so expect no speed-up: the point is
the router's overhead and zero failures. On a box with a GPU per replica (b) shows one GPU's rate.

    python -m bench.router_bench                     # 8 and 16 chats, 3 rounds
    python -m bench.router_bench --smoke             # 4 tokens, 1 and 2 chats, 1 round
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bench.report import add_output_flags, default_out_dir, machine, markdown_table, target, targets_table, write_results
from bench.serving_bench import direct_client, direct_request, run_level, summarise

NAME = "router_bench"


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.router_bench", description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", type=Path, default=None, help="model folder (default: the embedded model)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[8, 16], help="concurrent chats to try")
    p.add_argument("--max-tokens", type=int, default=64, help="max new tokens per reply")
    p.add_argument("--requests-per-worker", type=int, default=4, help="requests each chat sends per round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of router and direct runs")
    add_output_flags(p, smoke_help="tiny run: 1 and 2 chats, 4 tokens, 1 round")
    return p


def start_pool(model_dir: Path, data_dir: Path):
    """Two managed replicas and the router, on free ports; the caller stops it."""
    from bench.server import free_port
    from chatfb.serving.managed_replicas import ManagedReplicas
    from chatfb.serving.vllm_server import PortInUse

    for _ in range(5):  # the replicas take the two ports after port + 1
        port = free_port()
        try:
            pool = ManagedReplicas(model_dir, "chatfb-base", port, data_dir, 2, data_dir / "shared-adapters",
                                   max_model_len=1024)
            pool.start()
            return pool
        except PortInUse:
            pool.stop(grace_s=2)
    raise RuntimeError("no free ports for two replicas and the router")


def main(argv: list[str] | None = None, pool_factory=start_pool) -> dict:
    args = make_parser().parse_args(argv)
    if args.smoke:
        args.concurrency, args.max_tokens, args.rounds, args.requests_per_worker = [1, 2], 4, 1, 2
    at_start = machine()
    with tempfile.TemporaryDirectory(prefix="router-bench-") as tmp:
        model_dir = args.model_dir
        if model_dir is None:
            from chatfb.serving.model_files import resolve_model

            model_dir = resolve_model("embedded", Path(tmp))
        pool = pool_factory(model_dir, Path(tmp) / "data")
        try:
            paths = {"router, 2 replicas": pool.url, "1 replica direct": pool.replicas[0].url}
            clients = {k: direct_client(u, None) for k, u in paths.items()}
            levels = []
            for c in args.concurrency:
                samples = {k: [] for k in paths}
                walls = {k: 0.0 for k in paths}
                for rnd in range(args.rounds):
                    order = list(paths) if rnd % 2 == 0 else list(reversed(paths))
                    for k in order:
                        s, wall = run_level(lambda p, h=clients[k]: direct_request(h, p, args.max_tokens), c,
                                            args.requests_per_worker)
                        samples[k] += s
                        walls[k] += wall
                levels.append({"chats": c, **{k: summarise(samples[k], walls[k]) for k in paths}})
            for h in clients.values():
                h.close()
        finally:
            pool.stop(grace_s=5)
    results = {"machine": at_start, "max_tokens": args.max_tokens, "rounds": args.rounds,
               "requests_per_worker": args.requests_per_worker, "levels": levels,
               "targets": [target("failed requests through the router", float(sum(lv["router, 2 replicas"]["failures"]
                                                                            for lv in levels)), "==", 0)]}
    write_results(args.out_dir or default_out_dir(args.smoke), NAME, results, report(results))
    return results


def report(results: dict) -> str:
    r, d = "router, 2 replicas", "1 replica direct"
    rows = [[lv["chats"], lv[r]["tokens_per_s"], lv[d]["tokens_per_s"],
             lv[r]["tokens_per_s"] / lv[d]["tokens_per_s"] if lv[d]["tokens_per_s"] else None,
             lv[r]["ttft_p50_ms"], lv[d]["ttft_p50_ms"], f"{lv[r]['failures']} / {lv[d]['failures']}"]
            for lv in results["levels"]]
    m = results["machine"]
    return "\n".join([
        "## Router benchmark: vllm-router + 2 vLLM replicas vs 1 replica directly",
        "",
        f"{results['rounds']} interleaved rounds x {results['requests_per_worker']} requests per chat, max_tokens "
        f"{results['max_tokens']}, temperature 0, streamed. Machine: {m['host_cpus']} CPUs, 1-min load average "
        f"{m['load_avg_1m_at_start']} at start, {m['time_utc']}.",
        "",
        markdown_table(["chats", "router tok/s", "direct tok/s", "router / direct", "router TTFT p50 ms",
                        "direct TTFT p50 ms", "failures router / direct"], rows),
        "",
        targets_table(results["targets"]),
    ])


if __name__ == "__main__":
    main()
