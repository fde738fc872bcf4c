"""Who may teach the shared adapter: the trust policy, as pure logic (feedback records in, a scope per row out).

Without it, one anonymous visitor's ten false corrections trained the adapter everyone is served. Each
feedback row gets a scope:

    shared    vouched for: it may train the shared adapter (and be held out to gate it)
    personal  kept, exported as personal, never in the shared training set
    none      never trains, not even its author's personal adapter: its author is flagged, an admin rejected
              it, it came over the rate limit, or from no known session

A row is vouched for when one of the switched-on rules (`Policy.rules`) holds:
    trusted    its author is in CHATFB_TRUSTED_USERS or the admin allowlist, or the operator imported it
               with `import-feedback --trusted`
    agreement  at least `min_users` distinct people gave agreeing feedback on similar questions
               (`agreeing`); sessions that share a browser key, a user name or a client address count once
    review     an admin approved it (`python -m chatfb review approve`, or the admin tab)
CHATFB_SHARED_TRUST=open vouches for everything (a private single-team install, today's old behaviour).
Whatever the rules say, a row on the question of a row an admin rejected never trains the shared adapter
unless an admin approved that very row: a rejection sticks to its question, reworded or answered otherwise.
A rejection outlives its row (the store keeps its question and text, `rejected`): the row's conversation
deleted, the same question still closed, and the same text on the same question sent again trains nobody.

`decide` takes the records and an `embed` function (texts -> unit vectors, chatfb.critique.similarity.embed
in the app), and never touches the store or the model server: the unit tests hand it records.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from datetime import timedelta

from chatfb.config import SHARED_RULES as RULES
from chatfb.store.records import FeedbackRecord

SCOPES = ("shared", "personal", "none")
IMPORT_SESSION = "import"  # the session id of `import-feedback` rows (chatfb.store.db.Store.import_feedback)
# What an example teaches, by where it came from (exports and training rows carry it as "feedback_kind").
PROVENANCE_KINDS = ("written_correction", "accepted_revision", "edited_revision", "from_critique", "rating", "guideline")


@dataclass(frozen=True)
class Policy:
    mode: str = "vouched"  # vouched | open
    rules: frozenset = frozenset(RULES)
    trusted_users: frozenset = frozenset()
    min_users: int = 3
    prompt_cosine: float = 0.75  # two questions are "similar" at this cosine or more
    answer_cosine: float = 0.7  # two taught texts can agree at this cosine or more (and see `agreeing`)
    rate_limit_per_minute: int = 30

    @classmethod
    def from_settings(cls, s) -> "Policy":
        return cls(mode=s.shared_trust, rules=frozenset(s.shared_rule_list),
                   trusted_users=frozenset(s.trusted_user_list) | frozenset(s.admin_hf_user_list),
                   min_users=s.shared_min_users, prompt_cosine=s.shared_prompt_cosine,
                   answer_cosine=s.shared_answer_cosine, rate_limit_per_minute=s.rate_limit_per_minute)

    def describe(self) -> str:
        """One line for the admin view."""
        if self.mode == "open":
            return ("OPEN (CHATFB_SHARED_TRUST=open): every user's feedback trains the shared model; "
                    "only for a private install whose users all trust each other")
        rules = {"trusted": "trusted users", "agreement": f"{self.min_users} distinct users agreeing",
                 "review": "admin approval"}
        on = [rules[r] for r in RULES if r in self.rules]
        return "the shared model learns only what is vouched for: " + (", or ".join(on) if on else "nothing (no rule on)")


@dataclass(frozen=True)
class Decision:
    scope: str
    reason: str
    group: str | None = None  # the feedback id leading the group of rows that teach the same (review queue)
    supporters: int = 0  # distinct people agreeing with the row (itself included)


def who(user_name: str | None, session_id: str | None) -> str:
    """Who gave a row, as exports, training files and the admin show it: the user's name, else "anon-" and a
    hash of the anonymous session's id (the id itself ties a browser to its conversations: never shown)."""
    if user_name:
        return user_name
    return "anon-" + hashlib.sha256((session_id or "").encode()).hexdigest()[:12] if session_id else "unknown"


