"""The content check of a critique candidate: does it still say what the model's plain answer said?

A candidate can follow a critique's format and be wrong ("What is democracy?" -> "Theocracy.", issue 23).
The references are the model's own answers without the critique: the critiqued reply, and where the
caller has it the base model's plain answer to the same prompt. `content_verdict` drops a candidate that

- only restates the question's topic ("Climate change."): every content word it has is in the question;
- talks about replies (their format, the user, the instruction) where neither the question nor the
  plain answer does;
- quotes the critique's own words instead of using them ('The answer is "too long."');
- copies the critique's own wording: its opening verdict ("Wrong:", "Too long.") or a clause of it
  ("Always tell people to ... at <address>"); a literal it asks for, and the words that introduce it,
  may be copied (`copies_the_critique`);
- loses the plain answer's facts: a number the references agree on (one reference: the candidate gives
  no number where the plain answer's answering sentence gives one; two that give numbers but none they
  agree on: a number of its own, which neither gave; numbers by value, "forty-two" is 42), a name in that sentence, or
  every content word of the plain answer (unless its sentence embedding stays close to it: synonyms);
- drifts off the subject: its embedding is much further from the question AND from the plain answer
  than the plain answer is from the question.
- does not answer a question whose answer is a number: arithmetic the question states ("What is seventeen
  times three?", "the sum of 12 and 30") is worked out, and a candidate that does not give the result is
  dropped whatever the plain answers said; a question that asks for a count, an age, a year or a share
  ("How many ...?", "In what year ...?") needs a number beyond the question's own.

The nightly also asks the numbers a candidate answers with to be confirmed by another independent answer of
the model (chatfb.critique.candidates.unconfirmed_numbers: self-consistency; wrong sums scatter, right ones repeat),
except where the question's arithmetic is worked out: the result decides there.

For the scorer (chatfb.critique.candidates.score): `agreement`, how much of the plain answer's answering
sentence a candidate says too (a ranking term), and `within_the_plain_answer`, a candidate that says nothing
the plain answer did not (however unlikely a one-word answer is, it is not nonsense).

A critique that states new content (it corrects a fact, or gives an address to use) may replace the
plain answer's facts and move away from its subject: then only the question's topic checks apply. A fact
the critique names is never required (it may be the one it calls wrong). Words, not phrases: nothing here was written for one critique.
"""

from __future__ import annotations

import math
import operator
import re
from functools import lru_cache

from chatfb.critique.similarity import cosines

# General English function words (and yes/no, which answer nothing on their own): what is left of a
# text without them is its content. A fixed list because what makes a word a function word is English,
# not any critique.
STOPWORDS = frozenset("""
a about above after again against all also am an and any are as at be because been before being below
between both but by can could did do does doing done down during each either else even ever every few
for from further get gets got had has have having he her here hers herself him himself his how however i
if in into is it its itself just let like made make makes many may me might more most much must my
myself no nor not now of off often on once one only or other our ours ourselves out over own per please
quite rather really said same say says see she should so some such sure than that the their theirs them
themselves then there these they this those though through to too under until up upon us use used very
was way we well were what when where whether which while who whom whose why will with within without
would yes yet you your yours yourself yourselves
""".split())

# Nouns for a reply and what is said about it: a candidate that uses them where the question and the
# plain answer do not is writing about the reply (its format, the feedback), not answering. Left out on
# purpose, as ordinary words of answers: "answer" ("The answer is 19."), "instructions" (a recipe's),
# "reply"/"respond" ("we will reply within a day") and "user" ("Dear user,").
META_WORDS = frozenset("""
response responses format formats formatted formatting critique critiques feedback
""".split())

NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
NUMBER_WORDS.update({"thirty": "30", "forty": "40", "fifty": "50", "sixty": "60", "seventy": "70", "eighty": "80",
                     "ninety": "90", "hundred": "100", "thousand": "1000"})

# A candidate whose embedding is this much further from the question than the plain answer is, and
# under OFF_ANSWER_COSINE to the plain answer, has left the subject. Measured on SmolLM2-135M's plain
# answers (issue 23's questions): the dropped examples sat 0.3-0.6 below the plain answer and 0.05-0.3
# from it; right short answers 0.0-0.3 below and 0.36-0.9 from it (an address given as the answer is
# the lowest, 0.45 below, 0.46 from it).
TOPIC_DROP = 0.3
OFF_ANSWER_COSINE = 0.35
# Synonyms: a candidate that shares no content word with the plain answer is still the same answer
# when its embedding is this close to it ("government by the people" for "the will of the people").
SAME_ANSWER_COSINE = 0.7
# A first sentence this short is the answer itself ("The capital of Japan is Tokyo."): its names are
# the answer. A longer one explains, and names in it ("... the surface of the Earth") are incidental.
DIRECT_ANSWER_WORDS = 15

