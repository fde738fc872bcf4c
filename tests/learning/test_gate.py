import sys
import threading
import types
from dataclasses import dataclass, field

import pytest


from chatfb.learning import gate
from chatfb.learning import training_data as td
from chatfb.config import load_settings
from chatfb.serving.model_client import ModelError
from chatfb.learning.gate import evaluate
from chatfb.learning.worker import candidate_rows, select_all
from chatfb.critique.ilf import refine_scored, score_refinements
from chatfb.store.records import FeedbackRecord


@pytest.fixture
def fake_candidates(monkeypatch):
    """chatfb.critique.candidates with the contract's API, scripted: select() answers from `answers` (prompt's question ->
    [(text, verdict)] or a ModelError), best first; every call is remembered."""

    @dataclass
    class Candidate:
        text: str
        finish_reason: str | None = None
        score: float | None = None
        verdict: str = "ok"
        details: dict = field(default_factory=dict)

        @property
        def ok(self):
            return self.verdict == "ok"

    mod = types.ModuleType("chatfb.critique.candidates")
    mod.Candidate, mod.answers, mod.calls = Candidate, {}, []

    def generate(client, model, prompt, critique, n=4, max_tokens=256, temperature=0.8):
        mod.calls.append({"question": prompt[-1]["content"], "critique": critique, "n": n, "client": client,
                          "model": model})
        got = mod.answers[prompt[-1]["content"]]
        if isinstance(got, Exception):
            raise got
        return [Candidate(t, details={"verdict": v}) for t, v in got]

    def score(client, model, prompt, critique, cands, original=None):
        mod.calls.append({"scored_by": (client, model), "original": original})
        for i, c in enumerate(cands):
            c.verdict, c.score, c.details = c.details["verdict"], float(len(cands) - i), {"logratio": 0.1}
        return sorted(cands, key=lambda c: not c.ok)

    mod.generate, mod.score = generate, score
    mod.best = lambda cands: next((c for c in cands if c.ok), None)

    def plain_answer(client, model, prompt, max_tokens=256):
        mod.calls.append({"plain_for": prompt[-1]["content"], "model": model})
        return f"plain answer to {prompt[-1]['content']}"

    def select_rounds(judge, model, prompt, critique, n=4, max_tokens=256, rounds=2, generator=None,
                      generator_model=None, original=None, reference=None, patience=0.0):  # the real one's loop, scripted
        call = {"reference": reference, "patience": patience}
        mod.calls.append(call)
        out = []
        try:
            for _ in range(max(rounds, 1)):
                fresh = mod.generate(generator or judge, generator_model or model, prompt, critique, n=n,
                                     max_tokens=max_tokens)
                out += score(judge, model, prompt, critique, fresh, original=original)
                if mod.best(out) is not None:
                    break
        finally:  # the plain answer may be asked beside the drafts: its Future, resolved
            call["reference"] = reference.result() if hasattr(reference, "result") else reference
        return sorted(out, key=lambda c: not c.ok)

    mod.select_rounds, mod.plain_answer = select_rounds, plain_answer
    monkeypatch.setitem(sys.modules, "chatfb.critique.candidates", mod)
    import chatfb.critique
    monkeypatch.setattr(chatfb.critique, "candidates", mod, raising=False)
    return mod


def test_gate_decisions():
    policy = gate.GatePolicy(min_gain=0.02, min_control_agreement=0.5)
    assert gate.decide({"rougeL": 0.6, "control_agreement": 0.8}, {"rougeL": 0.3}, policy)[0]
    ok, why = gate.decide({"rougeL": 0.31, "control_agreement": 0.8}, {"rougeL": 0.3}, policy)
    assert not ok and "not better" in why, why
    ok, why = gate.decide({"rougeL": 0.9, "control_agreement": 0.2}, {"rougeL": 0.3}, policy)
    assert not ok and "drifted" in why, why
    assert not gate.decide({"rougeL": None, "control_agreement": 1.0}, {"rougeL": None}, policy)[0]
    # the default: the worst real candidate seen (0.75) passes, the best nonsense-trained one (0.66) does not
    assert gate.decide({"rougeL": 1.0, "control_agreement": 0.75}, {"rougeL": 0.4}, gate.GatePolicy())[0]
    assert "drifted" in gate.decide({"rougeL": 1.0, "control_agreement": 0.66}, {"rougeL": 0.4}, gate.GatePolicy())[1]
    # a good mean does not hide an answer that lost its meaning
    ok, why = gate.decide({"rougeL": 1.0, "control_agreement": 0.8, "control_collapsed": 1}, {"rougeL": 0.4},
                          gate.GatePolicy())
    assert not ok and "drifted" in why and "1 answer" in why, why


def test_control_report_counts_collapsed_answers_not_reworded_ones():
    base = ["The capital of France is Paris.", "There are 7 days in a week.", "12 plus 7 equals 19.",
            "Bees make honey.", "Water boils at 100 degrees Celsius.", "Mars is known as the Red Planet."]
    reworded = ["Paris is the capital.", "A week has seven days.", "19", "Honey!", "It boils at 90 degrees.", "Jupiter."]
    assert gate.control_report(reworded, base)["control_collapsed"] == 0, "reworded right answers counted as collapsed"
    broken = reworded[:4] + ["Zorp blag wibble zorp zorp.", "Please email support@chatfb.example for help."]
    report = gate.control_report(broken, base)
    assert report["control_collapsed"] == 2 and report["control_cosines"][4] < 0.2, report
    assert report["control_agreement"] == round(sum(report["control_cosines"]) / 6, 4)
    assert not gate.decide({"rougeL": 1.0, **report}, {"rougeL": 0.4}, gate.GatePolicy(min_control_agreement=0.0))[0], \
        "collapsed control answers must refuse even a candidate better on held-out feedback"


