"""Scale benchmark: learning-cycle wall time and peak memory as feedback grows, and DuckDB bytes per turn.

(1) For each size (default 50, 200 and 1,000 feedback items) a fresh data folder gets that much
feedback through `python -m chatfb import-feedback`, then `python -m chatfb nightly --no-promote`
runs with chatfb's default recipe (mode semi, SFT then DPO, at most CHATFB_TRAIN_MAX_STEPS steps per
phase) against one vLLM server. Reported: the cycle's wall time, its phases (snapshot, ILF
refinement, training, evaluation), training/held-out counts and peak RSS summed over the cycle's
process tree (the vLLM server is not in it). The feedback mix is fixed: 80 % corrections, 15 %
ratings (two thirds 👍), 5 % critiques (refined through ILF). Prompts are unique (topic x question
template); replies and corrections are synthetic text of typical chat length (~60 and ~40 words),
so the numbers are about volume, not about what is learnt (that is bench.efficacy_bench).

(2) DuckDB size: 10,000 chat turns (user message + a ~600-character reply with timing and token
counts; every tenth turn also gets a rating, every twentieth a critique) written through
`chatfb.store.db.Store` into a fresh file, closed (DuckDB checkpoints on close), then measured.

    python -m bench.scale_bench                          # starts its own vLLM on the embedded model
    python -m bench.scale_bench --vllm-url http://127.0.0.1:8011 --model-dir data/models/SmolLM2-135M-Instruct
    python -m bench.scale_bench --smoke ...              # 12 items, 2 training steps, 4 replay examples, 500 turns
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from bench.cycle import learning_cycle
from bench.report import (add_output_flags, default_out_dir, machine, markdown_table, percentile, plot_path, pyplot,
                          save_figure, write_results)
from bench.server import SERVED_NAME, add_server_flags, vllm_server

NAME = "scale_bench"
SYSTEM = "You are a helpful assistant."
TOPICS = ("password resets", "invoices", "refunds", "shipping", "account deletion", "two-factor login", "data export",
          "team plans", "API keys", "mobile app", "dark mode", "notifications", "file uploads", "search", "privacy",
          "billing dates", "student discounts", "gift cards", "language settings", "keyboard shortcuts", "backups",
          "integrations", "webhooks", "usage limits", "offline mode")
TEMPLATES = ("How do I get started with {t}?", "What should I know about {t}?", "Something is wrong with {t}. Help?",
             "Can you explain {t} briefly?", "Is there a limit on {t}?", "Who can change {t}?", "Where do I find {t}?",
             "Why does {t} not work for me?", "What changed recently in {t}?", "Give me a tip about {t}.",
             "How long does {t} take?", "Is {t} free?", "Can I automate {t}?", "What are common mistakes with {t}?",
             "How do I turn off {t}?", "Does {t} work on my phone?", "How secure is {t}?", "Can my team share {t}?",
             "What happens to {t} when I cancel?", "Compare {t} with last year's version.", "Summarise {t} in a line.",
             "How do I report a problem with {t}?", "Who do I ask about {t}?", "What are the steps for {t}?",
             "Explain {t} to a beginner.", "What is the best practice for {t}?", "How do I undo a change to {t}?",
             "How do I check the status of {t}?", "Can I try {t} before buying?", "Where is the setting for {t}?",
             "Tell me one fact about {t}.", "How do I get help with {t} fast?", "What does an error in {t} mean?",
             "Is {t} available in my country?", "How do I migrate {t}?", "What do people like about {t}?",
             "What are the limits of {t} on the free plan?", "Is there documentation for {t}?",
             "What is new in {t}?", "How do I set up {t} for a team?")
REPLY = ("Thanks for asking about {t}. In general you can find the relevant options in your account settings, "
         "and most changes take effect right away. If something looks wrong, try signing out and back in, clear "
         "your browser cache, and check that you are on the latest version of the app before trying again.")
CORRECTION = ("For {t}, open Settings, choose the {t} section and follow the steps there. If it still fails, "
              "email support@chatfb.example with a screenshot and we will reply within one working day.")
CRITIQUE = "Too long and too vague: give the exact steps for {t} and mention the support email."


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.scale_bench", description=__doc__.split("\n")[0])
    add_server_flags(p)
    p.add_argument("--sizes", type=int, nargs="+", default=[50, 200, 1000], help="feedback items per cycle")
    p.add_argument("--turns", type=int, default=10_000, help="chat turns for the DuckDB size measurement")
    p.add_argument("--max-steps", type=int, default=None, help="CHATFB_TRAIN_MAX_STEPS for the cycles (default: chatfb's)")
    p.add_argument("--work-dir", type=Path, default=None, help="where the data folders go (default: a temp dir)")
    p.add_argument("--again", type=int, default=0,
                   help="then this many more cycles on the first size's data folder, alternating the answers kept "
                        "from the cycles before (work/answers.json, chatfb.learning.answers) and that file removed")
    add_output_flags(p, smoke_help="tiny run: 12 feedback items, 2 training steps, 4 replay examples, 500 turns")
    return p


def prompts(n: int) -> list[tuple[str, str]]:
    """n unique (topic, question) pairs, topics spread evenly."""
    pairs = [(t, tpl.format(t=t)) for tpl in TEMPLATES for t in TOPICS]
    if n > len(pairs):
        raise SystemExit(f"at most {len(pairs)} distinct feedback prompts")
    return pairs[:n]


def feedback_rows(n: int) -> list[dict]:
    rows = []
    for i, (topic, question) in enumerate(prompts(n)):
        row = {"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
               "reply": REPLY.format(t=topic), "user": f"user{i % 37}"}
        slot = i % 20  # 16 corrections, 3 ratings, 1 critique in every 20
        if slot < 16:
            row.update(kind="correction", text=CORRECTION.format(t=topic))
        elif slot < 19:
            row.update(kind="rating", rating=-1 if slot == 18 else 1)
        else:
            row.update(kind="critique", text=CRITIQUE.format(t=topic))
        rows.append(row)
    return rows


def run_size(n: int, args, server, work: Path) -> dict:
    env = {"CHATFB_ADAPTER_PREFIX": f"benchscale-n{n}-{os.getpid()}",  # its own names on a shared server
           **getattr(args, "cycle_env", {})}
    if args.max_steps is not None:
        env["CHATFB_TRAIN_MAX_STEPS"] = str(args.max_steps)
    c = learning_cycle(f"n={n}", work / f"n{n}", feedback_rows(n), server, args.api_key, **env)
    summary, import_s, wall, peak, log_path = c["summary"], c["import_s"], c["wall_s"], c["peak_bytes"], c["log_path"]
    data_dir = work / f"n{n}"
    if not summary.get("ok"):
        raise RuntimeError(f"n={n}: the cycle failed ({summary.get('reason')}); see {log_path}")
    train = {}
    adapter_dir = data_dir / "adapters" / summary["adapter"]
    if (adapter_dir / "chatfb_train.json").exists():
        train = json.loads((adapter_dir / "chatfb_train.json").read_text())
    c, t = summary["counts"], summary["timings"]
    r = {"feedback": n, "import_s": round(import_s, 1), "cycle_wall_s": round(wall, 1), "peak_rss_gib": round(peak / 2**30, 2),
         "timings": t, "counts": c, "train": train,
         "train_examples": c.get("train_examples"), "heldout_examples": c.get("heldout_examples"),
         "dpo_pairs": c.get("dpo_pairs"), "sft_steps": train.get("sft_steps"), "dpo_steps": train.get("dpo_steps"),
         "gate": (summary.get("metrics") or {}).get("decision")}
    print(f"[n={n}] cycle {r['cycle_wall_s']} s, peak {r['peak_rss_gib']} GiB, train {t.get('train_s')} s "
          f"({r['sft_steps']} SFT + {r['dpo_steps']} DPO steps)", flush=True)
    return r


def run_again(n: int, args, server, work: Path, keep: bool) -> dict:
    """The cycle once more on size n's data folder (the same feedback, nothing promoted), with the answers the
    cycles before kept, or with that file removed first: what keeping them saves."""
    data_dir = work / f"n{n}"
    if not keep:
        (data_dir / "work" / "answers.json").unlink(missing_ok=True)
    env = {"CHATFB_ADAPTER_PREFIX": f"benchscale-n{n}-{os.getpid()}", **getattr(args, "cycle_env", {})}
    if args.max_steps is not None:
        env["CHATFB_TRAIN_MAX_STEPS"] = str(args.max_steps)
    c = learning_cycle(f"n={n} again, answers {'kept' if keep else 'removed'}", data_dir, [], server, args.api_key, **env)
    summary = c["summary"]
    if not summary.get("ok"):
        raise RuntimeError(f"n={n} again: the cycle failed ({summary.get('reason')}); see {c['log_path']}")
    counts = summary["counts"]
    r = {"answers": "kept" if keep else "removed", "cycle_wall_s": round(c["wall_s"], 1), "timings": summary["timings"],
         "answers_reused": counts.get("answers_reused"), "answers_asked": counts.get("answers_asked")}
    print(f"[n={n} again] answers {r['answers']}: cycle {r['cycle_wall_s']} s, {r['answers_reused']} reused, "
          f"{r['answers_asked']} asked", flush=True)
    return r


def again_report(results: dict) -> list[str]:
    rows = results.get("again") or []
    if not rows:
        return []
    med = {k: percentile([r["cycle_wall_s"] for r in rows if r["answers"] == k], 50) for k in ("kept", "removed")}
    return ["# The same cycle again: answers kept from the cycles before, or asked anew", "",
            markdown_table(["answers", "cycle wall s", "answers reused", "answers asked", "refine s", "train s", "eval s"],
                           [[r["answers"], r["cycle_wall_s"], r["answers_reused"], r["answers_asked"],
                             r["timings"].get("refine_s"), r["timings"].get("train_s"), r["timings"].get("eval_s")]
                            for r in rows]), "",
            f"Median cycle: {med['kept']:.1f} s with the answers kept, {med['removed']:.1f} s without "
            f"({med['kept'] / med['removed']:.2f}x).", ""]


def duckdb_size(turns: int, work: Path) -> dict:
    from chatfb.store.db import Store

    path = work / "size.duckdb"
    reply = ("Sure. Here is what you can do: open the settings page, pick the section you need and follow the "
             "steps shown there. Changes are saved automatically and take effect right away. ") * 3  # ~600 chars
    t0 = time.perf_counter()
    store = Store(path)
    try:
        conv = None
        for i in range(turns):
            if i % 10 == 0:  # ten turns per conversation
                conv = store.create_conversation(f"session-{i // 10}", f"user{i % 50}", SYSTEM)
            _, reply_id = store.add_turn(conv, f"Question {i}: how do I change my notification settings, please?",
                                         model=SERVED_NAME)
            store.finish_message(reply_id, reply, "ok", None, ttft_ms=120.0, latency_ms=2400.0, prompt_tokens=40,
                                 completion_tokens=130)
            if i % 10 == 0:
                store.log_feedback(reply_id, "rating", rating=1, user_name=f"user{i % 50}", session_id=f"session-{i // 10}")
            if i % 20 == 5:
                store.log_feedback(reply_id, "critique", text="Too long, just give me the steps.",
                                   user_name=f"user{i % 50}", session_id=f"session-{i // 10}")
    finally:
        store.close()  # DuckDB checkpoints its write-ahead log into the file on close
    wal = path.with_name(path.name + ".wal")
    size = path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)
    return {"turns": turns, "bytes": size, "mib": round(size / 2**20, 2),
            "mib_per_10k_turns": round(size / 2**20 * 10_000 / turns, 2), "write_s": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    sizes = args.sizes
    if args.smoke:
        sizes, args.turns = [12], 500
        args.max_steps = 2 if args.max_steps is None else args.max_steps
        # a check that the cycle runs end to end: little replay, a small gate sample and uptake check
        args.cycle_env = dict(CHATFB_REPLAY_EXAMPLES="4", CHATFB_EVAL_MAX_EXAMPLES="2", CHATFB_UPTAKE_MAX_ITEMS="2")
    out_dir = args.out_dir or default_out_dir(args.smoke)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="chatfb-scale-"))
    results: dict = {"bench": NAME, "machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
                     "cycles": []}
    print(f"DuckDB: writing {args.turns} turns ...", flush=True)
    results["duckdb"] = duckdb_size(args.turns, work)
    with vllm_server(args) as server:
        if server.model_dir is None:
            raise SystemExit("cannot tell which model folder the server serves: pass --model-dir")
        for n in sizes:
            results["cycles"].append(run_size(n, args, server, work))
            md = report(results)  # written after every size: a long run that is stopped keeps what it measured
            write_results(out_dir, NAME, results, md)
            if not args.no_plot:
                plot(results, plot_path(out_dir, NAME))
        for i in range(args.again):
            results.setdefault("again", []).append(run_again(sizes[0], args, server, work, keep=i % 2 == 0))
            md = report(results)
            write_results(out_dir, NAME, results, md)
    print(md)
    return 0


def report(results: dict) -> str:
    headers = ["feedback", "train ex.", "replay ex.", "held out", "DPO pairs", "SFT steps", "DPO steps", "refine s",
               "train s", "eval s", "cycle wall s", "peak RSS GiB", "gate"]
    rows = [[c["feedback"], c["train_examples"], c["counts"].get("replay_examples"), c["heldout_examples"], c["dpo_pairs"],
             c["sft_steps"], c["dpo_steps"], c["timings"].get("refine_s"), c["timings"].get("train_s"),
             c["timings"].get("eval_s"), c["cycle_wall_s"], c["peak_rss_gib"], c.get("gate")] for c in results["cycles"]]
    d, m = results["duckdb"], results["machine"]
    return "\n".join([
        "# Scale: one learning cycle (`python -m chatfb nightly`, default recipe) by feedback volume", "",
        markdown_table(headers, rows), "", *again_report(results),
        "Train ex.: feedback examples; replay ex. (the base model's own answers to general questions) train beside "
        "them. DPO pairs are built but not trained unless CHATFB_TRAIN_DPO=true (DPO steps '-'). The feedback is "
        "synthetic and templated (one correction pattern for every topic), so the gate may refuse the candidate: "
        "these runs are about time and memory. Peak RSS: the cycle's process tree (CLI + trainer), not the vLLM server.", "",
        "# DuckDB size", "",
        markdown_table(["turns", "file MiB", "MiB per 10k turns", "write s"],
                       [[d["turns"], d["mib"], d["mib_per_10k_turns"], d["write_s"]]]), "",
        f"Machine: {m['host_cpus']} CPUs, load {m['load_avg_1m_at_start']} at start, {m['time_utc']}."])


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    cycles = results["cycles"]
    n = [c["feedback"] for c in cycles]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6))
    for key, label in (("refine_s", "ILF refine"), ("train_s", "training"), ("eval_s", "evaluation")):
        a1.plot(n, [c["timings"].get(key) or 0 for c in cycles], marker="o", label=label)
    a1.plot(n, [c["cycle_wall_s"] for c in cycles], marker="o", label="whole cycle", color="black")
    a1.set_xlabel("feedback items")
    a1.set_ylabel("seconds")
    a1.set_xscale("log")
    a1.legend()
    a1.set_title("cycle wall time")
    a2.plot(n, [c["peak_rss_gib"] for c in cycles], marker="o")
    a2.set_xlabel("feedback items")
    a2.set_ylabel("GiB")
    a2.set_xscale("log")
    a2.set_title("peak RSS of the cycle")
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