def provenance_kind(r: FeedbackRecord) -> str:
    """The kind a stored row teaches as (PROVENANCE_KINDS); a critique's example is "from_critique"."""
    if r.kind == "correction":
        return r.origin if r.origin in PROVENANCE_KINDS else "written_correction"
    return "from_critique" if r.kind == "critique" else "rating"


def teaching(r: FeedbackRecord) -> tuple[str, str]:
    """(what kind of thing a row teaches, the text it teaches): an answer to learn, an answer to avoid, or an
    instruction (a critique). Rows teach the same only when both parts agree."""
    if r.kind == "correction":
        return "answer", (r.text or "").strip()
    if r.kind == "critique":
        return "instruction", (r.text or "").strip()
    if r.kind == "rating" and (r.rating or 0) > 0:
        return "answer", r.reply.strip()
    return "avoid", r.reply.strip()


def question(r: FeedbackRecord) -> str:
    return next((m["content"] for m in reversed(r.prompt) if m["role"] == "user"), "")


def review_content(r: FeedbackRecord) -> tuple[str, str]:
    """(question, taught text): what the store keeps with an admin's decision on `r`."""
    return question(r), teaching(r)[1]


def _same(text: str) -> str:
    return " ".join(text.lower().split())


def _rejected_keys(rejected: list[tuple[str, str]]) -> set[tuple[str, str]]:
    return {(_same(q), _same(t)) for q, t in rejected}


def _rejected_again(r: FeedbackRecord, rejected_keys: set[tuple[str, str]]) -> bool:
    """The same text on the same question as a row an admin rejected (whitespace and case aside)."""
    q, t = review_content(r)
    return (_same(q), _same(t)) in rejected_keys


def _rejected(r: FeedbackRecord, reviews: dict[str, str], rejected_keys: set[tuple[str, str]]) -> str | None:
    """Why an admin's rejection keeps `r` from training anything (scope "none"), or None."""
    review = reviews.get(r.feedback_id)
    if review == "rejected":
        return "rejected by an admin"
    if review != "approved" and _rejected_again(r, rejected_keys):
        return "the same as a row an admin rejected"
    return None


def _flagged(r: FeedbackRecord, flagged) -> bool:
    return bool({r.user_name, r.session_id, who(r.user_name, r.session_id)} & set(flagged))


# Terms that make a fact: numbers, e-mail addresses, web addresses and capitalised words not opening a
# sentence. Two answers whose cosine is high can still name different painters ("painted by Leonardo da
# Vinci" / "by Vincent van Gogh": 0.90 apart from 0.95 for a rewording, all-MiniLM-L6-v2); they agree only
# when one's terms (beyond its question's) are all among the other's.
_TERM = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+|https?://\S+|\d[\d.,:/-]*\w*|[A-Z][\w'-]+|[\w'-]+")


def key_terms(text: str, context: str = "") -> frozenset[str]:
    skip = {w.lower() for w in re.findall(r"[\w'-]+", context)}
    terms = set()
    for sentence in re.split(r"(?<=[.!?])\s+", text.strip()):
        for k, token in enumerate(_TERM.findall(sentence)):
            term = token.lower().rstrip(".,")
            is_term = "@" in token or "://" in token or token[0].isdigit() or (k > 0 and token[0].isupper())
            if is_term and term not in skip:
                terms.add(term)
    return frozenset(terms)


def agreeing(a: FeedbackRecord, b: FeedbackRecord, answer_cos: float, policy: Policy) -> bool:
    """Whether two rows teach the same thing (their questions' similarity is checked apart)."""
    return _agree(_taught(a), _taught(b), answer_cos, policy)


def _taught(r: FeedbackRecord) -> tuple[str, frozenset[str]]:
    kind, text = teaching(r)
    return kind, key_terms(text, question(r))


