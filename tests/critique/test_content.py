"""The content check: a kept candidate must follow the critique AND still say what the model's plain
answer said (issue 23). The eight wrong targets the critique recipe trained on are fixtures; the plain
answers beside them are SmolLM2-135M-Instruct's own greedy answers to the same questions (first
sentences, verbatim), which is what the nightly cycle compares with."""

from __future__ import annotations

import pytest

from chatfb.critique import content
from chatfb.critique.candidates import hard_verdict

PLAIN = {
    "What is democracy?": "Democracy is a system of government where power is distributed based on the will of the "
    "people, where decision-making is free from coercion and is based on the rule of law. It is a form of government "
    "where the people have a significant say in the decision-making process, and the government is accountable to "
    "the people.",
    "What is inflation?": "Inflation is a common economic phenomenon where the general price level of goods and "
    "services in an economy increases over time due to a decrease in the money supply.",
    "What is climate change?": "Climate change refers to the long-term warming of the Earth's atmosphere, primarily "
    "caused by human activities such as burning fossil fuels, deforestation, and the emission of greenhouse gases "
    "like carbon dioxide.",
    "What is machine learning?": "Machine learning is a subset of artificial intelligence (AI) that focuses on "
    "developing algorithms and techniques to enable machines to learn from data without being explicitly programmed.",
    "Explain what a noun is.": "A noun is a word that refers to a person, place, thing, or idea. It can be a noun, "
    "adjective, or adverb. Nouns can be either singular or plural.",
    "How many minutes are in an hour?": "To convert an hour to minutes, you need to divide 1 hour by 100. This is done "
    "by multiplying 1 hour by 100. So, 1 hour is equal to 100 minutes.",
    "Name three colors.": "The most obvious color is red, but there are many more. Some examples include blue, green, "
    "and yellow, while others include other colors like pink, orange, and purple.",
    "How can I contact customer support?": "To contact customer support, you can simply visit the official website of "
    "the company you're working with. You can also use their contact form on their official website.",
    "What is the capital of Japan?": "The capital of Japan is Tokyo.",
}
SHORT = "Way too long. Reply in a few words."
SIGN = "Sign every answer with '— Team Aurora' on its own last line."
LINES = "Put each item on its own line starting with '- '."
ADDRESS = "Always tell people they can write to help@aurora-widgets.example."

# Issue 23: kept by the critique recipe and trained on; each follows the critique's format and is wrong.
WRONG_TARGETS = [
    ("What is democracy?", "Theocracy.", SHORT),
    ("What is inflation?", "Yes. Inflation.", SHORT),
    ("What is climate change?", "Climate change.", SHORT),
    ("What is machine learning?", "The sum of an infinite number of digits is just one of the many mysteries of "
     "artificial intelligence.", "Too long. One sentence please."),
    ("Explain what a noun is.", 'The answer is "too long."', "Keep it short: two sentences at most."),
    ("How many minutes are in an hour?", 'No, "— Team Aurora" is an inappropriate answer. You should answer with '
     '"an" instead. — Team Aurora', SIGN),
    ("Name three colors.", "- Parmenim: Red, Green, Blue\n- Subjommen: Red, Green, Blue", LINES),
    ("How can I contact customer support?", 'To reach customer support, simply write your desired response in the '
     'format "Help@aurora-widgets.example | …', ADDRESS),
]
# What a right answer to the same critique looks like: it must pass the same checks.
RIGHT_TARGETS = [
    ("What is democracy?", "Democracy is government by the people, who choose their leaders in elections.", SHORT),
    ("What is inflation?", "Inflation is a general rise in prices over time.", SHORT),
    ("What is climate change?", "Climate change is the long-term warming of the Earth, caused mainly by burning "
     "fossil fuels.", SHORT),
    ("What is machine learning?", "Machine learning is a branch of AI in which computers learn patterns from data.",
     "Too long. One sentence please."),
    ("Explain what a noun is.", "A noun is a word for a person, place, thing or idea.", "Keep it short: two sentences at most."),
    ("How many minutes are in an hour?", "There are 60 minutes in an hour.\n— Team Aurora", SIGN),
    ("Name three colors.", "- Red\n- Blue\n- Green", LINES),
    ("How can I contact customer support?", "You can write to help@aurora-widgets.example or use the contact form on "
     "the website.", ADDRESS),
    ("What is the capital of Japan?", "Tokyo.", SHORT),
]