# A candidate that copies this many content words of the critique's own wording (`copies_the_critique`)
# is talking about the critique. Three: two content words copied are a phrase an answer may share
# ("three short tips" from a critique asking for them); three in runs are a clause of the critique
# ("always tell people to ...", "format it as a bulleted list").
COPIED_WORDS = 3
# ... or two, where they are this share of the critique's own content words: "tell people" of "Wrong: always
# tell people to email ..." (its other words introduce the address), "a child would understand" of "Please
# answer in plain words a child would understand." (SmolLM2-135M's "A child would understand that it rains."
# to "What causes rain?" had the best score of five: a log-ratio of 3.5 nats, from the copied words).
COPIED_SHARE = 0.4
# The words right before a literal the critique asks for are how an answer gives it ("email our support
# team at <address>", "write to <address>"): this many of them, in the literal's clause, may be copied.
LEAD_IN_WORDS = 5
# A critique that opens with a clause this short ("Wrong:", "Too long.", "Way too long.") opens with its
# verdict on the reply; an answer never says it.
VERDICT_WORDS = 3

_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")
_CAPITALISED = re.compile(r"\b[A-Z][A-Za-z'’-]*[A-Za-z]")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_QUOTED = re.compile(r"[\"“‘]([^\"”’\n]{2,80})[\"”’]|(?<!\w)'([^'\n]{2,80})'(?!\w)")
# What an e-mail address and a URL are, for every check that reads them (the selection, the in-loop and
# nightly constraints, the gate's exact values, the export's redaction): one definition.
EMAIL = r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+"
URL = r"https?://[^\s'\"<>]+"
ADDRESS = re.compile(f"{EMAIL}|{URL}")
_CLAUSE_BREAK = re.compile(r"[.,;:!?()\"“”‘’\n]+|'(?!\w)|(?<!\w)'")


def restates_the_question(text: str, question: str) -> bool:
    """Every content word of `text` is in the question ("Climate change.", "Yes. Inflation."): a topic, no answer."""
    said = content_words(text)
    return bool(said) and said <= content_words(question)


def says_nothing_new(text: str, question: str, critique: str, references: list[str] | tuple = ()) -> bool:
    """`text` says the question again, word for word, and nothing but the question's and the critique's wording
    besides (no name or number the critique gives, `given_content`): the request said back, no answer ("Question:
    What is photosynthesis?\n\nPlease answer this question:" was kept for "After you answer, always ask me a
    question back"). The question itself must be there, and a word the plain answers in `references` use is the
    answer's, whoever else uses it: an answer may well use the critique's words ("What is a noun? A noun is a
    word." for "Answer in one sentence of at most 25 words.")."""
    asked, words = " ".join(_words(question)), " ".join(_words(text))
    if not asked or f" {asked} " not in f" {words} ":
        return False
    said = content_words(text)
    answers = set().union(*(content_words(r) for r in references if r))
    request = content_words(question) | (content_words(critique) - answers)
    return bool(said) and not said - request and not said & given_content(critique)


def talks_about_replies(text: str, context: str = "") -> str | None:
    """A word for replies (META_WORDS) that `text` uses and `context` (the question, the plain answers)
    does not, or None."""
    allowed = content_words(context)
    return next((w for w in _words(text) if w in META_WORDS and _stem(w) not in allowed), None)