def _agree(a: tuple[str, frozenset], b: tuple[str, frozenset], answer_cos: float, policy: Policy) -> bool:
    return a[0] == b[0] and answer_cos >= policy.answer_cosine and (a[1] <= b[1] or b[1] <= a[1])


@dataclass
class _People:
    """Union-find over the marks of one person: sessions that share a user name, a session id (one browser
    key) or a client address are one person."""

    parent: dict = field(default_factory=dict)

    def find(self, x):
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def join(self, r: FeedbackRecord) -> None:
        # every imported row has the import's session id: it ties no two people together
        session = r.session_id if r.session_id and r.session_id != IMPORT_SESSION else None
        marks = [f"user:{r.user_name}" if r.user_name else None, f"session:{session}" if session else None,
                 f"client:{r.client}" if r.client else None]
        marks = [m for m in marks if m]
        for m in marks[1:]:
            self.parent[self.find(m)] = self.find(marks[0])

    def of(self, r: FeedbackRecord) -> str:
        return self.find(f"user:{r.user_name}" if r.user_name else f"session:{r.session_id}")


def accountable(r: FeedbackRecord) -> bool:
    """Whether a row can count as one person's voice towards agreement: a signed-in or API-key user, or a
    session whose client address is known. An anonymous session without an address costs nothing to make
    again (a new browser profile, a new gradio_client connection), so any number of them count as nobody;
    an import row's user name is only what the file says. Their feedback reaches everyone only through
    an admin's review (or a trusted import)."""
    if r.session_id == IMPORT_SESSION:
        return False
    return bool(r.user_name or r.client)


def over_rate_limit(records: list[FeedbackRecord], people: _People, per_minute: int) -> set[str]:
    """Rows a person sent beyond `per_minute` in any 60-second window (the app refuses these as they come;
    this catches what reached the store anyway, e.g. one person through many sessions)."""
    if per_minute <= 0:
        return set()
    by_person: dict[str, list[FeedbackRecord]] = {}
    for r in records:
        if not r.trusted and r.session_id != IMPORT_SESSION:  # the operator's imports arrive all at once
            by_person.setdefault(people.of(r), []).append(r)
    over = set()
    for rows in by_person.values():
        rows.sort(key=lambda r: r.created_at)
        start = 0
        for i, r in enumerate(rows):
            while r.created_at - rows[start].created_at >= timedelta(seconds=60):
                start += 1
            if i - start + 1 > per_minute:
                over.add(r.feedback_id)
    return over


def _vectors(embed, texts: list[str]):
    import numpy as np

    if not texts:
        return np.zeros((0, 1), dtype=np.float32)
    return np.asarray(embed(texts), dtype=np.float32).reshape(len(texts), -1)


def _similar_pairs(q, t, rows: list[int], prompt_cosine: float, answer_cosine: float, block: int = 1024):
    """(i, j, answer cosine) for i < j among `rows` whose questions and taught texts are both close: computed
    a block of rows at a time, so memory stays block x n and the Python loop sees only candidate pairs."""
    import numpy as np

    idx = np.asarray(rows, dtype=np.int64)
    if not len(idx):
        return
    qs, ts = q[idx], t[idx]
    for start in range(0, len(idx), block):
        close = (qs[start:start + block] @ qs.T >= prompt_cosine) & (ts[start:start + block] @ ts.T >= answer_cosine)
        for a, b in np.argwhere(close):
            if start + a < b:
                yield int(idx[start + a]), int(idx[b]), float(ts[start + a] @ ts[b])


def _blocked(r: FeedbackRecord, policy: Policy, flagged, over: set[str]) -> str | None:
    """Why a row never trains (scope "none"), or None."""
    if _flagged(r, flagged):
        return "its author is flagged by the admin"
    if not (r.user_name or r.session_id):
        return "from no known session"
    if r.feedback_id in over:
        return f"sent over the rate limit ({policy.rate_limit_per_minute} a minute)"
    return None


