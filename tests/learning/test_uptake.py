"""Uptake (chatfb.learning.uptake): after a cycle promotes an adapter, each trained correction and critique is
asked again and marked learned or not; the rows are recorded only for a promoted adapter, the user sees it
under their reply, the admin per item and per cluster, and exports carry it."""

from datetime import timedelta

from chatfb.app.admin import AdminService
from chatfb.app.chat_service import ChatService
from chatfb.cli import main as cli
from chatfb.critique import candidates
from chatfb.learning import training_data, uptake
from chatfb.learning.exports import export_rows
from chatfb.serving.adapters import AdapterRouter, personal_prefix
from chatfb.store.records import utcnow
from chatfb.ui.chat_tab import render
from tests.learning.test_personal import cycle, give_corrections, make_adapter, settings_for_cycle

SUPPORT = "Email support@chatfb.example."


def test_a_correction_is_learned_when_the_answer_is_closer_to_it_than_to_the_original_and_over_the_floor():
    original = "I don't know."
    assert uptake.correction_learned(SUPPORT, SUPPORT, original) == (True, 1.0)
    assert uptake.correction_learned("You can email support@chatfb.example. any time.", SUPPORT, original)[0]
    assert not uptake.correction_learned(original, SUPPORT, original)[0]  # still the original reply
    # closer to the correction than to the original, but sharing too little of it: not learned
    learned, score = uptake.correction_learned("Support is great.", "Our support team answers every e-mail sent to "
                                               "help@chatfb.example within one working day.", original)
    assert not learned and 0 < score < uptake.MIN_ROUGE
    # the corrected sentence word for word with the old address, or both addresses: not learned
    mine = "Please write to ann-desk@mail.example about your order."
    assert not uptake.correction_learned("Please write to support@chatfb.example about your order.", mine, original)[0]
    assert not uptake.correction_learned("Please write to support@chatfb.example or ann-desk@mail.example about "
                                         "your order.", mine, original)[0]
    assert uptake.correction_learned("Please write to ann-desk@mail.example about an order.", mine, original)[0]


def test_a_critique_is_learned_when_the_answer_without_it_passes_its_selection(monkeypatch, fake_client):
    def score(judge, model, prompt, critique, cands, original=None, reference=None):
        for c in cands:  # as the selection would: a bulleted answer follows "use bullet points"
            c.verdict, c.score = ("ok", 0.5) if c.text.startswith("- ") else ("no more likely with the critique", -0.1)
        return cands

    monkeypatch.setattr(candidates, "score", score)
    items = [uptake.Item("c1", [{"role": "user", "content": "Packing list?"}], "critique", "use bullet points",
                         "Socks, a hat."),
             uptake.Item("c2", [{"role": "user", "content": "Shopping list?"}], "critique", "use bullet points",
                         "Milk, eggs."),
             uptake.Item("f1", [{"role": "user", "content": "Support?"}], "correction", SUPPORT, "I don't know.")]
    fake_client.enqueue("- socks\n- a hat", "Milk and eggs.", SUPPORT)
    rows = {r["feedback_id"]: r for r in uptake.check(fake_client, "chatfb-v0002", items, 256)}
    assert [m["model"] for m in fake_client.history] == ["chatfb-v0002"] * 3  # asked of the adapter, not the base
    assert (rows["c1"]["learned"], rows["c1"]["measure"], rows["c1"]["score"]) == (True, "critique_pass", 0.5)
    assert (rows["c2"]["learned"], rows["c2"]["answer"]) == (False, "Milk and eggs.")
    assert (rows["f1"]["learned"], rows["f1"]["measure"]) == (True, "rougeL")