def copies_the_critique(text: str, critique: str, context: str = "", literals: list[str] | tuple = ()) -> str | None:
    """The critique's wording that `text` copies, where it is a sizeable part of it, else None: the text
    is talking about the critique, not answering ("Wrong: always tell people to email ...", "You should
    tell people to ...", 'The answer is "too long."'). Two ways, both overlap alone:

    - its opening verdict ("Wrong:", "Too long.", "Way too long.": a clause of at most VERDICT_WORDS words
      before the critique's first full stop or colon) said again as a verdict, closed by a full stop, colon
      or exclamation mark;
    - COPIED_WORDS content words of the critique's own wording (or two, where that is COPIED_SHARE of it), in
      runs of two words or more it shares with the critique.

    Not the critique's own wording: what `context` (the question, the plain answers) says too, the literal
    strings the critique asks for (`literals`, and any address or URL in it), the LEAD_IN_WORDS words
    that introduce one in its clause ("email our support team at <address>": how an answer gives it too),
    and the names and numbers it states (content it gives: "We are open 9 to 5, Monday to Friday.")."""
    verdict = _verdict(critique, context)
    if verdict:
        m = verdict.search(text)
        if m:
            return m.group().strip()
    literals = [f for f in (*literals, *ADDRESS.findall(critique)) if f.strip()]
    own = _own_wording(critique, literals)
    longest_clause = max(map(len, own), default=0)  # no run is longer: bounds the work on a long text
    grams = {tuple(seg[i:j]) for seg in _clauses(text, literals) for i in range(len(seg))
             for j in range(i + 2, min(len(seg), i + longest_clause) + 1)}
    said = f" {' '.join(_words(context))} "
    allowed = content_words(context)
    in_runs, longest = set(), ""
    for n, clause in enumerate(own):
        words = [w for w, _ in clause]
        for i in range(len(words) - 1):
            j = next((j for j in range(len(words), i + 1, -1) if tuple(words[i:j]) in grams), None)
            phrase = " ".join(words[i:j]) if j else ""
            if not phrase or f" {phrase} " in said:
                continue
            in_runs.update((n, k) for k in range(i, j))
            longest = max(longest, phrase, key=len)

    def counts(n: int, k: int) -> bool:
        word, countable = own[n][k]
        return countable and word not in STOPWORDS and _stem(NUMBER_WORDS.get(word, word)) not in allowed

    copied = sum(counts(n, k) for n, k in in_runs)
    owned = sum(counts(n, k) for n, clause in enumerate(own) for k in range(len(clause)))
    sizeable = copied >= COPIED_WORDS or (copied >= 2 and copied >= COPIED_SHARE * owned)
    return longest if sizeable else None


def given_content(critique: str) -> set[str]:
    """Stems of the names and numbers a critique states: content it gives ("open 9 to 5, Monday to Friday",
    "the capital of Australia is Canberra"), not its wording."""
    # numbers by value ("forty-two": 42) and word by word ("forty", "two"): the word-level checks see the words
    return _names(critique) | _numbers(critique) | {NUMBER_WORDS[w] for w in _words(critique) if w in NUMBER_WORDS}


def repeats_only_given_content(text: str, critique: str, context: str = "") -> bool:
    """Every content word `text` shares with the critique is one the context (the question, the plain answers)
    uses too, or a name or number the critique gives: "The capital of Australia is Canberra." says the fact
    of "Wrong: the capital of Australia is Canberra, not Sydney." in the question's words, and repeats
    nothing of the critique's own wording however much of the critique it is."""
    shared = content_words(text) & content_words(critique)
    return not shared - content_words(context) - given_content(critique)


def _verdict(critique: str, context: str) -> re.Pattern | None:
    """The critique's opening verdict as a pattern ("Wrong:" -> r"wrong\s*:"), where it is a short clause
    with a content word the context does not use, and more of the critique follows it (a critique that is
    one short clause, "Paris!", may be the answer itself); else None."""
    m = re.match(r"\s*([^.:!?\n]+)([.:!?])", critique or "")
    words = _words(m.group(1)) if m else []
    if not words or len(words) > VERDICT_WORDS or not content_words(m.group(1)) - content_words(context) \
            or not _words(critique[m.end():]):
        return None
    return re.compile(r"(?<![\w])" + r"\W+".join(map(re.escape, words)) + r"\s*[.:!]", re.I)


def _clauses(text: str, literals: list[str]) -> list[list[str]]:
    """The words of `text` by clause: split at punctuation and at the literal strings, which are left out."""
    for literal in sorted(literals, key=len, reverse=True):
        text = re.sub(re.escape(literal), "\n", text, flags=re.I)
    return [w for w in (_words(c) for c in _CLAUSE_BREAK.split(text)) if w]


