"""A second set of critiques, worded unlike the efficacy families and the fixtures the selection's checks were
built on, written after them (issue 23: a check must hold on critiques it was not written for). Each has a
candidate that talks about the critique instead of answering and one that answers as the critique asks;
the plain answers are in the 135M model's manner (first sentences).

First run (after the copy check and the ranking term were built): 7 of 8 talks dropped (one only by a bug:
a quote the critique forbids, "Don't start with 'Great question!'", was required, which also dropped that
critique's right answer), 6 of 8 answers kept. That bug is fixed (candidates.literal_facts); nothing else
was changed for this set: 6 of 8 talks dropped, 7 of 8 answers kept. The copy check caught four of the six
talks ('as bullet points', 'on a separate line', 'you forgot to tell them', 'This is incorrect.') and was
the only check to catch the first. The answer it still dropped, "The Great Fire of London was in 1666." for
"This is incorrect. The Great Fire of London was in 1666.", was "repeats the critique" (ROUGE-L 0.84 to it),
as were 2 of 10 right answers of the efficacy family australia_capital: a reply whose words shared with the
critique are the question's or the names and numbers it gives no longer repeats it (fixed after this set
showed it, so that case is no longer held out): 8 of 8 answers kept. What the checks still get wrong is
marked xfail, with why."""


from __future__ import annotations

import pytest

from chatfb.critique.candidates import hard_verdict

# (question, plain answer, critique, talks about the critique, answers as asked)
CASES = [
    ("How do I report a gas leak?",
     "If you smell gas, leave the building immediately and avoid using any electrical switches.",
     "Nope. You forgot to tell them to ring 0800 123 456.",
     "You forgot to tell them: ring 0800 123 456 if you smell gas.",
     "Leave the building at once and ring 0800 123 456 from outside."),
    ("What is the speed of light?",
     "The speed of light in a vacuum is about 299,792 kilometres per second. It is a fundamental constant of nature.",
     "Way too wordy!! Trim it to the essentials.",
     "Trimmed to the essentials: the speed of light is about 299,792 km/s.",
     "About 299,792 kilometres per second."),
    ("What should I pack for a beach trip?",
     "For a beach trip, you should pack sunscreen, a towel, a swimsuit and plenty of water.",
     "Could you put this as bullet points instead? Each point should start with '* '.",
     "Sure, here it is as bullet points:\n* Sunscreen\n* Towel\n* Swimsuit",
     "* Sunscreen\n* A towel\n* A swimsuit\n* Plenty of water"),
    ("Where is Mount Kilimanjaro?",
     "Mount Kilimanjaro is located in Kenya, in East Africa.",
     "Not quite right — Mount Kilimanjaro is in Tanzania, not Kenya.",
     "Not quite right: Mount Kilimanjaro is in Tanzania.",
     "Mount Kilimanjaro is in Tanzania, in East Africa."),
    ("Write a reply thanking a customer for their order.",
     "Dear customer, thank you so much for your order! We truly appreciate your business and hope you enjoy your purchase.",
     "Please always close with 'Kind regards, Mia' on a separate line.",
     "Thank you for your order!\nAs requested, I always close with the line below on a separate line.\nKind regards, Mia",
     "Thank you so much for your order! We hope you enjoy your purchase.\n\nKind regards, Mia"),
    ("What is DNS?",
     "DNS, or Domain Name System, is a hierarchical and decentralized naming system that translates domain names into "
     "IP addresses.",
     "Ugh, too technical. Say it simply.",
     "Saying it simply: DNS is like a phone book for the internet.",
     "DNS turns website names into the number addresses computers use, like a phone book."),
    ("When was the Great Fire of London?",
     "The Great Fire of London took place in 1766.",
     "This is incorrect. The Great Fire of London was in 1666.",
     "This is incorrect. The fire was in 1666.",
     "The Great Fire of London was in 1666."),
    ("How do vaccines work?",
     "Great question! Vaccines work by training the immune system to recognise a germ without causing the disease.",
     "Don't start with 'Great question!' — just answer.",
     "Just answer: vaccines train the immune system.",
     "Vaccines train the immune system to recognise a germ, so the body can fight it off without getting sick."),
]


KNOWN_MISSES = {
    # runs of words are matched word for word: "Trimmed to the essentials" shares one word with "Trim it to the
    # essentials" ("trimmed" is not "trim"), and "just answer" is one content word of a two-word critique
    ("talks", "What is the speed of light?"): "copied runs are not stemmed",
    ("talks", "How do vaccines work?"): "one copied content word is never sizeable",
}


def _cases(kind: str):
    return [pytest.param(*c, id=c[0], marks=[pytest.mark.xfail(reason=KNOWN_MISSES[(kind, c[0])], strict=True)]
                         if (kind, c[0]) in KNOWN_MISSES else []) for c in CASES]


@pytest.mark.parametrize("question,plain,critique,talks,answers", _cases("talks"))
def test_talk_about_the_critique_is_dropped(question, plain, critique, talks, answers):
    assert hard_verdict(talks, question, critique, references=[plain]) != "ok"


@pytest.mark.parametrize("question,plain,critique,talks,answers", _cases("answers"))
def test_an_answer_as_the_critique_asks_is_kept(question, plain, critique, talks, answers):
    assert hard_verdict(answers, question, critique, references=[plain]) == "ok"
