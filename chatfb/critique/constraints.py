"""Candidates that keep the content by construction: what a critique's shape allows without sampling anew.

- A length critique ("Too long.", "at most 25 words"): the plain answer cut at sentence ends
  (`cut_at_sentences`): its facts, shorter.
- A format the critique states literally (a closing or opening phrase in quotes, a line marker such as
  '- ', an e-mail address or URL to give): a regular expression (`format_regex`) that vLLM's structured
  outputs hold the sampler to (chatfb.serving.model_client `complete_choices(regex=...)`), so the reply
  has the shape whatever the model would have written. The cycle trains on it WITHOUT the constraint.

- An opening or closing phrase: also the plain answer framed by it (`framed`): its facts, in the asked
  form. A 135M model held to "Good question!" + anything went on about questions (1 of 5 capitals right,
  3 of 5 without the phrase); framed, the answer is the one it gives anyway. A saved guideline of this
  shape frames every reply (`guideline_frame`) instead of holding the sampler to a regex.

Only a literal, checkable shape gets a regex; a critique with none, two shapes at once, or a negation
("never end with ...") gets None, and today's sampled candidates only.
"""

from __future__ import annotations

import re

from chatfb.critique.content import ADDRESS
from chatfb.critique.ilf import SHORTER

# Where in the reply a quoted phrase goes: the words that say so (English, not any one critique).
CLOSING = frozenset("end ends ending close closes closing sign signed signs finish finishes last".split())
OPENING = frozenset("start starts starting begin begins beginning open opens opening first".split())
NEGATION = frozenset("never not don't dont avoid without stop no".split())
COUNTS = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}

_QUOTED = re.compile(r"(?<![\w])[\"'‘“]([^\"'’”\n]{1,60})[\"'’”](?![\w])")
_MARKER = re.compile(r"\s*[-*•+>#]{1,2}\s*")
_WORD_LIMIT = re.compile(r"\b(?:at most|no more than|under|fewer than|max(?:imum)?(?: of)?)\s+(\d+)\s+words\b", re.I)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
LINE = r"[^\n]"  # any character of a line; the regexes stay in the subset every structured-output backend reads


def word_limit(critique: str) -> int | None:
    """The word limit a critique states ("at most 25 words"), or None."""
    m = _WORD_LIMIT.search(critique or "")
    return int(m.group(1)) if m else None


def asks_for_shorter(critique: str) -> bool:
    return bool(SHORTER.search(critique or "")) or word_limit(critique) is not None


def cut_at_sentences(text: str, max_words: int | None = None, most: int = 2) -> list[str]:
    """The first one, two ... (up to `most`) sentences of `text`, each shorter than it and within
    `max_words`: the plain answer's own facts in fewer words. Only the first paragraph is cut (a list or a
    second paragraph is a different thing)."""
    first = (text or "").strip().split("\n")[0].strip()
    sentences = [s for s in _SENTENCE_END.split(first) if s.strip()]
    out = []
    for k in range(1, min(most, len(sentences)) + 1):
        cut = " ".join(sentences[:k]).strip()
        short_enough = max_words is None or len(cut.split()) <= max_words
        if cut and cut[-1] in ".!?" and len(cut) < len(text.strip()) and short_enough:
            out.append(cut)
    return out


def cut_candidates(critique: str, plain: str | None) -> list[str]:
    """The plain answer cut at sentence ends, where the critique asks for shorter; else nothing."""
    if not plain or not asks_for_shorter(critique):
        return []
    return cut_at_sentences(plain, word_limit(critique))


def shape(critique: str) -> tuple[str, str] | None:
    """The one literal shape the critique states, as (kind, literal): kind "address" (an e-mail address or
    URL to give), "marker" (a line marker), "opening" or "closing" (a phrase); None (see the module doc)."""
    words = set(re.findall(r"[a-z']+", (critique or "").lower()))
    if words & NEGATION:
        return None
    quoted = [q for q in _QUOTED.findall(critique) if not ADDRESS.search(q)]
    addresses = ADDRESS.findall(critique)
    if len(quoted) + (1 if addresses else 0) != 1:
        return None
    if addresses:
        return "address", addresses[0].rstrip(".,;:!?)")
    literal = quoted[0]
    if _MARKER.fullmatch(literal):
        return "marker", literal
    if words & CLOSING and not words & OPENING:
        return "closing", literal.strip()
    if words & OPENING and not words & CLOSING:
        return "opening", literal.strip()
    return None


