import math
from collections import Counter
from dataclasses import replace
from datetime import datetime

from chatfb.critique import candidates
from chatfb.learning import training_data as td
from chatfb.store.records import FeedbackRecord

P = [{"role": "user", "content": "How do I reach support? I'm ann@example.org"}]


def rec(i, kind, text=None, rating=None, reply="orig", mid=None, prompt=P):
    return FeedbackRecord(f"f{i}", mid or f"m{i}", kind, rating, text, None, datetime(2026, 1, 1), prompt, reply)


def test_each_kind_becomes_exact_records():
    records = [rec(1, "correction", "Email support@chatfb.example."), rec(2, "critique", "too vague"),
               rec(3, "rating", rating=1, reply="good reply"), rec(4, "rating", rating=-1), rec(5, "implicit", rating=-1)]
    data = td.build(records, "semi", holdout_fraction=0.0001, seed=0)
    scrubbed = [{"role": "user", "content": "How do I reach support? I'm [email]"}]
    assert [(e.source, e.prompt, e.target, e.rejected) for e in data.train] == [
        ("correction", scrubbed, "Email support@chatfb.example.", "orig"), ("rating", scrubbed, "good reply", None)]
    assert data.dpo_rows() == [{"prompt": scrubbed, "chosen": [{"role": "assistant", "content": "Email support@chatfb.example."}],
                                "rejected": [{"role": "assistant", "content": "orig"}],
                                "feedback_id": "f1", "author": "unknown", "feedback_kind": "written_correction",
                                "scope": "shared"}]  # provenance: TRL ignores it, chatfb.learning.train drops it
    assert [r.feedback_id for r in data.pending_critiques] == ["f2"]
    assert data.counts["kto_negatives"] == 2 and data.counts["kto_positives"] == 1


def test_modes():
    records = [rec(1, "correction", "fixed"), rec(2, "critique", "too vague"), rec(3, "rating", rating=1)]
    sup = td.build(records, "supervised", 0.0001)
    assert [e.source for e in sup.train] == ["correction"] and not sup.pending_critiques
    uns = td.build(records, "unsupervised", 0.0001)
    assert uns.train == [] and len(uns.pending_critiques) == 1
    (task,) = td.critique_tasks(uns, 0.0001, 0, limit=32)
    td.add_selections(uns, [(task, "a selected reply")])
    assert [(e.source, e.target, e.rejected) for e in uns.train] == [("critique", "a selected reply", "orig")]
    assert uns.train[0].prompt == task.prompt and "too vague" not in str(uns.train[0].prompt)  # trained WITHOUT it


def test_cleaning_drops_garbage_duplicates_and_overlong():
    records = [rec(1, "correction", "fine answer"), rec(2, "correction", "fine answer"), rec(3, "correction", "!!!!"),
               rec(4, "critique", "  "), rec(5, "correction", "x" * 50 + " words")]
    data = td.build(records, "semi", 0.0001, max_chars=45, pii=False)
    assert [e.feedback_id for e in data.train] == ["f1"]
    assert (data.counts["dropped_duplicate"], data.counts["dropped_empty_or_garbage"], data.counts["dropped_overlong"]) == (1, 2, 1)
    assert data.train[0].prompt == P  # no scrubbing when pii=False


def test_heldout_split_is_deterministic_and_disjoint():
    records = [rec(i, "correction", f"answer number {i}") for i in range(200)]
    a, b = td.build(records, "semi", 0.2, seed=7), td.build(records, "semi", 0.2, seed=7)
    assert [e.feedback_id for e in a.heldout] == [e.feedback_id for e in b.heldout]
    assert 20 < len(a.heldout) < 60
    assert not {e.feedback_id for e in a.heldout} & {e.feedback_id for e in a.train}


def test_corrected_reply_is_not_also_refined_or_praised():
    records = [rec(1, "correction", "better", mid="m"), rec(2, "critique", "too vague", mid="m"), rec(3, "rating", rating=1, mid="m")]
    data = td.build(records, "semi", 0.0001)
    assert [e.source for e in data.train] == ["correction"] and not data.pending_critiques


