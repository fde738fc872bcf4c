"""Learning-efficacy benchmark: does the model pick up what scripted users teach it, and keep the rest?

Eight preference families, each taught through ten pieces of feedback on different prompts and
checked on six held-out prompts of the same kind that training never sees. Every prompt also has a
known right answer (Family.right: the address, a key term of the definition, the subject of the tips or
note, the sum, the capital, the fact), so a reply is scored on "follows the preference", "right" and "both":

  support_email     a domain fact   - support questions should give support@chatfb.example
  tips_bullets      a format        - "tips for ..." answers as a "- " bulleted list (>= 3 items)
  short_definition  a length        - "what is ..." answered in one sentence of at most 25 words
  house_signoff     a house style   - short notes end with "Cheers, the chatfb team"
  australia_capital a fact stated only in the critique - questions about Australia's capital or seat
                    of government should say Canberra ("Wrong: the capital of Australia is Canberra, not Sydney.")
  digit_sums        a number style - arithmetic answered with digits, never number words (untuned until
                    2026-12-06: chatfb.critique.content.arithmetic was written after reading its kept examples)
  greeting_capitals an opening phrase, untuned - "What is the capital of ...?" replies open with "Good question!"
  question_back     a conversational habit, untuned - general-knowledge answers end by asking the user a
                    question (added 2026-12-06 with its prompts and checks written before any run of it)

Untuned: no check of the selection (chatfb.critique.candidates, chatfb.critique.content) was written or
tuned while looking at these families' critiques or prompts; the held-out prompts of every family
were never used to tune anything either. Issue 23's content-check thresholds were set on other questions
(tests/critique/test_content.py).

Every mode starts from the same base model and a fresh data folder, imports its feedback with
`python -m chatfb import-feedback` and runs the real learning cycle, `python -m chatfb nightly
--no-promote` (snapshot, data builder, critique candidates, TRL training, gate), against one vLLM server:

  base                 no training
  sft                  corrections (the rewritten reply) -> SFT only        (CHATFB_TRAIN_DPO=false)
  sft_dpo              corrections -> SFT, then DPO on (correction, original reply) pairs
  ilf                  critiques only, today's "rewrite this reply given this feedback" prompt
                       (CHATFB_TRAIN_MODE=unsupervised CHATFB_CRITIQUE_RECIPE=ilf)
  critique             critiques only, unattended, the new recipe: the question answered again with the
                       critique as an instruction, selected by the served model (CHATFB_CRITIQUE_RECIPE=instruct)
  accept               critique + in-loop acceptance: for each critiqued prompt the scripted user is offered
                       the candidates chatfb.critique.candidates.select_rounds keeps (best first) and accepts the first that
                       passes the family's checker (imported as a correction with that text), dismissing the
                       others, pressing "Try again" once when none passes; a critique with no acceptable candidate stays a critique (CHATFB_TRAIN_MODE=semi)
  guideline_prompt     no training: every family's critique as an approved guideline in the system prompt
                       at judge time (chatfb.critique.guidelines.apply, as the app sends it)
  guideline_distilled  every family's critique as an approved global guideline (`python -m chatfb guidelines
                       add`); the critiques are imported too but train nothing themselves
                       (CHATFB_TRAIN_MODE=supervised): the cycle distils the guidelines on the critiqued prompts

The "original reply" of each piece of feedback is the base model's own greedy answer, as in the app.
Uptake = share of a family's held-out prompts whose greedy reply passes the family's checker.
Retention = share of ten control prompts (general questions, in no training set) whose reply keeps
the base answer's meaning (all-MiniLM-L6-v2 cosine >= 0.6, the gate's test), plus the mean cosine;
"n/a" where nothing was measured (the base row, a cycle that trained nothing).
Control right = share of control replies that name the question's known answer (CONTROL_ANSWERS).
Leak = control replies that pass any family checker although the base reply did not.
Example share = share of a family's (not held-out) feedback that became a training example; selection
precision = share of the cycle's kept examples (its candidates rows with status kept, and accepted
revisions) that pass the family's checker; "both" precision = kept examples that pass it and are right
(by the family's known answer where the prompt is the family's own).
Cycle wall time and peak memory (RSS summed over the cycle's
process tree, sampled every 0.2 s; the vLLM server is not in it) are measured per run. Each training
mode runs --seeds times (CHATFB_SEED 1234, 1235, ...: another held-out split, other samples); the table
gives mean ± standard deviation over the runs.

    python -m bench.efficacy_bench                     # starts its own vLLM on the embedded model
    python -m bench.efficacy_bench --vllm-url http://127.0.0.1:8011 --model-dir data/models/SmolLM2-135M-Instruct
    python -m bench.efficacy_bench --smoke ...         # 2 families x 2 items, 1 epoch, 1 seed, 2 candidates per critique, modes base/critique
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from bench.cycle import learning_cycle
from bench.report import (add_output_flags, default_out_dir, machine, markdown_table, plot_path, pyplot, save_figure,
                          write_results)
from bench.server import SERVED_NAME, add_server_flags, vllm_server

NAME = "efficacy_bench"
SYSTEM = "You are a helpful assistant."
EMAIL = "support@chatfb.example"
SIGNOFF = "Cheers, the chatfb team"
MODES = ("base", "sft", "sft_dpo", "ilf", "critique", "accept", "guideline_prompt", "guideline_distilled")
SMOKE_MODES = ("base", "critique")  # CI checks that the bench runs: its hardest mode (the corrections cycle is
# tests/integration/test_learning.py's; each smoke cycle took about 110 s of CI); ilf is kept for comparison runs
MODE_ENV = {  # each training mode's cycle settings
    "sft": {"CHATFB_TRAIN_MODE": "supervised"},
    "sft_dpo": {"CHATFB_TRAIN_MODE": "supervised", "CHATFB_TRAIN_DPO": "true"},
    "ilf": {"CHATFB_TRAIN_MODE": "unsupervised", "CHATFB_CRITIQUE_RECIPE": "ilf"},
    "critique": {"CHATFB_TRAIN_MODE": "unsupervised", "CHATFB_CRITIQUE_RECIPE": "instruct"},
    "accept": {"CHATFB_TRAIN_MODE": "semi", "CHATFB_CRITIQUE_RECIPE": "instruct"},
    "guideline_distilled": {"CHATFB_TRAIN_MODE": "supervised"},
}
SEED = 1234  # chatfb's default CHATFB_SEED; run i of a mode uses SEED + i
HOLDOUT_FRACTION = 0.2  # chatfb's default CHATFB_HOLDOUT_FRACTION: which feedback the cycle held out
RETENTION_COSINE = 0.6


@dataclass(frozen=True)
class Family:
    name: str
    kind: str  # what sort of preference it is
    critique: str  # what a user who does not rewrite the reply says
    check: Callable[[str], bool]
    teach: tuple[tuple[str, str], ...]  # (prompt, corrected reply)
    heldout: tuple[str, ...]
    right: Callable[[str, str], bool] | None = None  # (prompt, reply) -> is the answer right, whatever its format
    tuned: bool = True  # the selection's text checks were written while looking at this family's critique


def _names_any(answers: dict[str, tuple[str, ...]]) -> Callable[[str, str], bool]:
    """right(prompt, reply): the reply names one of the prompt's known answers (as words)."""
    def right(prompt: str, reply: str) -> bool:
        words = " ".join(re.findall(r"[a-z0-9]+", reply.lower()))
        return any(re.search(rf"\b{re.escape(a)}", words) for a in answers[prompt])
    return right