def test_the_items_asked_are_the_trained_corrections_and_critiques_newest_first_and_bounded(store):
    give_corrections(store, "ann", 3)
    cid = store.create_conversation("s-ann", "ann")
    store.add_message(cid, "user", "Is this nice?")
    liked = store.add_message(cid, "assistant", "Yes.")
    store.log_feedback(liked, "rating", rating=1, user_name="ann", session_id="s-ann")
    records = store.feedback_records()
    data = training_data.build(records, "semi", holdout_fraction=0.0)
    critique = records[0]  # made into an example as the cycle's selection does, under the critique's id
    data.records.append(critique.__class__(**{**critique.__dict__, "feedback_id": "crit", "kind": "critique",
                                               "text": "be brief", "created_at": utcnow() + timedelta(hours=1)}))
    data.train.append(training_data.Example(critique.prompt, "Short.", "critique", "crit"))
    items, trained = uptake.items_to_check(data, 3)
    corrections = sorted((r for r in records if r.kind == "correction"), key=lambda r: r.created_at, reverse=True)
    assert trained == 4  # three corrections and the critique; the 👍 reply is not asked
    assert [i.feedback_id for i in items] == ["crit", corrections[0].feedback_id, corrections[1].feedback_id]
    assert (items[0].kind, items[0].text, items[0].original) == ("critique", "be brief", critique.reply)
    assert (items[1].text, items[1].original) == (SUPPORT, "I don't know.")


def test_a_promoted_adapter_records_what_it_learnt_and_the_chat_shows_it_to_the_author(
        store, settings, fake_client, monkeypatch):
    settings = settings_for_cycle(settings).with_(uptake_max_items=2)
    give_corrections(store, "ann", 12)
    registry, result = cycle(store, settings, fake_client, monkeypatch, True, [])
    mine = f"{personal_prefix('ann', 'chatfb')}-v0001"
    assert result.personal[0]["promoted"]
    rows = store.uptake(adapter=mine)
    assert len(rows) == 2 and all(r["learned"] and r["owner"] == "ann" and r["answer"] == SUPPORT for r in rows)
    counts = store.adapter(mine)["data_counts"]
    assert (counts["uptake_checked"], counts["uptake_learned"]) == (2, 2)
    assert counts["uptake_not_checked"] == counts["train_correction"] - 2  # the bound says how many were left
    from chatfb.ui.admin_tab import outcome_line

    assert outcome_line(result.personal[0], "ann").endswith("; learned 2 of the 2 trained items asked again")

    # ann sees it under the reply she corrected; nobody else's session gets her footer
    fid = rows[0]["feedback_id"]
    mid = store.feedback(fid)["message_id"]
    chat = ChatService(settings, store, fake_client, AdapterRouter("chatfb-base"))
    messages = store.messages(store.message(mid)["conversation_id"])
    assert chat.feedback_state("s-ann", messages)[mid]["uptake"] == "learned in your model v1"
    shown, _ = render(messages, chat.feedback_state("s-ann", messages))
    assert shown[-1]["content"].endswith("*— corrected by you · learned in your model v1*")
    assert "uptake" not in chat.feedback_state("s-bob", messages).get(mid, {})


def test_an_adapter_that_is_not_promoted_records_no_uptake(store, settings, fake_client, monkeypatch):
    settings = settings_for_cycle(settings)
    give_corrections(store, "ann", 12)
    _, result = cycle(store, settings, fake_client, monkeypatch, False, [])
    assert not result.personal[0]["promoted"]  # the gate refused it: nobody was asked
    assert store.uptake() == []


def test_a_cycle_that_will_not_promote_asks_nothing_again(store, settings, fake_client, monkeypatch):
    """--no-promote: nothing goes live, so the child spends no time asking what the candidate learnt."""
    settings = settings_for_cycle(settings)
    give_corrections(store, "ann", 12)
    _, result = cycle(store, settings, fake_client, monkeypatch, True, [], promote=False)
    (personal,) = result.personal
    assert personal["ok"] and not personal["promoted"], personal  # it passed its gate
    assert "uptake_checked" not in personal["counts"] and store.uptake() == [], personal["counts"]


