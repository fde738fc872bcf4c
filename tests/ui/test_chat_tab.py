"""The UI in-process (no model server): inert rendering, admin access control, bad input."""

import re
import socket

import httpx
import pytest
from gradio_client import Client

from chatfb.app.runtime import Runtime
from chatfb.ui.admin_tab import check_admin
from chatfb.ui.chat_tab import build_ui, inert, render

CRITIQUE_LABEL = "Critique (what was wrong, in plain words)"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ui(settings):
    """The real UI and runtime, pointed at a model server that is down (external mode, closed port)."""
    def launch(**changes):
        rt = Runtime(settings.with_(vllm_url=f"http://127.0.0.1:{free_port()}", request_timeout_s=2, **changes))
        demo = build_ui(rt)
        demo.queue()
        port = free_port()
        demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
        started.append((demo, rt))
        return Client(f"http://127.0.0.1:{port}/", verbose=False), rt
    started = []
    yield launch
    for demo, rt in started:
        demo.close()
        rt.store.close()


def test_inert_rendering():
    assert inert("<script>alert(1)</script>") == "&lt;script&gt;alert(1)&lt;/script&gt;"
    assert "javascript:" not in inert("[x](javascript:alert(1))").lower()
    shown, ids = render([{"id": "u1", "role": "user", "content": "<b>hi</b>", "status": "ok"},
                         {"id": "a1", "role": "assistant", "content": "yo", "status": "ok", "adapter": "chatfb-v0001"}])
    assert ids == ["u1", "a1"] and shown[0]["content"] == "&lt;b&gt;hi&lt;/b&gt;" and "chatfb-v0001" in shown[1]["content"]


ADMIN_ENDPOINTS = {"/admin_unlock", "/train_now", "/promote", "/rollback", "/export", "/compare",
                   "/approve_guideline", "/edit_guideline", "/retire_guideline"}


def test_admin_is_off_without_credentials(ui):
    client, rt = ui()
    assert not check_admin(rt, "", None) and not check_admin(rt, "anything", None)
    names = set(client.view_api(return_format="dict", print_info=False)["named_endpoints"])
    assert "/send" in names and not names & ADMIN_ENDPOINTS, f"admin actions reachable: {names & ADMIN_ENDPOINTS}"
    for action in ("/train_now", "/export", "/admin_unlock"):
        with pytest.raises(ValueError):
            client.predict(api_name=action)
    page = httpx.get(client.src, timeout=10).text
    assert "Admin actions are **off**" in page, "the page does not say admin actions are off"
    assert not rt.training_running(), "training started without credentials"
    assert not (rt.settings.data_dir / "exports").exists(), "an export was written without credentials"


def test_admin_needs_the_password(ui):
    client, rt = ui(admin_password="s3cret")
    assert client.predict(api_name="/train_now").startswith("⚠️ Unlock")  # train now, while locked
    assert client.predict(api_name="/export").startswith("⚠️ Unlock")
    msg, *_ = client.predict("wrong", api_name="/admin_unlock")
    assert "Wrong password" in msg
    assert client.predict(api_name="/train_now").startswith("⚠️ Unlock")
    msg, *_ = client.predict("s3cret", api_name="/admin_unlock")
    assert msg == "Unlocked."
    assert client.predict("nope", api_name="/promote").startswith("⚠️ no adapter named")  # unlocked now
    msg = client.predict(api_name="/export")
    assert msg.startswith("Exported to `exports/")
    folder = rt.settings.data_dir / msg.split("`")[1]
    assert sorted(p.name for p in folder.iterdir()) == ["dpo.jsonl", "kto.jsonl", "sft.jsonl"]


def test_hf_allowlist(settings):
    rt = Runtime(settings.with_(admin_hf_users="ann,bob"))
    try:
        class Profile:
            username = "ann"
        assert check_admin(rt, None, Profile())
        Profile.username = "mallory"
        assert not check_admin(rt, None, Profile())
    finally:
        rt.store.close()


