"""One learning cycle, as the process that owns the store runs it (the app, or the CLI when no app runs).

    owner  retention, a snapshot of the store, the next adapter name, the whole settings and the job
           written to work/<name>/ (settings.json, job.json, snapshot.duckdb)
    child  python -m chatfb.learning.worker work/<name>: refine, replay, train, evaluate (chatfb.learning.worker); writes
           work/<name>/result.json and adapters/<name>/ and never calls back into the owner
    owner  records the adapter row and every candidate, promotes through its one AdapterRegistry, and
           records the promoted adapter's uptake (chatfb.learning.uptake: which trained items it learnt)

The child generates with the owner's model server (`CycleJob.server_url`) or, when no app runs and
the model is managed, starts a temporary one of its own.

After the shared adapter, personal ones: each user (or anonymous browser, chatfb.learning.trust.who) with at
least CHATFB_PERSONAL_MIN_FEEDBACK rows of their own that may train, those with the most new feedback first, at
most CHATFB_PERSONAL_MAX_PER_CYCLE a cycle, gets a job of their own (`CycleJob.owner`, a folder of its own), all
of them run by ONE child (one trainer process; their gates side by side), which trains each on
from the live shared adapter's weights on their rows alone (plus replay), gated on their own held-out rows and the
control check against what they are served now, and a candidate that passes is served to them only
(AdapterRegistry.promote_personal). One that fails leaves them on what they had, its reason in its adapter row.
The cycles and their children share one answer file (chatfb.learning.answers): the replay and control answers
every personal child needs are generated once, not once a user, and the next cycle asks them again only of a
model that changed.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from chatfb.learning.answers import AnswerBook
from chatfb.serving.adapters import AdapterError, AdapterRegistry, next_adapter_name, personal_prefix
from chatfb.config import Settings, settings_from_json, settings_to_json
from chatfb.store.db import Store

log = logging.getLogger(__name__)

JOB, SETTINGS, RESULT, SNAPSHOT = "job.json", "settings.json", "result.json", "snapshot.duckdb"


@dataclass
class CycleJob:
    """What the owner hands the child: all it needs, so it never asks back."""

    name: str  # the adapter version this cycle trains
    incumbent: str | None  # the live adapter it must beat (None = the base model)
    server_url: str | None  # the owner's model server; None = the child starts a temporary one
    owner: str | None = None  # whose personal adapter this cycle trains (chatfb.learning.trust.who); None = the shared
    start_from: str | None = None  # a personal adapter trains on from this (the live shared adapter); None = the base
    promote: bool = True  # the owner promotes a candidate that passes (False: --no-promote, nothing goes live)
    merged: str | None = None  # the shared adapter merged into the owner's server's weights (chatfb.serving.merged)
    answers: str | None = None  # the answer file the cycles and their children share (chatfb.learning.answers)


@dataclass
class CycleOutcome:
    """What the child hands back (work/<name>/result.json)."""

    status: str  # candidate / rejected (gated), failed, or "nothing" (no adapter row to record)
    reason: str
    error: str | None = None  # the failed row's error
    counts: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    report: dict | None = None  # chatfb.learning.gate.GateReport, as a dict
    candidates: list[dict] = field(default_factory=list)  # store.add_candidates rows, every one scored
    recipe: dict = field(default_factory=dict)
    uptake: list[dict] = field(default_factory=list)  # a candidate's answers to what it trained on (chatfb.learning.uptake)


@dataclass
class CycleResult:
    ok: bool
    adapter: str | None = None
    promoted: bool = False
    reason: str = ""
    counts: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    personal: list[dict] = field(default_factory=list)  # each personal adapter's CycleResult, as a dict

    def summary(self) -> str:
        return json.dumps(asdict(self), indent=2, default=str)


def write_job(work: Path, job: CycleJob, settings: Settings) -> None:
    (work / SETTINGS).write_text(settings_to_json(settings))
    (work / JOB).write_text(json.dumps(asdict(job)))


def read_job(work: Path) -> tuple[CycleJob, Settings]:
    return CycleJob(**json.loads((work / JOB).read_text())), settings_from_json((work / SETTINGS).read_text())


def write_outcome(work: Path, outcome: CycleOutcome) -> None:
    tmp = work / (RESULT + ".tmp")
    tmp.write_text(json.dumps(asdict(outcome), default=str))
    tmp.replace(work / RESULT)


def read_outcome(work: Path) -> CycleOutcome | None:
    try:
        return CycleOutcome(**json.loads((work / RESULT).read_text()))
    except FileNotFoundError:
        return None


def apply_retention(store: Store, settings: Settings) -> None:
    """Delete conversations older than CHATFB_RETENTION_DAYS (at the app's start and before every cycle)."""
    if settings.retention_days:
        removed = store.apply_retention(settings.retention_days)
        log.info("retention: removed %d conversations older than %d days", removed, settings.retention_days)


def prepare(store: Store, settings: Settings, server_url: str | None,
            promote: bool = True, merged: str | None = None) -> tuple[CycleJob, Path] | CycleResult:
    """Retention, then the job folder for the next adapter version; a CycleResult when there is nothing to do."""
    apply_retention(store, settings)
    if not store.counts()["feedback"]:
        return CycleResult(False, reason="no feedback yet")
    live = store.live_adapter()
    name = next_adapter_name(store, settings.adapter_prefix)
    # the answers kept across cycles: the base model's and the live adapter's (what this cycle replays and gates on),
    # never those of an adapter carrying a deleted user's data
    kept = {settings.served_model_name, *([live["name"]] if live and not live.get("deleted_users") else [])}
    AnswerBook(settings.layout.answers).keep_only(kept, merged)
    return _job_folder(store, settings, CycleJob(name, live["name"] if live else None, server_url, promote=promote,
                                                 merged=merged, answers=str(settings.layout.answers)))


def personal_owners(store: Store, settings: Settings) -> list[str]:
    """Who gets a personal adapter this cycle: authors with at least CHATFB_PERSONAL_MIN_FEEDBACK rows of their own
    that may train (shared or personal scope: chatfb.learning.trust.teachable_by_author) and at least one since
    their newest personal adapter, the most such new rows first, at most CHATFB_PERSONAL_MAX_PER_CYCLE."""
    from chatfb.learning import trust

    if settings.personal_min_feedback <= 0 or settings.personal_max_per_cycle <= 0:
        return []
    rows = trust.teachable_by_author(store.feedback_records(), trust.Policy.from_settings(settings),
                                     store.flagged_authors(), store.reviews(), store.rejected_content())
    newest: dict[str, object] = {}
    for a in store.personal_adapters():
        newest[a["owner"]] = max(newest.get(a["owner"], a["created_at"]), a["created_at"])
    new = {o: sum(o not in newest or r.created_at > newest[o] for r in rs) for o, rs in rows.items()}
    eligible = [o for o, rs in rows.items() if len(rs) >= settings.personal_min_feedback and new[o] > 0]
    return sorted(eligible, key=lambda o: (-new[o], o))[:settings.personal_max_per_cycle]


def prepare_personal(store: Store, settings: Settings, server_url: str | None, owner: str,
                     promote: bool = True, merged: str | None = None, answers: str | None = None) -> tuple[CycleJob, Path]:
    """The job folder for `owner`'s next personal adapter: trained on from the live shared adapter, gated
    against what `owner` is served now (their live personal adapter, else the shared one, else the base).
    `answers`: the answer file (chatfb.learning.answers), shared with the cycle's other children and the next cycles."""
    live = store.live_adapter()
    shared = live["name"] if live else None
    incumbent = store.live_personal_adapters().get(owner) or shared
    name = next_adapter_name(store, personal_prefix(owner, settings.adapter_prefix))
    return _job_folder(store, settings, CycleJob(name, incumbent, server_url, owner=owner, start_from=shared,
                                                 promote=promote, merged=merged, answers=answers))


def _job_folder(store: Store, settings: Settings, job: CycleJob) -> tuple[CycleJob, Path]:
    name = job.name
    layout = settings.layout
    work = layout.work(name)
    # No row names this version yet: whatever files carry its name are left from a cycle whose owner died.
    for orphan in (work, layout.adapters / name, layout.adapters / f"{name}.partial"):
        shutil.rmtree(orphan, ignore_errors=True)
    work.mkdir(parents=True)
    store.snapshot(work / SNAPSHOT)
    write_job(work, job, settings)
    return job, work


def child_command(*works: Path) -> list[str]:
    """The child for one job folder, or for a cycle's personal adapters (several: one process trains them all)."""
    return [sys.executable, "-m", "chatfb.learning.worker", *map(str, works)]


def launch(command: list[str], output) -> subprocess.Popen:
    """The child, in its own process group (it and its trainer end together); `output` takes its log."""
    return subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)


