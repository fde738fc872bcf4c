"""Candidates that keep the content by construction: the plain answer cut short for a length critique,
and answers held by vLLM structured outputs to a format the critique states literally."""

from __future__ import annotations

import json
import re
import threading
from concurrent.futures import Future

import httpx
import pytest

from chatfb.critique import constraints
from chatfb.critique.candidates import generate, hard_verdict, instruction_messages, plain_answer
from chatfb.serving.model_client import ModelClient, ModelError

SIGN = "Sign every answer with '— Team Aurora' on its own last line."
LINES = "Format it as a bulleted list: exactly three short tips, each on its own line starting with '- '."
ADDRESS = "Always tell people they can write to help@aurora-widgets.example."
SHORT = "Too long. Answer in one short sentence of at most 25 words."
PROMPT = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Give me tips for sleeping."}]


@pytest.mark.parametrize("critique, follows, breaks", [
    (SIGN, "Go to bed early.\n\n— Team Aurora", "Go to bed early. — Team Aurora is here"),
    (LINES, "- Go to bed early.\n- Keep it dark.\n- No screens.", "- Go to bed early.\n- Keep it dark."),
    (ADDRESS, "Write to help@aurora-widgets.example for help.", "Call us any time."),
    ("Start every reply with 'Hello there!'", "Hello there! Sleep well.", "Sleep well. Hello there!"),
])
def test_a_literal_format_becomes_a_regex_that_holds_exactly_that_shape(critique, follows, breaks):
    regex = constraints.format_regex(critique)
    assert regex and re.fullmatch(regex, follows) and not re.fullmatch(regex, breaks)


@pytest.mark.parametrize("critique", [
    SHORT, "Be friendlier.", "Never end with 'Best regards'.",  # no literal shape, or one it must NOT have
    "Start with 'Hi' and end with 'Bye'.",  # two shapes at once: not one checkable regex
])
def test_no_regex_without_one_literal_shape(critique):
    assert constraints.format_regex(critique) is None


def test_constrained_candidates_follow_their_constraint_and_are_marked(fake_client):
    fake_client.enqueue("Sleep more.", "Keep a routine.")  # sampled freely
    fake_client.held.append("- Go to bed at the same time.\n- Keep the room dark.\n- Avoid screens before bed.")
    out = generate(fake_client, "chatfb-base", PROMPT, LINES, n=2)
    # two requests, sent side by side (vLLM batches them): one sampled freely, one held to the critique's shape
    (free,), (held,) = ([h for h in fake_client.history if (h["regex"] is None) == free] for free in (True, False))
    assert len(fake_client.history) == 2
    assert free["regex"] is None and free["n"] == 2
    assert held["regex"] == constraints.format_regex(LINES) and held["n"] == 1
    assert held["messages"] == instruction_messages(PROMPT, LINES)  # answered with the critique, held to its shape
    assert [c.source for c in out] == ["sampled", "sampled", "constrained"]
    (constrained,) = [c for c in out if c.source == "constrained"]
    assert re.fullmatch(held["regex"], constrained.text)
    assert hard_verdict(constrained.text, "Give me tips for sleeping.", LINES) == "ok"


def test_the_held_request_is_sent_beside_the_sampled_one(fake_client):
    """A round costs one wait for generation, not two: the sampled request waits here until the held one is
    in flight, which it never would be if the held one were sent after it."""
    held_sent = threading.Event()
    queued = fake_client.complete_choices

    def complete_choices(messages, model, regex=None, **kw):
        if regex is None:
            assert held_sent.wait(5), "the held request is sent only after the sampled one returned"
        else:
            held_sent.set()
        return queued(messages, model, regex=regex, **kw)

    fake_client.complete_choices = complete_choices
    fake_client.enqueue("Sleep more.", "Keep a routine.")
    fake_client.held.append("- Go to bed at the same time.\n- Keep the room dark.\n- Avoid screens before bed.")
    out = generate(fake_client, "chatfb-base", PROMPT, LINES, n=2)
    assert [c.source for c in out] == ["sampled", "sampled", "constrained"]


def test_a_server_without_structured_outputs_leaves_the_sampled_candidates(fake_client):
    fake_client.enqueue("Sleep more.")
    fake_client.held.append(ModelError("The model server refused the request (400): unknown field", 400))
    out = generate(fake_client, "chatfb-base", PROMPT, SIGN, n=1)
    assert [c.text for c in out] == ["Sleep more."] and not fake_client.queue and not fake_client.held
    fake_client.enqueue("Sleep more.")
    fake_client.held.append(ModelError("The model server is not reachable right now."))
    with pytest.raises(ModelError, match="not reachable"):  # down is not "refused": the task is retried as before
        generate(fake_client, "chatfb-base", PROMPT, SIGN, n=1)