def format_regex(critique: str) -> str | None:
    """A regular expression for the one literal shape the critique states, or None (see the module doc)."""
    found = shape(critique)
    if found is None:
        return None
    kind, literal = found
    if kind == "address":
        return f"{LINE}{{0,300}}{escape(literal)}{LINE}{{0,300}}"
    body = f"{LINE}{{1,300}}(\\n{LINE}{{0,300}}){{0,8}}"
    if kind == "marker":
        marker = literal if literal.endswith(" ") else literal.strip() + " "
        count = next((COUNTS[w] for w in re.findall(r"[a-z]+", critique.lower()) if w in COUNTS), None)
        count = next((int(d) for d in re.findall(r"\b\d+\b", critique)), count)
        item = f"{escape(marker)}{LINE}{{2,150}}"
        repeat = f"{{{count - 1}}}" if count and count > 1 else "{2,4}"
        return f"({item}\\n){repeat}{item}"
    if kind == "closing":
        return f"{body}\\n\\n{escape(literal)}"
    return f"{escape(literal)}{body}"


def phrase_frame(critique: str) -> tuple[str, str] | None:
    """(opening, closing) where the critique's one literal shape is a phrase to begin or end with (the
    other one ""); None for any other shape or none, or a blank phrase."""
    found = shape(critique)
    if found is None or found[0] not in ("opening", "closing") or not _core(found[1]):
        return None
    kind, literal = found
    return (literal, "") if kind == "opening" else ("", literal)


_DECOR = "\"'*_`“”‘’ \t\n"  # quotes, emphasis and spaces around a phrase the model writes itself
_PUNCT = "!.?,:;…"


def _core(phrase: str) -> str:
    """A phrase as the model might write it itself: any case, quoted or in bold, its end punctuation changed."""
    return phrase.strip(_DECOR).rstrip(_PUNCT).strip(_DECOR).lower()


def _without_leading(body: str, phrase: str) -> str | None:
    """`body` after a copy of `phrase` it begins with (see _core), or None when it begins with none."""
    core, b = _core(phrase), body.lstrip(_DECOR)
    if not core or not b.lower().startswith(core) or b[len(core):len(core) + 1].isalnum():
        return None
    return b[len(core):].lstrip(_PUNCT).lstrip(_DECOR)


def _without_trailing(body: str, phrase: str) -> str | None:
    """`body` before a copy of `phrase` it ends with (see _core), or None when it ends with none."""
    core, b = _core(phrase), body.rstrip(_DECOR + _PUNCT)
    if not core or not b.lower().endswith(core) or b[:len(b) - len(core)][-1:].isalnum():
        return None
    return b[:len(b) - len(core)].rstrip(_DECOR)


def framed(text: str, opening: str, closing: str, done: bool = True) -> str:
    """`text` (a plain answer, or the part of it streamed so far: `done` False) begun with `opening` and, once
    done, ended with `closing`, each exactly once and as written in the guideline: a copy the model wrote
    itself (any case, quoted, in bold) is replaced by it. While the text streamed so far could still be the
    model writing the opening, the opening alone shows, so nothing shown is taken back."""
    body = text.strip() if done else text.lstrip()
    if opening:
        rest = _without_leading(body, opening)
        if rest is None and not done and _core(opening).startswith(body.lstrip(_DECOR).lower()):
            rest = ""  # it may be writing the phrase: shown once, whatever comes
        body = f"{opening} {body if rest is None else rest}".rstrip()
    if closing and done and body.strip() and body.strip() != opening:
        rest = _without_trailing(body, closing)
        body = (body if rest is None else rest).rstrip()
        body = f"{body}\n\n{closing}" if body else closing
    return body