def publishable(records: list[FeedbackRecord], reviews: dict[str, str], flagged: set[str] | frozenset,
                rejected: list[tuple[str, str]] = ()) -> list[FeedbackRecord]:
    """The rows a published dataset may carry: none by a flagged author, none an admin rejected, none the same as a
    rejected row (`rejected`: Store.rejected_content). Needs no embeddings."""
    rejected_keys = _rejected_keys(rejected)
    return [r for r in records if not _flagged(r, flagged) and _rejected(r, reviews, rejected_keys) is None]


def teachable_by_author(records: list[FeedbackRecord], policy: Policy,
                        flagged: set[str] | frozenset = frozenset(),
                        reviews: dict[str, str] | None = None,
                        rejected: list[tuple[str, str]] = ()) -> dict[str, list[FeedbackRecord]]:
    """Author (`who`) -> their rows that may train at all (scope shared or personal under `decide`), without
    the embeddings `decide` needs: the learning cycle picks the users who get a personal adapter by it. Rows the
    operator imported count only when they name their user and the operator did not vouch for them
    (`--trusted` rows teach the shared adapter, which everyone, that user too, is served); rows an admin
    rejected, or the same as one (`rejected`: Store.rejected_content), never count."""
    reviews, rejected_keys = reviews or {}, _rejected_keys(rejected)
    people = _People()
    for r in records:
        people.join(r)
    over = over_rate_limit(records, people, policy.rate_limit_per_minute)
    out: dict[str, list[FeedbackRecord]] = {}
    for r in records:
        imported = r.session_id == IMPORT_SESSION
        if _rejected(r, reviews, rejected_keys):
            continue
        if _blocked(r, policy, flagged, over) is None and not (imported and (r.trusted or not r.user_name)):
            out.setdefault(who(r.user_name, r.session_id), []).append(r)
    return out


def decide(records: list[FeedbackRecord], policy: Policy, embed, reviews: dict[str, str] | None = None,
           flagged: set[str] | frozenset = frozenset(), rejected: list[tuple[str, str]] = ()) -> dict[str, Decision]:
    """A Decision per feedback id. `embed(texts)` returns unit vectors; `reviews` maps feedback id to an
    admin's "approved" / "rejected"; `flagged` holds user names and session ids whose rows never train;
    `rejected` the (question, taught text) of every rejection the store keeps (Store.rejected_content), which
    apply when the rejected row is gone too."""
    import numpy as np

    reviews, rejected_keys = reviews or {}, _rejected_keys(rejected)
    people = _People()
    for r in records:
        people.join(r)
    over = over_rate_limit(records, people, policy.rate_limit_per_minute)
    # the questions of rejections whose rows may be gone, embedded with the rows' (one call: one vector space)
    q_all = _vectors(embed, [question(r) for r in records] + [asked for asked, _ in rejected])
    q, q_rejected = q_all[:len(records)], q_all[len(records):]
    t = _vectors(embed, [teaching(r)[1] for r in records])
    closed = [q[i] for i, r in enumerate(records) if reviews.get(r.feedback_id) == "rejected"] + list(q_rejected)
    on_rejected = (q @ np.asarray(closed).T >= policy.prompt_cosine).any(axis=1) if closed and len(records) \
        else [False] * len(records)
    trusted = policy.trusted_users

    def blocked(r: FeedbackRecord) -> str | None:
        return _blocked(r, policy, flagged, over)

    # Who agrees with whom: similar questions, agreeing teaching, both rows allowed to count at all.
    usable = [i for i, r in enumerate(records) if blocked(r) is None]
    agree: dict[int, list[int]] = {i: [i] for i in usable}
    taught = {i: _taught(records[i]) for i in usable}
    for i, j, answer_cos in _similar_pairs(q, t, usable, policy.prompt_cosine, policy.answer_cosine):
        if _agree(taught[i], taught[j], answer_cos, policy):
            agree[i].append(j)
            agree[j].append(i)

    out: dict[str, Decision] = {}
    for i, r in enumerate(records):
        why = blocked(r)
        if why:
            out[r.feedback_id] = Decision("none", why)
            continue
        supporters = len({people.of(records[j]) for j in agree[i] if accountable(records[j])})
        group = records[min(agree[i], key=lambda j: (records[j].created_at, records[j].feedback_id))].feedback_id
        review = reviews.get(r.feedback_id)

        def decision(scope, reason):
            return Decision(scope, reason, group, supporters)

        refused = _rejected(r, reviews, rejected_keys)
        if refused:  # nor its author's personal adapter: an admin judged what it teaches
            out[r.feedback_id] = decision("none", refused)
        elif review == "approved" and "review" in policy.rules:
            out[r.feedback_id] = decision("shared", "approved by an admin")
        elif on_rejected[i]:
            out[r.feedback_id] = decision("personal", "on the question of a row an admin rejected")
        elif policy.mode == "open":
            out[r.feedback_id] = decision("shared", "open install (CHATFB_SHARED_TRUST=open)")
        elif "trusted" in policy.rules and (r.trusted or (r.user_name is not None and r.user_name in trusted
                                                          and r.session_id != IMPORT_SESSION)):
            out[r.feedback_id] = decision("shared", "from a trusted user" if not r.trusted else "a trusted import")
        elif r.private_guideline:
            out[r.feedback_id] = decision("personal", "rated under the user's own guideline")
        elif "agreement" in policy.rules and policy.min_users > 0 and supporters >= policy.min_users:
            out[r.feedback_id] = decision("shared", f"{supporters} distinct users agree")
        else:
            out[r.feedback_id] = decision("personal", f"awaiting agreement ({supporters} of {policy.min_users} users)"
                                          " or an admin's review")
    return out