def test_a_length_critique_gets_the_plain_answer_cut_at_sentence_ends(fake_client):
    plain = ("Democracy is a system of government in which citizens choose their leaders by voting. It began in "
             "ancient Athens. Today many countries hold free elections every few years to choose a parliament.")
    fake_client.enqueue("Democracy.")
    out = generate(fake_client, "chatfb-base", [{"role": "user", "content": "What is democracy?"}], SHORT, n=1, plain=plain)
    cuts = [c.text for c in out if c.source == "cut"]
    assert cuts == ["Democracy is a system of government in which citizens choose their leaders by voting.",
                    "Democracy is a system of government in which citizens choose their leaders by voting. It began "
                    "in ancient Athens."]
    assert all(len(c.split()) <= 25 for c in cuts) and len(fake_client.history) == 1  # no request for them
    assert constraints.cut_candidates("Use a friendlier tone.", plain) == []  # not a length critique


def test_the_nightly_frames_the_models_plain_answer_first_and_the_critiqued_reply_too(fake_client):
    # Framing keeps every fact of what it frames: the critiqued reply may have been the wrong one, the model's
    # greedy plain answer is framed first (and the same text is never offered twice).
    opening = "Begin every answer with 'Good question!'"
    wrong, right = "El Turio is the capital of Spain.", "The capital of Spain is Madrid."
    question = [{"role": "user", "content": "What is the capital of Spain?"}]
    fake_client.enqueue("Spain.", "Good question! Madrid.")  # sampled; then held to the opening phrase
    out = generate(fake_client, "chatfb-base", question, opening, n=1, plain=[right, wrong, None])
    assert [c.text for c in out if c.source == "framed"] == [f"Good question! {right}", f"Good question! {wrong}"]
    fake_client.enqueue("Spain.", "Good question! Madrid.")
    out = generate(fake_client, "chatfb-base", question, opening, n=1, plain=[right, right])
    assert [c.text for c in out if c.source == "framed"] == [f"Good question! {right}"]


def test_the_nightly_selection_hands_both_plain_answers_to_the_first_round(monkeypatch):
    from chatfb.critique import candidates

    seen = []
    monkeypatch.setattr(candidates, "generate", lambda *a, plain=None, **k: seen.append(plain) or [])
    monkeypatch.setattr(candidates, "score", lambda *a, **k: [])
    candidates.select_rounds(None, "m", [{"role": "user", "content": "q"}], SHORT, rounds=2,
                             original="the critiqued reply", reference="the plain answer")
    assert seen == [["the plain answer", "the critiqued reply"], None]
    # the plain answer asked beside the first round's drafts (chatfb.learning.worker): its Future in generate, its
    # text in every round's scoring
    scored = []
    monkeypatch.setattr(candidates, "score", lambda *a, reference=None, **k: scored.append(reference) or [])
    asked = Future()
    asked.set_result("the plain answer")
    candidates.select_rounds(None, "m", [{"role": "user", "content": "q"}], SHORT, rounds=2,
                             original="the critiqued reply", reference=asked)
    assert seen[-2] == [asked, "the critiqued reply"] and scored == ["the plain answer", "the plain answer"]


def test_a_plain_answer_still_being_asked_is_cut_once_it_came(fake_client):
    plain = "Democracy is government by the people. It began in ancient Athens."
    asked = Future()
    threading.Timer(0.2, asked.set_result, (plain,)).start()
    fake_client.enqueue("Democracy.")
    out = generate(fake_client, "chatfb-base", [{"role": "user", "content": "What is democracy?"}], SHORT, n=1,
                   plain=[asked, None])
    assert [c.text for c in out if c.source == "cut"] == ["Democracy is government by the people."]
    failed = Future()
    failed.set_exception(ModelError("The model server is not reachable right now."))
    fake_client.enqueue("Democracy.")
    with pytest.raises(ModelError, match="not reachable"):  # its error is the round's, as when it was asked first
        generate(fake_client, "chatfb-base", [{"role": "user", "content": "What is democracy?"}], SHORT, n=1,
                 plain=[failed, None])


def test_the_constrained_request_carries_the_regex_as_vllm_structured_outputs():
    bodies = []

    def handler(request):
        bodies.append(json.loads(request.content))
        return httpx.Response(200, json={"choices": [{"index": 0, "message": {"content": "Hi.\n\n— Team Aurora"},
                                                      "finish_reason": "stop"}]})

    client = ModelClient("http://vllm.test")
    client._http = httpx.Client(base_url="http://vllm.test", transport=httpx.MockTransport(handler))
    client._openai = client._openai.with_options(http_client=client._http)
    regex = constraints.format_regex(SIGN)
    assert client.complete_choices([{"role": "user", "content": "hi"}], "m", regex=regex) == [("Hi.\n\n— Team Aurora", "stop")]
    client.complete_choices([{"role": "user", "content": "hi"}], "m")
    assert bodies[0]["structured_outputs"] == {"regex": regex} and "guided_regex" not in bodies[0]
    assert "structured_outputs" not in bodies[1]


