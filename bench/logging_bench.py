"""Logging benchmark: how long the app's own write path takes with many chats writing at once.

Each writer thread plays one chat session against one real DuckDB file through `chatfb.store.db.Store`
(exactly the calls `chatfb.app.chat_service.ChatService` makes): per turn the user message with the pending
assistant message (`add_turn`, one transaction) and `finish_message`, then one feedback row on the reply. Writers run with no
pause between turns (a worst case), then again paced like chats: each writer waits about
`--pause-s` between turns (a reply takes a second or more to generate here), jittered so the
writers do not march in step. Afterwards each file is reopened and every acknowledged row must be in it.

    python -m bench.logging_bench            # 1, 8, 32 writers x 200 turns, then x 30 paced turns
    python -m bench.logging_bench --smoke    # 5 (and 2 paced) turns per writer, results in bench/results/raw/
    python -m bench.logging_bench --baseline e7c8932   # and the store of that commit, level by level, side by side

With --baseline, each level runs on the baseline's chatfb/store/db.py (read from git) and on this tree's,
one after the other on fresh files (which goes first alternates), and a table gives this tree's p99 over
the baseline's: the ratio is what to read, the absolute numbers move between machines.
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

from bench.report import (add_output_flags, default_out_dir, machine, markdown_table, percentile, publish, pyplot,
                          save_figure, target, targets_table)
from chatfb.store.db import Store

NAME = "logging_bench"
TARGET_P99_MS = 10.0
REPLY = "Sure. You can reach support by e-mail; they answer within a day. " * 4  # ~260 chars, a short reply


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.logging_bench", description=__doc__.split("\n")[0])
    p.add_argument("--writers", type=int, nargs="+", default=[1, 8, 32], help="concurrent writer threads to try")
    p.add_argument("--turns", type=int, default=200, help="chat turns per writer, no pause between them")
    p.add_argument("--paced-turns", type=int, default=30, help="chat turns per writer in the paced run (0: skip it)")
    p.add_argument("--pause-s", type=float, default=1.0, help="mean pause between a writer's turns in the paced run")
    p.add_argument("--baseline", metavar="REV", default=None,
                   help="also run every level on chatfb/store/db.py as of this git revision, side by side")
    add_output_flags(p, smoke_help="tiny run (5 turns per writer) to check the benchmark works")
    return p


class Writer:
    """One chat session: its latencies and the ids the store acknowledged."""

    def __init__(self, store: Store, index: int):
        self.store = store
        self.session = f"bench-session-{index}"
        self.conversation = store.create_conversation(self.session, f"user{index}", "You are a helpful assistant.")
        self.turn_ms: list[float] = []
        self.feedback_ms: list[float] = []
        self.message_ids: list[str] = []
        self.feedback_ids: list[str] = []
        self.error: BaseException | None = None

    def run(self, turns: int, start: threading.Barrier, pause_s: float = 0.0) -> None:
        jitter = random.Random(self.session)
        start.wait()
        try:
            for i in range(turns):
                if pause_s:
                    time.sleep(pause_s * jitter.uniform(0.5, 1.5))
                t0 = time.perf_counter()
                user_id, reply_id = self.store.add_turn(self.conversation, f"Question {i}: how do I contact support?",
                                                        model="chatfb-base")
                self.store.finish_message(reply_id, REPLY, "ok", None, ttft_ms=42.0, latency_ms=420.0,
                                          prompt_tokens=30, completion_tokens=60)
                t1 = time.perf_counter()
                feedback_id = self.store.log_feedback(reply_id, "rating", rating=1 if i % 2 else -1,
                                                      user_name=f"user-{self.session}", session_id=self.session)
                t2 = time.perf_counter()
                self.turn_ms.append((t1 - t0) * 1000)
                self.feedback_ms.append((t2 - t1) * 1000)
                self.message_ids += [user_id, reply_id]
                self.feedback_ids.append(feedback_id)
        except BaseException as e:  # reported in the results, never swallowed
            self.error = e


def baseline_store(rev: str) -> type:
    """The Store class of chatfb/store/db.py (chatfb/store.py before the package layout) as of git revision
    `rev`; its imports resolve to this tree's chatfb (a flat-layout store's `chatfb.migrations` is mapped to
    `chatfb.store.migrations`)."""
    root = Path(__file__).resolve().parents[1]
    for path in ("chatfb/store/db.py", "chatfb/store.py"):
        shown = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=root, capture_output=True, text=True)
        if shown.returncode == 0:
            break
    else:
        raise SystemExit(f"no chatfb store at {rev}: {shown.stderr.strip()}")
    source = shown.stdout.replace("from chatfb.migrations import", "from chatfb.store.migrations import")
    name = "chatfb_store_at_" + "".join(ch if ch.isalnum() else "_" for ch in rev)
    module = types.ModuleType(name)
    module.__file__ = f"{rev}:{path}"
    sys.modules[name] = module  # dataclasses look their module up
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module.Store


def run_level(n_writers: int, turns: int, workdir: Path, pause_s: float = 0.0, store_cls: type = Store,
              tag: str = "") -> dict:
    """n_writers threads against one fresh DuckDB file; then reopen it and count rows."""
    path = workdir / f"writers-{n_writers}-pause-{pause_s:g}{tag}" / "chatfb.duckdb"
    store = store_cls(path)
    writers = [Writer(store, i) for i in range(n_writers)]
    start = threading.Barrier(n_writers + 1)
    threads = [threading.Thread(target=w.run, args=(turns, start, pause_s)) for w in writers]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall_s = time.perf_counter() - t0
    store.close()

    errors = [repr(w.error) for w in writers if w.error]
    acked_messages = {m for w in writers for m in w.message_ids}
    acked_feedback = {f for w in writers for f in w.feedback_ids}
    with Store(path, read_only=True) as reopened:  # read back through the store's own queries
        in_file_messages = {m["id"] for w in writers for m in reopened.messages(w.conversation) if m["status"] == "ok"}
        in_file_feedback = {f["id"] for m in in_file_messages for f in reopened.feedback_for(m)}
        counts = reopened.counts()
    turn_ms = [x for w in writers for x in w.turn_ms]
    feedback_ms = [x for w in writers for x in w.feedback_ms]
    acked = len(acked_messages) + len(acked_feedback)
    return {
        "writers": n_writers, "turns_per_writer": turns, "pause_s": pause_s, "errors": errors, "wall_s": round(wall_s, 3),
        "turn_p50_ms": percentile(turn_ms, 50), "turn_p99_ms": percentile(turn_ms, 99),
        "feedback_p50_ms": percentile(feedback_ms, 50), "feedback_p99_ms": percentile(feedback_ms, 99),
        # committed transactions per second: a turn is 2 (it was 3 before Store.add_turn), feedback 1
        "writes_per_s": (2 * len(turn_ms) + len(feedback_ms)) / wall_s if wall_s else None,
        "rows_acknowledged": acked,
        "rows_in_file": len(in_file_messages & acked_messages) + len(in_file_feedback & acked_feedback),
        "rows_in_file_total": counts["messages"] + counts["feedback"],
    }


def plot(levels: list[dict], paced: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for runs, tag, color in ((levels, "no pause", "tab:blue"), (paced, "paced", "tab:green")):
        if not runs:
            continue
        xs = [lv["writers"] for lv in runs]
        for key, label, style in (("turn_p50_ms", "turn p50", "o-"), ("turn_p99_ms", "turn p99", "o--"),
                                  ("feedback_p99_ms", "feedback p99", "s:")):
            ax.plot(xs, [lv[key] for lv in runs], style, color=color, label=f"{label}, {tag}")
    ax.axhline(TARGET_P99_MS, color="red", linewidth=0.8, label=f"target p99 < {TARGET_P99_MS:g} ms")
    xs = [lv["writers"] for lv in levels]
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("concurrent writer threads")
    ax.set_ylabel("latency (ms)")
    ax.set_title("chatfb Store write latency (one DuckDB file)")
    ax.legend(fontsize=7)
    save_figure(fig, path)


def level_table(levels: list[dict]) -> str:
    base = levels[0]
    return markdown_table(
        ["writers", "turn p50 ms", "turn p99 ms", "feedback p50 ms", "feedback p99 ms", "transactions/s",
         f"turn p99 / {base['writers']} writer(s)", "rows acknowledged", "rows in file"],
        [[lv["writers"], lv["turn_p50_ms"], lv["turn_p99_ms"], lv["feedback_p50_ms"], lv["feedback_p99_ms"],
          round(lv["writes_per_s"]), lv["turn_p99_ms"] / base["turn_p99_ms"], lv["rows_acknowledged"],
          lv["rows_in_file"]] for lv in levels])


def baseline_table(results: dict) -> str:
    """This tree's store against the baseline's, level by level, measured in the same run."""
    rev, rows = results["baseline"]["rev"], []
    for key, tag in (("levels", "no pause"), ("paced", "paced")):
        for new, old in zip(results[key], results["baseline"][key]):
            rows.append([f"{new['writers']} ({tag})", old["turn_p99_ms"], new["turn_p99_ms"],
                         new["turn_p99_ms"] / old["turn_p99_ms"], old["feedback_p99_ms"], new["feedback_p99_ms"],
                         new["feedback_p99_ms"] / old["feedback_p99_ms"],
                         f"{old['rows_in_file']}/{old['rows_acknowledged']}", f"{new['rows_in_file']}/{new['rows_acknowledged']}"])
    return (f"Side by side with the store at {rev} (same run, fresh file per level, alternating which goes first):\n\n"
            + markdown_table(["writers", f"turn p99 ms ({rev})", "turn p99 ms (this tree)", "ratio",
                              f"feedback p99 ms ({rev})", "feedback p99 ms (this tree)", "ratio",
                              f"rows in file/acked ({rev})", "rows in file/acked (this tree)"], rows))


def main(argv: list[str] | None = None) -> dict:
    args = make_parser().parse_args(argv)
    turns = 5 if args.smoke else args.turns
    paced_turns = min(args.paced_turns, 2) if args.smoke else args.paced_turns
    pause_s = min(args.pause_s, 0.05) if args.smoke else args.pause_s
    out_dir = args.out_dir or default_out_dir(args.smoke)
    results = {"benchmark": NAME, "smoke": args.smoke, "machine": machine(), "levels": [], "paced": []}
    runs = [("levels", turns, 0.0)] + ([("paced", paced_turns, pause_s)] if paced_turns > 0 else [])
    old = baseline_store(args.baseline) if args.baseline else None
    if old is not None:
        results["baseline"] = {"rev": args.baseline, "levels": [], "paced": []}
    with tempfile.TemporaryDirectory(prefix="chatfb-logging-bench-") as tmp:
        for key, n_turns, pause in runs:
            for i, n in enumerate(args.writers):
                order = [("this tree", Store, results[key])]
                if old is not None:  # alternate which store goes first, so drift hurts both alike
                    base = (f"baseline {args.baseline}", old, results["baseline"][key])
                    order = [base] + order if i % 2 == 0 else order + [base]
                for label, cls, into in order:
                    level = run_level(n, n_turns, Path(tmp), pause, cls, "-baseline" if cls is old else "")
                    into.append(level)
                    print(f"{label}: {n:>3} writers, pause {pause:g} s: turn p99 {level['turn_p99_ms']:.2f} ms, feedback"
                          f" p99 {level['feedback_p99_ms']:.2f} ms, rows acknowledged {level['rows_acknowledged']} / in"
                          f" file {level['rows_in_file']}", flush=True)

    levels, paced = results["levels"], results["paced"]
    every = levels + paced
    top = max(levels, key=lambda lv: lv["writers"])
    results["targets"] = [
        target(f"turn p99 at {top['writers']} writers, no pause (ms)", top["turn_p99_ms"], "<", TARGET_P99_MS, "ms"),
        target(f"feedback p99 at {top['writers']} writers, no pause (ms)", top["feedback_p99_ms"], "<", TARGET_P99_MS, "ms"),
    ]
    if paced:
        top_paced = max(paced, key=lambda lv: lv["writers"])
        results["targets"] += [
            target(f"turn p99 at {top_paced['writers']} writers, paced (ms)", top_paced["turn_p99_ms"], "<",
                   TARGET_P99_MS, "ms"),
            target(f"feedback p99 at {top_paced['writers']} writers, paced (ms)", top_paced["feedback_p99_ms"], "<",
                   TARGET_P99_MS, "ms"),
        ]
    results["targets"].append(target("rows in file / rows acknowledged", sum(lv["rows_in_file"] for lv in every)
                                     / max(1, sum(lv["rows_acknowledged"] for lv in every)), "==", 1.0))
    m = results["machine"]
    paced_md = (f"\n\nPaced like chats: {paced_turns} turns per writer, {pause_s:g} s mean pause (0.5-1.5x) before"
                f" each turn.\n\n{level_table(paced)}" if paced else "")
    markdown = (f"## chatfb logging benchmark{' (smoke)' if args.smoke else ''}\n\n"
                f"A turn = user message and pending reply (1 transaction), then finish_message (1), then 1 feedback row,"
                f" each acknowledged only once committed. One DuckDB file per level.\n"
                f"Machine: {m['host_cpus']} CPUs, 1-min load average {m['load_avg_1m_at_start']} at start.\n\n"
                f"No pause between turns (worst case): {turns} turns per writer.\n\n{level_table(levels)}{paced_md}\n\n"
                f"{targets_table(results['targets'])}")
    if old is not None:
        markdown += "\n\n" + baseline_table(results)
    publish(out_dir, NAME, results, markdown,
            None if args.no_plot else lambda path: plot(levels, paced, path))

    for lv in every + (results["baseline"]["levels"] + results["baseline"]["paced"] if old is not None else []):
        if lv["errors"]:
            raise SystemExit(f"{lv['writers']} writers: {len(lv['errors'])} failed: {lv['errors'][0]}")
        assert lv["rows_acknowledged"] == lv["rows_in_file"], (
            f"{lv['writers']} writers: {lv['rows_acknowledged']} rows acknowledged but {lv['rows_in_file']} in the file")
    return results


if __name__ == "__main__":
    main()
