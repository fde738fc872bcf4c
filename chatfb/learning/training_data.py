"""Feedback -> training data: clean, split off a held-out share, and build SFT / DPO examples.

Kinds of feedback and what they become (modes as in the seeds' three objectives):
- correction  -> SFT example (conversation so far + corrected reply) and a DPO pair
                 (chosen = correction, rejected = original).            [supervised, semi]
- critique    -> the conversation answered again WITH the critique as an instruction (several
                 samples, chatfb.critique.candidates), the best that passes selection trained WITHOUT it
                 (recipe "instruct"; recipe "ilf" rewrites the reply instead, chatfb.critique.ilf).
                 A critique whose candidates all fail yields no example (counted). A critique
                 stating a lasting preference (`is_lasting_preference`) also trains on similar
                 other prompts answered with it: context distillation. [unsupervised, semi]
- approved global guideline -> distilled the same way on the prompts it was kept from (critiques
                 with the same text) and similar prompts; every mode.
- rating +1   -> the reply itself is an SFT example.                    [semi]
- rating -1 / implicit (regenerated) -> a filter: never trained on as a good reply; listed as
                 KTO-style negatives in the counts and exports.         [semi]
Only feedback the trust policy vouches for (chatfb.learning.trust, `scopes` in `build`) trains the shared
adapter or is held out to gate it; every example carries its provenance (who, kind, scope) into the files.
Held-out examples (a deterministic share by feedback id) are never trained on; the gate scores
candidates on them. Critiques are held out whole: nothing is generated from a held-out critique,
and the gate checks whether the candidate's own answer to its prompt passes the same selection.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field, replace

from chatfb.critique import content
from chatfb.critique.constraints import PlainAnswer
from chatfb.critique.guidelines import looks_like_rule
from chatfb.learning.rows import dpo_row, prompt_completion_row, provenance
from chatfb.learning.trust import provenance_kind, who
from chatfb.store.records import FeedbackRecord, last_user

MODES = ("supervised", "unsupervised", "semi")
EMAIL = re.compile(rf"\b{content.EMAIL}\b")
PHONE = re.compile(r"(?<!\w)\+?\d[\d ()-]{7,}\d(?!\w)")


@dataclass
class Example:
    """One training/evaluation example: chat messages before the reply, and the target reply."""

    prompt: list[dict]
    target: str
    source: str  # correction | critique | rating
    feedback_id: str
    rejected: str | None = None  # the original reply, for preference pairs
    author: str = ""  # who gave the feedback (chatfb.learning.trust.who)
    kind: str = ""  # its provenance kind (chatfb.learning.trust.PROVENANCE_KINDS)

    def provenance(self) -> dict:
        """The row's extra fields: everything that trains is vouched for, so its scope is shared."""
        return provenance(self.feedback_id, self.author, self.kind, "shared")


@dataclass
class TrainingData:
    train: list[Example] = field(default_factory=list)
    heldout: list[Example] = field(default_factory=list)
    pending_critiques: list[FeedbackRecord] = field(default_factory=list)  # need candidates (see critique_tasks)
    heldout_critiques: list[FeedbackRecord] = field(default_factory=list)  # held out whole, for the gate
    records: list[FeedbackRecord] = field(default_factory=list)  # all kept (cleaned) feedback: distillation's prompts
    guideline_eval: dict[str, list[list[dict]]] = field(default_factory=dict)  # guideline id -> prompts to check
    counts: dict = field(default_factory=dict)
    authors: dict[str, str] = field(default_factory=dict)  # feedback id -> who gave it

    def dpo_rows(self) -> list[dict]:
        return [dpo_row(e.prompt, e.target, e.rejected, **e.provenance()) for e in self.train
                if e.rejected and e.rejected.strip() != e.target.strip()]

    def sft_rows(self) -> list[dict]:
        return [prompt_completion_row(e.prompt, e.target, **e.provenance()) for e in self.train]


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
            r = replace(r, prompt=scrub_prompt(r.prompt))
        kept.append(r)
    return kept, dropped