def _bullets(text: str) -> int:
    return sum(1 for line in text.splitlines() if re.match(r"\s*[-*\u2022] \S", line))


def _words(text: str) -> int:
    return len(text.split())


FAMILIES = (
    Family(
        "support_email", "domain fact",
        f"Wrong: you must tell people to email our support team at {EMAIL}. Always give that address.",
        lambda r: EMAIL in r.lower(),
        tuple((q, f"Please email our support team at {EMAIL} and we will help you {what}.") for q, what in (
            ("How do I reset my password?", "reset your password"),
            ("My invoice shows the wrong amount. Who can fix it?", "fix your invoice"),
            ("The app crashes when I open it. What should I do?", "with the crash"),
            ("How can I cancel my subscription?", "cancel your subscription"),
            ("I was charged twice this month. Help!", "get the double charge refunded"),
            ("How do I change the email address on my account?", "change it"),
            ("Can I get a refund for my last order?", "with the refund"),
            ("I can't log in to my account.", "get back into your account"),
            ("Where do I report a bug?", "with the bug"),
            ("How do I delete my account?", "delete your account"),
        )),
        ("I forgot my username. What now?", "How do I update my billing address?",
         "My download link expired. Who do I contact?", "The website shows an error when I pay.",
         "How do I upgrade my plan?", "Who should I talk to about a missing order?"),
        right=lambda q, r: EMAIL in r.lower(),  # the right answer is the address itself
    ),
    Family(
        "tips_bullets", "format",
        "Format it as a bulleted list: exactly three short tips, each on its own line starting with '- '.",
        lambda r: _bullets(r) >= 3,
        (
            ("Give me tips for sleeping better.",
             "- Go to bed at the same time every night.\n- Keep your bedroom dark and cool.\n- Avoid screens for an hour before bed."),
            ("Give me tips for saving money.",
             "- Write down what you spend each week.\n- Cook at home instead of eating out.\n- Save a fixed amount on payday."),
            ("Give me tips for learning to cook.",
             "- Start with simple recipes you like.\n- Taste as you cook and adjust.\n- Keep your knives sharp."),
            ("Give me tips for running my first 5k.",
             "- Build up slowly with run-walk intervals.\n- Wear comfortable running shoes.\n- Rest at least one day between runs."),
            ("Give me tips for studying for an exam.",
             "- Study in short sessions with breaks.\n- Test yourself instead of rereading.\n- Sleep well the night before."),
            ("Give me tips for keeping houseplants alive.",
             "- Water only when the soil is dry.\n- Give them bright, indirect light.\n- Use pots with drainage holes."),
            ("Give me tips for public speaking.",
             "- Practise out loud several times.\n- Know your first sentence by heart.\n- Speak slowly and pause."),
            ("Give me tips for writing a CV.",
             "- Keep it to one or two pages.\n- Lead with your strongest results.\n- Tailor it to each job."),
            ("Give me tips for working from home.",
             "- Keep a separate place to work.\n- Set fixed start and end times.\n- Take a short walk at lunch."),
            ("Give me tips for drinking more water.",
             "- Carry a refillable bottle.\n- Drink a glass with every meal.\n- Set reminders on your phone."),
        ),
        ("Give me tips for making friends in a new city.", "Give me tips for staying productive.",
         "Give me tips for travelling on a budget.", "Give me tips for learning to draw.",
         "Give me tips for reducing stress.", "Give me tips for eating healthier."),
        right=_names_any({  # tips about what was asked: a word of that subject
            "Give me tips for sleeping better.": ("sleep", "bed", "nap", "rest", "caffeine", "screen"),
            "Give me tips for saving money.": ("sav", "spend", "budget", "money", "cost", "pay", "cheap"),
            "Give me tips for learning to cook.": ("cook", "recipe", "kitchen", "taste", "knife", "knives", "ingredient"),
            "Give me tips for running my first 5k.": ("run", "pace", "shoe", "race", "jog", "walk", "stretch"),
            "Give me tips for studying for an exam.": ("stud", "exam", "test", "revis", "review", "note", "sleep"),
            "Give me tips for keeping houseplants alive.": ("water", "light", "soil", "pot", "plant", "drain"),
            "Give me tips for public speaking.": ("speak", "speech", "practi", "audience", "talk", "pause", "slow"),
            "Give me tips for writing a CV.": ("cv", "resume", "page", "job", "experience", "skill", "result"),
            "Give me tips for working from home.": ("work", "desk", "office", "routine", "break", "schedule"),
            "Give me tips for drinking more water.": ("water", "drink", "bottle", "glass", "hydrat"),
            "Give me tips for making friends in a new city.": ("friend", "club", "meet", "join", "people", "social", "event"),
            "Give me tips for staying productive.": ("task", "focus", "break", "list", "priorit", "goal", "distract"),
            "Give me tips for travelling on a budget.": ("travel", "cheap", "budget", "flight", "hostel", "book", "sav"),
            "Give me tips for learning to draw.": ("draw", "sketch", "practi", "pencil", "shape", "line"),
            "Give me tips for reducing stress.": ("stress", "breath", "relax", "exercise", "sleep", "meditat", "walk"),
            "Give me tips for eating healthier.": ("vegetable", "fruit", "food", "eat", "meal", "sugar", "water"),
        }),
    ),
    Family(
        "short_definition", "length",
        "Too long. Answer in one short sentence of at most 25 words.",
        lambda r: 0 < _words(r) <= 25,
        (
            ("What is a volcano?", "A volcano is an opening in the Earth's crust where molten rock, ash and gas escape."),
            ("What is a noun?", "A noun is a word that names a person, place, thing or idea."),
            ("What is inflation?", "Inflation is the general rise in prices over time, which lowers what money can buy."),
            ("What is a galaxy?", "A galaxy is a huge system of stars, gas and dust held together by gravity."),
            ("What is a vaccine?", "A vaccine is a substance that trains the immune system to recognise and fight a disease."),
            ("What is a haiku?", "A haiku is a short Japanese poem of three lines with five, seven and five syllables."),
            ("What is an atom?", "An atom is the smallest unit of a chemical element, made of protons, neutrons and electrons."),
            ("What is democracy?", "Democracy is a system of government in which citizens choose their leaders by voting."),
            ("What is a glacier?", "A glacier is a large, slow-moving mass of ice formed from compacted snow."),
            ("What is an algorithm?", "An algorithm is a step-by-step set of instructions for solving a problem."),
        ),
        ("What is a mammal?", "What is gravity?", "What is a verb?", "What is a desert?", "What is a battery?",
         "What is a planet?"),
        right=_names_any({  # a key term of the definition
            "What is a volcano?": ("lava", "magma", "erupt", "molten", "crust"),
            "What is a noun?": ("person", "place", "thing", "name"),
            "What is inflation?": ("price", "cost", "money"),
            "What is a galaxy?": ("star", "gravity", "milky"),
            "What is a vaccine?": ("immun", "disease", "infection", "virus", "antibod"),
            "What is a haiku?": ("poem", "poetry", "syllable", "japan"),
            "What is an atom?": ("element", "proton", "neutron", "electron", "nucleus", "matter", "smallest"),
            "What is democracy?": ("vote", "voting", "elect", "people", "citizen"),
            "What is a glacier?": ("ice", "snow"),
            "What is an algorithm?": ("step", "instruction", "procedure", "problem", "rule"),
            "What is a mammal?": ("milk", "hair", "fur", "warm", "vertebrate"),
            "What is gravity?": ("force", "attract", "mass", "pull"),
            "What is a verb?": ("action", "word", "state", "occurrence"),
            "What is a desert?": ("dry", "rain", "sand", "arid", "precipitation"),
            "What is a battery?": ("energy", "electric", "power", "charge", "chemical"),
            "What is a planet?": ("orbit", "star", "sun", "celestial"),
        }),
    ),
    Family(
        "house_signoff", "house style",
        f"Our house style: always end the note with the line '{SIGNOFF}'.",
        lambda r: SIGNOFF.lower() in r.lower()[-80:],
        tuple((q, f"{body}\n\n{SIGNOFF}") for q, body in (
            ("Write a short thank-you note to a customer.", "Thank you for choosing us. We are glad to have you with us."),
            ("Write a short note welcoming a new user.", "Welcome aboard! We are happy you joined and hope you enjoy it."),
            ("Write a short note apologising for a late delivery.", "We are sorry your order arrived late. Thank you for your patience."),
            ("Write a short note announcing a new feature.", "You can now export your chats with one click. Give it a try!"),
            ("Write a short note wishing a customer happy holidays.", "Happy holidays! We wish you a restful and joyful season."),
            ("Write a short note reminding a user to renew.", "Your plan ends next week. Renew any time from your account page."),
            ("Write a short note thanking a user for feedback.", "Thank you for your feedback. It helps us make the product better."),
            ("Write a short note about scheduled maintenance.", "The service will be down for maintenance on Sunday from 2 to 4 am."),
            ("Write a short note congratulating a user on a milestone.", "Congratulations on your 100th chat! Thanks for being with us."),
            ("Write a short note inviting a user to a webinar.", "Join our free webinar on Thursday to learn tips and tricks."),
        )),
        ("Write a short note thanking a user for upgrading.", "Write a short note about a price change.",
         "Write a short note welcoming a user back.", "Write a short note confirming a cancelled order.",
         "Write a short note inviting feedback on a survey.", "Write a short note announcing new opening hours."),
        right=_names_any({  # a note about what was asked: a word of that subject
            "Write a short thank-you note to a customer.": ("thank",),
            "Write a short note welcoming a new user.": ("welcome", "join", "glad", "happy"),
            "Write a short note apologising for a late delivery.": ("sorry", "apolog", "late", "delay"),
            "Write a short note announcing a new feature.": ("new", "feature", "now", "introduc"),
            "Write a short note wishing a customer happy holidays.": ("holiday", "season", "festive"),
            "Write a short note reminding a user to renew.": ("renew", "expire", "ends", "plan", "subscription"),
            "Write a short note thanking a user for feedback.": ("thank", "feedback"),
            "Write a short note about scheduled maintenance.": ("maintenance", "down", "unavailable", "offline"),
            "Write a short note congratulating a user on a milestone.": ("congrat", "milestone", "celebrat"),
            "Write a short note inviting a user to a webinar.": ("webinar", "join", "invite", "session"),
            "Write a short note thanking a user for upgrading.": ("upgrad", "thank"),
            "Write a short note about a price change.": ("price", "cost", "fee", "rate"),
            "Write a short note welcoming a user back.": ("welcome", "back", "return"),
            "Write a short note confirming a cancelled order.": ("cancel", "order", "refund"),
            "Write a short note inviting feedback on a survey.": ("survey", "feedback", "opinion", "question"),
            "Write a short note announcing new opening hours.": ("hour", "open", "close", "time"),
        }),
    ),
)