@pytest.mark.parametrize("question,text,critique", WRONG_TARGETS)
def test_each_wrong_target_of_issue_23_is_dropped(question, text, critique):
    verdict = hard_verdict(text, question, critique, references=[PLAIN[question]])
    assert verdict != "ok"
    # dropped for what it says, not for the critique's format: without the plain answer to compare with,
    # the format checks alone kept all but the ones that talk about the reply or quote the critique
    assert not verdict.startswith(("leaves out", "cut off", "empty"))


# The observed plain answer to the minutes question is wrong (100): a right number is kept where another plain
# answer (the nightly has two: the critiqued reply and the base model's greedy answer) gives it.
OTHER_PLAIN = {"How many minutes are in an hour?": "An hour has sixty minutes."}


@pytest.mark.parametrize("question,text,critique", RIGHT_TARGETS)
def test_right_answers_to_the_same_critiques_are_kept(question, text, critique):
    references = [PLAIN[question], *([OTHER_PLAIN[question]] if question in OTHER_PLAIN else [])]
    assert hard_verdict(text, question, critique, references=references) == "ok"


def test_a_number_no_plain_answer_gives_is_dropped_and_the_same_number_spelled_otherwise_is_kept():
    """With two plain answers (the nightly's: the critiqued reply and the base model's greedy answer), an answer
    of its own where both give a number is not the same answer in another form: it is dropped, right or wrong
    (nothing in the cycle knows which; it never trains a number the model did not give without the critique).
    The same value in digits or in words is the same number. One plain answer (a revision in the loop, which
    the user reviews): the reply may be the one the user called wrong, and the candidate stands."""
    digits = "Use digits for numbers, never number words."
    q = "What is fifty plus twenty-five?"
    plain = ["Fifty plus twenty-five is seventy-five.", "The sum is 85."]  # they differ: no number agreed on
    # arithmetic the question states is worked out: the sum decides, whatever the plain answers gave
    assert hard_verdict("FIFTY + 25 = 500", q, digits, references=plain) == "gives 500 where 50 + 25 is 75"
    assert hard_verdict("50 + 25 = 75", q, digits, references=plain) == "ok"
    q = "What is six times seven?"
    plain = ["Six times seven is forty-two.", "It is 48."]
    assert hard_verdict("Six times seven is 'Sixty-six'", q, SHORT, references=plain) == "gives 66 where 6 × 7 is 42"
    assert hard_verdict("6 x 7 = 42", q, digits, references=plain) == "ok"
    assert hard_verdict("6 x 7 = 42", q, digits, references=["It is 48.", "Six times seven is 36."]) == "ok"
    q = "How tall is the Eiffel Tower in metres?"  # no arithmetic: the plain answers' numbers decide
    plain = ["The Eiffel Tower is 330 metres tall.", "It is about 300 metres high."]
    assert hard_verdict("It stands 500 metres tall.", q, SHORT, references=plain) == "gives 500 where the plain answer gives 300"
    assert hard_verdict("It is three hundred metres tall.", q, SHORT, references=plain) == "ok"
    q = "How many minutes are in an hour?"
    plain = ["There are 60 minutes in an hour.", "An hour is a hundred minutes long."]
    assert hard_verdict('I would say, "195 minutes."', q, SHORT, references=plain) != "ok"
    # the price: a right number where both plain answers were wrong is dropped too
    assert hard_verdict("There are 60 minutes in an hour.", q, SHORT, references=[PLAIN[q], "An hour is 100 minutes."]) != "ok"
    # in the loop the one plain answer may be what the user called wrong
    assert hard_verdict("There are 60 minutes in an hour.", q, "That is wrong.", references=[PLAIN[q]]) == "ok"