class PlainAnswer(str):
    """An answer's text that knows whether it was cut off: the token limit (chatfb.critique.candidates.plain_answer,
    a stored reply's finish reason) or the user's Stop. `framed_candidates` frames only its whole sentences."""

    cut_off: bool = False

    @classmethod
    def of(cls, text: str, cut_off: bool) -> "PlainAnswer":
        out = cls(text)
        out.cut_off = cut_off
        return out


_LAST_SENTENCE_END = re.compile(r"[.!?][\"'’”)\]]*(?=\s|$)")
_LIST_NUMBER = re.compile(r"\s*\d{1,3}")


def whole_sentences(text: str) -> str:
    """`text` up to the end of its last complete sentence ("" when it has none): what a reply the token limit cut
    off in mid-sentence said in full."""
    text = text or ""
    ends = [m for m in _LAST_SENTENCE_END.finditer(text)
            if not _LIST_NUMBER.fullmatch(text[text.rfind("\n", 0, m.start()) + 1:m.start()])]  # "2." opens a line
    return text[:ends[-1].end()].rstrip() if ends else ""


def framed_candidates(critique: str, text: str | None) -> list[str]:
    """`text` framed by the critique's opening or closing phrase (its facts, in the asked form); else nothing.
    A plain answer the token limit cut off is framed up to its last complete sentence: framed whole, the asked
    closing phrase followed half a word ("I am always ready t\n\nCheers, the chatfb team" was kept and trained)."""
    frame = phrase_frame(critique)
    if getattr(text, "cut_off", False):
        text = whole_sentences(text)
    if not frame or not (text or "").strip():
        return []
    out = framed(text.strip(), *frame)
    return [out] if out != text.strip() else []


def adds_the_shape(critique: str, text: str, original: str) -> bool:
    """`text` has the literal shape the critique asks for and `original` has not: however alike the two are,
    `text` is the change asked for (the critiqued reply framed by its phrase, say), not the same reply again.
    A phrase or an address is looked for as such (a reply of any length); a line marker by its regex."""
    found = shape(critique)
    if found is None:
        return False
    kind, literal = found
    text, original = (text or "").strip(), (original or "").strip()
    if kind == "opening":
        return _without_leading(text, literal) is not None and _without_leading(original, literal) is None
    if kind == "closing":
        return _without_trailing(text, literal) is not None and _without_trailing(original, literal) is None
    if kind == "address":
        return literal.lower() in text.lower() and literal.lower() not in original.lower()
    regex = format_regex(critique)
    return bool(regex and re.fullmatch(regex, text) and not re.fullmatch(regex, original))


def shaped_guideline(texts: list[str]) -> str | None:
    """The one guideline that states a literal, checkable shape (`format_regex`), or None when none does, or
    several do (two shapes are not composed)."""
    shaped = [t for t in dict.fromkeys(texts) if format_regex(t)]
    return shaped[0] if len(shaped) == 1 else None


def guideline_frame(texts: list[str]) -> tuple[str, str] | None:
    """The frame every reply gets under these guidelines: where their shaped guideline asks for an opening
    or closing phrase; None otherwise."""
    rule = shaped_guideline(texts)
    return phrase_frame(rule) if rule else None


def guideline_regex(texts: list[str]) -> str | None:
    """The regex every reply is held to under these guidelines: the shape of their shaped guideline
    (`shaped_guideline`), or None. An address may sit anywhere in a reply of several lines (a critique's
    regex asks for one line with it: a revision of one reply, not every reply from now on)."""
    rule = shaped_guideline(texts)
    if rule is None:
        return None
    kind, literal = shape(rule)
    if kind == "address":
        lines = f"({LINE}{{0,300}}\\n){{0,8}}"
        return f"{lines}{LINE}{{0,300}}{escape(literal)}{LINE}{{0,300}}(\\n{LINE}{{0,300}}){{0,8}}"
    return format_regex(rule)


def escape(text: str) -> str:
    """`text` as a regex literal, escaping only the characters every regex dialect treats as special."""
    return re.sub(r"([\\.^$*+?{}\[\]|()])", r"\\\1", text)