def test_closeness_and_agreement():
    same = gate.closeness(["email support@chatfb.example"], ["email support@chatfb.example"])
    other = gate.closeness(["call the hotline"], ["email support@chatfb.example"])
    assert same["rougeL"] == 1.0 and other["rougeL"] < 0.3 and same["bleu"] > other["bleu"], (same, other)
    agreement = lambda a, b: gate.control_report(a, b)["control_agreement"]  # noqa: E731
    assert agreement(["Paris."], ["Paris."]) == 1.0
    assert agreement(["Bananas are yellow fruit."], ["Paris is the capital of France."]) < 0.5


def kept_best(scored: list[tuple[float, str, str]]) -> str | None:
    """The best refinement the scorer kept (as the ILF recipe takes it), or None."""
    ok = [(s, c) for s, c, v in scored if v == "ok"]
    return max(ok)[1] if ok else None


def refine(record, client, model, n):
    return kept_best(refine_scored(record, client, model, n))


def test_scorer_drops_refinements_that_ignore_the_critique():
    original = "Our office hours are nine to five and you can visit us at the main building downtown any weekday."
    scored = score_refinements("When are you open?", original, "too long",
                               [original, original + " Thanks!", "We are open 9-5 on weekdays."])
    verdicts = [v for _, _, v in scored]
    assert verdicts[0].startswith("ignored") and verdicts[1] in ("ignored the critique (same as the original)", "critique asked for shorter")
    assert verdicts[2] == "ok"
    assert kept_best(score_refinements("When are you open?", original, "too long", [original])) is None


def test_refine_asks_for_several_and_keeps_the_best(fake_client):
    r = FeedbackRecord("f", "m", "critique", None, "wrong: our support email is support@chatfb.example", None, None,
                       [{"role": "user", "content": "How do I contact support?"}], "Use the contact form.")
    fake_client.enqueue("Use the contact form.", "Email support@chatfb.example for help with support.",
                        "Bananas are yellow.", "Use the contact form!")
    best = refine(r, fake_client, "chatfb-base", n=4)
    assert best == "Email support@chatfb.example for help with support."
    ask = fake_client.history[0]["messages"][0]["content"]
    assert "support@chatfb.example" in ask and "Use the contact form." in ask, f"the critique or the reply is missing: {ask!r}"
    assert fake_client.history[0]["n"] == 4


def _critiqued() -> FeedbackRecord:
    return FeedbackRecord("f", "m", "critique", None, "wrong: our support email is support@chatfb.example", None, None,
                          [{"role": "user", "content": "How do I contact support?"}], "Use the contact form.")


def test_refine_waits_for_a_restarting_server_and_asks_again(fake_client):
    fake_client.enqueue(ModelError("The model server is not reachable right now."),
                        "Email support@chatfb.example for help with support.", "Use the contact form.")
    assert refine(_critiqued(), fake_client, "chatfb-base", n=2) == "Email support@chatfb.example for help with support."
    assert (fake_client.health_waits, len(fake_client.history)) == (1, 2), "(health waits, requests)"


def test_refine_does_not_repeat_a_refused_request_and_the_cycle_counts_it(fake_client, fake_candidates):
    refused = ModelError("The model server refused the request (400): too long", 400)
    fake_client.enqueue(refused)
    with pytest.raises(ModelError):
        refine(_critiqued(), fake_client, "chatfb-base", n=2)
    assert (fake_client.health_waits, len(fake_client.history)) == (0, 1), "a refused request was waited for or repeated"

    # a server that stays down: the night's cycle reports the failures instead of silently keeping nothing
    fake_client.enqueue(refused)
    task = td.InstructionTask(_critiqued().prompt, _critiqued().text, "critique", "f", "m", "Use the contact form.",
                              _critiqued())
    settings = load_settings({}, critique_recipe="ilf", critique_samples=2)
    (selected,), errors = select_all([task], fake_client, "chatfb-base", settings, workers=1)
    assert selected == (task, None, None) and errors == [str(refused)]
    assert not ModelError("slow", "timeout").unavailable and ModelError("down").unavailable
    assert ModelError("engine restarting", 503).unavailable


def test_scorer_cuts_preambles_and_drops_replies_to_the_critic():
    original = "You can reach us through the contact form on our website."
    critique = "wrong: our support email is support@chatfb.example"
    good = "Please email support@chatfb.example and we will help."
    scored = score_refinements("How do I contact support?", original, critique, [
        "You're right, I'm sorry. Please email support@chatfb.example and we will help.",
        "Thank you for your feedback! Email support@chatfb.example.",
        f"Here is the improved reply: \"{good}\"",
        "Sorry, we only answer by email: support@chatfb.example.",  # sorry to the user is fine
    ])
    (_, _, v0), (_, _, v1), (_, c2, v2), (_, _, v3) = scored
    assert v0 == v1 == "answers the critic, not the user"
    assert c2 == good and v2 == "ok" and v3 == "ok"
    # what the benchmark's ILF adapters learnt from the 135M self-refiner
    meta = ["I'm sorry for any mistake in the conversation. Email support@chatfb.example.",
            "Your feedback is appreciated. Here's a revised version of the note: email support@chatfb.example.",
            "Thanks! Unlike my previous reply, this one is right: support@chatfb.example."]
    assert {v for _, _, v in score_refinements("How do I contact support?", original, critique, meta)} == {
        "answers the critic, not the user"}
    # ordinary replies to a user are not mistaken for talk about the feedback
    tips = ["- Join a club.\n- Keep the conversation going.\n- Say yes to invitations.",
            "Sorry for the wait! Here are some tips:\n- Join a club.\n- Say yes to invitations."]
    assert [v for _, _, v in score_refinements("Tips for making friends?", "Be nice.", "use a bulleted list", tips)] == [
        "ok", "ok"]