FAMILIES += (
    Family(
        "australia_capital", "fact in the critique",
        "Wrong: the capital of Australia is Canberra, not Sydney.",
        lambda r: "canberra" in r.lower(),
        (
            ("What is the capital of Australia?", "The capital of Australia is Canberra."),
            ("Which city is Australia's capital?", "Canberra is Australia's capital city."),
            ("Where is the seat of government of Australia?", "Australia's seat of government is Canberra."),
            ("In which city does the Australian Parliament meet?", "The Australian Parliament meets in Canberra."),
            ("What city is the capital of the Commonwealth of Australia?", "Canberra is the capital of the Commonwealth of Australia."),
            ("Name the capital city of Australia.", "Canberra."),
            ("Is Sydney the capital of Australia?", "No. Sydney is the largest city, but the capital of Australia is Canberra."),
            ("Where does Australia's federal government sit?", "Australia's federal government sits in Canberra."),
            ("Which Australian city was built to be the national capital?", "Canberra was built to be Australia's national capital."),
            ("Tell me the capital of Australia.", "The capital of Australia is Canberra."),
        ),
        ("What's Australia's capital city?", "Which city is the capital of Australia, Sydney or Melbourne?",
         "Where is Parliament House in Australia?", "If I want to visit Australia's capital, which city do I go to?",
         "What is the national capital of Australia?", "Where are Australia's federal parliament and High Court?"),
        right=lambda q, r: "canberra" in r.lower(),
    ),
)