def _own_wording(critique: str, literals: list[str]) -> list[list[tuple[str, bool]]]:
    """The critique's clauses as (word, counts) pairs: counts is False for the names and numbers it states
    (content it gives, as in `_lost_fact`) and for the LEAD_IN_WORDS words of the clause that introduces a
    literal (the words right before it)."""
    pattern = "|".join(re.escape(f) for f in sorted(literals, key=len, reverse=True))
    pieces = re.split(pattern, critique, flags=re.I) if pattern else [critique]
    facts = given_content(critique)
    out = []
    for k, piece in enumerate(pieces):
        if k < len(pieces) - 1:  # a literal follows this piece: its last clause introduces it
            piece = piece.rstrip(" \t\"'‘“")
        clauses = [_words(c) for c in _CLAUSE_BREAK.split(piece)]
        lead = clauses.pop() if k < len(pieces) - 1 else []
        out += [[(w, _stem(w) not in facts and NUMBER_WORDS.get(w, w) not in facts) for w in c] for c in clauses if c]
        if lead:
            out.append([(w, i < len(lead) - LEAD_IN_WORDS and _stem(w) not in facts) for i, w in enumerate(lead)])
    return out


def quotes_the_critique(text: str, critique: str) -> str | None:
    """A quoted span of `text` made of the critique's own words, or a string the critique quotes
    ("'- '"), quoted again instead of used; an address is used, not quoted. None when there is none."""
    critique_words = set(_words(critique))
    critique_quotes = {q for m in _QUOTED.finditer(critique) for q in (m.group(1) or m.group(2),)}
    for m in _QUOTED.finditer(text):
        span = m.group(1) or m.group(2)
        if ADDRESS.search(span):
            continue
        words = _words(span)
        if span in critique_quotes or span.strip() in {q.strip() for q in critique_quotes} \
                or (words and all(w in critique_words for w in words)):
            return span.strip() or span
    return None


def content_verdict(text: str, question: str, critique: str, references: list[str], corrects: bool = False,
                    uncritiqued: bool = False) -> str:
    """'ok', or why `text` loses what the plain answers in `references` got right: a fact of their first
    sentence, all of their content, or the subject (see the module doc). `corrects`: the critique
    states new content (a corrected fact), so the references' facts may go. `uncritiqued`: one of the
    references is the model's own answer to this prompt that nobody critiqued (the nightly's greedy answer),
    so a number of the candidate's own that none of them gives is dropped even with that one reference."""
    # a critique that corrects the fact here states the answer itself: it decides, not the arithmetic as read
    unanswered = None if corrects else number_unanswered(text, question)
    if unanswered:
        return unanswered
    references = [r for r in references if r and r.strip()]
    if not references:
        return "ok"
    corrects = corrects or states_new_content(critique)
    if not corrects:
        lost = _lost_fact(text, question, critique, references, uncritiqued, arithmetic(question) is not None)
        if lost:
            return lost
    named = content_words(critique) | content_words(question)
    new = {w for w in content_words(text) - named if not w.isdigit()}  # numbers: judged by _lost_fact
    ref_words = {w for w in set().union(*(content_words(r) for r in references)) - named if not w.isdigit()}
    cos_question = cosines(question, [text, *references])
    cos_refs = cosines(text, references)
    # a critique that states new content moves the answer away from the plain one by design, and a plain answer
    # that restates the question ("To reach customer service, you can use the following methods:", cosine 0.86)
    # set a bar that "Please email our support team at <address>." (0.28) failed: the subject is then the
    # question's alone (the scorer's OFF_TOPIC_COSINE)
    if not corrects and cos_question[0] < max(cos_question[1:]) - TOPIC_DROP and max(cos_refs) < OFF_ANSWER_COSINE:
        return "off the subject of the question and of the plain answer"
    if not corrects and new and ref_words and not new & ref_words and max(cos_refs) < SAME_ANSWER_COSINE:
        return "keeps none of the plain answer's content"
    return "ok"


def agreement(texts: list[str], question: str, critique: str, references: list[str]) -> list[float]:
    """How much of what the plain answers say each of `texts` says too: the share of the content words of a
    plain answer's answering sentence (`_answer_sentence`; those of the question and the critique set aside)
    that it uses, the best over `references`. 0.0 where no reference has such words."""
    named = content_words(question) | content_words(critique)
    leads = [content_words(_answer_sentence(r, question)) - named for r in references if r and r.strip()]
    leads = [lead for lead in leads if lead]
    return [max((len(lead & content_words(t)) / len(lead) for lead in leads), default=0.0) for t in texts]


