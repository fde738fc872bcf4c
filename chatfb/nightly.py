"""One learning cycle: snapshot -> training data -> critique candidates -> LoRA training -> gate -> promote.

Critiques (and approved global guidelines) become training examples through chatfb.candidates: the
conversation answered again with the critique as an instruction, several samples, the best that passes
selection kept and trained WITHOUT the critique; every candidate's score and verdict is recorded (the
admin tab's audit table). Critiques held out whole are judged at the gate by the same selection.

`python -m chatfb nightly` runs it now; the app runs the same command on its schedule and from
the admin tab's "Train now". With the app running, the cycle reads a snapshot the app writes and
asks the app to record and promote adapters (chatfb.control); the model server it generates with
is the app's. Without the app, it opens the store itself and, in managed mode, starts a
temporary vLLM server for refinement and evaluation.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from chatfb import gate, training_data
from chatfb.config import Settings
from chatfb.control import open_backend, running_app
from chatfb.model_client import ModelClient, ModelError
from chatfb.rows import prompt_completion_row, write_rows
from chatfb.store import Store

log = logging.getLogger(__name__)


@dataclass
class CycleResult:
    ok: bool
    adapter: str | None = None
    promoted: bool = False
    reason: str = ""
    counts: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)

    def summary(self) -> str:
        return json.dumps({"ok": self.ok, "adapter": self.adapter, "promoted": self.promoted, "reason": self.reason,
                           "counts": self.counts, "metrics": self.metrics, "timings": self.timings}, indent=2, default=str)


def batch_timeout(settings: Settings) -> float:
    """Per-request timeout for the cycle's own generation (refinement, replay, evaluation). It is batch
    work beside live chats on a possibly busy machine: a chat's short timeout would abort the night's cycle."""
    return max(settings.request_timeout_s, 600.0)


def model_server(settings: Settings):
    """(client, base model dir, stop function) for the server this cycle generates with."""
    from chatfb.model_files import resolve_model

    base = resolve_model(settings.model, settings.data_dir)
    info = running_app(settings.data_dir)
    if info is not None or not settings.managed:
        url = info["vllm_url"] if info else settings.base_url
        return ModelClient(url, settings.api_key, batch_timeout(settings)), base, lambda: None
    from chatfb.vllm_server import ManagedVLLM

    server = ManagedVLLM(base, settings.served_model_name, settings.vllm_port + 1, settings.data_dir,
                         settings.max_lora_rank, settings.max_model_len, settings.vllm_kvcache_gib,
                         settings.vllm_startup_timeout_s, settings.vllm_dtype)
    server.log_path = settings.data_dir / "logs" / "vllm-nightly.log"
    server.start(wait=True)
    client = ModelClient(server.url, timeout_s=batch_timeout(settings))
    return client, base, lambda: (client.close(), server.stop())


def train_adapter(settings: Settings, base: Path, data_dir: Path, out: Path, dpo: bool) -> int:
    cmd = [sys.executable, "-m", "chatfb.train", "--data", str(data_dir), "--base", str(base), "--output_dir", str(out),
           "--rank", str(settings.lora_rank), "--num_train_epochs", str(settings.train_epochs),
           "--learning_rate", str(settings.learning_rate), "--seed", str(settings.seed),
           "--step_cap", str(settings.train_max_steps), "--dpo_epochs", "1" if dpo else "0"]
    log.info("training: %s", " ".join(cmd))
    # The trainer's chatter goes to stderr: stdout carries only the cycle's JSON summary.
    return subprocess.call(cmd, stdout=sys.stderr)


def run_cycle(settings: Settings, promote: bool = True, dpo: bool | None = None) -> CycleResult:
    dpo = settings.train_dpo if dpo is None else dpo
    t_start = time.perf_counter()
    timings: dict = {}
    backend = open_backend(settings.data_dir, settings.adapter_prefix)
    client, base, stop_server = None, None, lambda: None
    name = None
    try:
        for a in backend.adapters():  # a cycle killed outright (kill -9) left its row behind
            if a["status"] == "training":
                backend.update_adapter(a["name"], status="failed", error="interrupted before it finished")
        t = time.perf_counter()
        snap = Path(backend.snapshot())
        with Store(snap, read_only=True) as s:
            records = s.feedback_records()
            guidelines = s.approved_guidelines()
        timings["snapshot_s"] = round(time.perf_counter() - t, 2)
        if not records:
            return CycleResult(False, reason="no feedback yet")
        data = training_data.build(records, settings.train_mode, settings.holdout_fraction, settings.seed,
                                   settings.max_feedback_chars, settings.scrub_pii)

        t = time.perf_counter()
        client, base, stop_server = model_server(settings)
        backend.attach_server(client)
        base_name = settings.served_model_name
        from chatfb.judge import judge_for

        judge = judge_for(settings.scorer, client, base)  # what scores candidates (and held-out answers at the gate)
        tasks = training_data.critique_tasks(data, settings.holdout_fraction, settings.seed, settings.refine_max_critiques)
        general = replay_prompts(settings.system_prompt)
        # The ILF recipe rewrites a critiqued reply: it has nothing to say about other prompts.
        extra = training_data.distillation_tasks(
            data, tasks if settings.critique_recipe == "instruct" else [], guidelines, data.records, general,
            settings.distill_prompts, settings.distill_max_examples, settings.holdout_fraction, settings.seed)
        generator = ModelClient(settings.refiner_url, settings.api_key, batch_timeout(settings)) if settings.refiner_url else None
        selected, select_errors = select_all(tasks + extra, client, base_name, settings, generator, settings.refiner_model,
                                             judge=judge)
        training_data.add_selections(data, [(task, best.text if best else None) for task, _, best in selected])
        counts = training_data.finalize_counts(data)
        if select_errors:
            counts["refine_errors"] = len(select_errors)
        counts["candidates_kept"] = sum(best is not None for _, _, best in selected)
        counts["candidates_dropped"] = sum(len(cands or []) for _, cands, _ in selected) - counts["candidates_kept"]
        timings["refine_s"] = round(time.perf_counter() - t, 2)

        live = backend.live_adapter()
        incumbent = live["name"] if live else None
        name = backend.next_adapter_name()
        rel = Path(name)
        out = settings.data_dir / "adapters" / rel
        rows = candidate_rows(selected, name, settings.critique_recipe)
        if data.train or rows:  # an adapter row also when nothing trains, so the audit rows name their cycle
            backend.add_adapter(name, incumbent, "training", str(rel),
                                {"mode": settings.train_mode, "rank": settings.lora_rank, "epochs": settings.train_epochs,
                                 "lr": settings.learning_rate, "dpo": dpo, "seed": settings.seed,
                                 "critique_recipe": settings.critique_recipe})
        if rows:
            backend.record_candidates(rows)
        if not data.train:
            reason = "no usable training examples"
            if select_errors:
                reason += f" ({len(select_errors)} candidate request(s) failed: {select_errors[0]})"
            if rows:
                backend.update_adapter(name, status="failed", error=reason, data_counts=counts, timings=timings)
            return CycleResult(False, name if rows else None, reason=reason, counts=counts, timings=timings)

        work = settings.data_dir / "work" / name
        # Retention: the base model's own answers to general prompts ride along (self-distillation); a
        # question a rule was distilled on is left out of it, so it never has two targets.
        distilled = {training_data.last_user(e.prompt) for e in data.train if e.source in ("distill", "guideline")}
        replay = replay_examples(client, base_name, settings.system_prompt, settings.replay_examples, skip=distilled)
        write_rows([prompt_completion_row(e.prompt, e.target) for e in data.train] + replay, work / "sft.jsonl")
        write_rows(data.dpo_rows(), work / "dpo.jsonl")
        counts["replay_examples"] = len(replay)

        t = time.perf_counter()
        code = train_adapter(settings, base, work, out, dpo=dpo and bool(data.dpo_rows()))
        timings["train_s"] = round(time.perf_counter() - t, 2)
        if code != 0 or not (out / "adapter_config.json").exists():
            shutil.rmtree(out.with_name(out.name + ".partial"), ignore_errors=True)
            backend.update_adapter(name, status="failed", error=f"training exited with code {code}", timings=timings,
                                   data_counts=counts)
            return CycleResult(False, name, reason=f"training failed (exit {code})", counts=counts, timings=timings)

        t = time.perf_counter()
        metrics = evaluate(client, settings, data, name, incumbent, base_name, out, guideline_checks(data, guidelines, extra),
                           judge)
        timings["eval_s"] = round(time.perf_counter() - t, 2)
        ok, reason = gate.decide({"rougeL": metrics["candidate_rougeL"], "critique_pass": metrics["candidate_critique_pass"],
                                  "control_agreement": metrics["control_agreement"],
                                  "control_collapsed": metrics["control_collapsed"]},
                                 {"rougeL": metrics["incumbent_rougeL"], "critique_pass": metrics["incumbent_critique_pass"]},
                                 gate.GatePolicy())
        metrics["decision"] = reason
        backend.update_adapter(name, status="candidate" if ok else "rejected", metrics=metrics, data_counts=counts,
                               timings=timings)
        promoted = False
        if ok and promote:
            t = time.perf_counter()
            backend.promote(name)
            timings["swap_s"] = round(time.perf_counter() - t, 3)
            promoted = True
        else:  # rejected, or kept for a later promote: either way it must not hold a LoRA slot meanwhile
            try:
                backend.unload_adapter(name)
            except Exception as e:  # noqa: BLE001 - the cycle's result stands; the server may be gone
                log.warning("could not unload candidate %s: %s", name, e)
        timings["total_s"] = round(time.perf_counter() - t_start, 2)
        backend.update_adapter(name, timings=timings)
        log.info("cycle done: %s %s (%s)", name, "promoted" if promoted else "not promoted", reason)
        return CycleResult(True, name, promoted, reason, counts, metrics, timings)
    except BaseException as e:
        if name is not None:
            try:
                a = {x["name"]: x for x in backend.adapters()}.get(name)
                if a and a["status"] == "training":
                    backend.update_adapter(name, status="failed", error=f"cycle aborted: {type(e).__name__}")
            except Exception:  # noqa: BLE001 - the original error matters more
                log.exception("could not mark %s failed", name)
        raise
    finally:
        stop_server()
        backend.close()


CANDIDATE_MAX_TOKENS = 192  # a longer candidate is cut off, and the selection drops cut-off candidates
CANDIDATE_ROUNDS = 2  # a task whose first critique_samples candidates all fail gets one more round


def select_all(tasks: list, client: ModelClient, model: str, settings: Settings, generator: ModelClient | None = None,
               generator_model: str | None = None, workers: int = 8, judge=None) -> tuple[list, list[str]]:
    """Candidates for every instruction task, several tasks at once (vLLM batches them): recipe 'instruct'
    answers the prompt with the instruction (chatfb.candidates generate + score, as its select: written by
    `generator` when given, else `model` on `client`; scored by `judge`, chatfb.judge, default the server);
    critique tasks under recipe 'ilf' get the older rewrite (chatfb.refine).
    Returns ([(task, candidates best first or None when the server failed, best passing one or None)],
    [error message per task the server failed]). A server that is down or restarting gets up to three
    minutes to come back, then the task is asked once more."""
    from concurrent.futures import ThreadPoolExecutor

    from chatfb import candidates
    from chatfb.refine import refine_scored

    errors: list[str] = []

    def ilf(task):
        scored = refine_scored(task.record, generator or client, generator_model or model, n=settings.critique_samples,
                               max_tokens=CANDIDATE_MAX_TOKENS)
        return sorted((candidates.Candidate(text, score=score, verdict=verdict) for score, text, verdict in scored),
                      key=lambda c: (not c.ok, -c.score))

    def instruct(task):  # candidates.select_rounds, plus the critiqued reply: a candidate that repeats it is dropped
        return candidates.select_rounds(judge or client, model, task.prompt, task.instruction, n=settings.critique_samples,
                                        max_tokens=CANDIDATE_MAX_TOKENS, rounds=CANDIDATE_ROUNDS,
                                        generator=generator or client,
                                        generator_model=(generator_model or model) if generator else model,
                                        original=task.original)

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


def candidate_rows(selected: list, cycle: str, recipe: str) -> list[dict]:
    """store.add_candidates rows for every candidate of every task: the kept one and why each other was dropped."""
    from chatfb.training_data import last_user

    rows = []
    for task, cands, best in selected:
        for c in cands or []:
            rows.append({"feedback_id": task.feedback_id, "message_id": task.message_id, "origin": "nightly",
                         "text": c.text, "score": c.score, "verdict": c.verdict,
                         "status": "kept" if c is best else "dropped", "cycle": cycle,
                         "details": {**(c.details or {}), "task": task.source, "recipe": recipe,
                                     "critique": task.instruction, "prompt": last_user(task.prompt)}})
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
                    max_tokens: int = 192, skip: set[str] = frozenset()) -> list[dict]:
    """The base model's own answers to general questions (self-distillation replay), trained beside the
    feedback so the adapter keeps its behaviour where feedback says nothing; questions in `skip` are left
    out. An answer that max_tokens cut off is left out too: trained with an end of turn after it, it
    would teach the model to stop mid-sentence."""
    from concurrent.futures import ThreadPoolExecutor

    prompts = [p for p in replay_prompts(system_prompt)[:max(count, 0)] if p[-1]["content"] not in skip]
    with ThreadPoolExecutor(8) as pool:  # vLLM batches concurrent requests
        answers = list(pool.map(lambda p: client.complete_finished(p, model, max_tokens), prompts))
    return [prompt_completion_row(p, a) for p, a in zip(prompts, answers) if a and a.strip()]


def eval_sample(heldout: list, limit: int, seed: int) -> list:
    """At most `limit` held-out examples, the same ones every cycle for the same feedback."""
    import hashlib

    if limit <= 0 or len(heldout) <= limit:
        return list(heldout)
    key = lambda e: hashlib.sha256(f"{seed}:{e.feedback_id}".encode()).hexdigest()  # noqa: E731
    return sorted(heldout, key=key)[:limit]


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


def evaluate(client: ModelClient, settings: Settings, data, candidate: str, incumbent: str | None,
             base_name: str, candidate_path: Path, guidelines: dict | None = None, judge=None) -> dict:
    """The gate's measurements of a trained candidate beside the incumbent (or the base model): ROUGE-L on
    held-out corrections, the selection pass rate on held-out critiques, how often each approved guideline
    is followed without it in the prompt, and the control answers."""
    if candidate in client.models():
        # Names are new for every cycle of this data folder: one already on the server belongs to someone else.
        raise RuntimeError(f"the model server already has an adapter named {candidate}: another chatfb data folder "
                           "shares it; give each one its own CHATFB_ADAPTER_PREFIX")
    client.load_adapter(candidate, str(candidate_path.resolve()))
    guidelines = guidelines or {}
    heldout = eval_sample(data.heldout, settings.eval_max_examples, settings.seed)
    critiques = eval_sample(data.heldout_critiques, settings.eval_max_examples, settings.seed)
    critique_items = [(r.prompt, r.text.strip(), r.reply) for r in critiques]
    guideline_items = [(gid, (p, text, None)) for gid, (text, prompts, _) in guidelines.items() for p in prompts]
    prompts = [e.prompt for e in heldout] + [i[0] for i in critique_items] + [i[0] for _, i in guideline_items]
    targets = [e.target for e in heldout]
    control = gate.control_messages(settings.system_prompt)
    answers = {m: gate.generate(client, m, prompts) for m in (candidate, incumbent or base_name)}
    measured = {}
    for m, replies in answers.items():
        a, b = len(heldout), len(heldout) + len(critique_items)
        follow = {}
        for gid in guidelines:
            idx = [k for k, (g, _) in enumerate(guideline_items) if g == gid]
            follow[gid] = gate.selection_pass_rate(judge or client, base_name, [guideline_items[k][1] for k in idx],
                                                   [replies[b + k] for k in idx])
        measured[m] = {**gate.closeness(replies[:a], targets),
                       "critique_pass": gate.selection_pass_rate(judge or client, base_name, critique_items, replies[a:b]),
                       "follow": follow}
    cand, inc = measured[candidate], measured[incumbent or base_name]
    base_control = gate.generate(client, base_name, control)
    cand_control = gate.generate(client, candidate, control)
    report = gate.control_report(cand_control, base_control)
    return {"candidate_rougeL": cand["rougeL"], "candidate_bleu": cand["bleu"], "incumbent": incumbent or "base",
            "incumbent_rougeL": inc["rougeL"], "incumbent_bleu": inc["bleu"], "heldout_n": cand["n"],
            "candidate_critique_pass": cand["critique_pass"], "incumbent_critique_pass": inc["critique_pass"],
            "heldout_critiques_n": len(critique_items),
            "guideline_follow": cand["follow"], "guideline_follow_incumbent": inc["follow"],
            "guideline_follow_on": {gid: on for gid, (_, _, on) in guidelines.items()},
            **report,
            "control_rougeL": gate.control_rouge(cand_control, base_control),
            # the three answers furthest from the base model's, so a reviewer sees what drifted
            "control_samples": [{"prompt": q, "cosine": round(c, 4), "base": b[:200], "candidate": a[:200]}
                                for c, q, b, a in sorted(zip(report["control_cosines"],
                                                             gate.CONTROL_PROMPTS, base_control, cand_control))[:3]]}