def test_model_down_gives_a_clear_error_and_a_failed_turn(ui):
    client, rt = ui()
    shown, *_ = client.predict("hello?", "", api_name="/send")
    text = shown[-1]["content"][0]["text"]
    assert "not reachable" in text and "Traceback" not in text and "127.0.0.1" not in text, \
        f"the model server down must be one plain line, no trace or address: {text!r}"
    (conv,) = rt.store._q("SELECT id FROM conversations")
    assert [m["status"] for m in rt.store.messages(conv[0])] == ["ok", "failed"]
    # feedback on the failed turn is refused
    assert client.predict("bad", api_name="/critique")[0].startswith("⚠️")
    too_long = "x" * (rt.settings.max_message_chars + 1)
    client.predict(too_long, "", api_name="/send")
    assert rt.store.counts()["messages"] == 2


def test_admin_views_show_versions_topics_and_feedback(settings):
    from chatfb.ui.admin_tab import adapters_frame, feedback_frame, metrics_frame, topics_frame

    rt = Runtime(settings)
    try:
        cid = rt.store.create_conversation("s")
        rt.store.add_message(cid, "user", "q")
        a = rt.store.add_message(cid, "assistant", "r")
        for text in ("too long and too formal", "way too formal", "wrong email address"):
            rt.store.log_feedback(a, "critique", text=text)
        rt.store.add_adapter("chatfb-v0001", None, "live", "chatfb-v0001")
        rt.store.update_adapter("chatfb-v0001", metrics={"candidate_rougeL": 0.8, "candidate_bleu": 40.0,
                                                         "control_agreement": 0.9})
        topics = topics_frame(rt.admin)
        top = topics.iloc[0].to_dict()  # critiques grouped by meaning, named by the most central one
        assert top["critiques"] == 2 and top["topic"] in ("too long and too formal", "way too formal"), topics
        assert feedback_frame(rt.admin)["count"].sum() == 3
        assert adapters_frame(rt.admin).iloc[0]["rougeL"] == 0.8
        assert sorted(metrics_frame(rt.admin)["metric"]) == ["BLEU/100", "ROUGE-L", "control"]
    finally:
        rt.store.close()


def test_the_api_page_lists_the_named_actions_only(ui):
    client, rt = ui(admin_password="s3cret")
    api = client.view_api(return_format="dict", print_info=False)
    assert api["unnamed_endpoints"] == {}
    names = set(api["named_endpoints"])
    assert {"/send", "/retry", "/critique", "/correct", "/thumbs_up", "/thumbs_down", "/revise", "/accept_revision",
            "/reject_revision", "/save_guideline"} <= names
    assert not any("lambda" in n or n.startswith("/views") or n.startswith("/on_") for n in names), names


UNNAMED = re.compile(r"^(param|parameter|value)_\d+$")


def test_every_public_endpoint_names_its_parameters_and_returns(settings):
    """gradio_client's view_api shows what the Blocks' API info says: a parameter's name (from the handler's
    signature) and label, each return's label, and types; `param_3`, `value_32` or `Literal[]` (a picker whose
    choices are filled in per session) tell a client nothing."""
    rt = Runtime(settings.with_(vllm_url=f"http://127.0.0.1:{free_port()}", admin_password="s3cret"))
    try:
        info = build_ui(rt).get_api_info()
    finally:
        rt.store.close()
    assert info["unnamed_endpoints"] == {}
    endpoints = info["named_endpoints"]
    assert {"/send", "/revise", "/remove_guideline", "/promote", "/approve_guideline", "/review_approve",
            "/review_reject"} <= set(endpoints)
    bad = []
    for name, ep in endpoints.items():
        for p in ep["parameters"]:
            if UNNAMED.match(p["parameter_name"]) or UNNAMED.match(p["label"]) or "Literal[]" in p["python_type"]["type"]:
                bad.append((name, "parameter", p["parameter_name"], p["label"], p["python_type"]["type"]))
        for r in ep["returns"]:
            if UNNAMED.match(r["label"]) or "Literal[]" in r["python_type"]["type"]:
                bad.append((name, "return", r["label"], r["python_type"]["type"]))
    assert bad == [], "\n".join(map(str, bad))
    params = {name: [p["parameter_name"] for p in ep["parameters"]] for name, ep in endpoints.items()}
    assert params["/send"] == ["text", "system_prompt"] and params["/remove_guideline"] == ["guideline_id"]
    assert params["/approve_guideline"] == ["guideline_id", "text"] and params["/promote"] == ["adapter"]
    assert [r["label"] for r in endpoints["/revise"]["returns"]][:4] == ["Status", CRITIQUE_LABEL, "Revision status",
                                                                          "Proposed revision"]