def about_its_subject(question: str, critique: str) -> bool:
    """The question names something the critique names (a capitalised word, by stem: "Australian" and
    "Australia" alike), or one of them names nothing. A critique that corrects a fact ("Wrong: the capital of Australia is Canberra") may
    replace the plain answer's facts only there: distilled onto "What is the capital of Peru?" it has no fact
    of Peru's to give, and a candidate that loses "Lima" lost the answer (one said "The capital of Australia
    is Canberra" and was trained)."""
    def names(text):
        return {_stem(w.lower()) for w in _CAPITALISED.findall(text or "") if w.lower() not in STOPWORDS}

    asked, named = names(question), names(critique)
    if not asked or not named:  # "What is 12 plus 7?", a lower-case question: nothing says it is another subject
        return True
    return any(a == n or (min(len(a), len(n)) >= 4 and (a.startswith(n) or n.startswith(a))) for a in asked for n in named)


def states_new_content(critique: str) -> bool:
    """The critique gives content to use (an address or URL): the plain answer's facts and subject may go."""
    return bool(ADDRESS.search(critique or ""))


def within_the_plain_answer(text: str, question: str, references: list[str]) -> bool:
    """Every content word of `text` is one the question or the plain answers use ("Paris" for "The capital of
    France is Paris."): it says nothing they did not, however unlikely its shortness is to the model."""
    said = content_words(text)
    return bool(said) and said <= content_words(question).union(*(content_words(r) for r in references if r))


def _lost_fact(text: str, question: str, critique: str, references: list[str], uncritiqued: bool = False,
               worked_out: bool = False) -> str | None:
    """The number or name of the plain answer's first sentence the candidate lost, said as a verdict.
    `worked_out`: the question's arithmetic decided the number (`number_unanswered`); the plain answers' do not."""
    skip_numbers = _numbers(question) | _numbers(critique)
    leads = [_answer_sentence(r, question) for r in references]
    per_ref = [_numbers(lead) - skip_numbers for lead in leads]
    have = _numbers(text)
    if all(per_ref) and not worked_out:
        agreed = set.intersection(*per_ref)
        missing = sorted(agreed - have) if len(per_ref) > 1 else []
        if missing:
            return f"loses the number {missing[0]} the plain answers agree on"
        # one plain answer: its number counts. Two that give numbers but agree on none ("149.7 million square
        # kilometres" and "319.78 million km²" for the largest ocean): no number is what the model knows there,
        # and a candidate that gives none ("The largest ocean on Earth is the Pacific Ocean.") lost nothing
        if len(per_ref) == 1 and not have - _numbers(question):
            return "gives no number where the plain answer gives one"
        # a number of its own where the plain answers give one: an answer none of them gave ("FIFTY + 25 =
        # 500", "7 + 8 = 55"), not the same answer in another form. Where two plain answers, or the model's
        # own uncritiqued answer, say so (the nightly's: nothing checks that number and it would train); a
        # revision offered in the loop (one plain answer: the reply the user may have called wrong in words no
        # check reads) is the user's to accept or not
        given, said = have - skip_numbers, set().union(*per_ref)
        if (len(per_ref) > 1 or uncritiqued) and given and not given & said:
            return f"gives {first_number(given)} where the plain answer gives {first_number(said)}"
    skip_names = content_words(question) | content_words(critique)
    names = [_names(lead) - skip_names for lead in leads]
    if len(references) > 1:  # the names the plain answers agree on (none agreed: nothing required)
        wanted = set.intersection(*names)
    else:  # one plain answer: its names count where its first sentence is the answer itself, not an explanation
        wanted = names[0] if len(_words(leads[0])) <= DIRECT_ANSWER_WORDS else set()
    if wanted and not wanted & {_stem(w) for w in _words(text)}:
        return f"loses {sorted(wanted)[0].capitalize()!r} from the plain answer"
    return None


def number_unanswered(text: str, question: str) -> str | None:
    """Why `text` fails a question whose answer is a number, or None: the question's arithmetic worked out
    (`arithmetic`) and not given, or a count, age, year or share asked for (`asks_for_a_number`) and none given
    beyond the question's own (a quantity word counts: "one moon", "no legs", "millions"). Any wording of the
    question and the answer: numbers are read by value. Never raises on any text."""
    worked = arithmetic(question)
    if worked is not None:
        said, value = worked
        if not any(_same_value(n, value) for n in _numbers(text)):
            own = _numbers(text) - _numbers(question)
            return (f"gives {first_number(own)} where {said} is {_shown(value)}" if own else
                    f"does not give {said}, which is {_shown(value)}")
        return None
    if asks_for_a_number(question) and not _numbers(text) - _numbers(question) \
            and not set(_words(text)) & _QUANTITY_WORDS:
        return "gives no number where the question asks for one"
    return None