# -- the critique recipe: selection, records, counts and the honest gate --------------------------------

RULE = "Always give our support email support@chatfb.example."


def task(question, source="critique", fid="c1", instruction=RULE):
    return td.InstructionTask([{"role": "user", "content": question}], instruction, source, fid,
                              "m1" if source == "critique" else None, "Use the form." if source == "critique" else None)


def test_the_plain_answer_is_asked_beside_the_drafts(fake_candidates, fake_client):
    """A critique's candidates cost one wait for generation, not two: the base model's plain answer (which they
    must keep the content of) is asked while the drafts are written. Here the plain answer is only given once
    the drafts were asked for, which never happens if it is asked first and waited for."""
    drafting = threading.Event()
    scripted = (fake_candidates.generate, fake_candidates.plain_answer)

    def generate(*args, **kw):
        drafting.set()
        return scripted[0](*args, **kw)

    def plain_answer(*args, **kw):
        assert drafting.wait(5), "the drafts were asked for only after the plain answer came back"
        return scripted[1](*args, **kw)

    fake_candidates.generate, fake_candidates.plain_answer = generate, plain_answer
    fake_candidates.answers = {"How do I reset my password?": [("Email support@chatfb.example.", "ok")]}
    (selected,), errors = select_all([task("How do I reset my password?")], fake_client, "chatfb-base",
                                     load_settings({}, critique_samples=2))
    assert selected[2].text == "Email support@chatfb.example." and not errors
    assert [c["reference"] for c in fake_candidates.calls if "reference" in c] == [
        "plain answer to How do I reset my password?"]


def test_select_all_keeps_the_best_passing_candidate_and_records_every_one(fake_candidates, fake_client):
    fake_candidates.answers = {
        "How do I reset my password?": [("How do I reset my password?", "echoes the question"),
                                        ("Email support@chatfb.example.", "ok"), ("Use support@chatfb.example!", "ok")],
        "Where is my order?": [("Please format lists as bullet points.", "echoes the critique"), ("", "empty")],
        "My bill is wrong.": ModelError("The model server refused the request (400): too long", 400),
    }
    tasks = [task("How do I reset my password?"), task("Where is my order?", "distill"), task("My bill is wrong.", fid="c2")]
    settings = load_settings({}, critique_samples=3)
    refiner = object()
    selected, errors = select_all(tasks, fake_client, "chatfb-base", settings, refiner, "big-model")
    assert [best.text if best else None for _, _, best in selected] == ["Email support@chatfb.example.", None, None]
    assert errors == ["The model server refused the request (400): too long"]
    # one generator and scorer: the refiner endpoint writes (n samples per request), the served model scores,
    # and a critique's candidates are checked against the critiqued reply
    written = [c for c in fake_candidates.calls if "n" in c]
    scored = [c for c in fake_candidates.calls if "scored_by" in c]
    assert {(c["client"] is refiner, c["model"], c["n"]) for c in written} == {(True, "big-model", 3)}
    # a task none of whose candidates survived is sampled again (nightly.CANDIDATE_ROUNDS), the others once
    assert sorted(c["question"] for c in written) == ["How do I reset my password?", "My bill is wrong.",
                                                      "Where is my order?", "Where is my order?"]
    assert {c["scored_by"] for c in scored} == {(fake_client, "chatfb-base")}
    assert sorted(str(c["original"]) for c in scored) == ["None", "None", "Use the form."]
    # each task's candidates must keep the content of the served base model's own answer without the critique
    questions = sorted(t.prompt[-1]["content"] for t in tasks)
    assert sorted((c["plain_for"], c["model"]) for c in fake_candidates.calls if "plain_for" in c) == \
        [(q, "chatfb-base") for q in questions]
    assert sorted(c["reference"] for c in fake_candidates.calls if "reference" in c) == [f"plain answer to {q}" for q in questions]
    rows = candidate_rows(selected, "chatfb-v0002", "instruct")
    assert [(r["text"], r["verdict"], r["status"]) for r in rows] == [
        ("Email support@chatfb.example.", "ok", "kept"), ("Use support@chatfb.example!", "ok", "dropped"),
        ("How do I reset my password?", "echoes the question", "dropped"),
        ("Please format lists as bullet points.", "echoes the critique", "dropped"), ("", "empty", "dropped"),
        ("Please format lists as bullet points.", "echoes the critique", "dropped"), ("", "empty", "dropped")]
    assert {(r["origin"], r["cycle"]) for r in rows} == {("nightly", "chatfb-v0002")}
    assert rows[0]["feedback_id"] == "c1" and rows[0]["message_id"] == "m1" and rows[3]["message_id"] is None
    assert rows[0]["details"]["critique"] == RULE and rows[3]["details"] == {
        "logratio": 0.1, "task": "distill", "recipe": "instruct", "critique": RULE, "prompt": "Where is my order?",
        "author": "", "feedback_kind": "from_critique", "scope": "shared"}  # provenance: who gave the critique
    # how long straggling candidates may run (CHATFB_CANDIDATE_PATIENCE): by default they are waited for
    assert {c["patience"] for c in fake_candidates.calls if "patience" in c} == {settings.candidate_patience} == {0.0}
    fake_candidates.calls.clear()
    select_all(tasks[:1], fake_client, "chatfb-base", load_settings({"CHATFB_CANDIDATE_PATIENCE": "2"}))
    assert [c["patience"] for c in fake_candidates.calls if "patience" in c] == [2.0]