def test_step_cap_only_caps():
    from chatfb.learning.train import step_cap

    assert step_cap(20, 1.0, 4, 120) == -1  # 5 steps: the epochs decide
    assert step_cap(1000, 3.0, 4, 120) == 120  # 750 steps: capped
    assert step_cap(1000, 3.0, 4, 0) == -1  # no cap
    assert step_cap(10, 0.5, 4, 2) == -1  # ceil(3 * 0.5) = 2 steps: within the cap
    assert step_cap(10, 1.0, 4, 2) == 2


def test_eval_sample_is_bounded_and_stable():
    from types import SimpleNamespace

    from chatfb.learning.gate import eval_sample

    heldout = [SimpleNamespace(feedback_id=f"f{i}") for i in range(100)]
    a, b = eval_sample(heldout, 10, 7), eval_sample(list(reversed(heldout)), 10, 7)
    assert len(a) == 10 and [e.feedback_id for e in a] == [e.feedback_id for e in b]
    assert eval_sample(heldout[:5], 10, 7) == heldout[:5] and len(eval_sample(heldout, 0, 7)) == 100


# -- critiques and guidelines -> instruction tasks ------------------------------------------------------

BENCH_RULES = ["Wrong: you must tell people to email our support team at support@chatfb.example. Always give that address.",
               "Format it as a bulleted list: exactly three short tips, each on its own line starting with '- '.",
               "Too long. Answer in one short sentence of at most 25 words.",
               "Our house style: always end the note with the line 'Cheers, the chatfb team'.",
               "Wrong: the capital of Australia is Canberra, not Sydney.", "Never use emoji.",
               "our support email is help@example.org"]


def test_lasting_preferences_are_told_from_one_off_complaints():
    assert all(td.is_lasting_preference(c) for c in BENCH_RULES)
    assert not any(td.is_lasting_preference(c) for c in ("too vague", "That's rude.", "This is wrong.",
                                                         "I don't like this answer", "not helpful", ""))


def words_similar(anchor, texts):  # word overlap instead of MiniLM: fast and predictable
    a = set(anchor.lower().strip("?.").split())
    return [len(a & set(t.lower().strip("?.").split())) / max(len(a), 1) for t in texts]


def q(text):
    return [{"role": "user", "content": text}]


def crit(i, text, question, created=1):
    return FeedbackRecord(f"c{i}", f"m{i}", "critique", None, text, None, datetime(2026, 1, created), q(question), "orig")


def test_critiques_are_held_out_whole_and_bounded_newest_first():
    records = [crit(i, "too vague", f"question {i}?", created=1 + i % 28) for i in range(40)]
    data = td.build(records, "unsupervised", holdout_fraction=0.25, seed=3)
    tasks = td.critique_tasks(data, 0.25, 3, limit=10)
    held = {r.feedback_id for r in data.heldout_critiques}
    assert held == {r.feedback_id for r in records if td.is_heldout(r.feedback_id, 0.25, 3)}, "held out by another rule"
    assert 3 < len(held) < 20, f"{len(held)} of 40 held out at a fraction of 0.25"
    assert len(tasks) == 10, "the limit of 10 tasks did not hold"
    assert not held & {t.feedback_id for t in tasks}, "a held-out critique became a training task"
    assert not data.pending_critiques
    assert (data.counts["critiques"], data.counts["critiques_heldout"]) == (40, len(held)), data.counts
    assert data.counts["critiques_not_refined"] == 40 - len(held) - 10
    rest = [r for r in records if r.feedback_id not in held]
    assert min(t.record.created_at for t in tasks) >= max(sorted(r.created_at for r in rest)[:len(rest) - 10]), \
        "the bound kept an older critique over a newer one"
    assert all(t.source == "critique" and t.original == "orig" and t.instruction == "too vague" for t in tasks), tasks
    assert not any(t.original.cut_off for t in tasks)


def test_a_liked_reply_that_was_cut_off_teaches_nothing():
    liked = FeedbackRecord("r1", "m1", "rating", 1, None, "ann", datetime(2026, 1, 1), q("What is Paris?"),
                           "Paris is the capital of France. It is also the larg")
    assert [e.target for e in td.build([liked], "semi", holdout_fraction=0.0, seed=3).train] == [liked.reply]
    assert td.build([replace(liked, reply_cut_off=True)], "semi", holdout_fraction=0.0, seed=3).train == []