def test_sessions_keep_the_first_key_of_a_page_load_and_separate_api_clients(tmp_path):
    from types import SimpleNamespace

    from chatfb.ui.chat_tab import Sessions, browser_secret

    sessions = Sessions(cap=2)
    key = sessions.bind("hash-1", "k" * 30)
    assert key == "k" * 30 and sessions(SimpleNamespace(session_hash="hash-1"))[0] == "k:" + key
    assert sessions.bind("hash-1", "x" * 30) == key  # a second call cannot move the tab to another key
    assert sessions.bind("hash-2", "<script>") != "<script>"  # malformed: a fresh random key instead
    api = sessions(SimpleNamespace(session_hash="k" * 30))[0]
    assert api == "h:" + "k" * 30 and api != "k:" + key  # an API client named like a key is not that browser
    sessions.bind("hash-3", None)
    assert sessions(SimpleNamespace(session_hash="hash-1"))[0] == "h:hash-1"  # capped: the oldest went
    sessions.forget("hash-3")
    assert sessions(SimpleNamespace(session_hash="hash-3"))[0] == "h:hash-3"
    assert browser_secret(tmp_path) == browser_secret(tmp_path)  # the same after a restart
    assert oct((tmp_path / "run" / "browser-state.secret").stat().st_mode)[-3:] == "600"


def test_admin_review_queue_lists_groups_decides_by_selection_and_names_an_open_install(settings):
    from chatfb.ui.admin_tab import adapters_frame, decide_review, policy_line, review_view

    rt = Runtime(settings)
    try:
        ids = []
        for session in ("k:a", "k:b"):
            cid = rt.store.create_conversation(session)
            rt.store.add_message(cid, "user", "Who painted the Mona Lisa?")
            a = rt.store.add_message(cid, "assistant", "Picasso.")
            ids.append(rt.store.log_feedback(a, "correction", text="Vincent van Gogh.", session_id=session))
        head, frame, choices = review_view(rt.admin)
        assert "only what is vouched for" in policy_line(rt.admin) and "vouched" not in head  # said once, above
        assert "2 row(s)** in 1 group(s)" in head and "from 2 author(s), 0 counted as agreeing" in frame["would teach"][0]
        assert list(frame["id"]) == ids and set(frame["group"]) == {1} and [v for _, v in choices] == ids
        assert "k:a" not in frame.to_string()  # anonymous sessions only hashed
        assert decide_review(rt.admin, [ids[0], "gone"], "rejected").startswith("⚠️ no feedback with id gone")
        assert rt.store.reviews() == {}
        assert "never train" in decide_review(rt.admin, ids, "rejected") and set(rt.store.reviews().values()) == {"rejected"}
        assert "Nothing waits" in review_view(rt.admin)[0]
        rt.store.add_adapter("chatfb-v0001", None, "live", "chatfb-v0001")
        rt.store.mark_deleted_user(["chatfb-v0001"])
        assert "until the next cycle retrains" in adapters_frame(rt.admin).iloc[0]["deleted users' data"]
    finally:
        rt.store.close()
    rt = Runtime(settings.with_(shared_trust="open"))
    try:
        assert "OPEN (CHATFB_SHARED_TRUST=open)" in policy_line(rt.admin)
    finally:
        rt.store.close()


# -- the chat tab's handlers, called as Gradio calls them, over a fake model -------------------------

import gc
import inspect
from types import SimpleNamespace

import gradio as gr

from chatfb.app.chat_service import NO_GOOD_REVISION, ChatInputError, ChatService


@pytest.fixture
def tab(settings, fake_client):
    """The chat tab built over a fake model; `tab.call(name, *inputs)` runs one handler and returns its
    outputs as {elem_id (or the component): what the update sets}."""
    rt = Runtime(settings.with_(revision_candidates=2))
    rt.chat = ChatService(rt.settings, rt.store, fake_client, rt.router)
    demo = build_ui(rt)
    yield Tab(rt, demo, fake_client)
    demo.close()
    rt.store.close()


def props(update):
    if isinstance(update, gr.blocks.Block):
        return dict(update.constructor_args)
    if isinstance(update, dict) and update.get("__type__") == "update":
        return {k: v for k, v in update.items() if k != "__type__"}
    return {"value": update}


