"""A learning cycle's computation, the child process of chatfb.learning.cycle: critique candidates -> LoRA training -> gate.

    python -m chatfb.learning.worker WORK_DIR [WORK_DIR ...]

WORK_DIR (work/<adapter name>/) holds what the owner wrote: the store's snapshot, the whole settings and
the job (adapter name, incumbent, model server). This process reads them, writes the adapter folder and
WORK_DIR/result.json (chatfb.learning.cycle.CycleOutcome), and calls nothing in the app: the owner records and
promotes. `python -m chatfb nightly` runs a whole cycle (chatfb.learning.cycle). Several WORK_DIRs (a cycle's
personal adapters) share one process, one model server and judge, and one trainer process (`compute_many`).

Only vouched-for feedback (chatfb.learning.trust) trains the shared adapter or gates it; work/<name>/sft.jsonl
and dpo.jsonl carry each row's provenance, so `delete-user` can find a user's rows in them.

Critiques (and approved global guidelines) become training examples through chatfb.critique.candidates: the
conversation answered again with the critique as an instruction, several samples, the best that passes
selection kept and trained WITHOUT the critique; every candidate's score and verdict is handed back for
the admin tab's audit table. Critiques held out whole are judged at the gate by the same selection.

A candidate that passes the gate is asked, while still loaded, the prompts of the newest feedback items it
trained on (`check_uptake`, chatfb.learning.uptake); the owner records the answers if it promotes it.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from chatfb.learning import gate, training_data, uptake
from chatfb.learning.answers import AnswerBook, model_identity
from chatfb.config import Settings, setup_logging
from chatfb.learning.cycle import SNAPSHOT, CycleJob, CycleOutcome, read_job, read_outcome, write_outcome
from chatfb.serving.adapters import is_personal
from chatfb.serving.model_client import ModelClient, ModelError
from chatfb.learning.rows import prompt_completion_row, write_rows
from chatfb.store.db import Store
from chatfb.store.records import last_user

log = logging.getLogger(__name__)


def batch_timeout(settings: Settings) -> float:
    """Per-request timeout for the cycle's own generation (refinement, replay, evaluation). It is batch
    work beside live chats on a possibly busy machine: a chat's short timeout would abort the night's cycle."""
    return max(settings.request_timeout_s, 600.0)


def model_server(settings: Settings, server_url: str | None, merged: str | None = None):
    """(client, base model dir, stop function) for the server this cycle generates with: the owner's (`merged`:
    the shared adapter its weights hold, chatfb.serving.merged), or (none given) a temporary managed one."""
    from chatfb.serving.model_files import resolve_model

    base = resolve_model(settings.model, settings.data_dir)
    if server_url is not None:
        client = ModelClient(server_url, settings.api_key, batch_timeout(settings))
        if merged is not None:
            from chatfb.serving.merged import ServedNames

            layout = settings.layout
            client.names = ServedNames(settings.served_model_name, merged, layout.adapters, layout.served)
        return client, base, lambda: None
    from chatfb.serving.vllm_server import ManagedVLLM

    server = ManagedVLLM.from_settings(settings, base, settings.vllm_port + 1, log_role="nightly")
    server.start(wait=True)
    client = ModelClient(server.url, timeout_s=batch_timeout(settings))
    return client, base, lambda: (client.close(), server.stop())


def train_adapter(settings: Settings, base: Path, data_dir: Path, out: Path, dpo: bool, init: Path | None = None,
                  more: list[dict] | None = None) -> int:
    """One trainer process (chatfb.learning.train). `init`: an adapter folder to train on from (a personal adapter
    starts from the shared one's weights). `more`: further adapters the same process trains after this one, each
    {"data", "output_dir", "init_adapter", "dpo_epochs"} (a cycle's personal adapters: the trainer's imports and
    start are paid once, not once a user)."""
    cmd = [sys.executable, "-m", "chatfb.learning.train", "--data", str(data_dir), "--base", str(base), "--output_dir", str(out),
           "--rank", str(settings.lora_rank), "--num_train_epochs", str(settings.train_epochs),
           "--learning_rate", str(settings.learning_rate), "--seed", str(settings.seed),
           "--step_cap", str(settings.train_max_steps), "--dpo_epochs", "1" if dpo else "0"]
    if init is not None:
        cmd += ["--init_adapter", str(init)]
    if more:
        jobs = Path(data_dir) / "more_adapters.json"
        jobs.write_text(json.dumps(more))
        cmd += ["--more", str(jobs)]
    log.info("training: %s", " ".join(cmd))
    return subprocess.call(cmd)


@dataclass
class TrainSpec:
    """One adapter of a trainer run: its data folder (sft.jsonl, dpo.jsonl), where it goes, what it starts from."""

    data: Path
    out: Path
    dpo: bool
    init: Path | None = None


def train_adapters(settings: Settings, base: Path, specs: list[TrainSpec]) -> list[int]:
    """Train every spec in ONE trainer process, in order; an exit code per spec (0 when its adapter is there)."""
    first, rest = specs[0], specs[1:]
    more = [{"data": str(s.data), "output_dir": str(s.out), "init_adapter": str(s.init) if s.init else None,
             "dpo_epochs": 1 if s.dpo else 0} for s in rest]
    start = {"init": first.init} if first.init is not None else {}
    code = train_adapter(settings, base, first.data, first.out, first.dpo, **start, **({"more": more} if more else {}))
    if not more:
        return [code]
    # several: the process's code is its first failure's; each adapter is renamed into place only when complete
    return [0 if (s.out / "adapter_config.json").exists() else (code or 1) for s in specs]


@dataclass
class Prepared:
    """One job between the phases of `compute_many`: what it built and counted so far."""

    job: CycleJob
    settings: Settings
    work: Path
    progress: dict
    data: object = None
    guidelines: list = field(default_factory=list)
    extra: list = field(default_factory=list)
    done: dict = field(default_factory=dict)  # counts, timings, candidates, recipe: CycleOutcome fields
    book: AnswerBook | None = None
    train: TrainSpec | None = None
    outcome: CycleOutcome | None = None  # set once the job ended (nothing to do, failed, or gated)
    started: float = field(default_factory=time.perf_counter)
    written: bool = False  # its result.json is written (`_settle`)


def compute_many(jobs: list[tuple[CycleJob, Settings, Path]], progress: list[dict]) -> list[CycleOutcome]:
    """Refine, replay, train and evaluate each job (its adapter goes to adapters/<job.name>/; `progress` gets what
    it counted so far, so a failure later on still reports it). Several jobs (a cycle's personal adapters) share a
    model server, phase by phase: each job's data and candidates (all jobs' requests at once: vLLM batches them),
    then every adapter in one trainer process, then the gates, several at once (as many as the server's LoRA slots
    hold: `gate_workers`). A job's failure is its own: the others go on. An error no job can survive (the model
    server not starting) is raised."""
    gate.require_embeddings()  # before hours of work the gate could not judge
    states = [Prepared(job, settings, work, p) for (job, settings, work), p in zip(jobs, progress)]
    try:
        _compute_phases(states)
    finally:
        _settle(states)  # what was decided is on disk, whatever stopped the rest
    return [s.outcome for s in states]


def _settle(states: list[Prepared]) -> None:
    """Write the result.json of every job that has an outcome and none yet: each job's result is on disk as soon
    as it is decided, so a child killed later (or an error no job survives) loses only the undecided ones."""
    for s in states:
        if s.outcome is not None and not s.written:
            s.outcome.timings["cycle_s"] = round(time.perf_counter() - s.started, 2)
            write_outcome(s.work, s.outcome)
            s.written = True


def _compute_phases(states: list[Prepared]) -> None:
    for s in states:
        _guarded(s, _read_data)
    _settle(states)
    live = [s for s in states if s.outcome is None]
    if live:
        first = live[0]
        settings = first.settings
        t = time.perf_counter()  # the candidates' time includes a temporary server's start, as it always did
        client, base, stop_server = model_server(settings, first.job.server_url, first.job.merged)
        try:
            base_id = model_identity(base, settings.vllm_dtype, settings.vllm_url)
            if first.job.server_url is None:  # our own temporary server: load what the jobs compare with and start from
                for other in dict.fromkeys(n for s in live for n in (s.job.incumbent, s.job.start_from) if n):
                    if other not in client.models():
                        client.load_adapter(other, str((settings.layout.adapters / other).resolve()))
            from chatfb.critique.judge import judge_for

            judge = judge_for(settings.scorer, client, base)  # what scores candidates (and held-out answers at the gate)
            # replay and control answers of the base model and the shared adapters, asked once across cycles
            for s in live:
                s.book = AnswerBook(s.job.answers, s.job.merged, keep=lambda model: not is_personal(model), base_id=base_id)
            live[0].book.keep_base(base_id)
            if len(live) > 1:
                _ask_shared_replay(client, settings, live)
            _each(live, lambda s: _select(s, client, judge))
            for s in live:
                s.done["timings"]["refine_s"] = round(time.perf_counter() - t, 2)
            _settle(live)
            training = [s for s in live if s.outcome is None]
            if training:
                t = time.perf_counter()
                try:
                    codes = train_adapters(settings, base, [s.train for s in training])
                except OSError as e:  # the trainer could not start: every job it was to train fails, with why
                    log.error("starting the trainer failed: %s", e)
                    codes = [f"could not start: {e}"] * len(training)
                took = round(time.perf_counter() - t, 2)
                for s, code in zip(training, codes):
                    s.done["timings"]["train_s"] = took
                    if len(training) > 1:
                        s.done["timings"]["trained_with"] = len(training)  # adapters that one trainer process trained
                    if code != 0 or not (s.train.out / "adapter_config.json").exists():
                        shutil.rmtree(s.train.out.with_name(s.train.out.name + ".partial"), ignore_errors=True)
                        why = code if isinstance(code, str) else f"exit {code}"
                        s.outcome = CycleOutcome("failed", f"training failed ({why})",
                                                 error=f"training failed: {why}", **s.done)
                _settle(training)
            gated = [s for s in live if s.outcome is None]
            if len(gated) > 1:
                _ask_shared_control(client, settings, gated)
            _each(gated, lambda s: _gate(s, client, judge, settings.served_model_name),
                  workers=gate_workers(settings, gated))
        finally:
            stop_server()


def gate_workers(settings: Settings, gated: list[Prepared]) -> int:
    """How many gates run at once: each holds its candidate and its incumbent in the server's LoRA slots
    (CHATFB_VLLM_MAX_LORAS). The base model as every incumbent (no shared adapter live yet) takes none: every slot
    holds a candidate; one shared incumbent for all: every slot but its one; some incumbents of their own (a
    user's live personal adapter): two slots a gate."""
    incumbents = {s.job.incumbent for s in gated if s.job.incumbent}
    per_gate = 1 if len(incumbents) <= 1 else 2
    reserved = len(incumbents) if per_gate == 1 else 0
    return max(1, min(len(gated), (settings.vllm_max_loras - reserved) // per_gate))


def _ask_shared_replay(client: ModelClient, settings: Settings, live: list[Prepared]) -> None:
    """The replay answers several jobs share (those of the adapter they start from), asked and filed once before
    the jobs select their candidates side by side. A failure here costs only the saving."""
    book = live[0].book
    count = settings.replay_examples
    try:
        for model in dict.fromkeys(s.job.start_from or settings.served_model_name for s in live):
            if book.keep(model) and count:
                replay_examples(client, model, settings.system_prompt, count, book=book)
    except ModelError as e:
        log.warning("asking the shared replay answers failed (%s); each job asks its own", e)


def _ask_shared_control(client: ModelClient, settings: Settings, gated: list[Prepared]) -> None:
    """The control answers several gates share (the base model's, the shared incumbents'), asked and filed once
    before the gates run side by side, so no two gates ask them at once. A failure here costs nothing but the
    saving: each gate asks what it lacks."""
    book = gated[0].book
    shared = dict.fromkeys([settings.served_model_name, *(s.job.incumbent for s in gated if s.job.incumbent)])
    try:
        for model in (m for m in shared if book.keep(m)):
            gate.filed_control_answers(client, settings, model, book)
    except ModelError as e:
        log.warning("asking the shared control answers failed (%s); each gate asks its own", e)


def _each(states: list[Prepared], step, workers: int | None = None) -> None:
    """`step` for every state, at once (each in its own thread), each failure its own (`_guarded`)."""
    if len(states) == 1:
        _guarded(states[0], step)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers or len(states)) as pool:
        list(pool.map(lambda s: _guarded(s, step), states))


def _guarded(s: Prepared, step) -> None:
    """Run one phase of one job; an exception ends that job with a failed outcome that keeps what it counted
    (a GateError says what to fix; anything else, e.g. the model server failing mid-gate, is recorded with
    its type, never a bare exit code)."""
    try:
        step(s)
    except gate.GateError as e:
        log.error("%s", e)
        s.outcome = CycleOutcome("failed", str(e), error=str(e), **{**s.progress, **s.done})
    except Exception as e:  # noqa: BLE001
        log.exception("the cycle %s failed", s.job.name)
        why = f"the cycle failed: {type(e).__name__}: {e}"
        s.outcome = CycleOutcome("failed", why, error=why, **{**s.progress, **s.done})
    _settle([s])


def _read_data(s: Prepared) -> None:
    """The job's training data from its snapshot: only vouched-for feedback trains the shared adapter or is
    held out to gate it (chatfb.learning.trust); a personal adapter, its owner's own rows."""
    job, settings = s.job, s.settings
    recipe = {"mode": settings.train_mode, "rank": settings.lora_rank, "epochs": settings.train_epochs,
              "lr": settings.learning_rate, "dpo": settings.train_dpo, "seed": settings.seed,
              "critique_recipe": settings.critique_recipe}
    log.info("phase: preparing data")  # the admin tab shows these phases in words (chatfb.ui.admin_tab)
    with Store(s.work / SNAPSHOT, read_only=True) as st:
        records = st.feedback_records()
        guidelines = st.approved_guidelines()
        reviews, flagged, rejected = st.reviews(), st.flagged_authors(), st.rejected_content()
    if not records:
        s.outcome = CycleOutcome("nothing", "no feedback yet")
        return
    scopes = training_data.shared_scopes(records, settings, reviews, flagged, rejected)
    if job.owner is not None:  # a personal adapter: its owner's own rows that may train, shared or personal
        scopes = training_data.owner_scopes(records, scopes, job.owner)
        guidelines = []  # everyone's guidelines are the shared adapter's to learn
        recipe.update(owner=job.owner, start_from=job.start_from)
    data = training_data.build(records, settings.train_mode, settings.holdout_fraction, settings.seed,
                               settings.max_feedback_chars, settings.scrub_pii, scopes=scopes)
    if job.owner is not None:  # one of the owner's own rows to gate on, however few they gave
        training_data.hold_one_out(data, settings.holdout_fraction, settings.seed)
    s.data, s.guidelines = data, guidelines
    s.done = dict(counts={}, timings={}, candidates=[], recipe=recipe)


def _select(s: Prepared, client: ModelClient, judge) -> None:
    """Candidates for the job's critiques (and guidelines), its replay, and its training files."""
    job, settings, data, work = s.job, s.settings, s.data, s.work
    book = s.book
    base_name, name = settings.served_model_name, job.name
    tasks = training_data.critique_tasks(data, settings.holdout_fraction, settings.seed, settings.refine_max_critiques)
    general = replay_prompts(settings.system_prompt)
    # The ILF recipe rewrites a critiqued reply: it has nothing to say about other prompts.
    s.extra = extra = training_data.distillation_tasks(
        data, tasks if settings.critique_recipe == "instruct" else [], s.guidelines, data.records, general,
        settings.distill_prompts, settings.distill_max_examples, settings.holdout_fraction, settings.seed)
    generator = ModelClient(settings.refiner_url, settings.api_key, batch_timeout(settings)) if settings.refiner_url else None
    log.info("phase: selecting candidates")
    selected, select_errors = select_all(tasks + extra, client, base_name, settings, generator, settings.refiner_model,
                                         judge=judge)
    training_data.add_selections(data, [(task, best.text if best else None) for task, _, best in selected])
    counts = training_data.finalize_counts(data)
    if select_errors:
        counts["refine_errors"] = len(select_errors)
    counts["candidates_kept"] = sum(best is not None for _, _, best in selected)
    counts["candidates_dropped"] = sum(len(cands or []) for _, cands, _ in selected) - counts["candidates_kept"]
    rows = candidate_rows(selected, name, settings.critique_recipe, data.authors, "personal" if job.owner else "shared")
    s.done.update(counts=counts, candidates=rows)
    s.progress.update(s.done)
    if not data.train:
        reason = "no usable training examples"
        if select_errors:
            reason += f" ({len(select_errors)} candidate request(s) failed: {select_errors[0]})"
        # an adapter row also when nothing trains, so the audit rows name their cycle
        s.outcome = CycleOutcome("failed" if rows else "nothing", reason, error=reason, **s.done)
        return
    # Retention: the base model's own answers to general prompts ride along (self-distillation); a
    # question a rule was distilled on is left out of it, so it never has two targets.
    distilled = {last_user(e.prompt) for e in data.train if e.source in ("distill", "guideline")}
    # A personal adapter replays what the shared adapter it starts from answers, so it keeps what everyone learnt.
    replay = replay_examples(client, job.start_from or base_name, settings.system_prompt, settings.replay_examples,
                             skip=distilled, book=book)
    scope = "personal" if job.owner else "shared"
    write_rows([dict(r, scope=scope) for r in data.sft_rows()] + replay, work / "sft.jsonl")  # delete-user scrubs by it
    write_rows([dict(r, scope=scope) for r in data.dpo_rows()], work / "dpo.jsonl")
    counts["replay_examples"] = len(replay)
    init = settings.layout.adapters / job.start_from if job.start_from else None  # the shared one trains anew
    s.train = TrainSpec(work, settings.layout.adapters / name, settings.train_dpo and bool(data.dpo_rows()), init)


def _gate(s: Prepared, client: ModelClient, judge, base_name: str) -> None:
    """The job's gate, then (it passed, and the owner will promote it) the uptake check while it is loaded."""
    job, settings, data, book, timings, counts = s.job, s.settings, s.data, s.book, s.done["timings"], s.done["counts"]
    name = job.name
    t = time.perf_counter()
    log.info("phase: gating")
    checked: list[dict] = []
    try:
        report = gate.evaluate(client, settings, data, name, job.incumbent, base_name, s.train.out,
                               guideline_checks(data, s.guidelines, s.extra), judge, book)
        timings["eval_s"] = round(time.perf_counter() - t, 2)
        counts.update(answers_reused=book.hits, answers_asked=book.asked)
        ok, reason = report.decide(gate.policy_for(settings))
        if ok and job.promote:  # the owner promotes it: ask it now, while it is loaded, what it learnt
            t = time.perf_counter()
            checked = check_uptake(client, settings, data, name, judge, base_name, counts)
            timings["uptake_s"] = round(time.perf_counter() - t, 2)
    except gate.GateError as e:  # refused before loading it: the name on the server is someone else's
        log.error("%s", e)
        s.outcome = CycleOutcome("failed", str(e), error=str(e), **s.done)  # what the cycle counted stays in its result
        return
    except BaseException:
        client.unload_adapter_quietly(name)
        raise
    client.unload_adapter_quietly(name)  # the owner loads it again if it promotes; until then it holds no LoRA slot
    report.decision = reason
    s.outcome = CycleOutcome("candidate" if ok else "rejected", reason, report=report.as_dict(), uptake=checked, **s.done)


def check_uptake(client: ModelClient, settings: Settings, data, name: str, judge, scorer_model: str,
                 counts: dict) -> list[dict]:
    """Uptake rows (chatfb.learning.uptake) for the newest CHATFB_UPTAKE_MAX_ITEMS items that trained `name`;
    `counts` gets how many were checked, learned, and left unchecked. A server error costs the check, not the
    cycle: none is recorded."""
    items, trained = uptake.items_to_check(data, settings.uptake_max_items)
    if not items:
        return []
    log.info("phase: checking uptake (%d of %d trained items)", len(items), trained)
    try:
        rows = uptake.check(client, name, items, settings.max_tokens, judge, scorer_model)
    except ModelError as e:
        log.warning("uptake check failed: %s", e)
        counts["uptake_error"] = str(e)
        return []
    counts.update(uptake_checked=len(rows), uptake_learned=sum(r["learned"] for r in rows),
                  uptake_not_checked=trained - len(rows))
    return rows


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: python -m chatfb.learning.worker WORK_DIR [WORK_DIR ...] (job folders chatfb.learning.cycle "
              "wrote; several: a cycle's personal adapters, trained in one trainer process)", file=sys.stderr)
        return 2
    # The owner stops this process group with SIGTERM (Ctrl-C on the CLI, app shutdown): exit through the
    # `finally` blocks, which stop a model server this child started in its own session.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t = time.perf_counter()
    jobs, progress = [], []  # progress: what each job counted before a failure; its result keeps it
    for work in map(Path, args):
        try:
            jobs.append((*read_job(work), work))
            progress.append({})
        except Exception as e:  # noqa: BLE001 - that folder's job fails; the others run
            log.exception("reading the job in %s failed", work)
            why = f"the cycle failed: its job could not be read: {type(e).__name__}: {e}"
            write_outcome(work, CycleOutcome("failed", why, error=why, timings={"cycle_s": 0.0}))
    try:
        compute_many(jobs, progress)  # writes each job's result.json as soon as it is decided
    except gate.GateError as e:  # says what to fix: the owner records it as the cycle's reason
        log.error("%s", e)
        _fail_undecided(jobs, progress, str(e), t)
    except Exception as e:  # noqa: BLE001 - e.g. the model server not starting: recorded, never a bare exit code
        log.exception("the cycle failed")
        _fail_undecided(jobs, progress, f"the cycle failed: {type(e).__name__}: {e}", t)
    return 0


def _fail_undecided(jobs: list, progress: list[dict], why: str, started: float) -> None:
    """A failed result.json for each job that has none yet, keeping what it counted."""
    for (_, _, work), p in zip(jobs, progress):
        if read_outcome(work) is None:
            outcome = CycleOutcome("failed", why, error=why, **p)
            outcome.timings["cycle_s"] = round(time.perf_counter() - started, 2)
            write_outcome(work, outcome)


CANDIDATE_MAX_TOKENS = 192  # a longer candidate is cut off, and the selection drops cut-off candidates
CANDIDATE_ROUNDS = 2  # a task whose first critique_samples candidates all fail gets one more round


def select_all(tasks: list, client: ModelClient, model: str, settings: Settings, generator: ModelClient | None = None,
               generator_model: str | None = None, workers: int = 8, judge=None) -> tuple[list, list[str]]:
    """Candidates for every instruction task, several tasks at once (vLLM batches them): recipe 'instruct'
    answers the prompt with the instruction (chatfb.critique.candidates generate + score, as its select: written by
    `generator` when given, else `model` on `client`; scored by `judge`, chatfb.critique.judge, default the server);
    critique tasks under recipe 'ilf' get the older rewrite (chatfb.critique.ilf).
    Returns ([(task, candidates best first or None when the server failed, best passing one or None)],
    [error message per task the server failed]). A server that is down or restarting gets up to three
    minutes to come back, then the task is asked once more."""
    from concurrent.futures import ThreadPoolExecutor

    from chatfb.critique import candidates
    from chatfb.critique.ilf import refine_scored

    errors: list[str] = []

    def ilf(task):
        scored = refine_scored(task.record, generator or client, generator_model or model, n=settings.critique_samples,
                               max_tokens=CANDIDATE_MAX_TOKENS)
        return sorted((candidates.Candidate(text, score=score, verdict=verdict) for score, text, verdict in scored),
                      key=lambda c: (not c.ok, -c.score))

    def instruct(task):
        # candidates.select_rounds, with the plain answers a candidate must keep the content of: the critiqued
        # reply (one that repeats it is dropped too) and the base model's own answer without the critique, asked
        # beside the first round's drafts (vLLM batches them: one wait for generation, not two)
        with ThreadPoolExecutor(1) as asking:
            reference = asking.submit(candidates.plain_answer, client, model, task.prompt, CANDIDATE_MAX_TOKENS)
            return candidates.select_rounds(judge or client, model, task.prompt, task.instruction,
                                            n=settings.critique_samples, max_tokens=CANDIDATE_MAX_TOKENS,
                                            rounds=CANDIDATE_ROUNDS, generator=generator or client,
                                            generator_model=(generator_model or model) if generator else model,
                                            original=task.original, reference=reference,
                                            patience=settings.candidate_patience)

    def one(task):
        make = ilf if settings.critique_recipe == "ilf" and task.source == "critique" else instruct
        for attempt in (1, 2):
            try:
                cands = make(task)
                return task, cands, candidates.best(cands)
            except ModelError as e:
                if attempt == 1 and make is instruct and e.unavailable and client.wait_healthy(180.0):
                    continue
                log.warning("candidates for %s failed: %s", task.feedback_id, e)
                errors.append(str(e))
                return task, None, None

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, tasks)), errors