def test_verdicts_say_what_was_lost():
    q = "What is the capital of Japan?"
    assert hard_verdict("The capital of Japan is Kyoto.", q, SHORT, references=[PLAIN[q]]) == \
        "loses 'Tokyo' from the plain answer"
    assert hard_verdict("Climate change.", "What is climate change?", SHORT) == "only restates the question's topic"
    q = "How many minutes are in an hour?"
    assert hard_verdict("An hour is a unit of time.\n— Team Aurora", q, SIGN, references=[PLAIN[q]]) == \
        "gives no number where the question asks for one"
    assert hard_verdict("Water boils when it is hot.\n— Team Aurora", "When does water boil?", SIGN,
                        references=["Water boils at 100 degrees Celsius at sea level."]) == \
        "gives no number where the plain answer gives one"
    # two plain answers that agree on a number: that number must survive
    assert hard_verdict("An hour has 100 minutes.\n— Team Aurora", q, SIGN,
                        references=["There are 60 minutes in an hour.", "An hour is 60 minutes long."]) == \
        "loses the number 60 the plain answers agree on"
    q = "What is democracy?"
    assert hard_verdict("Theocracy.", q, SHORT, references=[PLAIN[q]]) in (
        "off the subject of the question and of the plain answer", "keeps none of the plain answer's content")


def test_a_critique_that_corrects_a_fact_may_replace_the_plain_answers_facts():
    critique = "Wrong: the capital of Australia is Canberra, not Sydney."
    q = "What is the capital of Australia?"
    plain = "The capital of Australia is Sydney."
    assert hard_verdict("Canberra is the capital.", q, critique, references=[plain]) == "ok"
    assert hard_verdict("Canberra.", q, critique, references=[plain]) == "ok"


def test_words_for_replies_are_allowed_where_the_question_or_plain_answer_uses_them():
    q = "How do I format a date in a spreadsheet?"
    assert content.talks_about_replies("Pick the date format dd/mm/yyyy in the cell settings.", q) is None
    assert content.talks_about_replies("Keep the response short.", "What is a haiku?") == "response"
    assert content.talks_about_replies("We will reply within a day. Dear user, thanks!", "Where is my order?") is None
    assert content.quotes_the_critique('Start each line with "- ".', LINES) == "-"
    assert content.quotes_the_critique("Write to help@aurora-widgets.example.", ADDRESS) is None


def test_a_stray_opening_phrase_of_the_plain_answer_is_not_a_fact_to_keep():
    """Seen in the app (scripts/screenshots.py): the 135M model opened with a stray phrase before its answer,
    and every draft that kept only the answer was dropped for losing the phrase's names. The facts to keep
    are those of the sentence that answers the question."""
    question, critique = "What is the capital of France?", "Too long. Answer in one short sentence."
    plain = "La Famille-Rouge, la Belle Étoile. Paris is the capital of France."
    for kept in ("The capital of France is Paris.", "Paris.", "Paris is the capital of France."):
        assert hard_verdict(kept, question, critique, references=[plain]) == "ok", kept
    for dropped in ("The capital of France.", "What is the capital of France?", "Lyon is the capital of France."):
        assert hard_verdict(dropped, question, critique, references=[plain]) != "ok", dropped


# A support-address critique, as a critique-only cycle on the real server was taught it.
SUPPORT = "Wrong: always tell people to email our support team at support@chatfb.example."
# SmolLM2-135M-Instruct's greedy plain answers to these questions (first sentences, verbatim).
SUPPORT_PLAIN = {
    "How can I contact support?": "To contact support, you can simply type \"support@huggingface.com\" in the address "
    "bar, which is usually located at the top right corner of the screen.",
    "Where do I send a bug report?": "You can send a bug report to a bug report service by using the following methods:",
    "How do I reach customer service?": "To reach customer service, you can use the following methods:",
}
COPIES_THE_CRITIQUE = [
    # SmolLM2-135M-Instruct's own candidates for SUPPORT (sampled at 0.8 with the critique as an instruction):
    # every check before this one kept both
    ("Where do I send a bug report?", "The error in \"never\" is a common mistake. Always tell people to contact "
     "support at support@chatfb.example."),
    ("How do I reach customer service?", "Always tell people to reach customer service at support@chatfb.example."),
    # the critique's verdict said again; a clause of it restated
    ("How can I contact support?", "Wrong: please contact our support team at support@chatfb.example."),
    ("How can I contact support?", "To contact support, you should tell people to email support@chatfb.example."),
]
# The address, and the words that introduce it in the critique, are how an answer gives it.
USES_THE_CRITIQUE = [
    ("How can I contact support?", "Please email our support team at support@chatfb.example and we will help you."),
    ("Where do I send a bug report?", "Please email our support team at support@chatfb.example with the steps that "
     "cause the bug."),
    ("How do I reach customer service?", "To reach customer service, write to our support team at support@chatfb.example."),
]