def test_a_critiqued_reply_that_was_cut_off_is_framed_only_up_to_its_last_whole_sentence():
    """The task's original knows it was cut off (the stored finish reason, or Stop): a closing phrase the critique
    asks for follows its last whole sentence, not half a word."""
    cut = replace(crit(1, "End with 'Cheers, the chatfb team'.", "What is Paris?"),
                  reply="Paris is the capital of France. It is also the larg", reply_cut_off=True)
    [task] = td.critique_tasks(td.build([cut], "unsupervised", holdout_fraction=0.0, seed=3), 0.0, 3, limit=10)
    assert task.original.cut_off and task.original == cut.reply
    assert [c.text for c in candidates.content_keeping(task.instruction, task.original)] == [
        "Paris is the capital of France.\n\nCheers, the chatfb team"]


def test_the_bound_spreads_over_what_the_critiques_ask():
    # 20 new critiques asking one thing (two wordings), then 3 older ones each of two other asks: a bound of 8
    # takes the newest of every ask in turns, not the 8 newest (all of the first ask).
    def embed(texts):  # a stand-in for the sentence embeddings: "be brief" is "too long" reworded
        axes = {"too long": 0, "be brief": 0, "give the support address": 1, "end with cheers": 2, "too vague": 3}
        return [[1.0 if axes[t] == k else 0.0 for k in range(4)] for t in texts]

    records = [crit(i, "Too long." if i % 2 else "Be brief!", f"question {i}?", created=28) for i in range(20)]
    records += [crit(20 + i, "Give the support address.", f"support {i}?", created=10 + i) for i in range(3)]
    records += [crit(30 + i, "End with 'Cheers'.", f"note {i}?", created=5 + i) for i in range(3)]
    data = td.build(records, "unsupervised", holdout_fraction=0.0001, seed=0)
    tasks = td.critique_tasks(data, 0.0001, 0, limit=8, embed=embed)
    asked = Counter(t.instruction.split()[0] for t in tasks)
    assert asked == {"Too": asked["Too"], "Be": asked["Be"], "Give": 3, "End": 2}, asked
    assert asked["Too"] + asked["Be"] == 3, f"one ask took {asked['Too'] + asked['Be']} of 8 places"
    assert data.counts["critiques_not_refined"] == 26 - 8
    newest = {t.feedback_id for t in tasks if t.instruction.startswith("End")}
    assert newest == {"c32", "c31"}, f"the older critiques of an ask went first: {newest}"
    # a critique like two groups joins the one it is closest to
    # (angles: "too long" 0, "be very brief" 25, "be brief" 40 degrees: cosines 0.91 and 0.97, the two heads 0.77)
    angle = {"too long": 0, "be very brief": 25, "be brief": 40}
    records = [crit(42, "Too long.", "q42?", created=22), crit(43, "Other.", "o1?", created=21),
               crit(44, "Other.", "o2?", created=2), crit(41, "Be brief.", "q41?", created=20),
               crit(40, "Be very brief.", "q40?", created=19)]
    chosen = td.spread_over_asks(records, 4, lambda texts: [
        [math.cos(math.radians(angle[t])), math.sin(math.radians(angle[t])), 0.0] if t in angle else [0.0, 0.0, 1.0]
        for t in texts])
    # "be very brief" is in the "be brief" group: the second turn starts with the next group that has a second
    assert [r.feedback_id for r in chosen] == ["c42", "c43", "c41", "c44"], [r.feedback_id for r in chosen]
    one_ask = [crit(i, "too vague", f"q {i}?", created=1 + i) for i in range(12)]
    data = td.build(one_ask, "unsupervised", holdout_fraction=0.0001, seed=0)
    assert [t.feedback_id for t in td.critique_tasks(data, 0.0001, 0, limit=4, embed=embed)] == \
        ["c11", "c10", "c9", "c8"], "one ask alone: not the newest first"