def candidate_rows(selected: list, cycle: str, recipe: str, authors: dict[str, str] | None = None,
                   scope: str = "shared") -> list[dict]:
    """store.add_candidates rows for every candidate of every task: the kept one and why each other was dropped,
    with who gave the critique (or "admin": a guideline) and the scope it teaches."""

    rows = []
    for task, cands, best in selected:
        for c in cands or []:
            rows.append({"feedback_id": task.feedback_id, "message_id": task.message_id, "origin": "nightly",
                         "text": c.text, "score": c.score, "verdict": c.verdict,
                         "status": "kept" if c is best else "dropped", "cycle": cycle,
                         "details": {**(c.details or {}), "task": task.source, "recipe": recipe,
                                     "critique": task.instruction, "prompt": last_user(task.prompt),
                                     "author": (authors or {}).get(task.feedback_id)
                                     or ("admin" if task.source == "guideline" else ""),
                                     "feedback_kind": "guideline" if task.source == "guideline" else "from_critique",
                                     "scope": scope}})
    return rows


# General questions, none of them in the gate's or the benchmarks' control sets.
REPLAY_PROMPTS = (
    "Give me a tip for staying focused.", "What is photosynthesis?", "Write a haiku about rain.",
    "How do I boil an egg?", "What is the largest ocean?", "Explain what a noun is.",
    "Suggest a name for a cat.", "Why is the sky blue?", "Translate 'good morning' into French.",
    "What is 9 times 6?", "Name a famous painter.", "How many legs does a spider have?",
    "What is the opposite of hot?", "Give me a synonym for happy.", "What language is spoken in Brazil?",
    "What is the freezing point of water in Fahrenheit?", "How many minutes are in an hour?", "Who painted the Mona Lisa?",
    "How many hours are in a day?", "What is the chemical symbol for gold?", "Name a mammal that can fly.",
    "What is the tallest mountain in the world?", "What does a thermometer measure?", "Spell the word 'necessary'.",
    "What is the square root of 81?", "Which animal is known as the king of the jungle?",
    "What colour do you get by mixing blue and yellow?", "How many sides does a hexagon have?",
    "What is the capital of Japan?", "What do caterpillars turn into?", "Name a musical instrument with strings.",
    "What is the past tense of 'run'?",
)