def trust_decisions(records: list[FeedbackRecord], settings, reviews: dict[str, str], flagged: set[str],
                    rejected: list[tuple[str, str]] = ()) -> dict:
    """Feedback id -> chatfb.learning.trust.Decision under the settings' trust policy, questions and answers
    compared by sentence embeddings. `rejected`: Store.rejected_content (rejections outlive their rows)."""
    from chatfb.critique.similarity import embed
    from chatfb.learning import trust

    return trust.decide(records, trust.Policy.from_settings(settings), embed, reviews, flagged, rejected)


def shared_scopes(records: list[FeedbackRecord], settings, reviews: dict[str, str],
                  flagged: set[str], rejected: list[tuple[str, str]] = ()) -> dict[str, str]:
    """Feedback id -> shared | personal | none (see trust_decisions)."""
    return {fid: d.scope for fid, d in trust_decisions(records, settings, reviews, flagged, rejected).items()}


def owner_scopes(records: list[FeedbackRecord], scopes: dict[str, str], owner: str) -> dict[str, str]:
    """For `owner`'s personal adapter: their own rows that may train (shared or personal) as "shared" (what `build`
    trains on and holds out), everyone else's as "others" (neither trained nor counted as personal)."""
    return {r.feedback_id: "shared" if scopes.get(r.feedback_id) in ("shared", "personal")
            and who(r.user_name, r.session_id) == owner else "others" for r in records}


def review_queue(records: list[FeedbackRecord], settings, reviews: dict[str, str], flagged: set[str],
                 rejected: list[tuple[str, str]] = ()) -> list[dict]:
    """What waits for an admin's review, grouped by what it would teach (chatfb.learning.trust.queue_view)."""
    from chatfb.learning import trust

    return trust.queue_view(records, trust_decisions(records, settings, reviews, flagged, rejected), reviews)


def _split_hash(feedback_id: str, seed: int) -> bytes:
    """The hash that places a row in the held-out split (`is_heldout`) and orders rows for `hold_one_out`."""
    return hashlib.sha256(f"{seed}:{feedback_id}".encode()).digest()


def is_heldout(feedback_id: str, fraction: float, seed: int) -> bool:
    return int.from_bytes(_split_hash(feedback_id, seed)[:8], "big") / 2**64 < fraction


def build(records: list[FeedbackRecord], mode: str = "semi", holdout_fraction: float = 0.2, seed: int = 0,
          max_chars: int = 8000, pii: bool = True, scopes: dict[str, str] | None = None) -> TrainingData:
    """The examples that need no model: corrections and liked replies; critiques wait in `pending_critiques`.
    `scopes` (feedback id -> shared | personal | none, chatfb.learning.trust.decide): only shared rows train or
    are held out for the gate; the rest are counted. None = every row is shared (the caller vouched for all)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    total = len(records)
    if scopes is not None:
        records = [r for r in records if scopes.get(r.feedback_id) == "shared"]
    kept, dropped = clean(records, max_chars, pii)
    negatives = {r.message_id for r in kept if (r.kind == "rating" and r.rating < 0) or r.kind == "implicit"}
    corrected = {r.message_id for r in kept if r.kind == "correction"}
    data = TrainingData(records=kept, counts={"feedback": total, "kept": len(kept),
                                              **{f"dropped_{k}": v for k, v in dropped.items()}})
    if scopes is not None:
        data.counts.update(not_shared_personal=sum(v == "personal" for v in scopes.values()),
                           not_shared_blocked=sum(v == "none" for v in scopes.values()))
    data.authors = {r.feedback_id: who(r.user_name, r.session_id) for r in kept}
    for r in kept:
        ex = None
        if r.kind == "correction" and mode in ("supervised", "semi"):
            ex = Example(r.prompt, r.text.strip(), "correction", r.feedback_id, rejected=r.reply,
                         author=data.authors[r.feedback_id], kind=provenance_kind(r))
        elif r.kind == "critique" and mode in ("unsupervised", "semi") and r.message_id not in corrected:
            data.pending_critiques.append(r)
        elif (r.kind == "rating" and r.rating > 0 and mode == "semi" and r.message_id not in negatives | corrected
              and not r.reply_cut_off):  # a 👍 on a reply cut off mid-word would teach ending mid-word
            ex = Example(r.prompt, r.reply, "rating", r.feedback_id, author=data.authors[r.feedback_id], kind="rating")
        if ex is not None:
            (data.heldout if is_heldout(r.feedback_id, holdout_fraction, seed) else data.train).append(ex)
    data.counts.update(kto_negatives=len(negatives), kto_positives=sum(1 for r in kept if r.kind == "rating" and r.rating > 0))
    return data


def hold_one_out(data: TrainingData, holdout_fraction: float, seed: int) -> str | None:
    """Where the hash split held out none of the rows (neither a correction or rating nor a critique) and
    at least two examples train, hold out the one whose id hashes lowest, so the gate has something of the
    owner's own to judge by. A personal adapter's owner with a handful of rows otherwise got an adapter the
    gate could never promote ("no held-out feedback"), trained again every cycle (a third of users with 5
    rows at a 0.2 split). Returns the held-out row's feedback id, or None."""
    if (data.heldout or len(data.train) < 2
            or any(is_heldout(r.feedback_id, holdout_fraction, seed) for r in data.pending_critiques)):
        return None
    # a correction if there is one (a liked reply is the model's own: a weak test of what the adapter learnt)
    one = min(data.train, key=lambda e: (e.source != "correction", _split_hash(e.feedback_id, seed)))
    data.train.remove(one)
    data.heldout.append(one)
    data.counts["held_out_one"] = 1
    return one.feedback_id