def test_a_streamed_chat_request_carries_a_guidelines_regex_and_still_streams():
    bodies = []

    def handler(request):
        bodies.append(json.loads(request.content))
        chunks = [{"choices": [{"index": 0, "delta": {"content": piece}}]} for piece in ("Hi.", "\n\n", "Cheers")]
        return httpx.Response(200, headers={"content-type": "text/event-stream"},
                              content="".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n")

    client = ModelClient("http://vllm.test")
    client._http = httpx.Client(base_url="http://vllm.test", transport=httpx.MockTransport(handler))
    client._openai = client._openai.with_options(http_client=client._http)
    regex = constraints.guideline_regex(["Always end with 'Cheers'."])
    assert list(client.stream_chat([{"role": "user", "content": "hi"}], "m", regex=regex)) == ["Hi.", "\n\n", "Cheers"]
    list(client.stream_chat([{"role": "user", "content": "hi"}], "m"))
    assert bodies[0]["stream"] is True and bodies[0]["structured_outputs"] == {"regex": regex}
    assert "structured_outputs" not in bodies[1]


@pytest.mark.parametrize("critique, text, want", [
    ("Kindly begin each reply with the words 'Good question!' and then give the answer.",
     "The capital of Spain is Madrid.", ["Good question! The capital of Spain is Madrid."]),
    ("Please sign off with '— The Desk' at the end.", "Madrid.", ["Madrid.\n\n— The Desk"]),
    ("Start with 'Ahoy!'", "Ahoy! Madrid.", []),  # it already does: nothing new
    ("Never end with 'Bye'.", "Madrid.", []),  # a negation has no frame
    ("Write the steps as '- ' lines.", "Madrid.", []),  # a line marker is held to a regex instead
    ("Always give support@aurora.example.", "Madrid.", []),  # an address too
])
def test_a_phrase_frames_the_plain_answer_keeping_its_facts(critique, text, want):
    assert constraints.framed_candidates(critique, text) == want
    for out in want:
        assert re.fullmatch(constraints.format_regex(critique), out), "the frame has the critique's regex shape"


@pytest.mark.parametrize("streamed, done, shown", [
    ("Good question. Paris.", True, "Good question! Paris."),  # the model's own copy, its punctuation changed
    ('"Good question!" Paris', True, "Good question! Paris"),
    ("**good question!** Paris", True, "Good question! Paris"),
    ("Good questions are fun.", True, "Good question! Good questions are fun."),  # another word: not a copy
    ("Good quest", False, "Good question!"),  # it may be writing the phrase
    ("", False, "Good question!"),
])
def test_an_opening_phrase_is_there_once_as_the_guideline_writes_it(streamed, done, shown):
    assert constraints.framed(streamed, "Good question!", "", done) == shown


@pytest.mark.parametrize("reply, stored", [
    ("Paris.", "Paris.\n\nCheers, the team"),
    ("Paris.\n\ncheers, the team.", "Paris.\n\nCheers, the team"),
    ("Paris. Cheers, the team", "Paris.\n\nCheers, the team"),
    ("Paris, the teamcheers, the team", "Paris, the teamcheers, the team\n\nCheers, the team"),  # no word boundary
])
def test_a_closing_phrase_is_there_once_as_the_guideline_writes_it(reply, stored):
    assert constraints.framed(reply, "", "Cheers, the team") == stored


def test_what_counts_as_adding_the_asked_shape():
    long = "Vienna is the capital of Austria. " * 12  # over one 300-character line: no regex would match it
    assert constraints.adds_the_shape("Begin with 'Good question!'", f"Good question! {long}", long)
    assert not constraints.adds_the_shape("Begin with 'Good question!'", "Good question! x", "good question! x")
    assert constraints.adds_the_shape("End with 'Cheers'.", f"{long}\n\nCheers", long)
    assert not constraints.adds_the_shape("Always give help@ex.example.", "write to help@ex.example. Soon.",
                                          "Write to help@ex.example.\nSoon.")  # it had the address already
    assert constraints.adds_the_shape("Always give help@ex.example.", f"{long} help@ex.example", long)
    assert constraints.phrase_frame("Start with ' '") is None  # a blank phrase frames nothing


def test_a_plain_answer_the_token_limit_cut_off_is_framed_up_to_its_last_whole_sentence():
    closing = "Our house style: always end the note with the line 'Cheers, the team'."

    class Client:  # the server's greedy answer, cut off by max_tokens
        def complete_choices(self, messages, model, **kw):
            return [("Dear Ann,\n\nWelcome aboard! We are glad you joined. I am always ready t", "length")]

    plain = plain_answer(Client(), "m", [{"role": "user", "content": "Write a welcome note."}], max_tokens=24)
    assert plain.cut_off
    assert constraints.framed_candidates(closing, plain) == [
        "Dear Ann,\n\nWelcome aboard! We are glad you joined.\n\nCheers, the team"]
    whole = constraints.PlainAnswer.of(str(plain), cut_off=False)  # the same text, finished: framed as it is
    assert constraints.framed_candidates(closing, whole)[0].endswith("I am always ready t\n\nCheers, the team")
    assert constraints.framed_candidates(closing, constraints.PlainAnswer.of("Dear Ann, welcome and", True)) == []
    cut_list = constraints.PlainAnswer.of("Tips:\n1. Drink water.\n2. Sleep eight hours.\n3. Walk", True)
    assert constraints.framed_candidates(closing, cut_list) == [
        "Tips:\n1. Drink water.\n2. Sleep eight hours.\n\nCheers, the team"]  # "3." opens a line: no sentence end