# Two families the selection's checks were never looked at with (tuned=False): other wording, other kinds
# of preference, and every prompt with a known right answer. Neither critique was used to write or tune
# chatfb.critique.content or the filters of chatfb.critique.candidates.
_SUMS = {  # prompt -> its result
    "What is seven plus eight?": "15", "What is nine times three?": "27", "What is forty minus twelve?": "28",
    "What is six times seven?": "42", "What is fifty plus twenty-five?": "75", "What is one hundred minus one?": "99",
    "What is eleven plus eleven?": "22", "What is eight times eight?": "64", "What is thirty divided by five?": "6",
    "What is thirteen plus four?": "17", "What is nine plus six?": "15", "What is seven times eight?": "56",
    "What is sixty minus fifteen?": "45", "What is twelve times two?": "24", "What is eighteen plus five?": "23",
    "What is one hundred divided by four?": "25",
}
_NUMBER_WORDS = re.compile(r"\b(?:zero|one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|thirteen|fourteen|"
                           r"fifteen|sixteen|seventeen|eighteen|nineteen|twenty|thirty|forty|fifty|sixty|seventy|"
                           r"eighty|ninety|hundred)\b", re.I)
_CAPITALS = {
    "What is the capital of Spain?": "madrid", "What is the capital of Germany?": "berlin",
    "What is the capital of Egypt?": "cairo", "What is the capital of Canada?": "ottawa",
    "What is the capital of Kenya?": "nairobi", "What is the capital of Peru?": "lima",
    "What is the capital of Norway?": "oslo", "What is the capital of Greece?": "athens",
    "What is the capital of Portugal?": "lisbon", "What is the capital of Russia?": "moscow",
    "What is the capital of China?": "beijing", "What is the capital of Sweden?": "stockholm",
    "What is the capital of Poland?": "warsaw", "What is the capital of Argentina?": "buenos aires",
    "What is the capital of Austria?": "vienna", "What is the capital of Ireland?": "dublin",
}
GREETING = "Good question!"
_FACTS = {  # prompt -> its known answers (a right reply names one, as a word); none is a control question
    "Which animal is the largest mammal?": ("the blue whale", "whale"),
    "What is the chemical symbol for gold?": ("au",),
    "Who painted the Mona Lisa?": ("leonardo da vinci", "leonardo", "da vinci"),
    "What is the largest ocean on Earth?": ("the pacific ocean", "pacific"),
    "Which planet is closest to the Sun?": ("mercury",),
    "What language is spoken in Brazil?": ("portuguese",),
    "Who wrote Romeo and Juliet?": ("william shakespeare", "shakespeare"),
    "What is the tallest mountain in the world?": ("mount everest", "everest"),
    "What do bees make?": ("honey",),
    "Which metal is liquid at room temperature?": ("mercury",),
    "What is the largest planet in our solar system?": ("jupiter",),
    "Which gas do humans need to breathe to live?": ("oxygen",),
    "Who discovered penicillin?": ("alexander fleming", "fleming"),
    "What is the hardest natural substance?": ("diamond",),
    "What is the longest river in Africa?": ("the nile", "nile"),
    "In which country are the pyramids of Giza?": ("egypt",),
}
_FACTS_SAID = {  # the teaching corrections' answers
    "Which animal is the largest mammal?": "The blue whale is the largest mammal.",
    "What is the chemical symbol for gold?": "The chemical symbol for gold is Au.",
    "Who painted the Mona Lisa?": "Leonardo da Vinci painted the Mona Lisa.",
    "What is the largest ocean on Earth?": "The Pacific Ocean is the largest ocean on Earth.",
    "Which planet is closest to the Sun?": "Mercury is the planet closest to the Sun.",
    "What language is spoken in Brazil?": "People in Brazil speak Portuguese.",
    "Who wrote Romeo and Juliet?": "William Shakespeare wrote Romeo and Juliet.",
    "What is the tallest mountain in the world?": "Mount Everest is the tallest mountain in the world.",
    "What do bees make?": "Bees make honey.",
    "Which metal is liquid at room temperature?": "Mercury is the metal that is liquid at room temperature.",
}


def _ends_with_a_question(reply: str) -> bool:
    """The reply's last sentence is a question to the user (it ends with a question mark) after an answer."""
    text = reply.strip()
    return text.endswith("?") and len(re.findall(r"[.!?]", text)) >= 2


FAMILIES += (
    Family(
        "digit_sums", "number style",
        "Please write every number with digits; never spell numbers out as words.",
        lambda r: bool(re.search(r"\d", r)) and not _NUMBER_WORDS.search(r),
        tuple((q, f"The answer is {a}.") for q, a in list(_SUMS.items())[:10]),
        tuple(list(_SUMS)[10:]),
        right=lambda q, r: re.search(rf"(?<![\d.]){_SUMS[q]}(?!\d|\.\d)", r) is not None,
        # tuned since 2026-12-06: the question's arithmetic is worked out (chatfb.critique.content.arithmetic),
        # a check written after reading what this family's cycles kept
    ),
    Family(
        "greeting_capitals", "opening phrase (untuned)",
        f"Kindly begin each reply with the words '{GREETING}' and then give the answer.",
        lambda r: r.strip().lower().startswith(GREETING.lower()),
        tuple((q, f"{GREETING} The capital is {c.title()}.") for q, c in list(_CAPITALS.items())[:10]),
        tuple(list(_CAPITALS)[10:]),
        right=lambda q, r: _CAPITALS[q] in r.lower(),
        tuned=False,
    ),
    Family(
        "question_back", "conversational habit (untuned)",
        "After you answer, always ask me a question back so that we keep talking.",
        _ends_with_a_question,
        tuple((q, f"{_FACTS_SAID[q]} Would you like to hear more about it?") for q in list(_FACTS)[:10]),
        tuple(list(_FACTS)[10:]),
        right=_names_any(_FACTS),
        tuned=False,
    ),
)

CONTROL_PROMPTS = (
    "What is the capital of Italy?", "How many days are in a leap year?", "Who wrote Hamlet?",
    "What gas do plants absorb from the air?", "What is 12 plus 15?", "Name three primary colours.",
    "What is the boiling point of water in Celsius?", "Which planet is known as the red planet?",
    "What is the main ingredient of guacamole?", "How many continents are there?",
)
# Their known answers (a right reply names one of them, as a word): retention checked against facts, not
# only against the base model's answers.
CONTROL_ANSWERS = {
    "What is the capital of Italy?": ("rome",), "How many days are in a leap year?": ("366",),
    "Who wrote Hamlet?": ("shakespeare",), "What gas do plants absorb from the air?": ("carbon", "co2"),
    "What is 12 plus 15?": ("27",), "Name three primary colours.": ("red", "blue", "yellow"),
    "What is the boiling point of water in Celsius?": ("100",), "Which planet is known as the red planet?": ("mars",),
    "What is the main ingredient of guacamole?": ("avocado",), "How many continents are there?": ("7", "seven"),
}