def pending_review(records: list[FeedbackRecord], decisions: dict[str, Decision],
                   reviews: dict[str, str]) -> dict[str, list[FeedbackRecord]]:
    """The review queue: rows an admin has not decided that stay personal, grouped by what they would teach
    (group leader's feedback id -> rows, the largest groups first). Rows on a rejected row's question are in
    it too: the true answer to a question an attacker's rows closed trains everyone once approved."""
    groups: dict[str, list[FeedbackRecord]] = {}
    for r in records:
        d = decisions.get(r.feedback_id)
        if d is None or d.scope != "personal" or r.feedback_id in reviews:
            continue
        if teaching(r)[0] == "avoid":  # a thumbs-down teaches nothing to approve
            continue
        groups.setdefault(d.group or r.feedback_id, []).append(r)
    return dict(sorted(groups.items(), key=lambda g: (-len(g[1]), g[1][0].created_at)))


def queue_view(records: list[FeedbackRecord], decisions: dict[str, Decision], reviews: dict[str, str]) -> list[dict]:
    """`pending_review` as plain dicts (the CLI, the control API and the admin tab show them): per group what
    it would teach and its rows, each with who gave it and why it waits."""
    out = []
    for leader, rows in pending_review(records, decisions, reviews).items():
        first = next(r for r in rows if r.feedback_id == leader) if any(r.feedback_id == leader for r in rows) else rows[0]
        kind, text = teaching(first)
        out.append({"group": leader, "question": question(first), "teaches": text, "teaching": kind,
                    "users": max(decisions[r.feedback_id].supporters for r in rows),  # distinct people agreeing
                    # who gave the rows (an import's or an anonymous session's rows count as nobody's agreement)
                    "authors": len({who(r.user_name, r.session_id) for r in rows}),
                    "rows": [{"id": r.feedback_id, "author": who(r.user_name, r.session_id),
                              "feedback_kind": provenance_kind(r), "question": question(r), "text": teaching(r)[1],
                              "created_at": r.created_at.isoformat(timespec="seconds"),
                              "reason": decisions[r.feedback_id].reason} for r in rows]})
    return out