def test_a_lasting_preference_is_distilled_on_similar_prompts_of_other_feedback_and_replay():
    rule = "Always give our support email support@chatfb.example."
    records = [crit(1, rule, "How do I reset my password?"), crit(2, "too vague", "How do I reset my login?"),
               rec(3, "rating", rating=1, prompt=q("How do I reset my router?")),
               rec(4, "rating", rating=1, prompt=q("How do I reset my password please?")),
               rec(5, "rating", rating=1, prompt=q("What is a volcano?"))]
    replay = [q("How do I reset my watch?"), q("Why is the sky blue?")]
    data = td.build(records, "semi", holdout_fraction=0.0001, seed=0, pii=False)
    tasks = td.critique_tasks(data, 0.0001, 0, limit=32)
    extra = td.distillation_tasks(data, tasks, [], data.records, replay, per_rule=4, max_tasks=64,
                                  holdout_fraction=0.0001, seed=0, similar=words_similar)
    got = [(td.last_user(t.prompt), t.instruction, t.source, t.feedback_id) for t in extra]
    # the rule carries to the closest prompts of other feedback (2 of 4) and of replay (the other 2);
    # the one-off complaint ("too vague") to none, and its prompt, which has its own critique, gets no
    # second instruction; unrelated questions are not "of the same kind"
    assert got == [("How do I reset my password please?", rule, "distill", "c1"), ("How do I reset my router?", rule, "distill", "c1"),
                   ("How do I reset my watch?", rule, "distill", "c1")]
    assert data.counts["distill_tasks"] == 3 and data.counts["guideline_tasks"] == 0
    # bounded in all
    assert len(td.distillation_tasks(td.build(records, "semi", 0.0001, pii=False), tasks, [], data.records, replay, 4, 1,
                                     0.0001, 0, similar=words_similar)) == 1
    assert td.distillation_tasks(data, tasks, [], data.records, replay, 0, 64, 0.0001, 0, similar=words_similar) == []


def test_a_corrected_fact_is_distilled_on_users_questions_only_never_on_replay():
    fact = "Wrong: the capital of Australia is Canberra, not Sydney."
    records = [crit(1, fact, "What is the capital of Australia?"),
               rec(2, "rating", rating=1, prompt=q("What is the capital city of Australia?"))]
    replay = [q("What is the capital of Japan?")]
    data = td.build(records, "semi", holdout_fraction=0.0001, seed=0, pii=False)
    tasks = td.critique_tasks(data, 0.0001, 0, limit=32)
    extra = td.distillation_tasks(data, tasks, [], data.records, replay, per_rule=4, max_tasks=64,
                                  holdout_fraction=0.0001, seed=0, similar=words_similar)
    assert [td.last_user(t.prompt) for t in extra] == ["What is the capital city of Australia?"]


def test_held_out_feedback_never_becomes_a_distillation_prompt():
    rule = "Always answer in one sentence."
    records = [crit(i, rule, f"What is thing number {i}?") for i in range(30)]
    data = td.build(records, "unsupervised", holdout_fraction=0.3, seed=1)
    tasks = td.critique_tasks(data, 0.3, 1, limit=32)
    extra = td.distillation_tasks(data, tasks, [], data.records, [], 8, 640, 0.3, 1, similar=words_similar)
    held_questions = {td.last_user(r.prompt) for r in data.heldout_critiques}
    assert held_questions and not held_questions & {td.last_user(t.prompt) for t in tasks + extra}, \
        "a held-out critique's question is also a training prompt"