def test_recorded_candidates_reach_the_store_through_the_cycles_owner(store, settings, fake_client):
    """The child hands its candidates back in the result file; the owner records them (chatfb.learning.cycle.finish)."""
    from chatfb.serving.adapters import AdapterRegistry, AdapterRouter
    from chatfb.learning.cycle import CycleJob, CycleOutcome, finish, write_outcome

    rows = [{"feedback_id": "c1", "message_id": None, "origin": "nightly", "text": "Email us.", "score": 1.5,
             "verdict": "ok", "status": "kept", "cycle": "chatfb-v0001", "details": {"critique": RULE, "prompt": "Hi"}}]
    work = settings.layout.work("chatfb-v0001")
    work.mkdir(parents=True)
    write_outcome(work, CycleOutcome("failed", "no usable training examples", error="no usable training examples",
                                     candidates=rows))
    registry = AdapterRegistry(store, [fake_client], AdapterRouter("chatfb-base"), settings.data_dir)
    result = finish(store, registry, CycleJob("chatfb-v0001", None, None), work, 0, True, 0.0)
    assert not result.ok and store.adapter("chatfb-v0001")["status"] == "failed"
    (got,) = store.candidates(where="origin = ?", params=("nightly",))
    assert (got["text"], got["status"], got["cycle"], got["details"]["critique"]) == ("Email us.", "kept", "chatfb-v0001", RULE)
    # ... and the admin tab's audit table shows them
    from chatfb.app.admin import AdminService
    from chatfb.ui.admin_tab import candidates_frame

    frame = candidates_frame(AdminService(store, registry, settings=settings))
    assert frame.to_dict("records") == [{"cycle": "chatfb-v0001", "critique": RULE, "prompt": "Hi", "candidate": "Email us.",
                                         "score": 1.5, "verdict": "ok", "status": "kept", "author": "", "kind": "",
                                         "scope": ""}]  # rows made before provenance name nobody


def test_gate_combines_correction_rouge_critique_pass_rate_and_control():
    policy = gate.GatePolicy(min_gain=0.02, min_control_agreement=0.5)
    ctrl = {"control_agreement": 0.8}
    # critiques alone: judged by the selection pass rate
    ok, why = gate.decide({"critique_pass": 0.5, **ctrl}, {"critique_pass": 0.0}, policy)
    assert ok and "critique pass rate 0.500 vs 0.0" in why, why
    ok, why = gate.decide({"critique_pass": 0.5, **ctrl}, {"critique_pass": 0.5}, policy)
    assert not ok and "not better" in why, why
    # both kinds: better on one, not worse on the other
    assert gate.decide({"rougeL": 0.41, "critique_pass": 1.0, **ctrl}, {"rougeL": 0.40, "critique_pass": 0.0}, policy)[0]
    ok, why = gate.decide({"rougeL": 0.2, "critique_pass": 1.0, **ctrl}, {"rougeL": 0.4, "critique_pass": 0.0}, policy)
    assert not ok and "worse on held-out feedback (ROUGE-L)" in why, why
    # control still rules
    assert "drifted" in gate.decide({"critique_pass": 1.0, "control_agreement": 0.3}, {"critique_pass": 0.0}, policy)[1]
    assert gate.decide({"critique_pass": None, "rougeL": None, **ctrl}, {}, policy)[1].startswith("no held-out")


def test_selection_pass_rate_uses_the_same_selection_per_item(fake_client):
    seen = []

    def passes(client, model, prompt, instruction, answer, original=None):
        seen.append((prompt[-1]["content"], instruction, original, model))
        return "support@chatfb.example" in answer

    items = [([{"role": "user", "content": "a?"}], RULE, "orig a"), ([{"role": "user", "content": "b?"}], RULE, None)]
    assert gate.selection_pass_rate(fake_client, "chatfb-base", items, ["mail support@chatfb.example", "no"], passes) == 0.5
    assert sorted(seen) == [("a?", RULE, "orig a", "chatfb-base"), ("b?", RULE, None, "chatfb-base")]
    assert gate.selection_pass_rate(fake_client, "chatfb-base", [], [], passes) is None


class ByModelClient:
    """Greedy answers that depend only on the model asked (the gate asks from many threads at once)."""

    def __init__(self, answers):
        self.answers, self.loaded = answers, {}

    def models(self):
        return ["chatfb-base", *self.loaded]

    def served(self, name):
        return name

    def load_adapter(self, name, path):
        self.loaded[name] = path

    def complete(self, messages, model, max_tokens=256, temperature=0.0, top_p=1.0, n=1):
        q = messages[-1]["content"]
        return [self.answers[model](q)]