class Tab:
    KEY = "browser-key-of-the-test-page"
    SESSION = "k:" + KEY

    def __init__(self, rt, demo, client):
        self.rt, self.demo, self.client = rt, demo, client
        self.request = SimpleNamespace(session_hash="page-1", username=None)
        self.call("on_load", self.KEY)  # a page load ties the page to its browser's key

    def fn(self, name):
        return next(f for f in self.demo.fns.values() if f.name == name and f.fn is not None)

    def outputs(self, name, result):
        fn = self.fn(name)
        if isinstance(result, dict):  # Gradio refuses an update to a component the event does not output
            assert not set(result) - set(fn.outputs), [getattr(c, "elem_id", c) for c in set(result) - set(fn.outputs)]
        pairs = result.items() if isinstance(result, dict) else zip(fn.outputs, result if isinstance(result, tuple) else (result,))
        return {getattr(c, "elem_id", None) or c: props(u) for c, u in pairs}

    def steps(self, name, *inputs, **kw):
        """Every output a (streaming) handler yields, each as in `call`."""
        fn = self.fn(name).fn
        if "request" in inspect.signature(fn).parameters:
            kw["request"] = self.request
        result = fn(*inputs, **kw)
        return [self.outputs(name, r) for r in result] if hasattr(result, "__next__") else [self.outputs(name, result)]

    def call(self, name, *inputs, **kw):
        return self.steps(name, *inputs, **kw)[-1]

    def shown(self, out):
        """The chatbot's messages' texts in an output."""
        value = out["chatbot"]["value"]
        return [m["content"] if isinstance(m, dict) else m for m in value]

    def turn(self, text, cid=None):
        self.client.enqueue(text.upper())
        out = self.call("on_send", text, "", cid)
        cid = self.rt.store.latest_conversation(self.SESSION)
        return cid, self.rt.store.messages(cid)[-1]["id"], out


def test_a_correction_stays_in_view_when_the_next_message_is_sent(tab):
    cid, mid, _ = tab.turn("first question")
    tab.rt.chat.correct(tab.SESSION, mid, "My own better answer")
    tab.client.enqueue("second answer")
    for out in tab.steps("on_send", "second question", "", cid):  # while streaming and when done
        assert "My own better answer" in tab.shown(out)[1], tab.shown(out)
        assert "FIRST QUESTION" not in tab.shown(out)[1]
    tab.client.enqueue("again")
    for out in tab.steps("on_retry", "", cid):
        assert "My own better answer" in tab.shown(out)[1]


def test_a_page_load_shows_the_models_status_as_it_is_now(tab):
    tab.rt.status = "Model ready (chatfb-base)."  # the page was built while the model was still starting
    assert tab.call("on_load", tab.KEY)["model-status"]["value"] == "Model ready (chatfb-base)."


def revise(tab, mid, cid, critique="Use a bulleted list.", offered=None):
    return tab.steps("on_revise", mid, critique, False, False, cid, offered)


def test_the_revision_buttons_follow_the_offer(tab):
    cid, mid, _ = tab.turn("tips for sleeping")
    tab.client.enqueue("", "tips for sleeping")  # every draft fails: nothing to accept
    final = revise(tab, mid, cid)[-1]
    assert NO_GOOD_REVISION.split(".")[0] in str(final)
    for button in ("accept-revision", "edit-revision", "dismiss-revision"):
        assert final[button].get("visible") is False, (button, final[button])
    fid = tab.rt.store.feedback_for(mid)[0]["id"]
    tab.client.follows = ("- ",)
    tab.client.enqueue("Sleep more.", "- Go to bed early.\n- Keep it dark.")
    steps = tab.steps("on_again", fid, None, cid)
    assert any("Trying again" in str(out) for out in steps[:-1])
    assert "Trying again" not in str(steps[-1])  # the new offer is there: the note says so, not "trying"
    for button in ("accept-revision", "edit-revision", "dismiss-revision"):
        assert steps[-1][button].get("visible") is True, (button, steps[-1][button])


def test_feedback_on_quotes_the_reply_as_corrected(tab):
    cid, mid, out = tab.turn("what is a volcano")
    ids = out[tab.fn("on_send").outputs[2]]["value"]
    edit = gr.EditData(None, {"index": 1, "value": "A mountain that erupts.", "previous_value": "WHAT IS A VOLCANO"})
    assert "A mountain that erupts." in tab.call("on_edit", ids, cid, "", evt=edit)["fb-target"]["value"]
    select = gr.SelectData(None, {"index": 1, "value": "A mountain that erupts."})
    assert "A mountain that erupts." in tab.call("on_select", ids, evt=select)["fb-target"]["value"]