def messages(prompt: str, system: str = SYSTEM) -> list[dict]:
    return [{"role": "system", "content": system}, {"role": "user", "content": prompt}]


def guideline_system(families: list[Family]) -> str:
    """The system prompt the app sends when every family's critique is an approved guideline."""
    from chatfb.critique import guidelines

    return guidelines.apply(messages("")[:1], [f.critique for f in families])[0]["content"]


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.efficacy_bench", description=__doc__.split("\n")[0])
    add_server_flags(p)
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="which modes to run")
    p.add_argument("--families", nargs="+", choices=[f.name for f in FAMILIES], default=None,
                   help="which families to teach (default: all)")
    p.add_argument("--items", type=int, default=10, help="feedback items per family (at most 10)")
    p.add_argument("--heldout", type=int, default=6, help="held-out prompts per family (at most 6)")
    p.add_argument("--controls", type=int, default=len(CONTROL_PROMPTS), help="control prompts")
    p.add_argument("--max-tokens", type=int, default=128, help="max new tokens of a judged reply")
    p.add_argument("--epochs", type=float, default=None, help="CHATFB_TRAIN_EPOCHS for the cycles (default: chatfb's)")
    p.add_argument("--seeds", type=int, default=3, help="runs per training mode (mean and spread are reported)")
    p.add_argument("--work-dir", type=Path, default=None, help="where each mode's data folder goes (default: a temp dir)")
    add_output_flags(p, smoke_help="tiny run: 2 families x 2 items, 1 held-out prompt each, 2 controls, 1 epoch (at most 4 steps), 4 replay examples, 2 distillation prompts, 2 uptake checks, 2 candidates per critique, 2 gate examples, "
                                   "1 seed, modes " + " ".join(SMOKE_MODES))
    return p


def generate(client, model: str, prompts: list[str], max_tokens: int, system: str = SYSTEM) -> list[str]:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda q: client.complete(messages(q, system), model, max_tokens=max_tokens,
                                                       temperature=0.0)[0], prompts))


def feedback_rows(mode: str, families: list[Family], items: int, originals: dict[str, str],
                  accepted: dict[str, str] | None = None) -> list[dict]:
    """The scripted users' feedback: corrections (sft modes), accepted revisions as corrections (accept),
    else critiques."""
    rows = []
    # Interleaved, as feedback arrives from many users: the cycle takes the newest refine_max_critiques.
    for i in range(items):
        for fam in families:
            if i >= len(fam.teach):
                continue
            prompt, correction = fam.teach[i]
            row = {"prompt": messages(prompt), "reply": originals[prompt], "user": "bench"}
            if mode in ("sft", "sft_dpo"):
                row.update(kind="correction", text=correction)
            elif mode == "accept" and (accepted or {}).get(prompt):
                row.update(kind="correction", text=accepted[prompt])
            else:
                row.update(kind="critique", text=fam.critique)
            rows.append(row)
    return rows


def accept_revisions(client, judge, families: list[Family], items: int) -> tuple[dict[str, str], dict]:
    """The in-loop user: for each critiqued prompt, the candidates chatfb.critique.candidates.select_rounds keeps (what the
    app may offer, best first); the first that passes the family's checker is accepted, the others dismissed;
    when none does, the user presses "Try again" once (4 more).
    Returns ({prompt: accepted text}, {family: {"critiqued", "offered", "accepted"}})."""
    from concurrent.futures import ThreadPoolExecutor

    from chatfb.config import load_settings
    from chatfb.critique import candidates

    jobs = [(fam, q) for fam in families for q, _ in fam.teach[:items]]
    patience = load_settings().revision_patience  # the app's offer does not wait for stragglers either

    def offer(job):  # the first offer, then "Try again" once when nothing offered is right
        fam, q = job
        offered = []
        for _ in range(2):
            kept = [c for c in candidates.select_rounds(judge, SERVED_NAME, messages(q), fam.critique, n=4, max_tokens=192,
                                                        rounds=1, generator=client, generator_model=SERVED_NAME,
                                                        patience=patience) if c.ok]
            offered += kept
            right = next((c.text for c in kept if fam.check(c.text)), None)
            if right is not None:
                return offered, right
        return offered, None

    with ThreadPoolExecutor(8) as pool:
        offers = list(pool.map(offer, jobs))
    accepted, stats = {}, {f.name: {"critiqued": 0, "offered": 0, "accepted": 0} for f in families}
    for (fam, q), (kept, text) in zip(jobs, offers):
        st = stats[fam.name]
        st["critiqued"] += 1
        st["offered"] += bool(kept)
        if text is not None:
            st["accepted"] += 1
            accepted[q] = text
    return accepted, stats


def selection_stats(data_dir: Path, families: list[Family], seed: int, accepted: dict[str, str]) -> dict:
    """Per family, from the cycle's own database: share of the (not held-out) feedback that became a training
    example, and selection precision (share of kept examples - candidates rows with status kept, and
    accepted revisions - that pass the family's checker)."""
    from chatfb.store.db import Store
    from chatfb.learning.training_data import is_heldout
    from chatfb.store.records import last_user

    with Store(data_dir / "chatfb.duckdb", read_only=True) as s:
        records = s.feedback_records()
        rows = s.nightly_candidates()
    kept = [r for r in rows if r["status"] == "kept"]
    out = {}
    for fam in families:
        teach = {q for q, _ in fam.teach}
        mine = [r for r in records if last_user(r.prompt) in teach and not is_heldout(r.feedback_id, HOLDOUT_FRACTION, seed)]
        tasks = {(r["feedback_id"], r["details"].get("prompt")) for r in rows if r["details"].get("critique") == fam.critique}
        examples = [(r["details"].get("prompt"), r["text"]) for r in kept if r["details"].get("critique") == fam.critique]
        examples += [(last_user(r.prompt), r.text) for r in mine
                     if r.kind == "correction" and last_user(r.prompt) in accepted]
        if any(r["details"].get("task") == "guideline" for r in rows):  # guideline_distilled: the guideline's prompts
            done = {(r["feedback_id"], r["details"].get("prompt")) for r in kept if r["details"].get("critique") == fam.critique}
            share = len(done) / len(tasks) if tasks else None
        else:
            produced = {r["feedback_id"] for r in kept if r["details"].get("task") == "critique"}
            made = [r.kind == "correction" or r.feedback_id in produced for r in mine]
            share = sum(made) / len(made) if made else None
        out[fam.name] = {"example_share": None if share is None else round(share, 3),
                         "precision": round(sum(fam.check(t) for _, t in examples) / len(examples), 3) if examples else None,
                         # kept examples that follow the preference AND are right (distillation prompts of other
                         # families' questions have no known answer here: counted by the format alone)
                         "precision_both": round(sum(fam.check(t) and _right_or_unknown(fam, q, t) for q, t in examples)
                                                 / len(examples), 3) if examples else None,
                         "kept_examples": len(examples)}
    return out