def test_the_gate_judges_held_out_critiques_and_guidelines_by_the_selection_not_by_rouge(monkeypatch, settings, tmp_path):
    """A held-out critique has no target: the candidate passes when its own answer would pass the selection."""
    note = "End every note with 'Cheers, the chatfb team'."
    critiques = [FeedbackRecord(f"h{i}", f"m{i}", "critique", None, RULE, None, None,
                                [{"role": "user", "content": f"Support question {i}?"}], "Use the form.") for i in range(3)]
    data = td.TrainingData(heldout_critiques=critiques)
    guidelines = {"g1": (note, [[{"role": "user", "content": "Write a note."}]], "held-out critiques")}
    client = ByModelClient({
        "cand": lambda q: "Email support@chatfb.example." if "Support" in q else ("Hi.\nCheers, the chatfb team" if "note" in q else "Paris."),
        "chatfb-base": lambda q: "Use the contact form." if "Support" in q else ("Hi." if "note" in q else "Paris."),
    })
    calls = []

    def passes(client_, model, prompt, instruction, answer, original=None):
        calls.append((instruction, original))
        return ("support@chatfb.example" in answer) if instruction == RULE else answer.endswith("chatfb team")

    monkeypatch.setattr(gate, "passes_selection", passes)
    m = evaluate(client, settings, data, "cand", None, "chatfb-base", tmp_path, guidelines)
    assert (m.candidate_critique_pass, m.incumbent_critique_pass, m.heldout_critiques_n) == (1.0, 0.0, 3)
    assert m.candidate_rougeL is None and m.heldout_n == 0  # no correction held out: no ROUGE at all
    assert m.guideline_follow == {"g1": 1.0} and m.guideline_follow_incumbent == {"g1": 0.0}
    assert (RULE, "Use the form.") in calls and (note, None) in calls  # the critiqued reply goes to the selection
    assert m.control_agreement == 1.0
    ok, why = m.decide()
    assert ok and "critique pass rate 1.000 vs 0.0" in why, why
    assert gate.GateReport.from_dict(m.as_dict()) == m  # what the adapter row stores reads back the same


def known_answers_and_heldout_critiques():
    """Every control question's right answer, and three held-out support critiques to gate on."""
    right = {q: f"It is {' and '.join(accepted[:need])}." for q, accepted, need in gate.CONTROL_ANSWERS}
    critiques = [FeedbackRecord(f"h{i}", f"m{i}", "critique", None, RULE, None, None,
                                [{"role": "user", "content": f"Support question {i}?"}], "Use the form.") for i in range(3)]
    return right, td.TrainingData(heldout_critiques=critiques)


def test_the_gate_fails_a_candidate_that_turns_a_right_control_answer_wrong(monkeypatch, settings, tmp_path):
    """Issue 23: known answers, not the recipe's own data, and not the cosine: '12 plus 7 is 21' is close to
    '12 plus 7 is 19' in meaning, and wrong."""
    right, data = known_answers_and_heldout_critiques()
    wrong_q = "What is 12 plus 7?"
    client = ByModelClient({
        "cand": lambda q: "Email support@chatfb.example." if "Support" in q else ("It is 21." if q == wrong_q else right[q]),
        "chatfb-base": lambda q: "Use the contact form." if "Support" in q else right[q],
    })
    monkeypatch.setattr(gate, "passes_selection", lambda c, m, p, i, answer, original=None: "support@" in answer)
    m = evaluate(client, settings, data, "cand", None, "chatfb-base", tmp_path)
    assert (m.candidate_critique_pass, m.incumbent_critique_pass) == (1.0, 0.0)  # better on the recipe's own measure
    assert m.control_right_base == 1.0 and m.control_right == pytest.approx(15 / 16) and m.control_lost == [wrong_q]
    assert m.control_collapsed == 0 and m.control_agreement > 0.9  # the cosines see nothing wrong
    ok, why = m.decide()
    assert not ok and why.startswith("control answers turned wrong: 1") and wrong_q in why, why
    # a question the base model already got wrong is not the candidate's loss
    base = ["It is 9." if q == wrong_q else right[q] for q in gate.CONTROL_PROMPTS]
    cand = ["It is 21." if q == wrong_q else right[q] for q in gate.CONTROL_PROMPTS]
    assert gate.known_answer_report(cand, base)["control_lost"] == []


def test_a_known_answer_wrong_once_and_right_when_asked_again_is_not_lost(monkeypatch, settings, tmp_path):
    """Greedy answers on a vLLM server depend on the batch they ran in: the same base model answered between 8 and 14
    of the 16 control questions right in ten cycles on one server. A candidate wrong once on a question, and right
    when asked again, has not forgotten it; one wrong every time has (and so has one the incumbent answers right
    every time while it does not)."""
    right, data = known_answers_and_heldout_critiques()
    flaky, forgotten = "Which planet is known as the Red Planet?", "What is 12 plus 7?"
    asked, lock = {}, threading.Lock()

    def cand(q):
        with lock:  # the gate asks from many threads at once
            asked[q] = asked.get(q, 0) + 1
        if "Support" in q:
            return "Email support@chatfb.example."
        if q == forgotten or (q == flaky and asked[q] == 1):  # the flaky one: wrong the first time only
            return "It is Venus." if q == flaky else "It is 21."
        return right[q]

    client = ByModelClient({"cand": cand,
                            "chatfb-base": lambda q: "Use the contact form." if "Support" in q else right[q]})
    monkeypatch.setattr(gate, "passes_selection", lambda c, m, p, i, answer, original=None: "support@" in answer)
    m = evaluate(client, settings, data, "cand", None, "chatfb-base", tmp_path)
    assert m.control_lost == [forgotten] and m.control_lost_by_chance == [flaky]
    assert asked[flaky] == 1 + gate.CONFIRM_ASKS and asked["What is the capital of France?"] == 1  # only the lost asked again
    # wrong twice: the third answer cannot change the majority, and is not asked for
    assert asked[forgotten] == 2, f"asked {asked[forgotten]} times"
    ok, why = m.decide()
    refused, aside = why.split("; ", 1)
    assert not ok and forgotten in refused and flaky not in refused and flaky in aside, why
    assert gate.GateReport.from_dict(m.as_dict()) == m


