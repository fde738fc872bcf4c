"""Uptake: did an adapter learn the feedback it trained on? Each trained item asked again, and marked.

A cycle's child (chatfb.learning.worker) asks a candidate that passed the gate, while it is still loaded,
the prompt of each feedback item it trained on (the newest CHATFB_UPTAKE_MAX_ITEMS corrections and
critiques; greedy, the app's max tokens) and decides per item:

- a correction (written, or a revision the user accepted or edited): learned when the new answer gives every
  e-mail address, URL and number the correction states (chatfb.learning.gate.gives_exactly: the old address in
  the corrected words is not learned), is closer to the correction than to the original reply (ROUGE-L F1, as
  the gate on held-out corrections) and shares at least MIN_ROUGE with the correction;
- a critique: learned when the new answer, asked without the critique, passes the same selection the
  cycle's candidates passed with it (chatfb.critique.candidates.score, the gate's check on held-out critiques).

Ratings and guidelines are not asked: a 👍 reply was the model's own answer already, and a guideline's
uptake is the gate's `guideline_follow`. The owner records the rows only when it promotes the adapter
(chatfb.learning.cycle.finish; store table `uptake`); the chat shows `footer` under the reply the feedback
was on, the admin tab and `python -m chatfb adapters uptake [NAME]` show `report`, and exports carry
`export_fields`.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from chatfb.critique.similarity import rouge_l

# A floor, not a measurement: an answer that keeps under a third of the correction's words in order has
# not taken the correction up, even when it shares still less with the original reply.
MIN_ROUGE = 0.3
MEASURES = ("rougeL", "critique_pass")


@dataclass
class Item:
    """One trained feedback item to ask again."""

    feedback_id: str
    prompt: list[dict]  # what the model was asked (the conversation before the reply)
    kind: str  # correction | critique
    text: str  # the correction, or the critique
    original: str  # the reply the feedback was given on


def items_to_check(data, limit: int) -> tuple[list[Item], int]:
    """(the newest `limit` corrections and critiques that trained in `data` (chatfb.learning.training_data.
    TrainingData), how many trained in all). A critique counts once, however many examples it made."""
    records = {r.feedback_id: r for r in data.records}
    items: dict[str, Item] = {}
    for e in data.train:
        r = records.get(e.feedback_id)
        if r is None or e.feedback_id in items:
            continue
        if e.source == "correction":
            items[e.feedback_id] = Item(e.feedback_id, e.prompt, "correction", e.target, e.rejected or r.reply)
        elif e.source == "critique":
            items[e.feedback_id] = Item(e.feedback_id, e.prompt, "critique", (r.text or "").strip(), r.reply)
    newest = sorted(items.values(), key=lambda i: records[i.feedback_id].created_at, reverse=True)
    return newest[:max(limit, 0)], len(newest)


def correction_learned(answer: str, correction: str, original: str) -> tuple[bool, float]:
    """(learned, ROUGE-L F1 of the answer to the correction): gives the values the correction states, closer to
    the correction than to the original reply, and at least MIN_ROUGE to it."""
    from chatfb.learning.gate import exact_values, gives_exactly

    score = rouge_l(correction, answer)
    return (score >= MIN_ROUGE and score > rouge_l(original, answer)
            and gives_exactly(answer, exact_values(correction))), round(score, 4)


def critique_learned(judge, scorer_model: str, item: Item, answer: str) -> tuple[bool, float | None]:
    """(learned, the selection's score): the answer, given without the critique, passes the selection for it."""
    from chatfb.critique import candidates

    (scored,) = candidates.score(judge, scorer_model, item.prompt, item.text, [candidates.Candidate(answer)],
                                 original=item.original)
    return scored.ok, None if scored.score is None else round(scored.score, 4)


def check(client, model: str, items: list[Item], max_tokens: int, judge=None, scorer_model: str = "") -> list[dict]:
    """Ask `model` each item's prompt (greedy, batched as the gate does) and decide each: rows for
    Store.add_uptake. `judge` and `scorer_model` judge critiques as the gate does (chatfb.critique.judge)."""
    from chatfb.learning.gate import generate

    answers = generate(client, model, [i.prompt for i in items], max_tokens)

    def decide(pair):
        item, answer = pair
        if item.kind == "critique":
            learned, score = critique_learned(judge or client, scorer_model, item, answer)
        else:
            learned, score = correction_learned(answer, item.text, item.original)
        return {"feedback_id": item.feedback_id, "learned": learned, "score": score,
                "measure": "critique_pass" if item.kind == "critique" else "rougeL", "answer": answer}

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(decide, zip(items, answers)))