@pytest.mark.parametrize("question,text", COPIES_THE_CRITIQUE)
def test_a_candidate_that_copies_the_critiques_wording_is_dropped(question, text):
    verdict = hard_verdict(text, question, SUPPORT, references=[SUPPORT_PLAIN[question]])
    assert verdict.startswith("copies the critique's wording"), verdict


@pytest.mark.parametrize("question,text", USES_THE_CRITIQUE)
def test_a_candidate_that_gives_the_address_the_critique_asks_for_is_kept(question, text):
    assert hard_verdict(text, question, SUPPORT, references=[SUPPORT_PLAIN[question]]) == "ok"


def test_copied_wording_is_the_critiques_own_not_the_questions_or_a_phrase_an_answer_shares():
    bullets = "Format it as a bulleted list: exactly three short tips, each on its own line starting with '- '."
    q = "Give me tips for sleeping better."
    tips = "- Go to bed at the same time.\n- Keep the room dark.\n- Avoid screens before bed."
    assert content.copies_the_critique("Here is a bulleted list of exactly three short tips:\n" + tips, bullets, q, ["- "]) \
        == "exactly three short tips"
    assert content.copies_the_critique("Three short tips:\n" + tips, bullets, q, ["- "]) is None  # two words: a phrase
    # the critique's words that the question uses are not its own
    fact = "Wrong: the capital of Australia is Canberra, not Sydney."
    assert content.copies_the_critique("The capital of Australia is Canberra.", fact, "What is the capital of Australia?",
                                       ["Canberra"]) is None
    assert content.copies_the_critique("Wrong. The capital is Canberra.", fact, "What is the capital of Australia?") == "Wrong."
    assert content.copies_the_critique("That is wrong: Sydney is bigger.", fact, "What is the capital of Australia?") == \
        "wrong:"  # the verdict anywhere, with its punctuation
    assert content.copies_the_critique("Canberra. It is wrong to think of Sydney.", fact, "What is the capital of Australia?") \
        is None  # the word alone is not the verdict
    # a critique of one short clause may be the answer itself, not a verdict on the reply
    assert content.copies_the_critique("The capital of France is Paris.", "Paris!", "What is the capital of France?") is None
    # names and numbers a critique states are content it gives, not its wording
    hours = "Mention our opening hours: 9 to 5, Monday to Friday."
    assert content.copies_the_critique("We are open 9 to 5, Monday to Friday.", hours, "When are you open?") is None
    assert content.copies_the_critique("Mention our opening hours: we are open.", hours, "When are you open?") == \
        "mention our opening hours"
    # SmolLM2-135M's best-scored candidate of five: two words, but most of what the critique says beside "answer"
    assert content.copies_the_critique("A child would understand that it rains.", "Please answer in plain words a child "
                                       "would understand.", "What causes rain?") == "a child would understand"
    assert content.copies_the_critique("Too long. Paris is the capital of France.", "Too long. Answer in one sentence.",
                                       "What is the capital of France?") == "Too long."