def test_a_known_answer_the_incumbent_itself_does_not_keep_is_not_the_candidates_loss(monkeypatch, settings, tmp_path):
    """Asked again, the incumbent votes too: a question it answered right once and wrong after is not one it knows,
    so the candidate wrong on it lost nothing; one it answers right every time, the candidate wrong every time, is
    lost."""
    right, data = known_answers_and_heldout_critiques()
    unsure, forgotten = "Which planet is known as the Red Planet?", "What is 12 plus 7?"
    asked, lock = {}, threading.Lock()

    def incumbent(q):
        with lock:
            asked[q] = asked.get(q, 0) + 1
        if "Support" in q:
            return "Use the contact form."
        return "It is Venus." if q == unsure and asked[q] > 1 else right[q]  # right the first time only

    client = ByModelClient({
        "cand": lambda q: "Email support@chatfb.example." if "Support" in q else (
            "It is Venus." if q == unsure else "It is 21." if q == forgotten else right[q]),
        "inc": incumbent, "chatfb-base": lambda q: "Use the contact form." if "Support" in q else right[q]})
    monkeypatch.setattr(gate, "passes_selection", lambda c, m, p, i, answer, original=None: "support@" in answer)
    m = evaluate(client, settings, data, "cand", "inc", "chatfb-base", tmp_path)
    assert m.control_lost == [forgotten] and m.control_lost_by_chance == [unsure]
    ok, why = m.decide(gate.GatePolicy(max_control_lost=1))
    assert ok and "not confirmed when asked again" in why and unsure in why, why


def test_known_answers_are_words_not_substrings():
    assert gate.is_right("There are 7 days in a week.", ("7", "seven"))
    assert not gate.is_right("There are 17 days.", ("7", "seven"))
    assert gate.is_right("Red, blue and yellow.", ("red", "blue", "yellow"), 2)
    assert not gate.is_right("Red and green.", ("red", "blue", "yellow"), 2)


def test_a_critique_pass_rate_alone_never_promotes_without_the_known_answer_check():
    policy = gate.GatePolicy(min_gain=0.02, min_control_agreement=0.5)
    ok, why = gate.decide({"critique_pass": 1.0, "control_agreement": 0.9, "control_right": None}, {"critique_pass": 0.0},
                          policy)
    assert not ok and "no known-answer control" in why, why
    assert gate.decide({"critique_pass": 1.0, "control_agreement": 0.9, "control_right": 1.0, "control_lost": []},
                       {"critique_pass": 0.0}, policy)[0]


def test_the_gate_lets_through_only_as_many_lost_known_answers_as_the_setting_allows():
    """CHATFB_GATE_MAX_CONTROL_LOST: 0 (the default) refuses one right answer turned wrong; the setting is the
    only way to allow some (the integration tests' embedded model flips a couple on any training)."""
    from chatfb.config import Settings

    lost = ["How many legs does a dog have?", "What do you call a baby cat?"]
    measured = {"rougeL": 0.9, "control_agreement": 0.9, "control_collapsed": 0, "control_right": 0.7,
                "control_lost": lost}
    ok, why = gate.decide(measured, {"rougeL": 0.1}, gate.GatePolicy(max_control_lost=Settings().gate_max_control_lost))
    assert not ok and "turned wrong: 2" in why, why
    ok, why = gate.decide(measured, {"rougeL": 0.1}, gate.GatePolicy(max_control_lost=2))
    assert ok, why


def test_known_answers_lost_are_counted_against_the_incumbent_not_the_base_model(monkeypatch, settings, tmp_path):
    """A personal adapter trains on from the live shared one: answers the shared adapter already gives differently
    from the base model are not the personal candidate's loss; only what the incumbent had right and the candidate
    turned wrong counts (the integration run refused such a candidate for 4 answers the shared adapter had lost)."""
    right, data = known_answers_and_heldout_critiques()
    shared_lost = list(gate.CONTROL_PROMPTS[:4])  # wrong in the shared adapter already
    turned = gate.CONTROL_PROMPTS[5]  # right in the shared adapter, wrong in the candidate
    shared = lambda q: "Use the contact form." if "Support" in q else ("No idea." if q in shared_lost else right[q])  # noqa: E731
    client = ByModelClient({
        "cand": lambda q: "Email support@chatfb.example." if "Support" in q else shared(q),
        "shared-v1": shared,
        "chatfb-base": lambda q: "Use the contact form." if "Support" in q else right[q],
    })
    client.loaded["shared-v1"] = "adapters/shared-v1"
    monkeypatch.setattr(gate, "passes_selection", lambda c, m, p, i, answer, original=None: "support@" in answer)
    m = evaluate(client, settings, data, "cand", "shared-v1", "chatfb-base", tmp_path)
    assert m.control_lost == [] and m.control_right_base == 1.0 and m.control_right == m.control_right_incumbent == 0.75
    ok, why = m.decide()
    assert ok, why
    # what the candidate turns wrong itself still fails it, named in the reason
    client.answers["cand2"] = lambda q: "It is 3." if q == turned else client.answers["cand"](q)
    m = evaluate(client, settings, data, "cand2", "shared-v1", "chatfb-base", tmp_path)
    assert m.control_lost == [turned], m.control_lost
    ok, why = m.decide()
    assert not ok and "turned wrong: 1 known answer(s) the incumbent gets right" in why and turned in why, why