def replay_prompts(system_prompt: str) -> list[list[dict]]:
    return [[{"role": "system", "content": system_prompt}, {"role": "user", "content": q}] for q in REPLAY_PROMPTS]


def replay_examples(client: ModelClient, model: str, system_prompt: str, count: int = len(REPLAY_PROMPTS),
                    max_tokens: int = 192, skip: set[str] = frozenset(), book: AnswerBook | None = None) -> list[dict]:
    """The base model's own answers to general questions (self-distillation replay), trained beside the
    feedback so the adapter keeps its behaviour where feedback says nothing; questions in `skip` are left
    out. An answer that max_tokens cut off is left out too: trained with an end of turn after it, it
    would teach the model to stop mid-sentence. `book`: the answers kept across cycles
    (chatfb.learning.answers), where an earlier child or cycle asked the same model already."""
    from concurrent.futures import ThreadPoolExecutor

    def ask(prompts: list[list[dict]]) -> list:
        with ThreadPoolExecutor(8) as pool:  # vLLM batches concurrent requests
            return list(pool.map(lambda p: client.complete_finished(p, model, max_tokens), prompts))

    prompts = [p for p in replay_prompts(system_prompt)[:max(count, 0)] if p[-1]["content"] not in skip]
    answers = (book or AnswerBook(None)).answers("finished", model, prompts, max_tokens, ask)
    return [prompt_completion_row(p, a) for p, a in zip(prompts, answers) if a and a.strip()]


def guideline_checks(data, guidelines: list[dict], tasks: list) -> dict[str, tuple[str, list[list[dict]], str]]:
    """Guideline id -> (text, prompts to check it on, which prompts): the prompts of its held-out critiques,
    else (none held out) at most eight it was distilled on."""
    out = {}
    for g in guidelines:
        held = data.guideline_eval.get(g["id"]) or []
        trained = [t.prompt for t in tasks if t.source == "guideline" and t.feedback_id == g["id"]][:8]
        prompts, on = (held, "held-out critiques") if held else (trained, "distillation prompts")
        if prompts:
            out[g["id"]] = (g["text"], prompts, on)
    return out


if __name__ == "__main__":
    sys.exit(main())