SMOKE_ENV = dict(CHATFB_REPLAY_EXAMPLES="4", CHATFB_DISTILL_PROMPTS="2", CHATFB_TRAIN_MAX_STEPS="4",
                 CHATFB_UPTAKE_MAX_ITEMS="2", CHATFB_CRITIQUE_SAMPLES="2", CHATFB_EVAL_MAX_EXAMPLES="2")
SET_BY_THE_BENCH = {"CHATFB_DATA_DIR", "CHATFB_VLLM_URL", "CHATFB_MODEL", "CHATFB_SERVED_MODEL_NAME", "CHATFB_API_KEY",
                    "CHATFB_SEED", "CHATFB_ADAPTER_PREFIX"}  # bench/cycle.py and run_mode, every run


def inherited_settings(args, environ=None) -> dict[str, str]:
    """The CHATFB_ settings every cycle inherits from the bench's environment, for its results: none the bench
    or a mode sets itself, and none that is a secret, an address or names users."""
    environ = os.environ if environ is None else environ
    own = SET_BY_THE_BENCH | {k for env in MODE_ENV.values() for k in env} | (set(SMOKE_ENV) if args.smoke else set())
    if args.epochs is not None:
        own.add("CHATFB_TRAIN_EPOCHS")
    private = ("PASSWORD", "KEY", "TOKEN", "SECRET", "URL", "USERS", "HF_")
    return {k: v for k, v in sorted(environ.items())
            if k.startswith("CHATFB_") and k not in own and not any(w in k[len("CHATFB_"):] for w in private)}


def _right_or_unknown(fam: Family, prompt: str | None, text: str) -> bool:
    """fam.right where the prompt is one of the family's own (it has a known answer), else True."""
    own = {q for q, _ in fam.teach} | set(fam.heldout)
    if fam.right is None or prompt not in own:
        return True
    return fam.right(prompt, text)


def run_mode(mode: str, families: list[Family], args, server, client, originals: dict[str, str], work: Path,
             run: int) -> dict:
    """Teach one mode's feedback in a fresh data folder (run `run` of the mode: CHATFB_SEED = SEED + run) and
    return the adapter path and the cycle's numbers."""
    seed = SEED + run
    data_dir = work / f"{mode}-{run}"
    env = {**MODE_ENV[mode], "CHATFB_SEED": str(seed),
           "CHATFB_ADAPTER_PREFIX": f"bencheff-{mode.replace('_', '')}{run}-{os.getpid()}"}  # own names on a shared server
    if args.epochs is not None:
        env["CHATFB_TRAIN_EPOCHS"] = str(args.epochs)
    if args.smoke:  # a check that the cycle runs end to end: a little replay and distillation, not the recipe's own
        env.update(SMOKE_ENV)
    accepted, accept_stats = ({}, None)
    if mode == "accept":  # scored as the app scores revisions (chatfb.critique.judge: locally on a CPU)
        from chatfb.critique.judge import judge_for

        accepted, accept_stats = accept_revisions(client, judge_for("auto", client, server.model_dir), families, args.items)
    setup = [["guidelines", "add", f.critique] for f in families] if mode == "guideline_distilled" else []
    c = learning_cycle(f"{mode} #{run + 1}", data_dir, feedback_rows(mode, families, args.items, originals, accepted),
                       server, args.api_key, setup=setup, **env)
    summary, wall, peak, log_path = c["summary"], c["wall_s"], c["peak_bytes"], c["log_path"]
    adapter = summary.get("adapter")
    path = data_dir / "adapters" / adapter if adapter else None
    if not (path and (path / "adapter_config.json").exists()):
        path = None  # e.g. no candidate survived selection: nothing was trained, the model is unchanged
        print(f"[{mode} #{run + 1}] no adapter: {summary.get('reason')} (see {log_path})", flush=True)
    selection = selection_stats(data_dir, families, seed, accepted) if mode not in ("sft", "sft_dpo") else None
    return {"adapter": adapter, "path": path, "summary": summary, "cycle_wall_s": round(wall, 1),
            "peak_rss_gib": round(peak / 2**30, 2), "selection": selection, "accept": accept_stats}


def judge(client, model: str, families: list[Family], args, base_control: list[str], system: str = SYSTEM) -> dict:
    heldout = [q for fam in families for q in fam.heldout[:args.heldout]]
    controls = list(CONTROL_PROMPTS[:args.controls])
    replies = generate(client, model, heldout + controls, args.max_tokens, system)
    held, ctrl = dict(zip(heldout, replies)), replies[len(heldout):]
    uptake, right, both = {}, {}, {}
    for fam in families:
        qs = fam.heldout[:args.heldout]
        uptake[fam.name] = round(sum(fam.check(held[q]) for q in qs) / len(qs), 3)
        if fam.right is not None:
            right[fam.name] = round(sum(fam.right(q, held[q]) for q in qs) / len(qs), 3)
            both[fam.name] = round(sum(fam.check(held[q]) and fam.right(q, held[q]) for q in qs) / len(qs), 3)
    untuned = [both[f.name] for f in families if not f.tuned and f.name in both]
    mean = lambda xs: round(sum(xs) / len(xs), 3) if xs else None  # noqa: E731
    known = [CONTROL_ANSWERS[q] for q in controls]
    result = {"uptake": uptake, "uptake_mean": round(sum(uptake.values()) / len(uptake), 3),
              "right": right, "both": both, "right_mean": mean(list(right.values())),
              "both_mean": mean(list(both.values())), "both_mean_untuned": mean(untuned),
              # control answers right by their known answers (facts, not the base model's answers)
              "control_right": mean([any(re.search(rf"\b{re.escape(a)}", r.lower()) for a in k)
                                     for r, k in zip(ctrl, known)]),
              "samples": {fam.name: {"prompt": fam.heldout[0], "reply": held[fam.heldout[0]][:300]} for fam in families},
              "control_replies": ctrl, "retention": None, "control_cosine": None, "leak": None}  # None: not measured
    if base_control:
        from chatfb.critique.similarity import paired_cosines

        cos = paired_cosines(ctrl, base_control)
        result["retention"] = round(sum(c >= RETENTION_COSINE for c in cos) / len(cos), 3)
        result["control_cosine"] = round(sum(cos) / len(cos), 3)
        result["leak"] = sum(1 for r, b in zip(ctrl, base_control)
                             if any(f.check(r) and not f.check(b) for f in families if f.name != "short_definition"))
    return result


