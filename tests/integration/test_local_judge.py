"""The local judge's batched scoring (chatfb.critique.judge.LocalJudge.completion_logprobs_many) gives the numbers
one-at-a-time scoring gives, on the real embedded model: the in-loop revision and the nightly rank with it."""

import pytest

from chatfb.critique.judge import LocalJudge

pytestmark = pytest.mark.integration

CONVERSATION = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "What is the capital of France?"}]
INSTRUCTED = CONVERSATION[:-1] + [{"role": "user", "content": CONVERSATION[-1]["content"] +
                                   "\n\nFeedback on your last answer: too long. Answer in one short sentence."}]
REPLIES = ["Paris.", "The capital of France is Paris, a city on the Seine known for the Eiffel Tower and the Louvre.",
           "Paris is the capital.", "I think it is Lyon, but Paris is also a big city in France.",
           "The capital of France is Paris.", "Paris! 🇫🇷 <b>really</b>"]


def test_batched_scores_equal_one_at_a_time_scores(embedded_model):
    judge = LocalJudge(embedded_model)
    jobs = [(msgs, r) for r in REPLIES for msgs in (INSTRUCTED, CONVERSATION)] + [(CONVERSATION, "")]
    many = judge.completion_logprobs_many(jobs, chunk=4)  # two chunks for each conversation's six replies
    for (msgs, reply), got in zip(jobs, many):
        want = judge.completion_logprobs(msgs, reply)
        assert len(got) == len(want), reply
        assert max(abs(a - b) for a, b in zip(got, want)) < 1e-3, reply