# -- what users and admins see ----------------------------------------------------------------------

def version(adapter: str) -> int | None:
    """The version number in an adapter's name (<prefix>-v0005 -> 5)."""
    m = re.search(r"-v(\d+)$", adapter or "")
    return int(m.group(1)) if m else None


def best(rows: list[dict]) -> dict | None:
    """Of one item's uptake rows (newest first, Store.uptake): the newest that learned it, else the newest."""
    return next((r for r in rows if r["learned"]), rows[0] if rows else None)


def footer(rows: list[dict]) -> str | None:
    """What the chat says under the reply an item's feedback was on: "learned in your model v3" (the author's
    personal adapter), "learned in everyone's model v5" (the shared one), "not learned yet", or None
    (never checked)."""
    row = best(rows)
    if row is None:
        return None
    if not row["learned"]:
        return "not learned yet"
    whose = "your" if row["owner"] else "everyone's"
    return f"learned in {whose} model v{version(row['adapter'])}"


def export_fields(rows: list[dict]) -> dict:
    """An export row's uptake fields: "uptake" is "learned", "not learned" or "" (never checked), and
    "uptake_adapter" the adapter that was asked ("" when none)."""
    row = best(rows)
    if row is None:
        return {"uptake": "", "uptake_adapter": ""}
    return {"uptake": "learned" if row["learned"] else "not learned", "uptake_adapter": row["adapter"]}


def by_feedback(rows: list[dict]) -> dict[str, list[dict]]:
    """Uptake rows (newest first) grouped by feedback id, each group still newest first."""
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["feedback_id"], []).append(r)
    return out


def report(rows: list[dict], records: dict, embed=None, threshold: float = 0.45) -> dict:
    """The admin's view of uptake rows: per item (its question, kind, who, learned, score, answer) and per
    cluster (items grouped by their question's meaning, chatfb.critique.similarity.group_similar, each
    named by its most central question, with the share learned). `records`: feedback id -> FeedbackRecord
    (an item whose feedback is gone is left out)."""
    from chatfb.critique.similarity import group_similar
    from chatfb.learning.trust import provenance_kind, question, who

    items = []
    for r in rows:
        rec = records.get(r["feedback_id"])
        if rec is None:
            continue
        items.append({"feedback_id": r["feedback_id"], "adapter": r["adapter"], "model": r["owner"] or "shared",
                      "author": who(rec.user_name, rec.session_id), "feedback_kind": provenance_kind(rec),
                      "question": question(rec), "learned": bool(r["learned"]), "measure": r["measure"],
                      "score": r["score"], "answer": (r["answer"] or "")[:300],
                      "checked_at": r["checked_at"].isoformat(timespec="seconds") if r["checked_at"] else ""})
    if embed is None:
        from chatfb.critique.similarity import embed
    questions = [" ".join(i["question"].split()) for i in items]
    clusters = []
    for members, central in group_similar(embed(questions), threshold):
        learned = sum(items[k]["learned"] for k in members)
        clusters.append({"topic": questions[central], "items": len(members), "learned": learned,
                         "share": round(learned / len(members), 4)})
    clusters.sort(key=lambda c: (-c["items"], c["topic"]))
    learned = sum(i["learned"] for i in items)
    return {"checked": len(items), "learned": learned, "share": round(learned / len(items), 4) if items else None,
            "items": items, "clusters": clusters}