def test_picking_critique_keeps_the_thumbs_down_shown(tab):
    cid, mid, out = tab.turn("what is a volcano")
    ids = out[tab.fn("on_send").outputs[2]]["value"]
    tab.call("on_like", ids, cid, evt=gr.LikeData(None, {"index": 1, "value": "x", "liked": False}))
    picked = tab.call("on_like", ids, cid, evt=gr.LikeData(None, {"index": 1, "value": "x", "liked": "Critique"}))
    assert picked["chatbot"].get("feedback_value") == ["Dislike"]


def test_stop_shows_what_the_store_keeps(tab):
    tab.client.enqueue("one two three four five")
    stream = tab.fn("on_send").fn("count", "", None, request=tab.request)
    next(stream), next(stream)
    cid = tab.rt.store.latest_conversation(tab.SESSION)
    shown = tab.shown(tab.call("on_stop", cid))[-1]
    next(stream)  # the word in flight when Stop was pressed still arrives
    stream.close()  # Gradio closes the cancelled stream later
    gc.collect()
    stored = tab.rt.store.messages(cid)[-1]
    assert stored["status"] == "stopped" and shown.startswith(stored["content"] + " *(stopped)*"), (shown, stored)


def offer(tab, critique="Use a bulleted list."):
    """A conversation with one reply and a revision offered on it."""
    cid, mid, _ = tab.turn("tips for sleeping")
    tab.client.follows = ("- ",)
    tab.client.enqueue("Sleep more.", "- Go to bed early.\n- Keep it dark.")
    return cid, mid, revise(tab, mid, cid, critique)


def test_the_revision_is_shown_under_the_reply_it_revises_and_accepted_there(tab, monkeypatch):
    toasts = []
    monkeypatch.setattr(gr, "Info", toasts.append)
    cid, mid, steps = offer(tab)
    drafting = [out for out in steps if out["revision-status"]["value"] == "*Drafting a revision…*"]
    assert drafting and drafting[-1]["chatbot"]["value"][2]["metadata"]["status"] == "pending"
    final = steps[-1]
    items = final["chatbot"]["value"]
    assert [i["role"] for i in items] == ["user", "assistant", "assistant"]  # question, reply, revision under it
    assert items[2]["metadata"] == {"title": "✍️ Proposed revision of the reply above: Accept · Edit · Try again · Dismiss"}
    assert items[2]["content"].startswith("- Go to bed early.")
    assert final["chatbot"]["feedback_value"] == [None]  # the reply and its revision are one bubble: one rating
    assert final["critique-panel"]["visible"] is False and final["revision-panel"]["visible"] is True
    ids = final[tab.fn("on_revise").outputs[11]]["value"]
    cand = final[tab.fn("on_revise").outputs[9]]["value"]
    assert ids == [ids[0], mid, f"rev:{cand}"]
    # the offer stays in view while the conversation goes on, and after a reload
    tab.client.enqueue("fine")
    assert "- Go to bed early." in tab.shown(tab.call("on_send", "thanks", "", cid))[2]
    assert "- Go to bed early." in tab.shown(tab.call("on_load", tab.KEY))[2]
    accepted = tab.call("on_accept", cand, "- Go to bed early.", cid, mid)
    assert tab.shown(accepted)[1].startswith("- Go to bed early.") and "corrected by you" in tab.shown(accepted)[1]
    assert len(tab.shown(accepted)) == 4 and accepted["revision-panel"]["visible"] is False  # the offer is gone
    assert toasts == ["✅ Revision accepted: saved as the corrected reply."]


def test_editing_the_revision_in_place_accepts_it_as_edited(tab):
    cid, mid, steps = offer(tab)
    ids = steps[-1][tab.fn("on_revise").outputs[11]]["value"]
    unchanged = gr.EditData(None, {"index": 1, "value": "TIPS FOR SLEEPING", "previous_value": "TIPS FOR SLEEPING"})
    assert tab.call("on_edit", ids, cid, "", evt=unchanged) == {}  # the widget edits the reply beside it: no news
    edit = gr.EditData(None, {"index": 2, "value": "- Bed by ten.", "previous_value": "- Go to bed early."})
    out = tab.call("on_edit", ids, cid, "", evt=edit)
    assert out["fb-status"]["value"].startswith("✅ Revision accepted")
    [correction] = [f for f in tab.rt.store.feedback_for(mid) if f["kind"] == "correction"]
    assert correction["text"] == "- Bed by ten." and tab.rt.store.feedback(correction["id"])["derived_from"]
    assert tab.shown(out)[1].startswith("- Bed by ten.") and len(tab.shown(out)) == 2


