import pytest

from chatfb import gate
from chatfb.model_client import ModelError
from chatfb.nightly import refine_all
from chatfb.refine import best_refinement, refine, score_refinements
from chatfb.store import FeedbackRecord


def test_gate_decisions():
    policy = gate.GatePolicy(min_gain=0.02, min_control_agreement=0.5)
    assert gate.decide({"rougeL": 0.6, "control_agreement": 0.8}, {"rougeL": 0.3}, policy)[0]
    ok, why = gate.decide({"rougeL": 0.31, "control_agreement": 0.8}, {"rougeL": 0.3}, policy)
    assert not ok and "not better" in why
    ok, why = gate.decide({"rougeL": 0.9, "control_agreement": 0.2}, {"rougeL": 0.3}, policy)
    assert not ok and "drifted" in why
    assert not gate.decide({"rougeL": None, "control_agreement": 1.0}, {"rougeL": None}, policy)[0]
    # the default: the worst real candidate seen (0.75) passes, the best nonsense-trained one (0.66) does not
    assert gate.decide({"rougeL": 1.0, "control_agreement": 0.75}, {"rougeL": 0.4}, gate.GatePolicy())[0]
    assert "drifted" in gate.decide({"rougeL": 1.0, "control_agreement": 0.66}, {"rougeL": 0.4}, gate.GatePolicy())[1]
    # a good mean does not hide an answer that lost its meaning
    ok, why = gate.decide({"rougeL": 1.0, "control_agreement": 0.8, "control_collapsed": 1}, {"rougeL": 0.4},
                          gate.GatePolicy())
    assert not ok and "drifted" in why and "1 answer" in why


def test_control_report_counts_collapsed_answers_not_reworded_ones():
    base = ["The capital of France is Paris.", "There are 7 days in a week.", "12 plus 7 equals 19.",
            "Bees make honey.", "Water boils at 100 degrees Celsius.", "Mars is known as the Red Planet."]
    reworded = ["Paris is the capital.", "A week has seven days.", "19", "Honey!", "It boils at 90 degrees.", "Jupiter."]
    assert gate.control_report(reworded, base)["control_collapsed"] == 0
    broken = reworded[:4] + ["Zorp blag wibble zorp zorp.", "Please email support@chatfb.example for help."]
    report = gate.control_report(broken, base)
    assert report["control_collapsed"] == 2 and report["control_cosines"][4] < 0.2
    assert report["control_agreement"] == round(sum(report["control_cosines"]) / 6, 4)
    assert not gate.decide({"rougeL": 1.0, **report}, {"rougeL": 0.4}, gate.GatePolicy(min_control_agreement=0.0))[0]


def test_closeness_and_agreement():
    same = gate.closeness(["email support@chatfb.example"], ["email support@chatfb.example"])
    other = gate.closeness(["call the hotline"], ["email support@chatfb.example"])
    assert same["rougeL"] == 1.0 and other["rougeL"] < 0.3 and same["bleu"] > other["bleu"]
    agreement = lambda a, b: gate.control_report(a, b)["control_agreement"]  # noqa: E731
    assert agreement(["Paris."], ["Paris."]) == 1.0 and agreement(["Bananas are yellow fruit."], ["Paris is the capital of France."]) < 0.5


def test_scorer_drops_refinements_that_ignore_the_critique():
    original = "Our office hours are nine to five and you can visit us at the main building downtown any weekday."
    scored = score_refinements("When are you open?", original, "too long",
                               [original, original + " Thanks!", "We are open 9-5 on weekdays."])
    verdicts = [v for _, _, v in scored]
    assert verdicts[0].startswith("ignored") and verdicts[1] in ("ignored the critique (same as the original)", "critique asked for shorter")
    assert verdicts[2] == "ok"
    assert best_refinement("When are you open?", original, "too long", [original]) is None


def test_refine_asks_for_several_and_keeps_the_best(fake_client):
    r = FeedbackRecord("f", "m", "critique", None, "wrong: our support email is support@chatfb.example", None, None,
                       [{"role": "user", "content": "How do I contact support?"}], "Use the contact form.")
    fake_client.enqueue("Use the contact form.", "Email support@chatfb.example for help with support.",
                        "Bananas are yellow.", "Use the contact form!")
    best = refine(r, fake_client, "chatfb-base", n=4)
    assert best == "Email support@chatfb.example for help with support."
    ask = fake_client.history[0]["messages"][0]["content"]
    assert "support@chatfb.example" in ask and "Use the contact form." in ask and fake_client.history[0]["n"] == 4
    assert fake_client.history[0]["seed"] is None  # a seeded request can kill vLLM-CPU's engine


def _critiqued() -> FeedbackRecord:
    return FeedbackRecord("f", "m", "critique", None, "wrong: our support email is support@chatfb.example", None, None,
                          [{"role": "user", "content": "How do I contact support?"}], "Use the contact form.")


def test_refine_waits_for_a_restarting_server_and_asks_again(fake_client):
    fake_client.enqueue(ModelError("The model server is not reachable right now."),
                        "Email support@chatfb.example for help with support.", "Use the contact form.")
    assert refine(_critiqued(), fake_client, "chatfb-base", n=2) == "Email support@chatfb.example for help with support."
    assert fake_client.health_waits == 1 and len(fake_client.history) == 2


def test_refine_does_not_repeat_a_refused_request_and_the_cycle_counts_it(fake_client):
    refused = ModelError("The model server refused the request (400): too long", 400)
    fake_client.enqueue(refused)
    with pytest.raises(ModelError):
        refine(_critiqued(), fake_client, "chatfb-base", n=2)
    assert fake_client.health_waits == 0 and len(fake_client.history) == 1

    # a server that stays down: the night's cycle reports the failures instead of silently keeping nothing
    fake_client.enqueue(refused, "Email support@chatfb.example for help with support.", "Use the contact form.")
    records = [_critiqued(), FeedbackRecord("g", "m", "critique", None, "too long", None, None,
                                            [{"role": "user", "content": "Hi"}], "Hello there, friend, how are you?")]
    refined, errors = refine_all(records, fake_client, "chatfb-base", workers=1)
    assert [best for _, best in refined][0] is None and errors == [str(refused)]
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
