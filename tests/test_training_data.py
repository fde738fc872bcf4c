from datetime import datetime

from chatfb import training_data as td
from chatfb.store import FeedbackRecord

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
                                "rejected": [{"role": "assistant", "content": "orig"}]}]
    assert [r.feedback_id for r in data.pending_critiques] == ["f2"]
    assert data.counts["kto_negatives"] == 2 and data.counts["kto_positives"] == 1


def test_modes():
    records = [rec(1, "correction", "fixed"), rec(2, "critique", "too vague"), rec(3, "rating", rating=1)]
    sup = td.build(records, "supervised", 0.0001)
    assert [e.source for e in sup.train] == ["correction"] and not sup.pending_critiques
    uns = td.build(records, "unsupervised", 0.0001)
    assert uns.train == [] and len(uns.pending_critiques) == 1
    td.add_refinements(uns, [(uns.pending_critiques[0], "a refined reply")], 0.0001, 0)
    assert [(e.source, e.target, e.rejected) for e in uns.train] == [("critique", "a refined reply", "orig")]


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
    from chatfb.train import step_cap

    assert step_cap(20, 1.0, 4, 120) == -1  # 5 steps: the epochs decide
    assert step_cap(1000, 3.0, 4, 120) == 120  # 750 steps: capped
    assert step_cap(1000, 3.0, 4, 0) == -1  # no cap
    assert step_cap(10, 0.5, 4, 2) == -1  # ceil(3 * 0.5) = 2 steps: within the cap
    assert step_cap(10, 1.0, 4, 2) == 2


def test_eval_sample_is_bounded_and_stable():
    from types import SimpleNamespace

    from chatfb.nightly import eval_sample

    heldout = [SimpleNamespace(feedback_id=f"f{i}") for i in range(100)]
    a, b = eval_sample(heldout, 10, 7), eval_sample(list(reversed(heldout)), 10, 7)
    assert len(a) == 10 and [e.feedback_id for e in a] == [e.feedback_id for e in b]
    assert eval_sample(heldout[:5], 10, 7) == heldout[:5] and len(eval_sample(heldout, 0, 7)) == 100