# -- critiques and guidelines -> instruction tasks -> examples ---------------------------------------

# A critique states a lasting preference when it reads like a standing rule (chatfb.critique.guidelines.looks_like_rule:
# "always", "never", "our support email is ...", the same test that suggests keeping it as a guideline), or
# when it asks for a format, length or style ("format it as a bulleted list", "one short sentence", "end the
# note with ..."), or corrects a fact ("Wrong: the capital of Australia is Canberra"). A one-off complaint
# ("too vague", "that's rude") does not, and trains only on the reply it was given on. Regular expressions,
# on purpose: they err towards "no", and a rule they miss still trains on its own prompt.
FORMAT_OR_FACT = re.compile(
    r"\b(?:format(?:ted)?|bullet(?:ed|s)?|numbered list|one (?:short )?sentence|at most \d+ words|too long|too short"
    r"|shorter|concise|tone|formal|emojis?|sign[- ]?off|(?:end|start|begin) (?:it |each \w+ |the \w+ )?with)\b"
    r"|^\s*(?:wrong|incorrect|not true|actually)\b[^.?!]*\b(?:is|are|was|were)\b", re.I)
# Prompts "of the same kind" for distillation: all-MiniLM-L6-v2 cosine of the user's questions at least this.
# Measured: one support question to another 0.15-0.34, "tips for sleeping" to "tips for saving money" 0.33,
# "What is the capital of Australia?" to "Which city is the seat of government of Australia?" 0.79, to "What is
# the capital of Japan?" 0.59. 0.3 keeps distillation to close neighbours; a looser floor spread a rule (and
# its e-mail address or sign-off) to unrelated questions.
SAME_KIND_COSINE = 0.3
TASK_SOURCES = ("critique", "distill", "guideline")


def is_lasting_preference(text: str) -> bool:
    return looks_like_rule(text) or bool(FORMAT_OR_FACT.search(text or ""))


@dataclass
class InstructionTask:
    """One prompt to answer with an instruction (a critique or an approved guideline) in context. The
    selected answer trains WITHOUT the instruction: the critiqued reply's own prompt (source 'critique'),
    or another prompt it should carry to (context distillation: 'distill' for a critique, 'guideline')."""

    prompt: list[dict]
    instruction: str
    source: str
    feedback_id: str  # the critique it comes from, or the guideline's id
    message_id: str | None = None  # the critiqued reply
    original: str | None = None  # the critiqued reply's text (critique tasks)
    record: FeedbackRecord | None = None  # the critique itself (the ILF recipe rewrites its reply)


def _norm(text: str) -> str:
    return " ".join((text or "").lower().split())