# A count, an age, a year, a share, or a measure asked of a thing ("how tall is", "what temperature", "what is the
# boiling point"); not "how long should I rest?" or "when should I water it?", whose answers need no number
_ASKS_NUMBER = re.compile(
    r"\bhow (?:many|old)\b(?!-)|\bhow (?:tall|high|deep|far|heavy|wide|long|fast|hot|cold) (?:is|are|was|were)\b"
    r"|\bhow much (?:does|do|did) [^?]{1,60}\b(?:cost|weigh)\b|\b(?:what|which) (?:year|percentage|temperature)\b"
    r"|\bwhat percent\b|\bwhat is the (?:population|distance|speed|height|depth|weight|boiling point|freezing point"
    r"|melting point)\b", re.I)
# an answer to "how many" in words that no number reader counts: "one" alone (read as a pronoun elsewhere), none
_QUANTITY_WORDS = frozenset("one no none zero single once twice half dozen dozens several few many hundreds "
                            "thousands millions billions".split())


def asks_for_a_number(question: str) -> bool:
    """The question asks for a count, an age, a year, a share or a measure of a thing: its answer is a number."""
    return bool(_ASKS_NUMBER.search(question or ""))


_BINARY = {"plus": "+", "+": "+", "minus": "-", "-": "-", "times": "*", "x": "*", "×": "*", "*": "*",
           "/": "/", "÷": "/", "multiplied": "*", "divided": "/"}
_SIGNS = frozenset("+-x×*/÷")  # operators written as signs: arithmetic only where the question ends there
_OF_TWO = {"sum": "+", "total": "+", "product": "*", "difference": "-", "quotient": "/"}
# words beside a matched operation that make it part of a longer or other sum ("5 squared minus 1", "the sum of
# 2 and 3 and 4", "2 to the power of 10 minus 1") or a comparison ("is 9 squared more than 80?"): not worked out
_AROUND = frozenset([*_BINARY, *_OF_TWO, "squared", "cubed", "power", "root", "and", "of", "by", "half", "twice",
                     "double", "triple", "%", "percent", "more", "less", "greater", "smaller", "bigger", "than",
                     "equal", "equals", "negative"])


def arithmetic(question: str) -> tuple[str, float] | None:
    """(the arithmetic as the question states it, its value) where the question states exactly one
    operation on two numbers, in words or symbols ("What is seventeen times three?", "Add 12 and 30",
    "the product of 6 and 7", "15% of 80", "9 squared", "What is 12 / 4?"), else None: no operation, several,
    one inside a longer calculation or a comparison, a sign not ending the question ("What is 1920 x 1080
    called?"), a negative operand or result. Numbers by value, spelled or in digits."""
    tokens = _arith_tokens(question or "")
    found = []
    for i in range(len(tokens)):
        window = tokens[i:i + 5]
        kinds = "".join(k for k, _ in window)
        words = [v for _, v in window]
        op = a = b = None
        size = 0
        if kinds[:3] == "nwn" and words[1] in _BINARY:
            op, a, b, size = _BINARY[words[1]], words[0], words[2], 3
            if words[1] in _SIGNS and (i + 3 < len(tokens) and tokens[i + 3][1] not in ("?", "=")):
                continue  # "1920 x 1080 called", "chapters 3 - 5 summarised": not a sum asked
        elif kinds[:4] == "nwwn" and words[1] in ("multiplied", "divided") and words[2] == "by":
            op, a, b, size = _BINARY[words[1]], words[0], words[3], 4
        elif kinds[:5] == "wwnwn" and words[0] in _OF_TWO and words[1] == "of" and words[3] == "and":
            op, a, b, size = _OF_TWO[words[0]], words[2], words[4], 5
        elif kinds[:4] == "wnwn" and words[0] == "add" and words[2] in ("and", "to"):
            op, a, b, size = "+", words[1], words[3], 4
        elif kinds[:4] == "wnwn" and words[0] == "subtract" and words[2] == "from":
            op, a, b, size = "-", words[3], words[1], 4
        elif kinds[:4] == "nwwn" and words[1] in ("%", "percent") and words[2] == "of":
            op, a, b, size = "%", words[0], words[3], 4
        elif kinds[:2] == "nw" and words[1] in ("squared", "cubed"):
            op, a, b, size = "^", words[0], 2.0 if words[1] == "squared" else 3.0, 2
        if op is None:
            continue
        before = tokens[i - 1][1] if i else None
        after = tokens[i + size][1] if i + size < len(tokens) else None
        if before in _AROUND or before == "-" or after in _AROUND:
            return None  # part of a longer calculation, a comparison or a negative number: not worked out here
        found.append((op, a, b))
    if len(found) != 1:
        return None
    op, a, b = found[0]
    apply, said = _OPERATIONS[op]
    try:
        value = apply(a, b)
    except (ArithmeticError, ValueError):  # division by zero, an overflow
        return None
    if not math.isfinite(value) or value < 0 or abs(value) >= 1e15:
        return None
    return said.format(_shown(a), _shown(b)), value


