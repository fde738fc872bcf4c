"""Feedback -> training data: clean, split off a held-out share, and build SFT / DPO examples.

Kinds of feedback and what they become (modes as in the seeds' three objectives):
- correction  -> SFT example (conversation so far + corrected reply) and a DPO pair
                 (chosen = correction, rejected = original).            [supervised, semi]
- critique    -> ILF: refinements of the original reply, generated from the conversation, the
                 reply and the critique, scored, and the best survivor becomes an SFT example
                 (chatfb.refine).                                       [unsupervised, semi]
- rating +1   -> the reply itself is an SFT example.                    [semi]
- rating -1 / implicit (regenerated) -> a filter: never trained on as a good reply; listed as
                 KTO-style negatives in the counts and exports.         [semi]
Held-out examples (a deterministic share by feedback id) are never trained on; the gate scores
candidates on them.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field

from chatfb.store import FeedbackRecord

MODES = ("supervised", "unsupervised", "semi")
EMAIL = re.compile(r"\b[\w.+-]+@[\w-]+(\.[\w-]+)+\b")
PHONE = re.compile(r"(?<!\w)\+?\d[\d ()-]{7,}\d(?!\w)")


@dataclass
class Example:
    """One training/evaluation example: chat messages before the reply, and the target reply."""

    prompt: list[dict]
    target: str
    source: str  # correction | critique | rating
    feedback_id: str
    rejected: str | None = None  # the original reply, for preference pairs

    def sft_row(self) -> dict:
        return {"messages": self.prompt + [{"role": "assistant", "content": self.target}]}

    def dpo_row(self) -> dict:
        return {"prompt": self.prompt, "chosen": [{"role": "assistant", "content": self.target}],
                "rejected": [{"role": "assistant", "content": self.rejected}]}


@dataclass
class TrainingData:
    train: list[Example] = field(default_factory=list)
    heldout: list[Example] = field(default_factory=list)
    pending_critiques: list[FeedbackRecord] = field(default_factory=list)  # need ILF refinement
    counts: dict = field(default_factory=dict)

    def sft_rows(self) -> list[dict]:
        return [e.sft_row() for e in self.train]

    def dpo_rows(self) -> list[dict]:
        return [e.dpo_row() for e in self.train if e.rejected and e.rejected.strip() != e.target.strip()]


def scrub(text: str) -> str:
    return PHONE.sub("[phone]", EMAIL.sub("[email]", text))


def scrub_prompt(prompt: list[dict]) -> list[dict]:
    """Mask users' e-mail addresses and phone numbers in what they wrote. Replies and corrections
    keep theirs: a correction's "our support email is ..." is the very thing to learn."""
    return [dict(m, content=scrub(m["content"])) if m["role"] == "user" else m for m in prompt]


def is_garbage(text: str) -> bool:
    t = (text or "").strip()
    letters = sum(ch.isalpha() for ch in t)
    return letters < 2 or letters < 0.3 * len(t) or len(set(t)) < 3


def clean(records: list[FeedbackRecord], max_chars: int, pii: bool) -> tuple[list[FeedbackRecord], dict]:
    """Drop empty, garbage, overlong and duplicate feedback; optionally scrub PII from prompts."""
    kept, seen, dropped = [], set(), {"empty_or_garbage": 0, "overlong": 0, "duplicate": 0}
    for r in records:
        text = (r.text or "").strip()
        if r.kind in ("critique", "correction") and is_garbage(text):
            dropped["empty_or_garbage"] += 1
            continue
        if len(text) > max_chars or len(r.reply) > max_chars or any(len(m["content"]) > max_chars for m in r.prompt):
            dropped["overlong"] += 1
            continue
        key = json.dumps([r.prompt, r.reply, r.kind, r.rating, text], sort_keys=True)
        if key in seen:
            dropped["duplicate"] += 1
            continue
        seen.add(key)
        if pii:
            r = FeedbackRecord(r.feedback_id, r.message_id, r.kind, r.rating, r.text, r.user_name, r.created_at,
                               scrub_prompt(r.prompt), r.reply)
        kept.append(r)
    return kept, dropped


def is_heldout(feedback_id: str, fraction: float, seed: int) -> bool:
    h = hashlib.sha256(f"{seed}:{feedback_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < fraction


def build(records: list[FeedbackRecord], mode: str = "semi", holdout_fraction: float = 0.2, seed: int = 0,
          max_chars: int = 8000, pii: bool = True) -> TrainingData:
    """Everything but ILF refinement (which needs a model): see `add_refinements`."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    kept, dropped = clean(records, max_chars, pii)
    negatives = {r.message_id for r in kept if (r.kind == "rating" and r.rating < 0) or r.kind == "implicit"}
    corrected = {r.message_id for r in kept if r.kind == "correction"}
    data = TrainingData(counts={"feedback": len(records), "kept": len(kept), **{f"dropped_{k}": v for k, v in dropped.items()}})
    for r in kept:
        ex = None
        if r.kind == "correction" and mode in ("supervised", "semi"):
            ex = Example(r.prompt, r.text.strip(), "correction", r.feedback_id, rejected=r.reply)
        elif r.kind == "critique" and mode in ("unsupervised", "semi") and r.message_id not in corrected:
            data.pending_critiques.append(r)
        elif r.kind == "rating" and r.rating > 0 and mode == "semi" and r.message_id not in negatives | corrected:
            ex = Example(r.prompt, r.reply, "rating", r.feedback_id)
        if ex is not None:
            (data.heldout if is_heldout(r.feedback_id, holdout_fraction, seed) else data.train).append(ex)
    data.counts.update(kto_negatives=len(negatives), kto_positives=sum(1 for r in kept if r.kind == "rating" and r.rating > 0))
    return data


def add_refinements(data: TrainingData, refined: list[tuple[FeedbackRecord, str | None]], holdout_fraction: float,
                    seed: int) -> None:
    """Add ILF survivors (record, best refinement or None when every candidate was dropped)."""
    kept = 0
    for r, best in refined:
        if best is None:
            continue
        kept += 1
        ex = Example(r.prompt, best, "critique", r.feedback_id, rejected=r.reply)
        (data.heldout if is_heldout(r.feedback_id, holdout_fraction, seed) else data.train).append(ex)
    data.counts.update(critiques=len(refined), critiques_refined=kept)
    data.pending_critiques = []


def finalize_counts(data: TrainingData) -> dict:
    data.counts.update(train_examples=len(data.train), heldout_examples=len(data.heldout),
                       dpo_pairs=len(data.dpo_rows()),
                       **{f"train_{src}": sum(e.source == src for e in data.train) for src in ("correction", "critique", "rating")})
    return data.counts
