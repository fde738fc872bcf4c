"""One learning cycle: snapshot -> training data (with ILF) -> LoRA training -> gate -> promote.

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
from chatfb.feedback_io import write_rows
from chatfb.model_client import ModelClient, ModelError
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
    cmd = [sys.executable, "-m", "chatfb.train", "--data", str(data_dir), "--base", str(base), "--out", str(out),
           "--rank", str(settings.lora_rank), "--epochs", str(settings.train_epochs), "--lr", str(settings.learning_rate),
           "--seed", str(settings.seed), "--max-steps", str(settings.train_max_steps), "--dpo-epochs", "1" if dpo else "0"]
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
        timings["snapshot_s"] = round(time.perf_counter() - t, 2)
        if not records:
            return CycleResult(False, reason="no feedback yet")
        data = training_data.build(records, settings.train_mode, settings.holdout_fraction, settings.seed,
                                   settings.max_feedback_chars, settings.scrub_pii)

        t = time.perf_counter()
        client, base, stop_server = model_server(settings)
        backend.attach_server(client)
        base_name = settings.served_model_name
        skipped = 0
        if data.pending_critiques:
            refiner = (ModelClient(settings.refiner_url, settings.api_key, batch_timeout(settings)) if settings.refiner_url
                       else client)
            newest = sorted(data.pending_critiques, key=lambda r: r.created_at, reverse=True)
            todo = newest[:max(settings.refine_max_critiques, 0)]
            skipped = len(newest) - len(todo)
            refined, refine_errors = refine_all(todo, refiner, settings.refiner_model or base_name)
            training_data.add_refinements(data, refined, settings.holdout_fraction, settings.seed)
        else:
            refine_errors = []
        counts = training_data.finalize_counts(data)
        if skipped:
            counts["critiques_not_refined"] = skipped
        if refine_errors:
            counts["refine_errors"] = len(refine_errors)
        timings["refine_s"] = round(time.perf_counter() - t, 2)
        if not data.train:
            reason = "no usable training examples"
            if refine_errors:
                reason += f" ({len(refine_errors)} refinement(s) failed: {refine_errors[0]})"
            return CycleResult(False, reason=reason, counts=counts, timings=timings)

        live = backend.live_adapter()
        incumbent = live["name"] if live else None
        name = backend.next_adapter_name()
        rel = Path(name)
        out = settings.data_dir / "adapters" / rel
        backend.add_adapter(name, incumbent, "training", str(rel),
                            {"mode": settings.train_mode, "rank": settings.lora_rank, "epochs": settings.train_epochs,
                             "lr": settings.learning_rate, "dpo": dpo, "seed": settings.seed})
        work = settings.data_dir / "work" / name
        # Retention: the base model's own answers to general prompts ride along (self-distillation).
        replay = replay_examples(client, base_name, settings.system_prompt, settings.replay_examples)
        write_rows([pc_row(e.prompt, e.target) for e in data.train] + replay, work / "sft.jsonl")
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
        metrics = evaluate(client, settings, data.heldout, name, incumbent, base_name, out)
        timings["eval_s"] = round(time.perf_counter() - t, 2)
        ok, reason = gate.decide({"rougeL": metrics["candidate_rougeL"], "control_agreement": metrics["control_agreement"],
                                  "control_collapsed": metrics["control_collapsed"]},
                                 {"rougeL": metrics["incumbent_rougeL"]}, gate.GatePolicy())
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


def refine_all(records, client: ModelClient, model: str, workers: int = 8) -> tuple[list, list[str]]:
    """ILF refinements of every critiqued reply, several requests at once (vLLM batches them).
    Returns ([(record, best refinement or None)], [error message per refinement the server failed])."""
    from concurrent.futures import ThreadPoolExecutor

    from chatfb.refine import refine

    errors: list[str] = []

    def one(r):
        try:
            return refine(r, client, model, max_tokens=192)
        except ModelError as e:
            log.warning("refinement of %s failed: %s", r.feedback_id, e)
            errors.append(str(e))
            return None

    with ThreadPoolExecutor(workers) as pool:
        return list(zip(records, pool.map(one, records))), errors


def pc_row(prompt: list[dict], target: str) -> dict:
    return {"prompt": prompt, "completion": [{"role": "assistant", "content": target}]}


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


def replay_examples(client: ModelClient, model: str, system_prompt: str, count: int = len(REPLAY_PROMPTS),
                    max_tokens: int = 192) -> list[dict]:
    """The base model's own answers to general questions (self-distillation replay), trained beside the
    feedback so the adapter keeps its behaviour where feedback says nothing. An answer that max_tokens
    cut off is left out: trained with an end of turn after it, it would teach the model to stop mid-sentence."""
    from concurrent.futures import ThreadPoolExecutor

    prompts = [[{"role": "system", "content": system_prompt}, {"role": "user", "content": q}]
               for q in REPLAY_PROMPTS[:max(count, 0)]]
    with ThreadPoolExecutor(8) as pool:  # vLLM batches concurrent requests
        answers = list(pool.map(lambda p: client.complete_finished(p, model, max_tokens), prompts))
    return [pc_row(p, a) for p, a in zip(prompts, answers) if a and a.strip()]


def eval_sample(heldout: list, limit: int, seed: int) -> list:
    """At most `limit` held-out examples, the same ones every cycle for the same feedback."""
    import hashlib

    if limit <= 0 or len(heldout) <= limit:
        return list(heldout)
    key = lambda e: hashlib.sha256(f"{seed}:{e.feedback_id}".encode()).hexdigest()  # noqa: E731
    return sorted(heldout, key=key)[:limit]


def evaluate(client: ModelClient, settings: Settings, heldout, candidate: str, incumbent: str | None,
             base_name: str, candidate_path: Path) -> dict:
    if candidate in client.models():
        # Names are new for every cycle of this data folder: one already on the server belongs to someone else.
        raise RuntimeError(f"the model server already has an adapter named {candidate}: another chatfb data folder "
                           "shares it; give each one its own CHATFB_ADAPTER_PREFIX")
    client.load_adapter(candidate, str(candidate_path.resolve()))
    heldout = eval_sample(heldout, settings.eval_max_examples, settings.seed)
    prompts = [e.prompt for e in heldout]
    targets = [e.target for e in heldout]
    control = gate.control_messages(settings.system_prompt)
    cand = gate.closeness(gate.generate(client, candidate, prompts), targets)
    inc = gate.closeness(gate.generate(client, incumbent or base_name, prompts), targets)
    base_control = gate.generate(client, base_name, control)
    cand_control = gate.generate(client, candidate, control)
    report = gate.control_report(cand_control, base_control)
    return {"candidate_rougeL": cand["rougeL"], "candidate_bleu": cand["bleu"], "incumbent": incumbent or "base",
            "incumbent_rougeL": inc["rougeL"], "incumbent_bleu": inc["bleu"], "heldout_n": cand["n"],
            **report,
            "control_rougeL": gate.control_rouge(cand_control, base_control),
            # the three answers furthest from the base model's, so a reviewer sees what drifted
            "control_samples": [{"prompt": q, "cosine": round(c, 4), "base": b[:200], "candidate": a[:200]}
                                for c, q, b, a in sorted(zip(report["control_cosines"],
                                                             gate.CONTROL_PROMPTS, base_control, cand_control))[:3]]}