def test_editing_ones_own_message_sends_it_again_on_a_new_branch(tab):
    cid, first, _ = tab.turn("name a fruit")
    _, _, out = tab.turn("and a colour", cid)
    ids = out[tab.fn("on_send").outputs[2]]["value"]
    assert tab.shown(out)[2] == "and a colour"
    tab.client.enqueue("a leek")
    edit = gr.EditData(None, {"index": 2, "value": "and a vegetable", "previous_value": "and a colour"})
    steps = tab.steps("on_edit", ids, cid, "", evt=edit)
    assert len(steps) > 2, "the new reply is not streamed"
    final = steps[-1]
    assert tab.shown(final) == ["name a fruit", "NAME A FRUIT\n\n*— chatfb-base*", "and a vegetable",
                                "a leek\n\n*— chatfb-base*"]
    new_ids = final[tab.fn("on_edit").outputs[3]]["value"]
    assert new_ids[:2] == ids[:2] and new_ids[2:] != ids[2:]
    assert tab.client.history[-1]["messages"][-1] == {"role": "user", "content": "and a vegetable"}
    # the old branch stays stored, replaced; a reload shows the new one
    kept = tab.rt.store.messages(cid, include_replaced=True)
    assert [(m["content"], m["replaced"]) for m in kept[2:4]] == [("and a colour", True), ("AND A COLOUR", True)]
    assert tab.shown(tab.call("on_load", tab.KEY))[2:] == tab.shown(final)[2:]
    # a message no longer in view cannot be edited again
    stale = tab.call("on_edit", ids, cid, "", evt=edit)
    assert stale["fb-status"]["value"].startswith("⚠️ Only your own messages")


def test_dismiss_takes_the_revision_out_of_the_conversation(tab):
    cid, mid, steps = offer(tab)
    cand = steps[-1][tab.fn("on_revise").outputs[9]]["value"]
    out = tab.call("on_dismiss", cand, cid)
    assert len(tab.shown(out)) == 2 and out["revision-panel"]["visible"] is False
    assert tab.rt.store.candidate(cand)["status"] == "rejected"


def test_critique_from_the_message_opens_the_critique_box_under_the_chat(tab):
    cid, mid, out = tab.turn("what is a volcano")
    ids = out[tab.fn("on_send").outputs[2]]["value"]
    picked = tab.call("on_like", ids, cid, evt=gr.LikeData(None, {"index": 1, "value": "x", "liked": "Critique"}))
    assert picked["critique-panel"]["visible"] is True and picked["fb-status"]["value"].startswith("Write your critique")
    assert "WHAT IS A VOLCANO" in picked["fb-target"]["value"]
    opened = tab.call("on_open_critique", None, ids)  # the button under the message box: the latest reply
    assert opened["critique-panel"]["visible"] is True and "WHAT IS A VOLCANO" in opened["fb-target"]["value"]


def test_the_conversation_list_opens_renames_and_deletes_ones_own_conversations(tab):
    first, _, _ = tab.turn("first chat about cats")
    second, _, _ = tab.turn("second chat about dogs")  # no conversation id: a new conversation
    choices = tab.call("on_list_conversations", second)["conversation-list"]["choices"]
    assert [cid for _, cid in choices] == [second, first]  # the most recently active first
    assert choices[1][0].startswith("first chat about cats · 20")  # its first message, and the date
    opened = tab.call("on_open_conversation", first)
    assert tab.shown(opened) == ["first chat about cats", "FIRST CHAT ABOUT CATS\n\n*— chatfb-base*"]
    assert opened["conversation-list"]["value"] == first and opened["conversation-title"]["value"] == "first chat about cats"
    renamed = tab.call("on_rename_conversation", first, "  Cats  ")
    assert [label.split(" · ")[0] for label, _ in renamed["conversation-list"]["choices"]] == ["second chat about dogs", "Cats"]
    assert tab.call("on_rename_conversation", first, " ")["fb-status"]["value"] == "⚠️ Your title is empty."
    # another browser sees none of them, and can neither rename nor delete them
    assert tab.rt.chat.conversations("k:someone-else") == []
    for action, args in ((tab.rt.chat.rename_conversation, ("mine",)), (tab.rt.chat.delete_conversation, ())):
        with pytest.raises(ChatInputError, match="Pick one of your conversations"):
            action("k:someone-else", first, *args)
    deleted = tab.call("on_delete_conversation", first)
    assert tab.shown(deleted) == [] and [cid for _, cid in deleted["conversation-list"]["choices"]] == [second]
    assert tab.rt.store.conversation(first) is None and tab.rt.store.conversation(second) is not None
    assert tab.call("on_open_conversation", first)["fb-status"]["value"].startswith("⚠️")
    mine = tab.rt.store.conversation(second)["session_id"]
    empty = tab.rt.store.create_conversation(mine)  # its own, with no message yet: it opens, empty
    opened = tab.call("on_open_conversation", empty)
    assert tab.shown(opened) == [] and opened["fb-status"]["value"] == "" and opened["conversation-list"]["value"] is None


