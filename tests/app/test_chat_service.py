import pytest

from chatfb.serving.adapters import AdapterRouter
from chatfb.app.chat_service import MODEL_UNAVAILABLE, ChatInputError, ChatService
from chatfb.serving.model_client import ModelError


@pytest.fixture
def chat(settings, store, fake_client):
    return ChatService(settings.with_(max_message_chars=50), store, fake_client, AdapterRouter("chatfb-base"))


def run(stream):
    return list(stream)[-1]


def test_a_turn_is_streamed_and_logged(chat, store, fake_client):
    fake_client.enqueue("Paris is the capital.")
    cid, stream = chat.send("s1", None, "Capital of France?", "Be brief.", user="ann")
    updates = list(stream)
    assert [u.text for u in updates[:-1]] == ["Paris", "Paris is", "Paris is the", "Paris is the capital."]
    assert updates[-1].done and updates[-1].error is None
    user, reply = store.messages(cid)
    assert (user["content"], reply["content"], reply["status"], reply["model"]) == \
        ("Capital of France?", "Paris is the capital.", "ok", "chatfb-base")
    assert fake_client.history[0]["messages"] == [{"role": "system", "content": "Be brief."},
                                                  {"role": "user", "content": "Capital of France?"}]
    assert chat.router.inflight("chatfb-base") == 0


@pytest.mark.parametrize("text, why", [("   ", "empty"), ("x" * 51, "limit is 50")])
def test_bad_messages_are_refused_before_anything_is_sent(chat, store, fake_client, text, why):
    with pytest.raises(ChatInputError, match=why):
        chat.send("s1", None, text)
    assert store.counts()["messages"] == 0 and fake_client.history == []


def test_model_failure_is_stored_as_failed_and_chat_recovers(chat, store, fake_client):
    fake_client.enqueue(ModelError("The model server is not reachable right now."), "back again")
    cid, stream = chat.send("s1", None, "hello")
    last = run(stream)
    assert last.error == "The model server is not reachable right now."
    assert "Traceback" not in last.error and "http" not in last.error
    assert store.messages(cid)[-1]["status"] == "failed"
    cid, stream = chat.send("s1", cid, "hello?")
    assert run(stream).text == "back again"
    # the failed reply is not fed back to the model
    assert fake_client.history[-1]["messages"] == [{"role": "user", "content": "hello"}, {"role": "user", "content": "hello?"}]


def test_regenerate_replaces_and_logs_implicit_negative(chat, store, fake_client):
    fake_client.enqueue("first", "second")
    cid, stream = chat.send("s1", None, "q")
    first = run(stream).message_id
    second = run(chat.regenerate("s1", cid)).message_id
    assert [m["id"] for m in store.messages(cid)][-1] == second
    assert store.message(first)["replaced"] is True
    (fb,) = store.feedback_for(first)
    assert (fb["kind"], fb["rating"]) == ("implicit", -1)


def test_editing_ones_own_message_answers_it_on_a_new_branch(chat, store, fake_client):
    fake_client.enqueue("Apple.", "Red.", "Leek.")
    cid, stream = chat.send("s1", None, "Name a fruit.")
    first = run(stream).message_id
    run(chat.send("s1", cid, "And a colour?")[1])
    question = store.messages(cid)[0]["id"]
    chat.rate("s1", first, 1)
    reply = run(chat.edit_message("s1", cid, question, "Name a vegetable."))
    assert reply.text == "Leek." and reply.error is None
    assert [(m["role"], m["content"]) for m in chat.history("s1", cid)] == [("user", "Name a vegetable."),
                                                                             ("assistant", "Leek.")]
    assert fake_client.history[-1]["messages"] == [{"role": "user", "content": "Name a vegetable."}]
    old = store.messages(cid, include_replaced=True)
    assert len(old) == 6 and all(m["replaced"] for m in old[:4])  # the old branch stays stored
    assert store.feedback_for(first)[0]["rating"] == 1  # with its feedback
    # only one's own user message, still in view, in this conversation
    for session, mid, why in (("intruder", question, "Only your own"), ("s1", question, "Only your own"),
                              ("s1", reply.message_id, "Only your own")):
        with pytest.raises(ChatInputError, match=why):
            chat.edit_message(session, cid, mid, "mine now")
    new_question = chat.history("s1", cid)[0]["id"]
    with pytest.raises(ChatInputError, match="empty"):
        chat.edit_message("s1", cid, new_question, "  ")
    assert len(store.messages(cid, include_replaced=True)) == 6