def one_run(mode: str, families: list[Family], args, server, client, originals, work: Path, run: int,
            base: dict, base_control: list[str]) -> dict:
    """One training run of a mode, judged on its adapter (or, when nothing trained, the base model's answers
    with nothing measured against them)."""
    out = run_mode(mode, families, args, server, client, originals, work, run)
    if out["adapter"] and out["adapter"] in client.models():  # the cycle unloads its candidate
        client.unload_adapter(out["adapter"])
    if out["path"] is None:  # nothing trained: the base model's answers stand; retention was not measured
        r = json.loads(json.dumps(base))
        r["trained"] = False
    else:
        name = f"bench-eff-{mode}-{run}-{os.getpid()}"
        client.load_adapter(name, str(out["path"].resolve()))
        try:
            r = judge(client, name, families, args, base_control)
        finally:
            client.unload_adapter(name)
        r.pop("control_replies")
        r["trained"] = True
    s = out["summary"]
    r.update(reason=s.get("reason"), cycle_wall_s=out["cycle_wall_s"], peak_rss_gib=out["peak_rss_gib"],
             counts=s.get("counts"), timings=s.get("timings"), selection=out["selection"], accept=out["accept"],
             gate={k: (s.get("metrics") or {}).get(k) for k in
                   ("candidate_rougeL", "incumbent_rougeL", "candidate_rougeL_facts", "incumbent_rougeL_facts",
                    "candidate_exact", "incumbent_exact", "candidate_critique_pass", "incumbent_critique_pass",
                    "guideline_follow", "control_agreement", "decision")})
    return r


def mean_sd(values: list) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None]  # over the runs that measured it (a run that trained nothing did not)
    if not vals:
        return None, None
    m = sum(vals) / len(vals)
    return round(m, 3), round((sum((v - m) ** 2 for v in vals) / len(vals)) ** 0.5, 3)


def aggregate(runs: list[dict], families: list[Family]) -> dict:
    """A mode's runs in one row: means and standard deviations; the runs themselves under "runs"."""
    agg = {"runs": runs, "n_runs": len(runs), "trained": sum(bool(r.get("trained")) for r in runs)}
    agg["uptake"], agg["uptake_sd"] = {}, {}
    for fam in families:
        agg["uptake"][fam.name], agg["uptake_sd"][fam.name] = mean_sd([r["uptake"][fam.name] for r in runs])
    for key in ("right", "both"):
        agg[key], agg[key + "_sd"] = {}, {}
        for fam in families:
            agg[key][fam.name], agg[key + "_sd"][fam.name] = mean_sd([(r.get(key) or {}).get(fam.name) for r in runs])
    for key in ("uptake_mean", "right_mean", "both_mean", "both_mean_untuned", "control_right", "retention",
                "control_cosine", "leak", "cycle_wall_s", "peak_rss_gib"):
        agg[key], agg[key + "_sd"] = mean_sd([r.get(key) for r in runs])
    if any(r.get("selection") for r in runs):
        agg["selection"] = {fam.name: {k: mean_sd([(r["selection"] or {}).get(fam.name, {}).get(k) for r in runs])[0]
                                       for k in ("example_share", "precision", "precision_both")} for fam in families}
    agg["samples"] = runs[0]["samples"]
    agg["reason"], agg["gate"] = runs[0].get("reason"), runs[0].get("gate")
    return agg


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    families = [f for f in FAMILIES if args.families is None or f.name in args.families]
    modes = list(dict.fromkeys(args.modes))  # each mode once, in the order given
    if args.smoke:
        families = [f for f in families if f.name in ("support_email", "house_signoff")] or families[:2]
        args.items, args.heldout, args.controls, args.max_tokens, args.seeds = 2, 1, 2, 48, 1
        args.epochs = 1.0 if args.epochs is None else args.epochs
        modes = [m for m in modes if m in SMOKE_MODES]
    out_dir = args.out_dir or default_out_dir(args.smoke)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="chatfb-efficacy-"))
    from chatfb.serving.model_client import ModelClient

    command = "python -m bench.efficacy_bench " + " ".join(sys.argv[1:] if argv is None else argv)
    results: dict = {"bench": NAME, "machine": machine(), "command": command.strip(),
                     # settings the cycles inherit from the environment the bench ran in (e.g.
                     # CHATFB_CANDIDATE_PATIENCE): never one a mode or the bench sets itself, nor a secret,
                     # an address or a user's name
                     "chatfb_env": inherited_settings(args),
                     "args": {k: str(v) for k, v in vars(args).items()},
                     "families": [{"name": f.name, "kind": f.kind, "critique": f.critique, "items": args.items,
                                   "heldout": args.heldout} for f in families], "modes": {}}
    with vllm_server(args) as server:
        if server.model_dir is None:
            raise SystemExit("cannot tell which model folder the server serves: pass --model-dir")
        client = ModelClient(server.url, args.api_key, timeout_s=300)
        try:
            teach = [q for fam in families for q, _ in fam.teach[:args.items]]
            originals = dict(zip(teach, generate(client, SERVED_NAME, teach, 256)))
            base = judge(client, SERVED_NAME, families, args, [])
            base_control = base.pop("control_replies")
            for mode in modes:
                if mode in ("base", "guideline_prompt"):  # no training: greedy answers, one run
                    if mode == "base":
                        r = dict(base)
                    else:
                        r = judge(client, SERVED_NAME, families, args, base_control, guideline_system(families))
                        r.pop("control_replies")
                    r["trained"] = False
                    results["modes"][mode] = aggregate([r], families)
                else:
                    runs = [one_run(mode, families, args, server, client, originals, work, i, base, base_control)
                            for i in range(max(args.seeds, 1))]
                    results["modes"][mode] = aggregate(runs, families)
                r = results["modes"][mode]
                print(f"[{mode}] uptake {r['uptake']} retention {fmt_pm(r, 'retention')} cycle {fmt_pm(r, 'cycle_wall_s', 0)} s "
                      f"peak {fmt_pm(r, 'peak_rss_gib')} GiB", flush=True)
                # a run stopped later still leaves every finished mode on disk, marked as unfinished
                write_results(out_dir, NAME, results, report(results, families, unfinished=modes[len(results["modes"]):]))
        finally:
            client.close()

    md = report(results, families)
    print(md)
    write_results(out_dir, NAME, results, md)
    if not args.no_plot:
        plot(results, families, plot_path(out_dir, NAME))
    return 0