def finish(store: Store, registry: AdapterRegistry, job: CycleJob, work: Path, exit_code: int,
           promote: bool, started: float) -> CycleResult:
    """Record what the child did (adapter row, candidates, gate report) and promote a candidate that passed.
    `started`: time.perf_counter() when the cycle began."""
    outcome = read_outcome(work) or CycleOutcome(
        "failed", f"the cycle's process exited with code {exit_code} before it finished",
        error=f"cycle aborted (exit {exit_code}); its log says why (logs/nightly.log, or the CLI's stderr)")
    (work / SNAPSHOT).unlink(missing_ok=True)
    if outcome.status == "nothing":
        return CycleResult(False, reason=outcome.reason, counts=outcome.counts, timings=outcome.timings)
    name, timings = job.name, outcome.timings
    store.add_adapter(name, job.incumbent, "training", name, outcome.recipe, owner=job.owner)
    if outcome.candidates:
        store.add_candidates(outcome.candidates)
    store.update_adapter(name, status=outcome.status, error=outcome.error, metrics=outcome.report,
                         data_counts=outcome.counts, timings=timings)
    promoted, reason = False, outcome.reason
    if outcome.status == "candidate" and promote:
        t = time.perf_counter()
        try:
            registry.promote_personal(job.owner, name) if job.owner else registry.promote(name)
            promoted = True
        except AdapterError as e:
            reason += f"; not promoted: {e}"
            log.error("promoting %s failed: %s", name, e)
        timings["swap_s"] = round(time.perf_counter() - t, 3)
    if promoted:  # only now is it live for its scope: what it learnt shows on the users' messages
        store.add_uptake(name, outcome.uptake)
    timings["total_s"] = round(time.perf_counter() - started, 2)
    store.update_adapter(name, timings=timings)
    log.info("cycle done: %s %s (%s)", name, "promoted" if promoted else "not promoted", reason)
    return CycleResult(outcome.status in ("candidate", "rejected"), name, promoted, reason, outcome.counts,
                       outcome.report or {}, timings)