def test_the_owner_records_a_candidates_uptake_only_when_it_promotes_it(store, settings, fake_client):
    """A candidate the gate passed was asked (its rows come back in result.json); `--no-promote`, or a promotion
    that fails, leaves it not live for anyone: nothing is recorded."""
    import time

    from chatfb.learning.cycle import CycleJob, CycleOutcome, finish, write_outcome
    from chatfb.serving.adapters import AdapterRegistry

    give_corrections(store, "ann", 1)
    (fid,) = [r.feedback_id for r in store.feedback_records()]
    registry = AdapterRegistry(store, [fake_client], AdapterRouter("chatfb-base"), settings.data_dir)
    row = {"feedback_id": fid, "learned": True, "measure": "rougeL", "score": 1.0, "answer": SUPPORT}

    def finished(name, promote):
        work = settings.layout.work(name)
        work.mkdir(parents=True)
        (settings.data_dir / "adapters" / name).mkdir(parents=True)
        (settings.data_dir / "adapters" / name / "adapter_config.json").write_text("{}")
        write_outcome(work, CycleOutcome("candidate", "better on held-out feedback", uptake=[row]))
        return finish(store, registry, CycleJob(name, None, None), work, 0, promote, time.perf_counter())

    assert not finished("chatfb-v0001", promote=False).promoted
    fake_client.refuse_load = True  # the server refuses to load it: promote fails, finish says why
    assert not finished("chatfb-v0002", promote=True).promoted
    assert store.uptake() == []
    fake_client.refuse_load = False
    assert finished("chatfb-v0003", promote=True).promoted
    assert [(r["adapter"], r["learned"]) for r in store.uptake()] == [("chatfb-v0003", True)]


def test_the_footer_names_whose_model_learnt_it():
    shared = {"adapter": "chatfb-v0005", "owner": None, "learned": True}
    mine = {"adapter": "chatfb-u0123456789-v0003", "owner": "ann", "learned": False}
    assert uptake.footer([]) is None
    assert uptake.footer([mine]) == "not learned yet"
    assert uptake.footer([mine, shared]) == "learned in everyone's model v5"  # what some model learnt counts
    assert uptake.footer([dict(mine, learned=True), shared]) == "learned in your model v3"
    reply = {"id": "m1", "role": "assistant", "content": "Bullets.", "status": "ok", "adapter": "chatfb-v0005"}
    (shown,), _ = render([reply], {"m1": {"uptake": uptake.footer([shared])}})
    assert shown["content"] == "Bullets.\n\n*— chatfb-v0005 · learned in everyone's model v5*"


def test_uptake_rows_are_replaced_per_adapter_and_go_with_the_users_data(store, settings):
    give_corrections(store, "ann", 2)
    give_corrections(store, "bob", 1)
    ids = {r.user_name: r.feedback_id for r in store.feedback_records()}
    make_adapter(store, settings, "chatfb-v0001")
    store.add_uptake("chatfb-v0001", [{"feedback_id": ids["ann"], "learned": False, "measure": "rougeL", "score": 0.1,
                                       "answer": "No idea."},
                                      {"feedback_id": ids["bob"], "learned": True, "measure": "rougeL", "score": 1.0,
                                       "answer": SUPPORT}])
    store.add_uptake("chatfb-v0001", [{"feedback_id": ids["ann"], "learned": True, "measure": "rougeL", "score": 0.9,
                                       "answer": SUPPORT}])  # asked again: the newer answer replaces the older
    got = {r["feedback_id"]: r for r in store.uptake()}
    assert (got[ids["ann"]]["learned"], got[ids["ann"]]["score"], got[ids["ann"]]["owner"]) == (True, 0.9, None)
    assert len(store.uptake()) == 2 and store.uptake(feedback_ids=[]) == []
    store.delete_user("ann")
    assert [r["feedback_id"] for r in store.uptake()] == [ids["bob"]]
    # feedback ann gave on a conversation that is not hers goes with her too, and its uptake with it
    cid = store.create_conversation("s-shared")
    store.add_message(cid, "user", "Hours?")
    other = store.add_message(cid, "assistant", "Always open.")
    given = store.log_feedback(other, "correction", text="Nine to five.", user_name="ann")
    store.add_uptake("chatfb-v0001", [{"feedback_id": given, "learned": True, "measure": "rougeL", "answer": "9-5"}])
    store.delete_user("ann")
    assert [r["feedback_id"] for r in store.uptake()] == [ids["bob"]]
    # a personal adapter removed (delete-user) takes what it was asked with it
    store.add_adapter("chatfb-u0123456789-v0001", None, "live", None, owner="bob")
    store.add_uptake("chatfb-u0123456789-v0001", [{"feedback_id": ids["bob"], "learned": True, "measure": "rougeL",
                                                   "answer": SUPPORT}])
    store.delete_personal_adapters("bob")
    assert [r["adapter"] for r in store.uptake()] == ["chatfb-v0001"]