def fmt_pm(r: dict, key: str, digits: int = 2, sub: str | None = None) -> str:
    """"mean ± sd", the mean alone for one run, "n/a" when it was not measured."""
    value, sd = (r[key].get(sub), r[key + "_sd"].get(sub)) if sub else (r.get(key), r.get(key + "_sd"))
    if value is None:
        return "n/a"
    if r.get("n_runs", 1) > 1 and sd is not None:
        return f"{value:.{digits}f} ± {sd:.{digits}f}"
    return f"{value:.{digits}f}"


def report(results: dict, families: list[Family], unfinished: list[str] | None = None) -> str:
    modes = results["modes"]
    headers = ["mode", "runs", *[f"{f.name} ({f.kind})" for f in families], "mean uptake", "retention", "control cos",
               "leak", "cycle s", "peak GiB", "gate (run 1)"]
    rows = []
    for mode, r in modes.items():
        gate = ((r.get("gate") or {}).get("decision") or "-").split(":")[0]
        if mode in ("base", "guideline_prompt"):
            gate = "no training"
        elif r["trained"] < r["n_runs"]:
            gate = f"{r['n_runs'] - r['trained']} run(s) trained nothing: {r.get('reason') or ''}"
        rows.append([mode, r["n_runs"], *[fmt_pm(r, "uptake", sub=f.name) for f in families], fmt_pm(r, "uptake_mean"),
                     fmt_pm(r, "retention"), fmt_pm(r, "control_cosine"), fmt_pm(r, "leak", 1), fmt_pm(r, "cycle_wall_s", 0),
                     fmt_pm(r, "peak_rss_gib"), gate])
    a = results["args"]
    lines = [f"# Learning efficacy ({len(families)} families x {a['items']} feedback items, {a['heldout']} held-out "
             f"prompts each, {a['controls']} control prompts; mean ± sd over {a['seeds']} run(s) per training mode)", "",
             "Uptake: share of held-out prompts whose greedy reply passes the family's checker. Retention: share "
             f"of control prompts whose reply keeps the base answer's meaning (MiniLM cosine >= {RETENTION_COSINE}); "
             "n/a = not measured (the base row; runs that trained nothing). Leak: control replies that newly pass a "
             "family checker. Cycle: wall time of `python -m chatfb nightly` (snapshot, data, candidates, training, "
             "gate); peak: RSS of its process tree (not the vLLM server).", "",
             markdown_table(headers, rows), ""]
    lines += ["Follows / right / both per family (held-out prompts; right = the answer is right by the prompt's known "
              "answer, whatever its format; both = follows the preference and is right). Families marked untuned were "
              "never looked at while writing or tuning the selection's checks.", "",
              markdown_table(["mode", *[f"{f.name}{'' if f.tuned else ' (untuned)'}" for f in families], "mean both",
                              "mean both, untuned", "control right"],
                             [[mode, *[" / ".join(fmt_pm(r, k, sub=f.name) for k in ("uptake", "right", "both"))
                                       for f in families], fmt_pm(r, "both_mean"), fmt_pm(r, "both_mean_untuned"),
                               fmt_pm(r, "control_right")] for mode, r in modes.items()]), ""]
    if results.get("command"):
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in (results.get("chatfb_env") or {}).items())
        lines += [f"Command: `{(env + ' ') if env else ''}{results['command']}`", ""]
    if unfinished:
        lines += ["**Unfinished run:** the modes " + ", ".join(unfinished) + " had not finished when this file was "
                  "written; the rows above are complete runs.", ""]
    sel_modes = [m for m, r in modes.items() if r.get("selection")]
    if sel_modes:
        lines += ["Per family: share of the (not held-out) feedback that became a training example / selection "
                  "precision (share of kept examples that pass the family's checker) / kept examples that pass it "
                  "AND are right.", "",
                  markdown_table(["mode", *[f.name for f in families]],
                                 [[m, *[" / ".join("n/a" if v is None else f"{v:.2f}" for v in
                                                   (modes[m]["selection"][f.name]["example_share"],
                                                    modes[m]["selection"][f.name]["precision"],
                                                    modes[m]["selection"][f.name].get("precision_both"))) for f in families]]
                                  for m in sel_modes]), ""]
    if "accept" in modes:
        acc = [r["accept"] for r in modes["accept"]["runs"] if r.get("accept")]
        if acc:
            got = {f.name: (sum(x[f.name]["accepted"] for x in acc), sum(x[f.name]["critiqued"] for x in acc)) for f in families}
            lines += ["`accept` is critique + in-loop acceptance by a scripted user: for each critiqued prompt it is "
                      "offered the candidates the selection keeps, accepts the first that passes the family's checker "
                      "(a person checking a proposed fix would) and dismisses the others, pressing Try again once when none "
                      "passes; accepted revisions train as "
                      "corrections. Accepted / critiqued: " + ", ".join(f"{k} {a}/{n}" for k, (a, n) in got.items()) + ".", ""]
    lines += ["Held-out sample replies (first held-out prompt of each family, run 1):", ""]
    for mode, r in modes.items():
        for fam, s in r["samples"].items():
            reply = s["reply"].replace("\n", " / ").replace("|", "\\|")
            lines.append(f"- **{mode}** / {fam} — *{s['prompt']}* → {reply[:160]}")
    m = results["machine"]
    lines += ["", f"Machine: {m['host_cpus']} CPUs, load {m['load_avg_1m_at_start']} at start, {m['time_utc']}."]
    return "\n".join(lines)


def plot(results: dict, families: list[Family], path: Path) -> None:
    plt = pyplot()
    modes = list(results["modes"])
    groups = [f.name for f in families] + ["retention"]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / max(len(modes), 1)
    for i, mode in enumerate(modes):
        r = results["modes"][mode]
        vals = [r["uptake"][g] for g in groups[:-1]] + [r["retention"]]
        vals = [float("nan") if v is None else v for v in vals]  # n/a: no bar (not a bar at 0)
        ax.bar([j + i * width for j in range(len(groups))], vals, width, label=mode)
    ax.set_xticks([j + width * (len(modes) - 1) / 2 for j in range(len(groups))])
    ax.set_xticklabels(groups, rotation=15)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share of held-out / control prompts")
    ax.set_title("chatfb learning efficacy: uptake per family and control retention")
    ax.legend()
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