def critique_tasks(data: TrainingData, holdout_fraction: float, seed: int, limit: int,
                   embed=None) -> list[InstructionTask]:
    """Split the pending critiques: held out whole (to `data.heldout_critiques`, nothing generated) or one
    task each for `limit` others (the rest counted as critiques_not_refined), spread over what they ask
    (`spread_over_asks`): the newest of each ask first, then the next newest of each, so one preference
    critiqued fifty times leaves room for the others in the cycle's bound."""
    held = [r for r in data.pending_critiques if is_heldout(r.feedback_id, holdout_fraction, seed)]
    rest = sorted((r for r in data.pending_critiques if not is_heldout(r.feedback_id, holdout_fraction, seed)),
                  key=lambda r: r.created_at, reverse=True)
    todo = spread_over_asks(rest, max(limit, 0), embed) if len(rest) > limit else rest
    data.heldout_critiques = held
    data.counts.update(critiques=len(data.pending_critiques), critiques_heldout=len(held),
                       critiques_not_refined=len(rest) - len(todo))
    data.pending_critiques = []
    # a critiqued reply the token limit or Stop cut off is framed only up to its last whole sentence
    return [InstructionTask(r.prompt, r.text.strip(), "critique", r.feedback_id, r.message_id,
                            PlainAnswer.of(r.reply, r.reply_cut_off), r) for r in todo]


SPREAD_WINDOW = 8
# Two critiques this alike (all-MiniLM-L6-v2) ask for the same thing; "Too long." and "Too short." are 0.79 apart.
# Only the order of the bound depends on it: a critique in a group of its own is taken in the first turn.
SAME_ASK_COSINE = 0.85


def spread_over_asks(records: list[FeedbackRecord], limit: int, embed=None,
                     floor: float = SAME_ASK_COSINE) -> list[FeedbackRecord]:
    """`limit` of `records` (newest first), taken in turns from each group of critiques that ask the same
    thing (same words, or grouped by meaning: chatfb.critique.similarity.group_similar at `floor`, the closest
    group): the newest of every group, then the second newest of every group, and so on; groups in the order of
    their newest critique. Only the newest SPREAD_WINDOW x `limit` are grouped (a backlog of thousands costs no
    more than that). `embed`: texts -> unit vectors (default the sentence embeddings)."""
    from chatfb.critique.similarity import group_similar

    if limit <= 0:
        return []
    if embed is None:
        from chatfb.critique.similarity import embed
    window = records[:SPREAD_WINDOW * limit]
    keys = [" ".join(re.findall(r"\w+", (r.text or "").lower())) for r in window]
    texts = list(dict.fromkeys(keys))  # each wording once, newest first: groups come in the order of their newest
    grouped = group_similar(embed(texts), floor)
    group_of = {texts[i]: g for g, (members, _) in enumerate(grouped) for i in members}
    groups: list[list[FeedbackRecord]] = [[] for _ in grouped]
    for r, key in zip(window, keys):
        groups[group_of[key]].append(r)
    out: list[FeedbackRecord] = []
    for turn in range(max((len(g) for g in groups), default=0)):
        out += [g[turn] for g in groups if turn < len(g)][:limit - len(out)]
    return out


def same_kind_prompts(anchors: list[str], pool: list[list[dict]], count: int, similar=None,
                      floor: float = SAME_KIND_COSINE) -> list[list[dict]]:
    """Up to `count` prompts of `pool` whose question is most similar to any of `anchors` (cosine >= floor),
    most similar first; never one whose question is an anchor itself."""
    if count <= 0 or not pool or not anchors:
        return []
    if similar is None:
        from chatfb.critique.similarity import cosines as similar
    questions = [last_user(p) for p in pool]
    taken = {_norm(a) for a in anchors}
    best: dict[int, float] = {}
    for a in anchors:
        for i, c in enumerate(similar(a, questions)):
            if c >= floor and _norm(questions[i]) not in taken:
                best[i] = max(best.get(i, -1.0), c)
    order = sorted(best, key=lambda i: (-best[i], questions[i]))
    out, seen = [], set()
    for i in order:
        if _norm(questions[i]) not in seen:
            seen.add(_norm(questions[i]))
            out.append(pool[i])
    return out[:count]