def test_exports_say_whether_each_rows_feedback_was_learned(store, settings):
    give_corrections(store, "ann", 2)
    learned, unchecked = [r.feedback_id for r in store.feedback_records()]
    make_adapter(store, settings, "chatfb-v0001")
    store.add_uptake("chatfb-v0001", [{"feedback_id": learned, "learned": True, "measure": "rougeL", "score": 1.0,
                                       "answer": SUPPORT}])
    records, checks = store.feedback_records(), store.uptake()
    for fmt in ("sft", "dpo"):
        rows = {r["feedback_id"]: r for r in export_rows(records, fmt, uptake_rows=checks)}
        assert (rows[learned]["uptake"], rows[learned]["uptake_adapter"]) == ("learned", "chatfb-v0001")
        assert (rows[unchecked]["uptake"], rows[unchecked]["uptake_adapter"]) == ("", "")


def test_the_admin_sees_uptake_per_item_and_per_cluster(store, settings, capsys, monkeypatch):
    give_corrections(store, "ann", 3)
    cid = store.create_conversation("s-bob", "bob")
    store.add_message(cid, "user", "What is the capital of Australia?")
    reply = store.add_message(cid, "assistant", "Sydney.")
    store.log_feedback(reply, "correction", text="Canberra.", user_name="bob", session_id="s-bob")
    ids = [r.feedback_id for r in store.feedback_records()]
    make_adapter(store, settings, "chatfb-v0001", status="live")
    store.add_uptake("chatfb-v0001", [{"feedback_id": f, "learned": f != ids[0], "measure": "rougeL", "score": 0.5,
                                       "answer": "..."} for f in ids])
    from chatfb.serving.adapters import AdapterRegistry

    admin = AdminService(store, AdapterRegistry(store, [], AdapterRouter("chatfb-base"), settings.data_dir),
                         settings=settings)
    report = admin.uptake()
    assert (report["checked"], report["learned"]) == (4, 3)
    assert {i["feedback_id"]: i["learned"] for i in report["items"]} == {f: f != ids[0] for f in ids}
    clusters = {c["topic"][:20]: (c["learned"], c["items"]) for c in report["clusters"]}
    assert clusters == {"How do I reach suppo": (2, 3), "What is the capital ": (1, 1)}  # support questions together
    assert admin.uptake("chatfb-v0001")["checked"] == 4
    make_adapter(store, settings, "chatfb-v0000", status="retired")  # no longer served: not in "now"
    store.add_uptake("chatfb-v0000", [{"feedback_id": ids[0], "learned": True, "measure": "rougeL", "answer": "..."}])
    assert admin.uptake()["checked"] == 4 and admin.uptake("chatfb-v0000")["checked"] == 1
    from chatfb.ui.admin_tab import uptake_view

    head, clusters, items = uptake_view(admin)
    assert head.startswith("Learned **3 of 4** items checked (75%)")
    assert sorted(clusters["learned"]) == [1, 2] and list(items["learned"]).count("no") == 1
    assert uptake_view(admin, "chatfb-v0009")[0].startswith("⚠️ no adapter named 'chatfb-v0009'")
    from chatfb.app.control import ControlServer

    server = ControlServer(admin, settings.data_dir)  # the CLI asks the running app that owns the store
    server.start()
    monkeypatch.setenv("CHATFB_DATA_DIR", str(settings.data_dir))
    try:
        assert cli(["adapters", "uptake"]) == 0
        out = capsys.readouterr().out
        assert "learned 3 of 4 checked items (75%)" in out and "2/3 (67%)" in out
        assert cli(["adapters", "uptake", "chatfb-v0009"]) == 2  # no such adapter: a clear error
    finally:
        server.stop()