def test_an_approved_guideline_trains_on_its_critiques_prompts_and_is_checked_on_the_held_out_ones():
    text = "Our house style: always end the note with the line 'Cheers, the chatfb team'."
    records = [crit(i, text, f"Write a short note number {i}.") for i in range(20)]
    records.append(crit(99, "too vague", "Write a short poem."))
    g = {"id": "g1", "text": text, "source_feedback_id": "c0"}
    data = td.build(records, "supervised", holdout_fraction=0.25, seed=2)  # critiques train in no mode but guidelines
    assert not data.pending_critiques
    extra = td.distillation_tasks(data, [], [g], data.records, [q("Write a haiku about rain.")], 2, 64, 0.25, 2,
                                  similar=words_similar)
    held = [r for r in records[:20] if td.is_heldout(r.feedback_id, 0.25, 2)]
    trained = [r for r in records[:20] if not td.is_heldout(r.feedback_id, 0.25, 2)]
    assert held, "nothing held out: the check below would be empty"
    assert [td.last_user(p) for p in data.guideline_eval["g1"]] == [td.last_user(r.prompt) for r in held], \
        "the guideline is not checked on exactly the held-out critiques' questions"
    assert {t.source for t in extra} == {"guideline"} and {t.feedback_id for t in extra} == {"g1"}, extra
    questions = [td.last_user(t.prompt) for t in extra]
    assert questions[:len(trained)] == [td.last_user(r.prompt) for r in trained]
    assert "Write a short poem." in questions, "another critique's question is not used for the guideline"
    assert not {td.last_user(r.prompt) for r in held} & set(questions), "the guideline trains on a held-out question"
    assert data.counts["guideline_tasks"] == len(extra)


def test_a_critique_whose_candidates_all_fail_yields_no_example_and_is_counted():
    rule = "Always give our support email support@chatfb.example."
    records = [crit(1, rule, "How do I reset my password?"), crit(2, "too vague", "What is a volcano?")]
    data = td.build(records, "unsupervised", 0.0001)
    tasks = td.critique_tasks(data, 0.0001, 0, 32)
    distill = td.InstructionTask(q("How do I reset my router?"), rule, "distill", "c1")
    td.add_selections(data, [(tasks[0], "Email support@chatfb.example."), (tasks[1], None), (distill, None)])
    counts = td.finalize_counts(data)
    assert [(e.source, e.feedback_id, e.target) for e in data.train] == [("critique", "c1", "Email support@chatfb.example.")]
    assert (counts["critiques_with_example"], counts["critiques_without_example"]) == (1, 1)
    assert (counts["distill_tasks_with_example"], counts["distill_tasks_without_example"]) == (0, 1)
    assert counts["train_critique"] == 1 and counts["train_distill"] == 0 and counts["train_examples"] == 1


def test_hold_one_out_holds_out_one_row_only_where_the_split_held_out_nothing():
    rows = [FeedbackRecord(f"f{i}", f"m{i}", "correction", None, f"Answer {i}.", None, None,
                           [{"role": "user", "content": f"Question {i}?"}], "Wrong.") for i in range(5)]
    data = td.build(rows, "supervised", holdout_fraction=0.0, seed=1)
    assert len(data.train) == 5 and not data.heldout
    held = td.hold_one_out(data, 0.0, 1)
    assert held is not None and [e.feedback_id for e in data.heldout] == [held] and len(data.train) == 4
    assert td.hold_one_out(data, 0.0, 1) is None and len(data.heldout) == 1  # something is held out already
    assert td.hold_one_out(td.build(rows[:1], "supervised", 0.0, 1), 0.0, 1) is None  # one row: it trains
    critique = FeedbackRecord("c1", "m9", "critique", None, "Too long.", None, None, [{"role": "user", "content": "Q?"}], "A.")
    data = td.build(rows + [critique], "semi", 0.0, 1)
    assert td.hold_one_out(data, 1.0, 1) is None  # its critique will be held out whole: the gate has that


def test_a_row_held_out_by_hold_one_out_is_never_a_distillation_prompt():
    rule = "Always give our support email support@chatfb.example."
    records = [crit(1, rule, "How do I reset my password?"),
               rec(3, "rating", rating=1, prompt=q("How do I reset my router?")),
               rec(4, "rating", rating=1, prompt=q("How do I reset my password please?"))]
    data = td.build(records, "semi", holdout_fraction=0.0001, seed=0, pii=False)
    held = td.hold_one_out(data, 0.0001, 0)
    tasks = td.critique_tasks(data, 0.0001, 0, limit=32)
    extra = td.distillation_tasks(data, tasks, [], data.records, [], per_rule=4, max_tasks=64,
                                  holdout_fraction=0.0001, seed=0, similar=words_similar)
    (held_prompt,) = [td.last_user(r.prompt) for r in records if r.feedback_id == held]
    assert extra and held_prompt not in {td.last_user(t.prompt) for t in extra}