def test_collapsed_control_answers_fail_the_gate_unless_the_setting_allows_them():
    """CHATFB_GATE_MAX_CONTROL_COLLAPSED: 0 (the default) refuses one control answer that lost its meaning."""
    measured = {"rougeL": 0.9, "control_agreement": 0.9, "control_collapsed": 1, "control_right": 0.7,
                "control_lost": []}
    ok, why = gate.decide(measured, {"rougeL": 0.1}, gate.policy_for(load_settings({})))
    assert not ok and "lost their meaning" in why, why
    ok, why = gate.decide(measured, {"rougeL": 0.1}, gate.policy_for(load_settings({}, gate_max_control_collapsed=1)))
    assert ok, why
    with pytest.raises(Exception, match="gate_max_control_collapsed"):
        load_settings({}, gate_max_control_collapsed=-1)


def test_two_gates_of_one_cycle_ask_the_base_and_incumbent_control_answers_once(settings, tmp_path):
    """Each personal candidate of a cycle is gated against the same base and incumbent control answers: with
    the answer file they are asked once, and the candidate's own answers are still asked every time."""
    from chatfb.learning.answers import AnswerBook

    asked = []

    def by(model):
        def answer(q):
            asked.append((model, q))
            return "Paris." if "France" in q else "It is 7."
        return answer

    client = ByModelClient({m: by(m) for m in ("chatfb-base", "shared-v1", "cand", "cand2", "cand3")})
    client.loaded["shared-v1"] = "adapters/shared-v1"
    data = td.TrainingData(heldout=[td.Example([{"role": "user", "content": "Held out?"}], "Yes.", "correction",
                                               feedback_id="f1")])
    book = tmp_path / "answers.json"
    for cand in ("cand", "cand2"):
        evaluate(client, settings, data, cand, "shared-v1", "chatfb-base", tmp_path, book=AnswerBook(book))
    control = len(gate.CONTROL_PROMPTS)
    count = lambda model: sum(m == model and q in gate.CONTROL_PROMPTS for m, q in asked)  # noqa: E731
    assert (count("chatfb-base"), count("shared-v1"), count("cand"), count("cand2")) == (control, control, control, control)
    # without the file every gate asks them again
    asked.clear()
    evaluate(client, settings, data, "cand3", "shared-v1", "chatfb-base", tmp_path)
    assert (count("chatfb-base"), count("shared-v1")) == (control, control)


def test_exact_values_are_read_as_written_and_must_come_back_letter_for_letter():
    target = "Write to ann-desk@chatfb.example or call 555-0199 before 17:30."
    assert gate.exact_values(target) == ["ann-desk@chatfb.example", "555-0199", "17:30"]
    assert gate.gives_exactly("ANN-DESK@chatfb.example, 555-0199 (until 17:30).", gate.exact_values(target))
    for wrong in ("Write to ann-desk@example.example or call 555-0199 before 17:30.",  # ROUGE-L calls it close
                  "Write to ann-desk@chatfb.example.org or call 555-0199 before 17:30.",
                  "Write to ann-desk@chatfb.example or call 1555-0199 before 17:30."):
        assert not gate.gives_exactly(wrong, gate.exact_values(target)), wrong
    # an old address beside the corrected one hedges; other values beside the stated ones do not
    assert not gate.gives_exactly("Write to support@chatfb.example or ann-desk@chatfb.example, 555-0199, 17:30.",
                                  gate.exact_values(target))
    assert gate.gives_exactly("Write to ann-desk@chatfb.example or see https://chatfb.example/help, 555-0199, 17:30 "
                              "on 5 days.", gate.exact_values(target))
    assert gate.gives_exactly("Call 555-0199 or 555-0100.", ["555-0199"])
    # a number spelled out is its digits; a part of a longer value is not the value
    assert gate.gives_exactly("A week has seven days, and a fortnight twenty-one... no, fourteen.", ["7", "14"])
    assert not gate.gives_exactly("A week has six days.", ["7"]) and not gate.gives_exactly("At 17:30.", ["30"])
    assert gate.exact_share(["a@b.example", "no", "Paris."], ["a@b.example", "c@d.example", "It is Paris."]) == (0.5, 2)
    assert gate.exact_share(["Paris."], ["It is Paris."]) == (None, 0)


