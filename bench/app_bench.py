"""App benchmark: the turn rate one chatfb app process holds, with a model too fast to be the bottleneck.

The model is tests/fake_openai.py (a fixed reply of --reply-words words, streamed with no delay); the
app is the real one (`python app.py` in external mode pointed at it, a temp data folder, its own
process group). N chat sessions, each its own gradio_client Client, send messages through the app's
/send API, each waiting for its reply before sending the next, for a fixed time (or --turns each). A
turn = one /send call until the whole reply has arrived: Gradio's queue, `ChatService`, the store
and streaming to the client. Every --turns-per-conversation turns a session starts a new conversation
(a new Gradio session), so histories stay chat-sized. Reported per level: turns/s, turn p50/p99,
failed turns, and the CPU used by the app, the fake model and this load generator (all share the
machine). After each app is stopped (SIGTERM: it commits every queued write) its DuckDB file is
opened read-only and every acknowledged turn (the message and its reply) must be in it.

Each CHATFB_CHAT_CONCURRENCY (how many chat events Gradio runs at once) runs in a fresh app.

    python -m bench.app_bench                  # 1, 8, 32 sessions x 30 s; chat concurrency 16 (default) and 64
    python -m bench.app_bench --smoke          # 1 and 2 sessions x 2 turns, results in bench/results/raw/
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

from bench.report import (add_output_flags, default_out_dir, machine, markdown_table, percentile, publish, pyplot,
                          save_figure, target, targets_table)
from bench.server import SERVED_NAME, free_port
from chatfb.config import Settings
from chatfb.layout import DataLayout
from chatfb.serving.process_group import stop_groups
from chatfb.serving.wait import wait_until

NAME = "app_bench"
ROOT = Path(__file__).resolve().parents[1]
FAKE_MODEL = ROOT / "tests" / "fake_openai.py"
DEFAULT_CHAT_CONCURRENCY = next(f.default for f in fields(Settings) if f.name == "chat_concurrency")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class AppStartError(RuntimeError):
    """The app under test did not come up; the message carries the end of its log."""


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.app_bench", description=__doc__.split("\n")[0])
    p.add_argument("--sessions", type=int, nargs="+", default=[1, 8, 32], help="concurrent chat sessions to try")
    p.add_argument("--seconds", type=float, default=30.0, help="how long each level sends messages")
    p.add_argument("--turns", type=int, default=None, help="send exactly this many turns per session instead of --seconds")
    p.add_argument("--chat-concurrency", type=int, nargs="+", default=[DEFAULT_CHAT_CONCURRENCY, 64],
                   help="CHATFB_CHAT_CONCURRENCY values to try, each in a fresh app")
    p.add_argument("--reply-words", type=int, default=64,
                   help="words (streamed chunks) per fake reply; 64 = the serving benchmark's max_tokens")
    p.add_argument("--turns-per-conversation", type=int, default=10, help="turns before a session starts a new conversation")
    p.add_argument("--startup-timeout-s", type=float, default=120.0, help="how long to wait for the app to be ready")
    add_output_flags(p, smoke_help="tiny run: 1 and 2 sessions x 2 turns, 5-word replies")
    return p


# -- the processes under test -----------------------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process (all its threads), from /proc."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    utime, stime = stat.rsplit(")", 1)[1].split()[11:13]  # fields 14 and 15, after the command name
    return (int(utime) + int(stime)) / CLOCK_TICKS


@dataclass
class App:
    url: str
    data_dir: Path
    proc: subprocess.Popen
    model: subprocess.Popen
    startup_s: float = 0.0


def _answers(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@contextlib.contextmanager
def running_app(workdir: Path, chat_concurrency: int, reply_words: int, startup_timeout_s: float):
    """The fake model and `python app.py` on it, each in its own process group; both are stopped on the way out,
    also when startup or the run fails."""
    workdir.mkdir(parents=True)
    model_port, app_port = free_port(), free_port()
    procs: list[subprocess.Popen] = []
    try:
        with open(workdir / "fake-model.log", "wb") as out:
            procs.append(subprocess.Popen([sys.executable, str(FAKE_MODEL), str(model_port), str(reply_words), "0"],
                                          stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
        model_url = f"http://127.0.0.1:{model_port}"
        if not wait_until(lambda: _answers(model_url + "/health"), 30, every_s=0.1):
            raise AppStartError(f"the fake model server did not answer on {model_url}")
        # only what we set: a developer's CHATFB_* settings (nightly schedule, data dir) must not leak in
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHATFB_")}
        env.update(CHATFB_DATA_DIR=str(workdir / "data"), CHATFB_VLLM_URL=model_url, CHATFB_SERVED_MODEL_NAME=SERVED_NAME,
                   CHATFB_CHAT_CONCURRENCY=str(chat_concurrency), CHATFB_RATE_LIMIT_PER_MINUTE=str(10**9),
                   CHATFB_MAX_TOKENS="64", CHATFB_REQUEST_TIMEOUT_S="60", GRADIO_SERVER_PORT=str(app_port),
                   GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        log = workdir / "app.log"
        t0 = time.perf_counter()
        with open(log, "wb") as out:
            procs.append(subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=out,
                                          stderr=subprocess.STDOUT, start_new_session=True))
        app = App(f"http://127.0.0.1:{app_port}", workdir / "data", procs[1], procs[0])

        def ready() -> bool:
            if app.proc.poll() is not None:
                raise AppStartError(f"the app exited ({app.proc.returncode}):\n{log.read_text()[-3000:]}")
            return b"model ready" in log.read_bytes() and _answers(app.url)

        if not wait_until(ready, startup_timeout_s, every_s=0.2):
            raise AppStartError(f"the app was not ready after {startup_timeout_s:.0f} s:\n{log.read_text()[-3000:]}")
        app.startup_s = time.perf_counter() - t0
        yield app
    finally:
        stop_groups(procs, grace_s=15)


# -- the load ---------------------------------------------------------------------------------------
@dataclass
class Session:
    """One chat session after another on one gradio_client Client (a new session hash = a new conversation)."""

    index: int
    client: object
    reply: str  # what the fake model answers, as the store keeps it
    turn_ms: list[float] = field(default_factory=list)
    acked: list[tuple[str, str]] = field(default_factory=list)  # (session hash, message) of every acknowledged turn
    hashes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def run(self, tag: str, start: threading.Barrier, seconds: float, turns: int | None, per_conversation: int) -> None:
        start.wait()
        deadline = None if turns else time.perf_counter() + seconds
        in_conversation = 0
        self.hashes.append(self.client.session_hash)
        n = 0
        while (turns is None or n < turns) and (deadline is None or time.perf_counter() < deadline):
            if in_conversation == per_conversation:
                self.client.reset_session()
                self.hashes.append(self.client.session_hash)
                in_conversation = 0
            message = f"{tag} session {self.index} turn {n}: how do I reach support?"
            t0 = time.perf_counter()
            try:
                shown = self.client.predict(message, "You are a helpful assistant.", api_name="/send")[0]
                ms = (time.perf_counter() - t0) * 1000
                problem = self.check(shown, message, in_conversation + 1)
            except Exception as e:  # a failed turn is a result, not a crash
                problem = f"{type(e).__name__}: {e}"
            n += 1
            if problem:  # the conversation may now hold a half turn: go on in a new one
                self.errors.append(problem)
                in_conversation = per_conversation
                continue
            self.turn_ms.append(ms)
            self.acked.append((self.client.session_hash, message))
            in_conversation += 1

    def check(self, shown: list[dict], message: str, turn_in_conversation: int) -> str | None:
        """None when the chat shows this conversation with our message and the whole reply last."""
        text = lambda m: m["content"][0]["text"] if isinstance(m["content"], list) else m["content"]
        if len(shown) != 2 * turn_in_conversation:
            return f"the chat shows {len(shown)} messages after turn {turn_in_conversation} (refused or mixed up)"
        if text(shown[-2]) != message or shown[-1]["role"] != "assistant" or not text(shown[-1]).startswith(self.reply):
            return f"unexpected last turn: {text(shown[-2])[:80]!r} -> {text(shown[-1])[:80]!r}"
        return None


def run_level(app: App, n_sessions: int, seconds: float, turns: int | None, per_conversation: int, reply: str,
              tag: str) -> dict:
    """n_sessions sessions released together (their Clients connected beforehand, not timed)."""
    from gradio_client import Client

    sessions: list[Session] = []
    try:
        for i in range(n_sessions):
            sessions.append(Session(i, Client(app.url, verbose=False), reply))
        start = threading.Barrier(n_sessions + 1)
        # daemons: after an interrupt the app is stopped under them, and nothing should wait for them to notice
        threads = [threading.Thread(target=s.run, args=(tag, start, seconds, turns, per_conversation), daemon=True)
                   for s in sessions]
        for t in threads:
            t.start()
        cpu0 = (cpu_seconds(app.proc.pid), cpu_seconds(app.model.pid), time.process_time())
        start.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        wall_s = time.perf_counter() - t0
        cpu1 = (cpu_seconds(app.proc.pid), cpu_seconds(app.model.pid), time.process_time())
    finally:
        for s in sessions:
            s.client.close()
    turn_ms = [x for s in sessions for x in s.turn_ms]
    errors = [e for s in sessions for e in s.errors]
    app_cpu, model_cpu, load_cpu = (b - a for a, b in zip(cpu0, cpu1))
    return {"sessions": n_sessions, "wall_s": round(wall_s, 3), "turns": len(turn_ms), "failures": len(errors),
            "errors": sorted(set(errors))[:5], "turns_per_s": len(turn_ms) / wall_s if wall_s else None,
            "turn_p50_ms": percentile(turn_ms, 50), "turn_p99_ms": percentile(turn_ms, 99),
            # CPU seconds per wall second: 1.0 = one core busy the whole time
            "app_cpu_cores": app_cpu / wall_s, "model_cpu_cores": model_cpu / wall_s, "load_cpu_cores": load_cpu / wall_s,
            "_acked": [a for s in sessions for a in s.acked], "_hashes": [h for s in sessions for h in s.hashes]}


def stored_turns(data_dir: Path, hashes: list[str], reply: str) -> tuple[set[tuple[str, str]], int]:
    """(session hash, message) of every turn in the stopped app's file whose reply is stored complete, and the
    file's message count. API clients' sessions are stored as "h:<session hash>" (chatfb/ui/chat_tab.py Sessions)."""
    from chatfb.store.db import Store

    found = set()
    with Store(DataLayout(data_dir).db, read_only=True) as store:
        for h in hashes:
            cid = store.latest_conversation(f"h:{h}")
            msgs = store.messages(cid) if cid else []
            found |= {(h, q["content"]) for q, a in zip(msgs, msgs[1:])
                      if q["role"] == "user" and a["role"] == "assistant" and a["status"] == "ok" and a["content"] == reply}
        return found, store.counts()["messages"]


def run_app(workdir: Path, chat_concurrency: int, args, reply: str) -> dict:
    """One fresh app at this chat concurrency: a warm-up turn, every level, then stop it and read its file."""
    with running_app(workdir, chat_concurrency, args.reply_words, args.startup_timeout_s) as app:
        warm = run_level(app, 1, 0, 1, args.turns_per_conversation, reply, "warm-up")  # first-request paths, not measured
        levels = [run_level(app, n, args.seconds, args.turns, args.turns_per_conversation, reply, f"level {n}")
                  for n in args.sessions]
        startup_s, data_dir = app.startup_s, app.data_dir
    # the app is stopped: its file is complete and ours to open
    acked = {a for lv in [warm] + levels for a in lv.pop("_acked")}
    hashes = [h for lv in [warm] + levels for h in lv.pop("_hashes")]
    found, messages_in_file = stored_turns(data_dir, hashes, reply)
    for lv in levels:
        print(f"chat concurrency {chat_concurrency}, {lv['sessions']:>3} sessions: {lv['turns_per_s']:.1f} turns/s, p50"
              f" {lv['turn_p50_ms']:.0f} ms, p99 {lv['turn_p99_ms']:.0f} ms, {lv['failures']} failed", flush=True)
    return {"chat_concurrency": chat_concurrency, "startup_s": round(startup_s, 2), "levels": levels,
            "warmup_failures": warm["failures"], "turns_acknowledged": len(acked), "turns_in_file": len(acked & found),
            "messages_in_file": messages_in_file}


# -- the report -------------------------------------------------------------------------------------
def report(results: dict) -> str:
    rows = []
    for a in results["apps"]:
        base = a["levels"][0]
        for lv in a["levels"]:
            rows.append([a["chat_concurrency"], lv["sessions"], lv["turns"], lv["turns_per_s"],
                         lv["turns_per_s"] / base["turns_per_s"] if base["turns_per_s"] else None, lv["turn_p50_ms"],
                         lv["turn_p99_ms"], lv["failures"], lv["app_cpu_cores"], lv["model_cpu_cores"], lv["load_cpu_cores"]])
    stored = markdown_table(["chat concurrency", "app startup s", "turns acknowledged", "in the file after stop"],
                            [[a["chat_concurrency"], a["startup_s"], a["turns_acknowledged"], a["turns_in_file"]]
                             for a in results["apps"]])
    m, run = results["machine"], results["run"]
    length = f"{run['turns']} turns per session" if run["turns"] else f"{run['seconds']:g} s per level"
    return "\n".join([
        f"## chatfb app benchmark{' (smoke)' if results['smoke'] else ''}: turns/s of one app process",
        "",
        f"The real app (`python app.py`, external mode) on tests/fake_openai.py ({run['reply_words']}-word replies, no"
        f" delay). Each session is a gradio_client Client sending through /send and waiting for the whole reply;"
        f" {length}, a new conversation every {run['turns_per_conversation']} turns. CPU columns: cores busy on average"
        f" (CPU s / wall s) for the app, the fake model and this load generator, which share the machine."
        f" Machine: {m['host_cpus']} CPUs, 1-min load average {m['load_avg_1m_at_start']} at start, {m['time_utc']}.",
        "",
        markdown_table(["chat concurrency", "sessions", "turns", "turns/s", "turns/s / 1st level", "turn p50 ms",
                        "turn p99 ms", "failed", "app CPU", "model CPU", "load CPU"], rows),
        "",
        stored,
        "",
        targets_table(results["targets"]),
    ])


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    fig, (rate, p99) = plt.subplots(1, 2, figsize=(9, 4))
    for a in results["apps"]:
        xs = [lv["sessions"] for lv in a["levels"]]
        rate.plot(xs, [lv["turns_per_s"] for lv in a["levels"]], "o-", label=f"chat concurrency {a['chat_concurrency']}")
        p99.plot(xs, [lv["turn_p99_ms"] for lv in a["levels"]], "o-", label=f"chat concurrency {a['chat_concurrency']}")
    for ax, label in ((rate, "turns/s"), (p99, "turn p99 (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel("concurrent chat sessions")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.suptitle("chatfb app with an instant model: one process")
    save_figure(fig, path)


def _exit_on_sigterm(signum, _frame):
    raise SystemExit(128 + signum)  # unwinds through running_app, which stops the app and the fake model


def main(argv: list[str] | None = None) -> dict:
    args = make_parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    if args.smoke:
        args.sessions, args.turns, args.reply_words = [1, 2], 2, 5
    reply = " ".join(f"word{i}" for i in range(args.reply_words))  # tests/fake_openai.py's reply
    results = {"benchmark": NAME, "smoke": args.smoke, "machine": machine(), "apps": [],
               "run": {"seconds": None if args.turns else args.seconds, "turns": args.turns,
                       "reply_words": args.reply_words, "turns_per_conversation": args.turns_per_conversation}}
    with tempfile.TemporaryDirectory(prefix="chatfb-app-bench-") as tmp:
        for c in args.chat_concurrency:
            results["apps"].append(run_app(Path(tmp) / f"concurrency-{c}", c, args, reply))
    apps = results["apps"]
    levels = [lv for a in apps for lv in a["levels"]]
    results["targets"] = [
        target("failed turns", float(sum(lv["failures"] for lv in levels) + sum(a["warmup_failures"] for a in apps)),
               "==", 0),
        target("turns in file / turns acknowledged", sum(a["turns_in_file"] for a in apps)
               / max(1, sum(a["turns_acknowledged"] for a in apps)), "==", 1.0),
    ]
    out_dir = args.out_dir or default_out_dir(args.smoke)
    publish(out_dir, NAME, results, report(results), None if args.no_plot else lambda path: plot(results, path))
    for a in apps:
        assert a["turns_acknowledged"] == a["turns_in_file"], (
            f"chat concurrency {a['chat_concurrency']}: {a['turns_acknowledged']} turns acknowledged but only"
            f" {a['turns_in_file']} in the file")
    return results


if __name__ == "__main__":
    main()
