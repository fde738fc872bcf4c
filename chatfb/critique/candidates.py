"""Candidate replies for a critique: answer again with the critique as an instruction, then select.

A 135M model cannot rewrite a reply by a critique (it echoes it or talks about the feedback), but it
can often answer the question again with the critique appended to the question as an instruction.
One request samples n candidates (vLLM `n`); the served model itself then judges them:

    logratio(c) = mean token logprob of c given the question + critique
                - mean token logprob of c given the question alone          (end-of-turn token included)

i.e. how much more likely the critique made this reply. That alone rewards text that is unlikely
without the critique, which is what nonsense is, so the score also has a plausibility term: a candidate
pays PLAUSIBILITY_WEIGHT per nat its mean token logprob without the critique falls below the plain
answer's (the critiqued reply, else the base model's answer without the critique):

    score(c) = logratio + ON_TOPIC_WEIGHT * cos(c, question) + PLAUSIBILITY_WEIGHT * min(0, plausibility_gap)
             + AGREEMENT_WEIGHT * agreement(c)

(the last term: a good answer says what the plain answer said, the share of the content words of the plain
answer's answering sentence it uses; not for a critique that states new content).

Dropped, in this order: the text checks of `form_verdict` (empty, cut off, repeats the question, only
restates its topic, repeats, quotes or copies the wording of the critique, talks about the feedback or
the reply, leaves out what the critique states literally, only the question and the critique said back, a
dialogue, repeated lines), off topic (cosine
to the question below OFF_TOPIC_COSINE, MiniLM embeddings from chatfb.critique.similarity), the content
check against the plain answers (chatfb.critique.content: a number or name they got right lost, their
subject or all of their content lost), far less likely than the plain answer (PLAUSIBILITY_FLOOR; not where every content
word is the question's or the plain answer's: "Paris"; for a critique that states new content, NEW_CONTENT_FLOOR
with the tokens of the literal it states set aside), then logratio <= 0.
Besides the sampled answers, `generate` adds candidates that keep the content by construction
(chatfb.critique.constraints): the plain answer cut short for a length critique, and answers held to a
format the critique states literally by vLLM structured outputs.

Shared by the in-loop revision (the user picks among what survives) and the nightly critique recipe.
The judge is any object with `completion_logprobs(messages, completion, model)`: `chatfb.critique.judge.LocalJudge` (the
model's files, in-process; two forward passes per candidate) or a vLLM ModelClient only where the
server runs without --enable-lora (see chatfb.critique.judge for why).

Measured once on this machine, before the content check and plausibility term (efficacy families
support_email / tips_bullets / short_definition / house_signoff x 3 teach prompts x n=4, two runs on
different prompts; checker = the family's check):
all candidates passed 21/48 and 21/48; top-1 kept passed 8/11 and 6/9 (1 and 3 prompts kept nothing);
kept ones passed 12/23 and 15/22 (selection precision 0.52, 0.68; short_definition 14/18, support_email
1/4). Among candidates past the hard filters, checker-passing ones outscored failing ones in 14/14 and
6/10 same-prompt pairs. The logratio favours text that copies the critique's words, hence the filters.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from chatfb.critique import constraints, content, guidelines
from chatfb.critique.ilf import TO_THE_CRITIC
from chatfb.critique.similarity import cosines, rouge_l
from chatfb.serving.model_client import ModelError
from chatfb.store.records import last_user

log = logging.getLogger(__name__)

# Measured on the efficacy families (4 x 3 prompts x n=4, embedded SmolLM2-135M): quoting the critique
# after "Follow this instruction when you answer" passed the checkers 0.44 of the time, the same
# critique as "feedback from the user" 0.29, appended bare 0.29.
INSTRUCTION = '{question}\n\nFollow this instruction when you answer: "{critique}"'
OFF_TOPIC_COSINE = 0.15
ON_TOPIC_WEIGHT = 0.1
SCORING_THREADS = 8
# Waiting for the slowest of n sampled drafts (the in-loop revision): once half of them have finished, the rest
# get PATIENCE times as long as the slowest finished one took, then are dropped (finish reason ABANDONED) and
# their request stopped. Measured on this machine (8 families x 2 teach prompts, n=4, 256 tokens, one vLLM):
# the third draft finished at a median 6.8 s, all four at 11.2 s; the slowest was often 2-8x as long as its
# siblings and cut off at the token limit, so never offered anyway.
PATIENCE = 2.0
ABANDONED = "abandoned"
# Being a good answer at all: the logratio alone rewards text that is unlikely without the critique,
# which is what nonsense is ("Alle Chatelier. France's capital is Paris, not Paris itself." scored 0.12
# against 0.07 for "The capital of France is Paris.", issue 23). So a candidate pays
# PLAUSIBILITY_WEIGHT per nat its mean token log-probability without the critique falls below the plain
# answer's (the critiqued reply, else the base model's answer), and one more than PLAUSIBILITY_FLOOR
# below is dropped. Measured with the local judge on SmolLM2-135M against its greedy plain answers:
# right answers written by hand sat 0.0-2.9 nats below (a one-word "Paris." 5.8: its end of turn is
# unlikely without the critique), so the floor drops only text further off than any right answer seen; and
# never text made of the plain answer's own words ("Paris" without its full stop sat 8.9 nats below "The
# capital of France is Paris.": the model's end of turn after one word, not a wrong answer).
PLAUSIBILITY_WEIGHT = 0.5
PLAUSIBILITY_FLOOR = 6.0
# For a critique that states new content (an address, a URL, a corrected fact) the likelihood ratio cannot tell a
# right answer from fluent-looking nonsense that contains the literal (issue 23: 'To reach customer support, simply
# write your desired response in the format "help@...'), and the agreement term is off. So the gap is taken without
# the literal's own tokens (`literal_token_spans`: the new fact is legitimately unlikely without the critique),
# and the floor is tighter. Measured once with the local judge (SmolLM2-135M) on four such critiques (an e-mail
# address, a URL, a phone number, a corrected capital; its greedy plain answers): 18 right answers written by
# hand sat at most 3.4 nats a token below the plain answer (one just above it; setting the literal aside moved
# them -0.2 to +1.2 nats closer), the 7 of its own sampled candidates the text checks kept 0.6-1.7 below; 14
# nonsense texts with the literal (15 measurements) 2.9-6.6 below, 8 of them more than 4.0. A bare
# "Email <address>." sat 7.6 below (its early end of turn), as PLAUSIBILITY_FLOOR found for "Paris.", and is
# dropped with or without this floor.
# The floor is half a nat beyond the worst right answer seen: it drops the worst nonsense; the rest only ranks
# lower (the gap's PLAUSIBILITY_WEIGHT) or falls to the text checks.
NEW_CONTENT_FLOOR = 4.0
# A good answer says what the plain answer said: a candidate gains AGREEMENT_WEIGHT times the share of the
# content words of the plain answers' answering sentence it uses (chatfb.critique.content.agreement), except
# for a critique that states new content. Measured once with the local judge (SmolLM2-135M): on hand-written
# right and evasive answers to three questions (where the weight was chosen) the log-ratio ranked the evasive
# one first twice; half a nat per unit put the right one first in one of the two (gravity), a whole nat in
# both. On the model's own sampled candidates for 12 questions (six critiques, its greedy plain answers; two
# questions shared with the hand-written set), 0.5 changed the pick for 3:
# better for rain (water and air over "because of the Sun"), the plain answer's own sentences over a
# paraphrase for photosynthesis, worse for spider ("The answer is 28" over an evasive one that said 8 legs;
# the plain answer itself was wrong). 1.0 also put "I will clarify the definition ..." first for prime
# numbers: word shares punish paraphrase ("two distinct factors" for "cannot be divided evenly"), hence half.
AGREEMENT_WEIGHT = 0.5

# Talk about the feedback or the rewriting instead of an answer; what the 135M model writes when it
# reads the critique as the thing to reply to (issue 14's kept targets). Nouns for the reply and the
# feedback (response, format, feedback, critique) are checked as words, without phrases, by
# chatfb.critique.content.talks_about_replies, and a critique's words quoted back by quotes_the_critique;
# what stays here are phrases built on words that ordinary answers use too ("reply", "user", "answer",
# "instructions"), each seen in issue 14's kept targets: promises to follow, offers to rewrite, the user
# in the third person, what the reply "should end with", "this/your instruction" (not a recipe's "the
# instructions"), a word count or "one short sentence" said back, the text referring to itself.
ABOUT_THE_FEEDBACK = re.compile(
    r"\bhappy to help you (?:improve|rewrite|revise|fix)\b"
    r"|\b(?:improve|rewrite|revise|fix|correct) (?:the|this|my|your) (?:reply|answer)\b"
    r"|\bI(?:'ll| will) (?:make sure|be sure) to (?:follow|use|keep|format|include|end)\b"
    r"|\b(?:recommended|requested|suggested|desired|preferred|required) style\b"
    r"|\b(?:it seems|it looks|it appears) (?:like|that) (?:the|this) user\b"
    r"|\bthe user (?:is|was|wants|asked|has asked|is asking|requested|would like|needs)\b"
    r"|\bfollow (?:this|your|that|the) guidelines?\b"
    r"|\b(?:note|reply|answer) (?:ends|should end|must end) with\b"
    r"|\b(?:this|your) instructions?\b|\bto your liking\b|\bthe correct way to (?:answer|respond|reply)\b"
    r"|\b(?:note|list|answer|reply|text) (?:rewritten|revised)\b|\baforementioned\b"
    r"|\bat most \d+ words\b|\b(?:in )?one short sentence\b"
    r"|\bI(?:'ll| will) do my best\b|\bthe above (?:text|note|message|reply|answer)\b",
    re.I)
# A line that is only a dialogue label ("A:", "User:"): a made-up transcript, not an answer.
DIALOGUE_LABEL = re.compile(r"^\s*(?:Q|A|User|Assistant|Question|Answer|Human|AI)\s*:\s*$", re.I | re.M)
# A speaker's label opening a sentence or a line ("... is Ottawa. Question: Good question! Answer: Good question!"):
# two kinds of them in one reply (a question's and an answer's, or two speakers) is a dialogue written out.
SPEAKER = re.compile(r"(?:^|(?<=[.!?])[ \t]+)(Q|A|User|Assistant|Question|Answer|Human|AI)[ \t]*:", re.I | re.M)
SPEAKER_KINDS = {"q": "asks", "question": "asks", "user": "asks", "human": "asks",
                 "a": "answers", "answer": "answers", "assistant": "answers", "ai": "answers"}


ASKS_FOR_DIALOGUE = re.compile(r"\b(?:faq|q\s*&\s*a|dialog(?:ue)?|interview|transcript|script)s?\b", re.I)


def writes_a_dialogue(text: str, context: str = "") -> bool:
    """`text` writes out a dialogue: a label alone on its line, or labels of both sides opening its sentences.
    Not where `context` (the question, the critique, the plain answers) asks for one or writes in that form
    itself ("Write an FAQ entry", "Q: ... A: ...")."""
    if ASKS_FOR_DIALOGUE.search(context) or len(_speakers(context)) > 1:
        return False
    return bool(DIALOGUE_LABEL.search(text)) or len(_speakers(text)) > 1


def _speakers(text: str) -> set[str]:
    return {SPEAKER_KINDS[m.lower()] for m in SPEAKER.findall(text or "")}

# A list marker and a short "Label:" at the start of a line.
LINE_LABEL = re.compile(r"^\s*(?:[-*\u2022+]|\d+[.)])?\s*(?:[^:\n]{1,30}:\s)?")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


@dataclass
class Candidate:
    text: str
    finish_reason: str | None = None
    source: str = "sampled"           # "sampled", "cut" (the plain answer cut short), "framed" (it begun or
    #                                   ended with the critique's phrase) or "constrained"
    score: float | None = None        # higher = better
    verdict: str = "ok"               # "ok" or why dropped (short phrase)
    # {"source", "cos_prompt", "logratio", "logprob_instructed", "logprob_plain", "plausibility_gap"}
    details: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.verdict == "ok"


def instruction_messages(prompt: list[dict], critique: str) -> list[dict]:
    """The conversation with the critique appended to its last user message as a quoted instruction.

    The critique stays data: one line, its double quotes turned into single ones so it cannot close
    the quote, chat-template tokens broken up (guidelines.inline), and never a system message."""
    quoted = guidelines.inline(critique)
    last_user = max((i for i, m in enumerate(prompt) if m["role"] == "user"), default=None)
    if last_user is None:
        raise ValueError("the conversation has no user message to add the critique to")
    out = [dict(m) for m in prompt]
    out[last_user]["content"] = INSTRUCTION.format(question=prompt[last_user]["content"].rstrip(), critique=quoted)
    return out


def hard_verdict(text: str, question: str, critique: str, finish_reason: str | None = None,
                 references: list[str] | tuple = ()) -> str:
    """'ok', or why `text` is not an answer worth showing or training on: its form (pure text checks),
    and with `references` (the model's plain answers: the critiqued reply, the base model's answer
    without the critique) whether it kept what they got right (chatfb.critique.content)."""
    verdict = form_verdict(text, question, critique, finish_reason, references)
    if verdict == "ok" and references:
        verdict = content.content_verdict(text, question, critique, list(references), corrects_here(question, critique))
    return verdict


def form_verdict(text: str, question: str, critique: str, finish_reason: str | None = None,
                 references: list[str] | tuple = ()) -> str:
    """The pure text checks of `hard_verdict`: an answer, not an echo, a topic or talk about the reply."""
    text = text.strip()
    if not text:
        return "empty"
    if finish_reason == "length":
        return "cut off at the token limit"
    if finish_reason == ABANDONED:
        return "not finished when the other drafts were long done"
    if _repeats_question(text, question):
        return "repeats the question"
    if content.restates_the_question(text, question):
        return "only restates the question's topic"
    about = _talks_about_the_critique(text, critique, context=" ".join([question, *[r or "" for r in references]]))
    if about:
        return about
    facts = literal_facts(critique, question)
    missing = [f for f in facts if not _has_literal(text, f)]
    if missing:
        return f"leaves out {missing[0]!r} from the critique"
    negated = [f for f in facts if re.search(rf"\b(?:not|isn't|is not|never)\s+(?:in\s+|at\s+)?{re.escape(f)}", text, re.I)]
    if negated:
        return f"contradicts {negated[0]!r} from the critique"
    quoted = content.quotes_the_critique(text, critique)
    if quoted:
        return f"quotes the critique ({quoted!r}) instead of answering"
    if only_the_frame(text, question, critique):
        return "only the phrase the critique asks for, no answer"
    if (not content.states_new_content(critique) and not corrects_a_fact(critique)
            and content.says_nothing_new(text, question, critique, references)):
        return "says nothing the question and the critique do not"
    if writes_a_dialogue(text, " ".join([question, critique, *[r or "" for r in references]])):
        return "writes a dialogue, not an answer"
    if _repeats_lines(text):
        return "repeats itself"
    return "ok"


def only_the_frame(text: str, question: str, critique: str) -> bool:
    """The critique asks for a phrase to begin or end with (constraints.phrase_frame) and `text` says nothing the
    question and the critique do not (the phrase is the critique's own words): the frame without an answer ("Write
    a short note inviting a user to a webinar." -> "Cheers, the chatfb team." was kept and trained). A yes or a no
    is an answer, however short."""
    frame = constraints.phrase_frame(critique)
    if frame is None:
        return False
    body = text
    for phrase in frame:
        if phrase.strip():
            body = re.sub(re.escape(phrase.strip()), " ", body, flags=re.I)
    if re.search(r"\b(?:yes|no)\b", body, re.I):
        return False
    return not content.content_words(text) - content.content_words(critique) - content.content_words(question)


def _has_literal(text: str, fact: str) -> bool:
    """`fact` is in `text`; a list marker quoted from the critique ("start lines with '- '") must start a line,
    and an e-mail address or URL must stand whole ("asupport@chatfb.example.com" is not support@chatfb.example)."""
    if re.fullmatch(r"[-*•+>#]{1,2}", fact):
        return re.search(rf"^\s*{re.escape(fact)}\s", text, re.M) is not None
    if _EMAIL.fullmatch(fact) or _URL.fullmatch(fact):
        return re.search(rf"(?<![\w.+-]){re.escape(fact)}(?![\w-]|\.[\w-])", text, re.I) is not None
    return fact.lower() in text.lower()


# What a critique states literally and a reply that follows it must contain: an e-mail address, a URL,
# or a short quoted string ("end with 'Cheers, the chatfb team'", "start lines with '- '").
_EMAIL = re.compile(content.EMAIL)
_URL = re.compile(content.URL)
_QUOTED = re.compile(r"(?<![\w])[\"'‘“]([^\"'’”\n]{1,40})[\"'’”](?![\w])")


# A critique that corrects a fact ("Wrong: the capital of Australia is Canberra, not Sydney.") states the
# right value after the verb: a name or a number. Only that shape, on purpose: a 135M model kept "The capital
# of Australia is Sydney" and "Auckland, not Sydney" as answers to that critique (issue 14's benchmark rows).
_CORRECTS_A_FACT = re.compile(r"^\s*(?:wrong|incorrect|not true|false|no|actually)\b|\b(?:correct|right) answer is\b", re.I)
_NAME_OR_NUMBER = r"(?:[A-Z][\w'’-]*|\d[\w.,:/%-]*)"
_STATED_VALUE = re.compile(rf"\b(?:is|are|was|were)\s+(?:actually\s+|really\s+)?(?:(?:at|in|on)\s+)?({_NAME_OR_NUMBER}(?:\s+{_NAME_OR_NUMBER})*)")


def corrects_a_fact(critique: str) -> bool:
    """The critique corrects a fact ("Wrong: ... is Canberra"): it holds for questions about that subject only."""
    return bool(_CORRECTS_A_FACT.search(critique or ""))


def corrects_here(question: str, critique: str) -> bool:
    """The critique corrects a fact of this question's subject (chatfb.critique.content.about_its_subject): only
    then may a candidate drop the plain answer's facts for it."""
    return corrects_a_fact(critique) and content.about_its_subject(question, critique)


def literal_facts(critique: str, question: str | None = None) -> list[str]:
    """The literal strings a critique asks for: e-mail addresses, URLs, short quoted strings (not where it
    says no, never, don't ...: the quote may be what it forbids), and the name or number a fact-correcting
    critique states ("... is Canberra, not Sydney" -> "Canberra"); with `question`, that name or number only
    where the question is about the critique's subject (`corrects_here`: "Canberra" answers nothing about Peru)."""
    facts = _EMAIL.findall(critique) + [u.rstrip(".,;:!?)") for u in _URL.findall(critique)]
    if not set(re.findall(r"[a-z']+", critique.lower())) & constraints.NEGATION:  # "Don't start with 'Great question!'"
        facts += [q.strip() if q.strip() else q for q in _QUOTED.findall(critique)]
    if corrects_a_fact(critique) if question is None else corrects_here(question, critique):
        facts += [v.rstrip(".,;:!?") for v in _STATED_VALUE.findall(critique) if not _EMAIL.fullmatch(v)]
    return [f for f in dict.fromkeys(facts) if f.strip() or f == " "]


def about_the_critique(text: str, critique: str, context: str = "") -> str | None:
    """Why `text` is about the critique rather than an answer (it repeats or quotes the critique, talks
    about the feedback, the rewriting or the reply itself), or None. `context` (the question, the
    critiqued reply) may use words for replies that `text` then may use too. Also checked on a draft
    while it streams (chatfb.app.chat_service)."""
    about = _talks_about_the_critique(text, critique, context)
    if about:
        return about
    quoted = content.quotes_the_critique(text, critique)
    if quoted:
        return f"quotes the critique ({quoted!r}) instead of answering"
    return None


def _talks_about_the_critique(text: str, critique: str, context: str = "") -> str | None:
    if _repeats_critique(text, critique, context):
        return "repeats the critique"
    if TO_THE_CRITIC.search(text) or ABOUT_THE_FEEDBACK.search(text):
        return "talks about the feedback, not an answer"
    meta = content.talks_about_replies(text, context)
    if meta:
        return f"talks about the reply ({meta!r}), not an answer"
    copied = content.copies_the_critique(text, critique, context, literal_facts(critique))
    if copied:
        return f"copies the critique's wording ({copied!r}) instead of answering"
    return None


def answered(plain: str | Future | None) -> str | None:
    """A plain answer given as its text, or as the Future of a request asked beside the drafts (its error raised)."""
    return plain.result() if isinstance(plain, Future) else plain


def generate(client, model: str, prompt: list[dict], critique: str, n: int = 4, max_tokens: int = 256,
             temperature: float = 0.8, plain: str | Future | list[str | Future | None] | None = None,
             patience: float = 0.0) -> list[Candidate]:
    """n answers to the conversation with the critique as an instruction, from ONE request; and the
    candidates that keep the content by construction (chatfb.critique.constraints): each of the `plain`
    answers (one, or several: the base model's greedy answer first, then the critiqued reply) cut at sentence
    ends for a length critique, or framed by the opening or closing phrase the critique asks for, and n // 2
    (at least one) answers held to the format the critique states literally, from one more request.

    The greedy answer comes first because framing keeps every fact of what it frames: a critiqued reply
    that was wrong ("Good question! El Turio is the capital of Spain") stays wrong in the asked form,
    where the model's own plain answer is most often its best one; a plain answer may be the Future of a
    request asked beside these (`answered`). `patience`: as in `stream_drafts` (0: wait for every draft). The
    held request is sent beside the sampled one, not after it: vLLM batches the two, so a round costs one wait
    for generation, not two."""
    messages = instruction_messages(prompt, critique)
    pool = ThreadPoolExecutor(1)
    try:
        held = pool.submit(held_to_format, client, messages, model, critique, max(1, n // 2), max_tokens, temperature,
                           patience)
        choices = collect_drafts(client, messages, model, n, max_tokens, temperature, patience=patience)
        out = [Candidate(text.strip(), finish_reason) for text, finish_reason in choices]
        plain = [answered(p) for p in plain] if isinstance(plain, list) else answered(plain)
        return out + content_keeping(critique, plain) + held.result()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # a failed sampled request does not wait for the held one


def collect_drafts(client, messages: list[dict], model: str, n: int, max_tokens: int = 256, temperature: float = 0.8,
                   regex: str | None = None, patience: float = 0.0) -> list[tuple[str, str | None]]:
    """(text, finish reason) of n answers sampled in one request (held to `regex` when given): streamed under
    `patience` (`stream_drafts`; an abandoned draft's finish reason is ABANDONED), or one plain request (0)."""
    if not patience:
        return client.complete_choices(messages, model, max_tokens=max_tokens, temperature=temperature, top_p=0.95,
                                       n=n, **({"regex": regex} if regex else {}))
    texts: dict[int, str] = {}
    finish: dict[int, str | None] = {}
    for index, delta in stream_drafts(client, messages, model, n, max_tokens, temperature, finish, regex, patience):
        texts[index] = texts.get(index, "") + delta
    return [(texts.get(i, ""), finish.get(i)) for i in range(n)]


def stream_drafts(client, messages: list[dict], model: str, n: int, max_tokens: int = 256, temperature: float = 0.8,
                  finish: dict | None = None, regex: str | None = None,
                  patience: float = PATIENCE) -> Iterator[tuple[int, str]]:
    """Yield (choice index, text delta) of n answers sampled in one streamed request (held to `regex` when
    given), without waiting for stragglers: once at least half of them have finished, the rest may run
    `patience` times as long as the slowest finished one took; then the request is stopped and each unfinished
    draft's finish reason in `finish` is ABANDONED (never offered: `form_verdict`). patience 0: wait for all."""
    finish = finish if finish is not None else {}
    t0 = time.perf_counter()
    done_at: dict[int, float] = {}
    stream = client.stream_choices(messages, model, n=n, max_tokens=max_tokens, temperature=temperature, top_p=0.95,
                                   finish_reasons=finish, regex=regex)
    try:
        for index, delta in stream:
            yield index, delta
            now = time.perf_counter() - t0
            for i in finish:
                done_at.setdefault(i, now)
            if patience and n > len(done_at) >= n / 2 and now > patience * max(done_at.values()):
                for i in range(n):
                    finish.setdefault(i, ABANDONED)
                return
    finally:
        stream.close()  # closes the connection: vLLM stops the abandoned drafts


def content_keeping(critique: str, plain: str | list[str | None] | None) -> list[Candidate]:
    """The candidates that keep the content by construction (chatfb.critique.constraints), each once: every
    `plain` answer (one, or several, best first) cut at sentence ends for a length critique, or framed by the
    opening or closing phrase the critique asks for."""
    plains = [p for p in ([plain] if isinstance(plain, str) else plain or []) if p and p.strip()]
    out, made = [], set()
    for source, make in (("cut", constraints.cut_candidates), ("framed", constraints.framed_candidates)):
        for text in (t for p in plains for t in make(critique, p)):
            if text not in made:
                made.add(text)
                out.append(Candidate(text, "stop", source=source))
    return out


def held_to_format(client, messages: list[dict], model: str, critique: str, n: int, max_tokens: int = 256,
                   temperature: float = 0.8, patience: float = 0.0) -> list[Candidate]:
    """n answers to `messages` held to the format the critique states literally (vLLM structured outputs),
    from one request; none when the critique states no such format, or the server refuses structured
    outputs (the other candidates still stand). A server that is down raises ModelError. `patience`: as
    in `stream_drafts` (0: wait for all n)."""
    regex = constraints.format_regex(critique)
    if not regex:
        return []
    try:
        held = collect_drafts(client, messages, model, n, max_tokens, temperature, regex, patience)
    except ModelError as e:
        if e.unavailable:
            raise
        log.warning("constrained candidates refused (%s); sampled ones only", e)
        return []
    return [Candidate(text.strip(), finish_reason, source="constrained") for text, finish_reason in held]


def plain_answer(client, model: str, prompt: list[dict], max_tokens: int = 256) -> str | None:
    """The model's greedy answer without the critique: what a candidate must keep the content of. A
    constraints.PlainAnswer: it says whether the token limit cut it off (then only its whole sentences are framed)."""
    text, finish_reason = client.complete_choices(prompt, model, max_tokens=max_tokens, temperature=0.0, top_p=1.0)[0]
    text = text.strip()
    return constraints.PlainAnswer.of(text, finish_reason == "length") if text else None


def score(client, model: str, prompt: list[dict], critique: str, candidates: list[Candidate],
          original: str | None = None, reference: str | None = None) -> list[Candidate]:
    """Fill score, verdict and details of each candidate; return them best first, kept ones first.

    `original` (the critiqued reply) drops candidates that are the same reply again; it and `reference`
    (the base model's answer without the critique, where the caller has one) are the plain answers a
    candidate must keep the content of (chatfb.critique.content) and must not be far less likely than.
    Candidates that fail the text checks are not sent to the model."""
    question = last_user(prompt)
    instructed = instruction_messages(prompt, critique)
    references = [r for r in (original, reference) if r and r.strip()]
    for c in candidates:
        c.verdict = form_verdict(c.text, question, critique, c.finish_reason, references)
        if (c.ok and original and rouge_l(c.text, original) > 0.9
                and not constraints.adds_the_shape(critique, c.text, original)):
            c.verdict = "same as the critiqued reply"
    corrects, uncritiqued = corrects_here(question, critique), bool(reference and reference.strip())
    alive = [c for c in candidates if c.ok]
    if alive:
        cos = cosines(question, [c.text for c in alive])
        for c, cos_c in zip(alive, cos):
            c.details = {"source": c.source, "cos_prompt": round(cos_c, 4)}
            if cos_c < OFF_TOPIC_COSINE:
                c.verdict = "off topic"
            elif references:
                c.verdict = content.content_verdict(c.text, question, critique, references, corrects, uncritiqued)
    if uncritiqued and not corrects:  # the nightly: it would train
        unconfirmed_numbers(candidates, question, critique, references)
    alive = [c for c in alive if c.ok]
    if alive:
        baseline = references[0] if references else None  # the critiqued reply, else the plain answer
        jobs = [(msgs, c.text) for c in alive for msgs in (instructed, prompt)]
        jobs += [(prompt, baseline)] if baseline else []
        logprobs = many_logprobs(client, jobs, model)
        plain_baseline = _mean(logprobs[-1]) if baseline else None
        # a critique that states new content (an address, a corrected fact) moves the answer away from the plain
        # one by design: closeness to it is then no measure of a good answer
        new_content = corrects_a_fact(critique) or content.states_new_content(critique)
        measured = references and not new_content
        # how likely the text is as an answer at all; for new content, its own tokens set aside (the new fact is
        # legitimately unlikely without the critique) and held to NEW_CONTENT_FLOOR
        literals = literal_facts(critique) if new_content and plain_baseline is not None else []
        skips = literal_token_spans(client, model, prompt, [c.text for c in alive], literals) if literals \
            else [set() for _ in alive]
        floor = NEW_CONTENT_FLOOR if literals else PLAUSIBILITY_FLOOR
        agreements = dict(zip(map(id, alive), content.agreement([c.text for c in alive], question, critique, references))) \
            if measured else {}
        for i, c in enumerate(alive):
            with_critique, without = _mean(logprobs[2 * i]), _mean(logprobs[2 * i + 1])
            logratio = with_critique - without
            c.details.update({"logratio": round(logratio, 4), "logprob_instructed": round(with_critique, 4),
                              "logprob_plain": round(without, 4)})
            c.score = logratio + ON_TOPIC_WEIGHT * c.details["cos_prompt"]
            rest = [p for k, p in enumerate(logprobs[2 * i + 1]) if k not in skips[i]]
            rest = _mean(rest) if rest else without  # a text that is only the literal: judged whole
            gap = None if plain_baseline is None else rest - plain_baseline
            if gap is not None:
                c.details["plausibility_gap"] = round(gap, 4)
                c.score += PLAUSIBILITY_WEIGHT * min(0.0, gap)
            agree = agreements.get(id(c))
            if agree is not None:
                c.details["agreement"] = round(agree, 4)
                c.score += AGREEMENT_WEIGHT * agree
            if gap is not None and gap < -floor and not content.within_the_plain_answer(c.text, question, references):
                c.verdict = "far less likely as an answer than the plain answer" + (
                    f", the critique's {', '.join(map(repr, literals))} aside"
                    f" ({-gap:.1f} nats a token below it; at most {floor:g})" if literals else "")
            elif logratio <= 0:
                c.verdict = "no more likely with the critique"
    return sorted(candidates, key=lambda c: (c.ok, c.score is not None, c.score or 0.0), reverse=True)


def unconfirmed_numbers(candidates: list[Candidate], question: str, critique: str, references: list[str]) -> None:
    """Self-consistency for the numbers a kept candidate would train: a candidate that answers with numbers
    (beyond the question's and the critique's) must share one with another independent answer of the model, a
    plain answer or another sampled candidate; else it is dropped as unconfirmed. A small model's wrong sums
    scatter ("an adult has 28 bones", "1691"), its right ones repeat. Candidates made from a plain
    answer (cut, framed) give no support of their own: theirs is that answer's. A question whose arithmetic is
    worked out (content.arithmetic) needs no vote: the content check already dropped every candidate that does
    not give its result ("11 + 11 = 22" was dropped here when no other draft said 22); another number such a
    candidate gives besides is not voted on either."""
    if content.arithmetic(question) is not None:
        return
    answers = [(c, content.answer_numbers(c.text, question, critique)) for c in candidates]
    pool = [(c, n) for c, n in answers if c.source not in ("cut", "framed")]
    pool += [(None, content.answer_numbers(r, question, critique)) for r in references]
    for c, numbers in answers:
        if not c.ok or not numbers:
            continue
        support = set().union(*(n for other, n in pool if other is not c))
        if not numbers & support:
            c.verdict = f"gives {content.first_number(numbers)}, which no other answer of the model gives"


def select_rounds(judge, model: str, prompt: list[dict], critique: str, n: int = 4, max_tokens: int = 256,
                  rounds: int = 2, generator=None, generator_model: str | None = None,
                  original: str | None = None, reference: str | Future | None = None,
                  patience: float = 0.0) -> list[Candidate]:
    """Generate n candidates (on `generator`/`generator_model` when given, e.g. a stronger refiner endpoint)
    and score them with the served model (`judge`); when none of a round survives, sample n more (up to `rounds` rounds) and
    score only the new ones; all candidates of all rounds, best first. The extra round costs time only
    where the first found nothing (on the efficacy families about one critique in three). `original` and
    `reference` as in `score` (the reference may be the Future of its request, asked beside the first round's
    drafts); the first round also cuts or frames both of them, the reference first (`generate`).
    `patience`: how long stragglers may run, as in `stream_drafts`."""
    out: list[Candidate] = []
    for round_ in range(max(rounds, 1)):
        fresh = generate(generator or judge, generator_model or model, prompt, critique, n=n, max_tokens=max_tokens,
                         plain=[reference, original] if round_ == 0 else None, patience=patience)
        reference = answered(reference)
        out += score(judge, model, prompt, critique, fresh, original=original, reference=reference)
        if best(out) is not None:
            break
    return sorted(out, key=lambda c: (c.ok, c.score is not None, c.score or 0.0), reverse=True)


def literal_token_spans(judge, model: str, prompt: list[dict], texts: list[str], literals: list[str]) -> list[set[int]]:
    """For each of `texts`, the positions of its reply tokens (as `judge.completion_logprobs` gives them) that
    spell the critique's `literals` where they occur in it. The judge gives log-probabilities, not tokens: the
    tokens of the text up to a literal's start and up to its end are counted by scoring those two prefixes
    (a causal model tokenizes and scores a prefix as the start of the whole; a token that straddles the edge
    counts with the literal)."""
    bounds = []  # per text: (text before the literal, text up to its end) for each occurrence
    for text in texts:
        found = []
        for literal in literals:
            for m in re.finditer(re.escape(literal), text, re.I):
                found.append((text[:m.start()].rstrip(), text[:m.end()]))
        bounds.append(found)
    prefixes = sorted({p for found in bounds for pair in found for p in pair if p})
    counts = {p: len(lp) - 1 for p, lp in zip(prefixes, many_logprobs(judge, [(prompt, p) for p in prefixes], model))}
    counts[""] = 0
    return [{k for before, upto in found for k in range(counts[before], counts[upto])} for found in bounds]


def many_logprobs(judge, jobs: list[tuple[list[dict], str]], model: str) -> list[list[float]]:
    """`judge.completion_logprobs` of each (messages, completion) job: in one call where the judge batches them
    itself (chatfb.critique.judge.LocalJudge), else as concurrent requests (vLLM batches those)."""
    if not jobs:
        return []
    many = getattr(judge, "completion_logprobs_many", None)
    if many is not None:
        return many(jobs, model)
    with ThreadPoolExecutor(min(SCORING_THREADS, len(jobs))) as pool:
        return list(pool.map(lambda job: judge.completion_logprobs(job[0], job[1], model), jobs))


def best(candidates: list[Candidate]) -> Candidate | None:
    """The highest-scoring kept candidate, or None when every one was dropped."""
    kept = [c for c in candidates if c.ok and c.score is not None]
    return max(kept, key=lambda c: c.score) if kept else None


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("-inf")


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def _repeats_question(text: str, question: str) -> bool:
    """The reply is the question again, or opens with it (a 135M habit before it rambles)."""
    if not _words(question):
        return False
    first_line = text.strip().splitlines()[0]
    # "Paris is the capital of France." shares most words with its question, and answers it: a reply that
    # adds a content word of its own is not the question again
    adds = content.content_words(text) - content.content_words(question)
    return (rouge_l(text, question) >= 0.8 and not adds) or rouge_l(first_line, question) >= 0.9


def _repeats_critique(text: str, critique: str, context: str = "") -> bool:
    """The reply is mostly the critique, or restates one of its sentences (its fact alone may be
    quoted: "Please email support@..." answers the support-email critique; and a reply that shares only
    the context's words and the names and numbers the critique gives states its fact:
    content.repeats_only_given_content)."""
    if content.repeats_only_given_content(text, critique, context):
        return False
    if rouge_l(text, critique) >= 0.7:
        return True
    reply_sentences = [_words(s) for s in SENTENCE_END.split(text)]
    for sentence in map(_words, SENTENCE_END.split(critique)):
        if len(sentence) >= 3 and any(_lcs(sentence, s) >= 0.75 * len(sentence) for s in reply_sentences):
            return True
    return False


def _lcs(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two word lists."""
    row = [0] * (len(b) + 1)
    for x in a:
        prev_diag = 0
        for j, y in enumerate(b, 1):
            prev_diag, row[j] = row[j], prev_diag + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def _repeats_lines(text: str) -> bool:
    """The same non-empty line three times or more; two lines that say the same words once a leading
    label is set aside ("- Parmenim: Red, Green, Blue" twice: padding, not a list); or mostly repeated
    word 4-grams."""
    lines = [" ".join(_words(line)) for line in text.splitlines()]
    lines = [line for line in lines if line]
    if any(lines.count(line) >= 3 for line in set(lines)):
        return True
    bodies = [" ".join(_words(LINE_LABEL.sub("", line))) for line in text.splitlines()]
    bodies = [b for b in bodies if len(b.split()) >= 2]
    if len(bodies) != len(set(bodies)):
        return True
    words = _words(text)
    grams = [tuple(words[i:i + 4]) for i in range(len(words) - 3)]
    return len(grams) >= 30 and len(set(grams)) / len(grams) < 0.5