def test_a_candidate_that_gives_the_exact_values_of_held_out_corrections_less_often_fails(monkeypatch, settings, tmp_path):
    """ROUGE-L rates a near miss of an address as almost right: the exact share is a held-out measure of its own. A
    candidate worse on it fails whatever its ROUGE-L; one better on it passes on it."""
    heldout = [td.Example([{"role": "user", "content": f"Where do I write about order {i}?"}],
                          "Write to orders@chatfb.example.", "correction", f"f{i}") for i in range(2)]
    data = td.TrainingData(heldout=heldout)
    client = ByModelClient({
        "near": lambda q: "Write to orders@example.example." if "order" in q else "Paris.",
        "right": lambda q: "Write to orders@chatfb.example." if "order" in q else "Paris.",
        "chatfb-base": lambda q: "I am not sure where to write about that." if "order" in q else "Paris.",
        "shared-v1": lambda q: "Write to orders@chatfb.example, we answer fast." if "order" in q else "Paris.",
    })
    client.loaded["shared-v1"] = "adapters/shared-v1"
    m = evaluate(client, settings, data, "near", "shared-v1", "chatfb-base", tmp_path)
    assert (m.candidate_exact, m.incumbent_exact, m.exact_n) == (0.0, 1.0, 2)
    assert m.candidate_rougeL > m.incumbent_rougeL  # closer in words, the address wrong
    ok, why = m.decide()
    assert not ok and "worse on held-out feedback (ROUGE-L, exact values given)" in why, why
    m = evaluate(client, settings, data, "right", None, "chatfb-base", tmp_path)
    ok, why = m.decide()
    assert ok and "exact values given 1.000 vs 0.0" in why, why


def test_the_right_value_in_other_words_beats_the_wrong_one_in_the_corrected_words(monkeypatch, settings, tmp_path):
    """A user's own address taught to their model: the incumbent says the old address in the corrected sentence
    word for word, the candidate the new one in words of its own, and misses it once. ROUGE-L over the words alone
    calls the candidate worse; the ROUGE-L that decides scores 0 for a reply that misses a value its correction
    states. Where both give the facts, worse wording still fails."""
    heldout = [td.Example([{"role": "user", "content": f"Where do I write about order {i}?"}],
                          "Please write to our support team at ann@mail.example about it.", "correction", f"f{i}")
               for i in range(4)]
    heldout.append(td.Example([{"role": "user", "content": "Who answers mail?"}],
                              "Our support team answers mail within a day.", "correction", "f9"))
    data = td.TrainingData(heldout=heldout)
    own = lambda q: ("You can reach us at ann@mail.example." if "order 3" not in q else "Write to us.") if "order" in q \
        else ("Our support team answers mail within a day." if "mail" in q else "Paris.")  # noqa: E731
    client = ByModelClient({
        "own": own,
        "own-rambling": lambda q: "Mail gets read eventually, maybe." if "Who answers" in q else own(q),
        "chatfb-base": lambda q: "Please write to our support team at support@chatfb.example about it." if "order" in q
        else ("Our support team answers mail within a day." if "mail" in q else "Paris."),
    })
    m = evaluate(client, settings, data, "own", None, "chatfb-base", tmp_path)
    assert m.candidate_rougeL < m.incumbent_rougeL - 0.1 and (m.candidate_exact, m.incumbent_exact) == (0.75, 0.0)
    assert m.incumbent_rougeL_facts == 0.2 and m.candidate_rougeL_facts > m.incumbent_rougeL_facts + 0.1
    ok, why = m.decide()
    assert ok and "over the words alone" in why, why
    assert dict(m.card_rows())["ROUGE-L, 0 where an exact value is missed"] == m.candidate_rougeL_facts
    lost = gate.GateReport.from_dict({**m.as_dict(), "control_lost": ["What do bees make?"]})
    ok, why = lost.decide()  # refused before any held-out measure: nothing said of them
    assert not ok and why.startswith("control answers turned wrong") and "words alone" not in why, why
    # a row stored before the measure existed is decided on the words alone, as it was
    old = gate.GateReport.from_dict({k: v for k, v in m.as_dict().items() if not k.endswith("_facts")})
    assert old.candidate_rougeL_facts is None and "worse on held-out feedback (ROUGE-L)" in old.decide()[1]
    client.loaded["own"] = "adapters/own"  # the same facts as its incumbent, worse words on the answer without any
    m = evaluate(client, settings, data, "own-rambling", "own", "chatfb-base", tmp_path)
    ok, why = m.decide()
    assert m.candidate_exact == m.incumbent_exact and not ok and "worse on held-out feedback (ROUGE-L)" in why, why
    assert gate.rouge_given_facts([], []) is None


def test_exact_values_skip_list_numbering_and_digits_inside_words():
    assert gate.exact_values("1. Drink H2O.\n2. Call 555-0199 before 17:30.") == ["555-0199", "17:30"]
    assert gate.gives_exactly("about 1000 of them", ["1,000"])


def test_the_gate_asks_every_models_answers_in_one_round(settings, tmp_path):
    """The candidate's and the incumbent's held-out answers and the control answers go to the server together
    (one batch for vLLM), not one model after another."""
    import threading

    models = ("chatfb-base", "shared-v1", "cand")
    waiting = threading.Barrier(len(models), timeout=10)  # each model's first answer waits for the others'
    first = {}

    def by(model):
        def answer(q):
            if first.setdefault(model, q) == q:
                waiting.wait()  # BrokenBarrierError when the models are asked one after another
            return "Paris." if "France" in q else "It is 7."
        return answer

    client = ByModelClient({m: by(m) for m in models})
    client.loaded["shared-v1"] = "adapters/shared-v1"
    data = td.TrainingData(heldout=[td.Example([{"role": "user", "content": "Held out?"}], "Yes.", "correction",
                                               feedback_id="f1")])
    m = evaluate(client, settings, data, "cand", "shared-v1", "chatfb-base", tmp_path)
    assert m.heldout_n == 1 and len(m.control_samples) == 3 and m.control_lost == []