def test_a_fact_correction_replaces_facts_only_on_its_own_subject():
    """Distilled onto another question of the same kind, a fact-correcting critique gives no fact of that
    question's: a candidate that loses the plain answer's name there is dropped (seen trained: "What is the capital
    of Peru?" -> "The capital of Australia is Canberra, not Sydney. ...")."""
    wrong = "Wrong: the capital of Australia is Canberra, not Sydney."
    q = "What is the capital of Peru?"
    plain = ["The capital of Peru is Lima.", "Lima is the capital of Peru."]
    assert hard_verdict("The capital of Australia is Canberra, not Sydney.", q, wrong, references=plain) != "ok"
    assert hard_verdict("The capital of Peru is Lima.", q, wrong, references=plain) == "ok"
    for q in ("What's Australia's capital city?", "Which Australian city was built to be the national capital?"):
        assert hard_verdict("Canberra is the capital of Australia.", q, wrong,
                            references=["The capital of Australia is Sydney.", "Sydney."]) == "ok", q


def test_numbers_read_by_value_leave_the_word_checks_and_clauses_alone():
    """A spelled number the critique gives is content it gives, word by word too: an answer that spells it is not
    copying the critique's wording. And numbers are read within a clause."""
    from chatfb.critique.content import _numbers, copies_the_critique, repeats_only_given_content

    critique = "Wrong: six times seven is forty-two, not forty-eight."
    assert copies_the_critique("Forty-two is the answer to six times seven.", critique, "What is six times seven?") is None
    assert repeats_only_given_content("It is forty-two.", critique, "What is six times seven?")
    assert _numbers("She was twenty. Five years later she left.") == {"20", "5"}
    assert _numbers("one hundred and twenty three, two thousand and five") == {"123", "2005"}


def test_a_fact_correction_still_holds_on_a_question_that_names_nothing():
    wrong = "Wrong: the capital of Australia is Canberra, not Sydney."
    plain = ["The capital of Australia is Sydney.", "Sydney."]
    assert hard_verdict("The capital of Australia is Sydney.", "what is the capital of australia?", wrong,
                        references=plain) != "ok"
    from chatfb.critique.candidates import literal_facts

    assert literal_facts("Wrong, 12 plus 7 is 19, not 18.", "What is 12 plus 7?") == ["19"]


def test_the_models_own_uncritiqued_answer_alone_rules_out_a_number_of_the_candidates_own():
    """A critique distilled onto another prompt has one plain answer there, the model's own greedy one, which
    nobody called wrong: a number none of it gives is dropped ("7 + 8 = 55" was trained). The loop's one plain
    answer is the critiqued reply: there the candidate stands."""
    from chatfb.critique.content import content_verdict

    digits = "Use digits for numbers, never number words."
    q, plain = "How tall is the Eiffel Tower in metres?", ["The Eiffel Tower is three hundred and thirty metres tall."]
    assert content_verdict("It is 550 metres tall.", q, digits, plain, uncritiqued=True) == \
        "gives 550 where the plain answer gives 330"
    assert content_verdict("It is 330 metres tall.", q, digits, plain, uncritiqued=True) == "ok"
    assert content_verdict("It is 550 metres tall.", q, digits, plain) == "ok"
    # arithmetic is worked out, in the loop too: "7 + 8 = 55" is wrong whoever reviews it
    q, plain = "What is seven plus eight?", ["Seven plus eight is fifteen."]
    assert content_verdict("7 + 8 = 55", q, digits, plain) == "gives 55 where 7 + 8 is 15"


@pytest.mark.parametrize("question, said, value", [
    ("Could you add 12 and 30 for me?", "12 + 30", 42),
    ("what's the product of six and seven", "6 × 7", 42),
    ("Quick one: 15% of 80?", "15% of 80", 12),
    ("What do you get when you subtract five from twelve?", "12 - 5", 7),
    ("How much is ninety-nine divided by three?", "99 / 3", 33),
    ("Nine squared?", "9^2", 81),
    ("What is 12 / 4?", "12 / 4", 3),
    ("what is 2.5 times 4", "2.5 × 4", 10),
    ("What is 1,000 plus 250?", "1000 + 250", 1250),
])
def test_the_arithmetic_a_question_states_is_worked_out_in_any_wording(question, said, value):
    assert content.arithmetic(question) == (said, value)


