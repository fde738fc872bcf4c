"""How many cores vLLM on a CPU should keep off the model's threads (CHATFB_VLLM_CPU_RESERVED).

vLLM on a CPU keeps one core per process for its scheduler (VLLM_CPU_NUM_OF_RESERVED_CPU) and binds the
model's threads to the others: on a 2-core machine, one core. This starts a managed vLLM server
(`chatfb.serving.vllm_server.ManagedVLLM`, as the app starts it) for each value in turn, `--rounds` times,
alternating the order, and measures in each: seconds until healthy; tokens/s of 1 chat (two requests one
after another) and of 8 chats at once (greedy, 128 tokens each, never stopped early); the CPU the idle
server's process tree uses (after a warm-up request, 10 s).

    python -m bench.cpu_bench                         # --reserved 1 0, 2 rounds
    python -m bench.cpu_bench --smoke                 # 1 round, 16 tokens, 2 chats
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from bench.report import add_output_flags, cpu_seconds, default_out_dir, machine, markdown_table, process_group, publish
from bench.server import SERVED_NAME, free_port

NAME = "cpu_bench"
PROMPTS = ["What is the capital of France?", "Explain photosynthesis.", "Name three colors.", "What is a noun?",
           "How do I bake bread?", "What is inflation?", "Write a haiku about rain.", "Who wrote Hamlet?"]


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.cpu_bench", description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", type=Path, default=None, help="base model folder (default: the embedded model)")
    p.add_argument("--data-dir", type=Path, default=Path("data"), help="embedded model cache and the servers' logs")
    p.add_argument("--reserved", type=int, nargs="+", default=[1, 0],
                   help="VLLM_CPU_NUM_OF_RESERVED_CPU values to compare (1 is vLLM's own choice for one server)")
    p.add_argument("--rounds", type=int, default=2, help="servers started per value (the order alternates)")
    p.add_argument("--chats", type=int, default=8, help="chats at once in the concurrent measurement")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens per reply")
    add_output_flags(p, smoke_help="tiny run: 1 round, 2 chats, 16 tokens")
    return p


def group_cpu_s(pgid: int) -> float:
    """CPU seconds (user + system) of every process in process group `pgid` (vLLM's server and engine)."""
    total = 0.0
    for pid in process_group(pgid):
        try:
            total += cpu_seconds(pid)
        except OSError:  # ended meanwhile
            continue
    return total


def ask(client: httpx.Client, url: str, prompt: str, max_tokens: int) -> int:
    r = client.post(url + "/v1/chat/completions", json={
        "model": SERVED_NAME, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
        "temperature": 0.0, "ignore_eos": True})
    r.raise_for_status()
    return r.json()["usage"]["completion_tokens"]


def measure(settings, model_dir: Path, port: int, args) -> dict:
    from chatfb.serving.vllm_server import ManagedVLLM

    server = ManagedVLLM.from_settings(settings, model_dir, port, log_role="bench")
    t0 = time.perf_counter()
    try:
        server.start()
        out = {"startup_s": round(time.perf_counter() - t0, 1)}
        with httpx.Client(timeout=600) as client:
            ask(client, server.url, "Hello.", 8)
            time.sleep(2)
            pgid = server._proc.pid
            c0 = group_cpu_s(pgid)
            time.sleep(10)
            out["idle_cores"] = round((group_cpu_s(pgid) - c0) / 10, 3)
            t = time.perf_counter()
            tokens = sum(ask(client, server.url, p, args.max_tokens) for p in PROMPTS[:2])
            out["tok_s_1"] = round(tokens / (time.perf_counter() - t), 2)
            prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.chats)]
            t = time.perf_counter()
            with ThreadPoolExecutor(args.chats) as pool:
                tokens = sum(pool.map(lambda p: ask(client, server.url, p, args.max_tokens), prompts))
            out[f"tok_s_{args.chats}"] = round(tokens / (time.perf_counter() - t), 2)
    finally:
        server.stop()
    return out


def main(argv: list[str] | None = None) -> dict:
    args = make_parser().parse_args(argv)
    if args.smoke:
        args.rounds, args.chats, args.max_tokens = 1, 2, 16
    from chatfb.config import Settings

    model_dir = args.model_dir
    if model_dir is None:
        from chatfb.serving.model_files import resolve_model

        model_dir = resolve_model("embedded", args.data_dir / "models")
    results = {"bench": NAME, "machine": machine(), "cpus_usable": len(os.sched_getaffinity(0)),
               "command": "python -m bench.cpu_bench " + " ".join(sys.argv[1:] if argv is None else argv),
               "runs": []}
    with tempfile.TemporaryDirectory(prefix="cpu-bench-") as tmp:
        for rnd in range(args.rounds):
            order = args.reserved if rnd % 2 == 0 else list(reversed(args.reserved))
            for reserved in order:
                settings = Settings(data_dir=Path(tmp) / "data", served_model_name=SERVED_NAME,
                                    vllm_cpu_reserved=reserved)
                r = {"reserved": reserved, "round": rnd, **measure(settings, Path(model_dir), free_port(), args)}
                print(r, flush=True)
                results["runs"].append(r)
    key = f"tok_s_{args.chats}"
    summary = {}
    for reserved in args.reserved:
        runs = [r for r in results["runs"] if r["reserved"] == reserved]
        summary[reserved] = {k: round(statistics.mean(r[k] for r in runs), 3)
                             for k in ("startup_s", "idle_cores", "tok_s_1", key)}
    first = summary[args.reserved[0]]
    for reserved, s in summary.items():
        s["tok_s_1_ratio"] = round(s["tok_s_1"] / first["tok_s_1"], 2)
        s[key + "_ratio"] = round(s[key] / first[key], 2)
    results["summary"] = summary
    rows = [[reserved, s["startup_s"], s["idle_cores"], s["tok_s_1"], s["tok_s_1_ratio"], s[key], s[key + "_ratio"]]
            for reserved, s in summary.items()]
    markdown = (f"## vLLM on a CPU: cores kept for its scheduler{' (smoke)' if args.smoke else ''}\n\n"
                f"{results['cpus_usable']} usable CPUs; {args.rounds} server start(s) per value, alternating; "
                f"greedy replies of {args.max_tokens} tokens; ratios against {args.reserved[0]} kept, same run.\n\n"
                + markdown_table(["cores kept (VLLM_CPU_NUM_OF_RESERVED_CPU)", "startup s", "idle cores used",
                                  "tokens/s, 1 chat", "x", f"tokens/s, {args.chats} chats", "x"], rows)
                + f"\n\nCommand: `{results['command'].strip()}`")
    publish(args.out_dir or default_out_dir(args.smoke), NAME, results, markdown)
    return results


if __name__ == "__main__":
    main()