def server_for_the_cycle(settings: Settings) -> str:
    """The model server a cycle's child generates and gates on: with several replicas behind a router, the
    first replica's own URL (a candidate loaded through the router reaches one replica, and requests
    naming it would go round-robin to others without it); else the one server."""
    return next(iter(settings.replica_url_list), settings.base_url)


def run_cycle(store: Store, registry: AdapterRegistry, settings: Settings, promote: bool = True, output=None,
              owner_server: str | None = None, command=child_command, start=launch,
              closing=lambda: False) -> CycleResult | None:
    """One whole learning cycle in this thread (prepare, launch the child, wait, finish), for whoever owns the
    store: the app (chatfb.app.runtime) or the CLI when no app runs. The child's log goes to `output`.

    `owner_server`: the owner's running model server, if it has one; else the child uses the settings' external
    server or, when the model is managed, starts a temporary one. `start(command, output)` launches the child
    (returns None when the owner is closing); `closing()` says, once the child ended, that the owner is closing
    and nothing is recorded. Both return None then."""
    t0 = time.perf_counter()
    server_url = owner_server or (None if settings.managed else server_for_the_cycle(settings))
    # what the owner's server has merged into its weights, so the child names its models right
    prepared = prepare(store, settings, server_url, promote, registry.merged if owner_server else None)
    if isinstance(prepared, CycleResult):
        return prepared
    result = _run_child(store, registry, *prepared, promote, output, command, start, closing, t0)
    if result is None:
        return None
    # Then personal adapters, on top of the shared adapter now live (whatever the shared cycle decided). One
    # that fails says why in its own entry: it never takes the shared job's result (and counts) with it.
    try:
        owners = personal_owners(store, settings)
    except Exception as e:  # noqa: BLE001 - the shared result stands
        log.exception("choosing this cycle's personal adapters failed")
        result.personal.append(asdict(CycleResult(False, reason=f"choosing personal adapters failed: {type(e).__name__}: {e}")))
        return result
    # Every owner's job folder first, then ONE child for all of them (chatfb.learning.worker.compute_many: one
    # model server client and judge, one trainer process, the gates side by side).
    jobs, t = [], time.perf_counter()
    for owner in owners:
        try:
            jobs.append(prepare_personal(store, settings, server_url, owner, promote,
                                         registry.merged if owner_server else None, prepared[0].answers))
        except Exception as e:  # noqa: BLE001 - the next owner's and the shared result stand
            log.exception("a personal adapter (%s) failed", personal_prefix(owner, settings.adapter_prefix))
            result.personal.append(asdict(CycleResult(False, reason=f"the personal adapter's cycle failed: "
                                                                     f"{type(e).__name__}: {e}")))
    if not jobs:
        return result
    proc = start(command(*(work for _, work in jobs)), output)
    if proc is None:
        return None
    code = _wait(proc)
    if closing():
        return None
    for job, work in jobs:
        try:
            personal = finish(store, registry, job, work, code, promote, t)
        except Exception as e:  # noqa: BLE001 - the next owner's and the shared result stand
            log.exception("a personal adapter (%s) failed", job.name)
            personal = CycleResult(False, reason=f"the personal adapter's cycle failed: {type(e).__name__}: {e}")
        result.personal.append(asdict(personal))
    return result


def _wait(proc) -> int:
    try:
        return proc.wait()
    except BaseException:  # Ctrl-C: no cycle or trainer left behind
        from chatfb.serving.process_group import stop_groups

        stop_groups([proc], 4.0)
        raise


def _run_child(store, registry, job: CycleJob, work: Path, promote: bool, output, command, start, closing,
               started: float) -> CycleResult | None:
    proc = start(command(work), output)
    if proc is None:
        return None
    code = _wait(proc)
    if closing():  # the owner is closing: its store with it
        return None
    return finish(store, registry, job, work, code, promote, started)