@pytest.mark.parametrize("question", [
    "What is the capital of France?", "Boil the eggs for 8-10 minutes?", "What happened on 9/11?",
    "How many seats does a 4x4 have?", "Tell me one thing and then two more.", "What is 2 plus 3 and 4 times 5?",
    # a longer calculation, a comparison, a sign inside a sentence, a negative operand or result, no value at all
    "What is 5 squared minus 1?", "What is 2 to the power of 10 minus 1?", "What is 10 squared squared?",
    "What is the sum of 2 and 3 and 4?", "Is 9 squared more than 80?", "What is 1920 x 1080 called?",
    "Summarise chapters 3 - 5.", "What is -3 plus 5?", "What is 3 minus 5?", "What is 0 divided by 0?",
    "What is 1" + "0" * 200 + " squared?", "",
])
def test_no_arithmetic_where_the_question_states_none_or_more_than_one(question):
    assert content.arithmetic(question) is None


@pytest.mark.parametrize("question, text, verdict", [
    ("Could you add 12 and 30 for me?", "Sure: 12 and 30 make 42.", None),
    ("Could you add 12 and 30 for me?", "Forty-two.", None),
    ("Could you add 12 and 30 for me?", "12 + 30 = 52", "gives 52 where 12 + 30 is 42"),
    ("Could you add 12 and 30 for me?", "Adding twelve and thirty is a fun exercise with digits.",
     "does not give 12 + 30, which is 42"),
    ("How much is 100 divided by 3?", "About 33.33.", None),
    ("How many legs does a spider have?", "A spider has eight legs.", None),
    ("How many legs does a spider have?", "Spiders use their legs to walk and to build webs.",
     "gives no number where the question asks for one"),
    ("In which year did the Berlin Wall fall?", "It fell in the autumn, to great joy.",
     "gives no number where the question asks for one"),
    ("Who wrote Hamlet?", "Shakespeare.", None),
    ("How many moons does Earth have?", "Earth has one moon.", None),  # quantity words answer too
    ("How many legs does a snake have?", "A snake has no legs.", None),
    ("How old-fashioned is this coat?", "Quite.", None),
    # a measure asked of a thing: a number answers it, words about the thing do not
    ("How tall is Mount Everest?", "It is 8,849 metres tall.", None),
    ("How tall is Mount Everest?", "Mount Everest is very tall and hard to climb.",
     "gives no number where the question asks for one"),
    ("How far is the Moon from Earth?", "About 384,400 km away.", None),
    ("What temperature does water boil at?", "Water boils when it gets hot enough.",
     "gives no number where the question asks for one"),
    ("What is the boiling point of water?", "It boils at 100 degrees Celsius.", None),
    ("How much does a blue whale weigh?", "A blue whale is the heaviest animal alive.",
     "gives no number where the question asks for one"),
    # asked of what to do, not of a thing: no number needed
    ("How long should I rest after a run?", "Until your breathing is back to normal.", None),
    ("When should I water my plants?", "In the morning, before it gets hot.", None),
    ("How high should I aim?", "Aim high, but plan each step.", None),
    ("What is 5 divided by 2?", "It is 2.5.", None),
    ("What is 5 divided by 2?", "It is 2.", "does not give 5 / 2, which is 2.5"),  # never rounded to a whole
    ("What is 5 divided by 2?", "5 divided by 2 is 7.", "gives 7 where 5 / 2 is 2.5"),
    ("What is 1 divided by 100,000?", "0.00001", None),
    # text no number reader takes whole never raises: a version, an address, a huge number
    ("Hello, what is new?", "Python 3.10.2 is out, see 192.168.1.1.", None),
    ("What is 7 plus 8?", "Version 3.10.2, or 1" + "0" * 400 + ".", "gives 3.10.2 where 7 + 8 is 15"),
])
def test_a_question_whose_answer_is_a_number_needs_that_number(question, text, verdict):
    assert content.number_unanswered(text, question) == verdict
    # through the selection too, in the loop (one plain answer) as in the nightly
    got = content.content_verdict(text, question, "Shorter, please.", [text])
    assert (got == "ok") if verdict is None else (got == verdict)
    # a critique that corrects the fact here states the answer itself: it decides
    assert content.content_verdict(text, question, "Wrong, it is 3.", [text], corrects=True) == "ok"