# each operation: how it is worked out, and how a verdict writes it
_OPERATIONS = {"+": (operator.add, "{} + {}"), "-": (operator.sub, "{} - {}"), "*": (operator.mul, "{} × {}"),
               "/": (operator.truediv, "{} / {}"), "%": (lambda a, b: a * b / 100, "{}% of {}"), "^": (operator.pow, "{}^{}")}


def _arith_tokens(text: str) -> list[tuple[str, object]]:
    """("n", value) for each number (digits, or a run of number words: "seventy five" is 75, "one" is 1
    here) and ("w", word) for every other word, operator sign, "?" and "=", in order."""
    out: list[tuple[str, object]] = []
    run: list[str] = []

    def flush():
        if run:
            values = _spelled_numbers(run) if run != ["one"] else {"1"}
            if len(values) == 1:
                out.append(("n", float(next(iter(values)))))
            else:  # several numbers in one run of words: nothing to read as one operand
                out.extend(("w", w) for w in run)
            run.clear()

    # a dash, slash or x between digits with no space is a range, a date or a name ("8-10 minutes", "9/11",
    # "a 4x4"), not arithmetic
    text = re.sub(r"(?<=\d)[-/x×](?=\d)", " ~ ", text.lower())
    text = re.sub(r"(?<=[a-z])-(?=[a-z])", " ", text)  # "twenty-five"
    for tok in re.findall(r"\d+(?:,\d{3})*(?:\.\d+)?|[a-z]+|[-+*/×÷%?=]", text):
        if tok in NUMBER_WORDS or (tok == "and" and run and run[-1] in ("hundred", "thousand")):
            run.append(tok)
            continue
        flush()
        out.append(("n", float(tok.replace(",", ""))) if tok[0].isdigit() else ("w", tok))
    flush()
    return out


def _same_value(written: str, value: float) -> bool:
    """The number `written` (as `_numbers` reads it) is `value`: exactly for a whole number; else rounded as it
    is written, with at least one decimal (3.33 or 3.3 for 10 / 3, never 3)."""
    try:
        given = float(written)
    except ValueError:  # "192.168.1.1", "3.10.2": not one number
        return False
    if float(value).is_integer():
        return given == value
    decimals = len(written.split(".", 1)[1]) if "." in written else 0
    return decimals > 0 and round(value, decimals) == given


def _shown(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:.4f}".rstrip("0")


def answer_numbers(text: str, question: str, critique: str) -> set[str]:
    """The numbers `text` states (by value) beyond those the question and the critique give."""
    return _numbers(text) - _numbers(question) - _numbers(critique)


def first_number(numbers: set[str]) -> str:
    """The smallest of `numbers` (numeric strings), to name one in a verdict."""
    return min(numbers, key=lambda n: (len(n), n))


def _answer_sentence(text: str, question: str) -> str:
    """Where a plain answer says its answer: of its first three sentences, the one closest in meaning to the
    question. Mostly the first; a small model may open with a stray phrase ("La Famille-Rouge, la Belle
    Étoile. Paris is the capital of France."), whose names are not what the answer got right."""
    sentences = [s for s in _SENTENCE.split(text.strip()) if s.strip()][:3]
    if len(sentences) <= 1:
        return sentences[0] if sentences else ""
    sims = cosines(question, sentences)
    return sentences[max(range(len(sentences)), key=lambda i: sims[i])]


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