def distillation_tasks(data: TrainingData, tasks: list[InstructionTask], guidelines: list[dict],
                       records: list[FeedbackRecord], replay_prompts: list[list[dict]], per_rule: int, max_tasks: int,
                       holdout_fraction: float, seed: int, similar=None) -> list[InstructionTask]:
    """Context distillation: for each critique task whose critique states a lasting preference, and for each
    approved global guideline, other prompts answered with it as the instruction (trained without it):
    prompts of other feedback (never held-out feedback) and, at most half of them, replay questions, the
    most similar first (`same_kind_prompts`). A guideline also trains on the prompts of the critiques it was
    kept from (same text, or its source); those critiques' held-out share becomes `data.guideline_eval`,
    the prompts the gate checks it on. At most `max_tasks` tasks in all; none repeats a task's
    (question, instruction)."""
    from chatfb.critique.candidates import corrects_a_fact

    # A question that has an instruction of its own (another critique) never gets a second one: two rules
    # on one prompt gave notes with bullet lists and "the capital of Australia" under Japan (efficacy run).
    own = {_norm(last_user(t.prompt)) for t in tasks}
    held_out = {e.feedback_id for e in data.heldout}  # the split's, and one `hold_one_out` added
    pool = [r.prompt for r in records if not is_heldout(r.feedback_id, holdout_fraction, seed)
            and r.feedback_id not in held_out and _norm(last_user(r.prompt)) not in own]
    replay_prompts = [p for p in replay_prompts if _norm(last_user(p)) not in own]
    from_feedback, from_replay = per_rule - per_rule // 2, per_rule // 2
    seen = {(_norm(last_user(t.prompt)), _norm(t.instruction)) for t in tasks}
    out: list[InstructionTask] = []

    def add(prompt, instruction, source, fid):
        key = (_norm(last_user(prompt)), _norm(instruction))
        if key not in seen and len(out) < max_tasks:
            seen.add(key)
            out.append(InstructionTask(prompt, instruction, source, fid))

    def neighbours(anchors, instruction):  # a corrected fact is about its subject: users' questions only
        replay = [] if corrects_a_fact(instruction) else same_kind_prompts(anchors, replay_prompts, from_replay, similar)
        return same_kind_prompts(anchors, pool, from_feedback, similar) + replay

    if per_rule > 0:
        for t in tasks:
            if t.source == "critique" and is_lasting_preference(t.instruction):
                for p in neighbours([last_user(t.prompt)], t.instruction):
                    add(p, t.instruction, "distill", t.feedback_id)
    for g in guidelines:
        kept_from = [r for r in records if r.kind == "critique"
                     and (_norm(r.text) == _norm(g["text"]) or r.feedback_id == g.get("source_feedback_id"))]
        held = [r.prompt for r in kept_from if is_heldout(r.feedback_id, holdout_fraction, seed)]
        train = [r.prompt for r in kept_from if not is_heldout(r.feedback_id, holdout_fraction, seed)]
        for p in train:
            add(p, g["text"], "guideline", g["id"])
        anchors = [last_user(p) for p in train] or [g["text"]]
        for p in neighbours(anchors, g["text"]) if per_rule > 0 else []:
            add(p, g["text"], "guideline", g["id"])
        data.guideline_eval[g["id"]] = held
    data.counts.update(distill_tasks=sum(t.source == "distill" for t in out),
                       guideline_tasks=sum(t.source == "guideline" for t in out))
    return out


def add_selections(data: TrainingData, selected: list[tuple[InstructionTask, str | None]]) -> None:
    """Add the selected answer of each task (None: every candidate failed, no example) as a training
    example, its prompt WITHOUT the instruction. Counts per source how many tasks yielded an example."""
    for task, best in selected:
        if best is not None:
            data.train.append(Example(task.prompt, best, task.source, task.feedback_id, rejected=task.original,
                                      author=data.authors.get(task.feedback_id)  # a guideline: the admin's
                                      or ("admin" if task.source == "guideline" else ""),
                                      kind="guideline" if task.source == "guideline" else "from_critique"))
    for src in TASK_SOURCES:
        done = [best is not None for task, best in selected if task.source == src]
        name = "critiques" if src == "critique" else f"{src}_tasks"
        data.counts[f"{name}_with_example"] = sum(done)
        data.counts[f"{name}_without_example"] = len(done) - sum(done)


def finalize_counts(data: TrainingData) -> dict:
    data.counts.update(train_examples=len(data.train), heldout_examples=len(data.heldout),
                       dpo_pairs=len(data.dpo_rows()),
                       **{f"train_{src}": sum(e.source == src for e in data.train)
                          for src in ("correction", "critique", "rating", "distill", "guideline")})
    return data.counts