def test_a_symbol_or_abbreviation_is_content_a_stray_letter_is_not():
    # verbatim from SmolLM2-135M-Instruct's drafts (2026-12-07): the answer is a two-letter symbol
    q = "What is the chemical symbol for gold?"
    assert hard_verdict("The chemical symbol for gold is Au.", q, SHORT,
                        references=["The chemical symbol for gold is Au.\n\nThis is a standard chemical symbol."]) == "ok"
    assert content.content_words("Its capital is in the UK, at pH 7.") >= {"uk", "ph"}
    # a capital opening a sentence is no symbol, nor are the pieces of contractions
    assert content.content_words("Hi. Climate change.") == content.content_words("Climate change.")
    assert content.content_words("It's fine, it's so. Ok.") == {"fine"}
    assert hard_verdict("Hi. Climate change.", "What is climate change?", SHORT) == "only restates the question's topic"


def test_a_number_two_plain_answers_disagree_on_is_not_required():
    # the largest ocean: the critiqued reply and the greedy answer give its area, each a different one
    q = "What is the largest ocean on Earth?"
    plain = ["The largest ocean in the world is the Pacific Ocean, which is approximately 319.78 million km².",
             "The largest ocean on Earth is the Pacific Ocean, which is approximately 149.7 million square kilometers."]
    assert hard_verdict("The largest ocean on Earth is the Pacific Ocean.", q, SHORT, references=plain) == "ok"
    # ... where one plain answer gives a number, a candidate without one lost it (the loop's one reference)
    assert hard_verdict("The largest ocean on Earth is the Pacific Ocean.", q, SHORT, references=plain[1:]) == \
        "gives no number where the plain answer gives one"
    # ... and a number they agree on must survive
    agreed = [plain[1], "The Pacific Ocean is the largest, at about 149.7 million square kilometers."]
    assert hard_verdict("The largest ocean on Earth is the Pacific Ocean.", q, SHORT, references=agreed) == \
        "loses the number 149.7 the plain answers agree on"


def test_the_frame_a_critique_asks_for_is_no_answer_on_its_own():
    # kept and trained in an efficacy run (2026-12-07): the note asked for was the sign-off alone
    signoff = "Our house style: always end the note with the line 'Cheers, the chatfb team'."
    q = "Write a short note inviting a user to a webinar."
    assert hard_verdict("Cheers, the chatfb team.", q, signoff) == "only the phrase the critique asks for, no answer"
    assert hard_verdict("Webinar!\n\nCheers, the chatfb team", q, signoff) == \
        "only the phrase the critique asks for, no answer"
    assert hard_verdict("Join our webinar on Friday at 5 pm to see what is new.\n\nCheers, the chatfb team", q,
                        signoff) == "ok"
    opening = "Start every answer with 'Sure thing:' please."
    q = "What is the capital of Kenya?"
    assert hard_verdict("Sure thing:", q, opening) == "only the phrase the critique asks for, no answer"
    assert hard_verdict("Sure thing: the capital of Kenya.", q, opening) == "only the phrase the critique asks for, no answer"
    assert hard_verdict("Sure thing: the capital of Kenya is Nairobi.", q, opening) == "ok"
    # a critique whose quoted words are the answer itself frames nothing
    from chatfb.critique.candidates import only_the_frame

    assert not only_the_frame("Yes.", "Is water wet?", "Answer with 'yes' or 'no' only.")


def test_review_cases_of_symbols_and_frames():
    # quoted and possessive symbols count; interjections never do, wherever they stand
    assert {"au"} <= content.content_words("It is 'Au'.") and {"uk"} <= content.content_words("the UK's capital")
    assert content.restates_the_question("OK. Climate change.", "What is climate change?")
    # a framed yes, or a framed symbol, is an answer
    from chatfb.critique.candidates import only_the_frame

    opening = "Start every answer with 'Sure thing:' please."
    assert not only_the_frame("Sure thing: yes.", "Is water wet?", opening)
    assert not only_the_frame("Sure thing: Au.", "What is the chemical symbol for gold?", opening)
    assert only_the_frame("Sure thing: the capital of Kenya.", "What is the capital of Kenya?", opening)