@lru_cache(maxsize=4096)
def _stem(word: str) -> str:
    return _porter().stem(word) if len(word) > 3 else word


@lru_cache(maxsize=1)
def _porter():
    from nltk.stem.porter import PorterStemmer  # nltk comes with rouge-score, which stems the same way

    return PorterStemmer()


def content_words(text: str) -> set[str]:
    """Stems of the content words of `text` (numbers as digits). Words of one or two letters are mostly the
    pieces of contractions and stray letters ("it's", "e.g."); one written with a capital after its first
    letter, or a capital not at a sentence's start, is a symbol or an abbreviation and counts ("Au", "UK", "pH":
    "The chemical symbol for gold is Au." says more than its question)."""
    out = set()
    for w in _words(text):
        if w in STOPWORDS:
            continue
        w = NUMBER_WORDS.get(w, w)
        if len(w) > 2 or w.isdigit():
            out.add(_stem(w))
    return out | _symbols(text)


# a word of two letters with a capital: after its first letter ("UK", "pH"), or its first not opening a sentence;
# quoted ('Au') or possessive ("the UK's") too, never the piece of a contraction ("It's", "WE'RE")
_SYMBOL = re.compile(r"(?<!\w)(?<!\w['’])(?:[A-Za-z][A-Z]|(?<![.!?]\s)(?<![.!?])(?<!^)(?<!\n)[A-Z][a-z])(?!\w)")
# two-letter interjections, however written ("OK. Climate change." still only restates its question)
INTERJECTIONS = frozenset("ok hi oh ah eh uh ha yo go".split())


def _symbols(text: str) -> set[str]:
    return {w for w in (m.group(0).lower() for m in _SYMBOL.finditer(text)) if w not in STOPWORDS | INTERJECTIONS}


def _numbers(text: str) -> set[str]:
    """The numbers `text` states, by value: in digits, or spelled out ("forty-two" and "42" are both "42")."""
    return {n.replace(",", "") for n in _NUMBER.findall(text)} | spelled_numbers(text)


def spelled_numbers(text: str) -> set[str]:
    """The numbers `text` spells out, in digits ("forty-two": "42"). They are read within a clause: "She was
    twenty. Five years later" is 20 and 5. "one" alone is no number (see _spelled_numbers)."""
    return set().union(*(_spelled_numbers(_words(clause)) for clause in _CLAUSE_BREAK.split(text or "")))


_TENS = frozenset("twenty thirty forty fifty sixty seventy eighty ninety".split())


def _spelled_numbers(words: list[str]) -> set[str]:
    """Numbers spelled out in `words`, by value: a tens word and a unit after it are one number ("seventy
    five": 75), "hundred" and "thousand" multiply what comes before ("one hundred and five": 105); any other
    number word after a number starts the next one. "one" alone is as often a pronoun ("one of the many") as
    a number: only its digit counts."""
    out: set[str] = set()
    total, current, prev = 0, None, None

    def close():
        nonlocal total, current
        if current is not None or total:
            value = total + (current or 0)
            if not (value == 1 and prev == "one"):
                out.add(str(value))
        total, current = 0, None

    for w in words:
        if w == "and" and prev in ("hundred", "thousand"):
            continue
        if w not in NUMBER_WORDS:
            close()
            prev = w
            continue
        v = int(NUMBER_WORDS[w])
        if w == "hundred":
            current = (current or 1) * 100
        elif w == "thousand":
            total, current = total + (current or 1) * 1000, None
        elif current is None and prev == "thousand" and total:
            current = v
        elif current is None:
            close()
            current = v
        elif (prev in _TENS and v < 10) or (prev == "hundred" and v < 100):
            current += v
        else:
            close()
            current = v
        prev = w
    close()
    return out


def _names(text: str) -> set[str]:
    """Stems of the capitalised words of `text` that are names: not a function word, and capitalised
    somewhere other than the start of a sentence or line (so "Dear" and "Here" are not names)."""
    out = set()
    for m in _CAPITALISED.finditer(text):
        word = m.group().lower()
        word = word[:-2] if word.endswith(("'s", "’s")) else word  # "Japan's" names Japan
        before = text[:m.start()].rstrip(" \t\"'“‘(-*•")
        if word in STOPWORDS or not before or before[-1] in ".!?:\n":
            continue
        out.add(_stem(word))
    return out