def test_the_revision_api_keeps_its_shape(settings, fake_client):
    """API clients (gradio_client) read /revise and /retry_revision by position: status, critique box, note,
    revision; /accept_revision takes the revision's text."""
    rt = Runtime(settings.with_(revision_candidates=2))
    rt.chat = ChatService(rt.settings, rt.store, fake_client, rt.router)
    demo = build_ui(rt)
    demo.queue()
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        c = Client(f"http://127.0.0.1:{port}/", verbose=False)
        fake_client.enqueue("Sleep more and relax.", "", "tips")  # the reply; two drafts that fail
        c.predict(text="Tips for sleeping?", system_prompt="", api_name="/send")  # by name, as docs/api.md shows
        status, box, note, revision = c.predict(text="Use a bulleted list.", keep_rule=False, for_everyone=False,
                                                api_name="/revise")[:4]
        assert status.startswith("✅") and box == "" and "None of the drafts" in note and revision == ""
        fake_client.follows = ("- ",)
        # drafts that keep the reply's content (the content check drops ones that share nothing with it)
        fake_client.enqueue("Sleep.", "- Sleep more: go to bed early.\n- Relax in a dark room.")
        status, box, note, revision = c.predict(api_name="/retry_revision")[:4]
        assert "Revised following your feedback" in note and revision.startswith("- Sleep more"), (note, revision)
        assert c.predict(text=revision, api_name="/accept_revision")[0].startswith("✅ Revision accepted")
    finally:
        demo.close()
        rt.store.close()


def test_new_conversation_and_guidelines_update_only_their_outputs(tab):
    cid, mid, steps = offer(tab)
    cleared = tab.call("on_new")
    assert cleared["chatbot"]["value"] == [] and cleared["revision-panel"]["visible"] is False
    saved = tab.call("on_save_guideline", "Always answer in British English.")
    assert saved["fb-status"]["value"].startswith("✅") and "British" in saved["guidelines-list"]["value"]
    [(_, gid)] = saved["guideline-pick"]["choices"]
    assert tab.call("on_remove_guideline", gid)["fb-status"]["value"] == "Guideline removed."
    assert tab.call("on_critique", mid, "Too long.")["critique"]["value"] == ""
    assert tab.call("on_up", mid)["fb-status"]["value"].startswith("✅")


def test_a_conversation_records_a_keyed_hash_of_its_client_address(tab):
    """Sessions from one address count once towards the trust policy's agreement rule: each conversation the chat
    starts records a hash of the sender's address keyed with the data folder's secret, never the address."""
    from chatfb.app.chat_service import client_key
    from chatfb.learning import trust
    from chatfb.ui.chat_tab import browser_secret

    tab.request.client = SimpleNamespace(host="203.0.113.7")
    cid, mid, _ = tab.turn("who painted it?")
    tab.rt.chat.correct(tab.SESSION, mid, "Leonardo da Vinci painted it.")
    (r,) = tab.rt.store.feedback_records()
    secret = browser_secret(tab.rt.settings.data_dir)
    assert r.client == client_key("203.0.113.7", secret) and "203.0.113" not in r.client
    assert trust.accountable(r)  # an anonymous session with a known address counts as someone
    other = client_key("203.0.113.7", "another-secret")
    assert other != r.client and client_key(None, "s") is None