def test_feedback_only_on_own_finished_replies(chat, store, fake_client):
    cid, stream = chat.send("s1", None, "q")
    mid = run(stream).message_id
    chat.critique("s1", mid, "too long")
    chat.correct("s1", mid, "short answer")
    chat.rate("s1", mid, 1)
    assert {f["kind"] for f in store.feedback_for(mid)} == {"critique", "correction", "rating"}
    with pytest.raises(ChatInputError, match="unknown message"):
        chat.critique("intruder", mid, "mine now")
    with pytest.raises(ChatInputError, match="unknown message"):
        chat.rate("s1", "no-such-id", 1)
    with pytest.raises(ChatInputError, match="empty"):
        chat.correct("s1", mid, " ")
    assert chat.history("intruder", cid) == []
    with pytest.raises(ChatInputError, match="not yours"):
        chat.send("intruder", cid, "let me in")


def test_rate_limit(settings, store, fake_client):
    chat = ChatService(settings.with_(rate_limit_per_minute=2), store, fake_client, AdapterRouter("b"))
    for _ in range(2):
        run(chat.send("s1", None, "q")[1])
    with pytest.raises(ChatInputError, match="too fast"):
        chat.send("s1", None, "q")
    run(chat.send("s2", None, "other session is fine")[1])


def test_nothing_is_sent_while_the_model_is_unavailable(settings, store, fake_client, caplog):
    why = ["Port 8011 on 127.0.0.1 is already in use by another process"]
    chat = ChatService(settings, store, fake_client, AdapterRouter("chatfb-base"), model_unavailable=lambda: why[0])
    cid, stream = chat.send("s1", None, "hello")
    last = run(stream)
    assert last.error == MODEL_UNAVAILABLE and "8011" not in last.error  # the user is told, not the details
    assert fake_client.history == [] and chat.router.inflight("chatfb-base") == 0
    assert store.messages(cid)[-1]["status"] == "failed"
    assert "Port 8011" in caplog.text  # the operator is told why
    why[0] = None
    mid = run(chat.send("s1", cid, "hello again")[1]).message_id
    why[0] = "the managed model server is not running"
    _, revision = chat.revise("s1", mid, "shorter please")
    assert run(revision).error == MODEL_UNAVAILABLE and len(fake_client.history) == 1


def test_an_api_request_over_the_rate_limit_writes_nothing_not_even_its_history(settings, store, fake_client):
    """The API's client-held history starts a new conversation: only once the turn passed the rate limit (a flood
    of refused requests must not fill the store), and a request that passes writes it before its turn."""
    from chatfb.app.api_chat import start_turn
    from chatfb.app.chat_service import RateLimited

    chat = ChatService(settings.with_(rate_limit_per_minute=1), store, fake_client, AdapterRouter("chatfb-base"))
    messages = [{"role": "user", "content": "Earlier question"}, {"role": "assistant", "content": "An answer elsewhere"},
                {"role": "user", "content": "And now?"}]
    cid, stream = start_turn(chat, "ann", messages)
    run(stream)
    assert [m["content"] for m in store.messages(cid)][:3] == ["Earlier question", "An answer elsewhere", "And now?"]
    before = store.counts()
    with pytest.raises(RateLimited):
        start_turn(chat, "ann", [dict(m, content=m["content"] + " again") for m in messages])
    assert store.counts() == before


def test_a_fast_reply_streams_in_time_slices_and_closing_it_stores_it(store, fake_client, settings):
    """With stream_every_s set, the words that arrive within one slice go out as one update (the first and the
    last always), so a fast model does not cost a UI update per word; closing the sliced stream still
    closes the reply's own, which stores what was said, marked stopped."""
    chat = ChatService(settings.with_(stream_every_s=60), store, fake_client, AdapterRouter("chatfb-base"))
    fake_client.enqueue("one two three four five six")
    cid, stream = chat.send("s1", None, "count")
    updates = list(stream)
    assert [(u.text, u.done) for u in updates] == [("one", False), ("one two three four five six", True)]
    assert store.messages(cid)[-1]["content"] == "one two three four five six"

    fake_client.enqueue("alpha beta gamma")
    cid, stream = chat.send("s1", cid, "again")
    assert next(stream).text == "alpha"
    stream.close()
    assert (store.messages(cid)[-1]["status"], store.messages(cid)[-1]["content"]) == ("stopped", "alpha")
