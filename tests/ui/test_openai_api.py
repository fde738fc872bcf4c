"""The OpenAI-compatible API of the real app (chatfb.serve: runtime, Gradio UI and API on one port),
driven by the real `openai` client, with tests/fake_openai.py as the model server."""

from __future__ import annotations

import signal
import socket
import time

import httpx
import openai
import pytest

from chatfb.app.api_keys import create_key
from chatfb.app.chat_service import MODEL_UNAVAILABLE
from chatfb.serve import serve
from tests.fake_openai import start_replica

REPLY = "word0 word1 word2 word3 word4"  # what the fake model says


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def replica():
    """The fake model server; yields its handler class (`bodies`: the requests it was sent)."""
    model, handler = start_replica()
    handler.delay = 0.05  # between words, so a test can hang up half-way
    yield model, handler
    model.shutdown()


@pytest.fixture
def app(settings, monkeypatch, replica):
    """The app as `python -m chatfb serve` runs it, on a free port; yields (base URL, runtime)."""
    model, _ = replica
    monkeypatch.setenv("GRADIO_SERVER_PORT", str(free_port()))  # where Gradio's search for a free port starts
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    rt, demo = serve(settings.with_(vllm_url=f"http://127.0.0.1:{model.server_address[1]}"), block=False)
    try:
        assert rt.ready.wait(20)
        yield f"http://127.0.0.1:{demo.server_port}", rt
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        demo.close()
        rt.close()


@pytest.fixture
def ann(app):
    url, rt = app
    key = create_key(rt.store, "ann")["key"]
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0), rt


def test_a_completion_is_a_logged_turn_of_the_keys_user(ann):
    client, rt = ann
    assert [m.id for m in client.models.list()] == ["chatfb"]
    raw = client.chat.completions.with_raw_response.create(
        model="chatfb", messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}])
    done = raw.parse()
    assert done.choices[0].message.content == REPLY and done.choices[0].finish_reason == "stop"
    ids = done.chatfb
    assert raw.headers["x-chatfb-message-id"] == ids["message_id"]
    conv = rt.store.conversation(ids["conversation_id"])
    assert (conv["user_name"], conv["session_id"], conv["system_prompt"]) == ("ann", "api:ann", "Be brief.")
    user, reply = rt.store.messages(ids["conversation_id"])
    assert (user["content"], reply["id"], reply["content"], reply["status"]) == ("Hi?", ids["message_id"], REPLY, "ok")
    assert done.usage.completion_tokens == 5


def test_a_streamed_completion_continues_the_conversation_the_history_names(ann):
    client, rt = ann
    first = client.chat.completions.create(model="chatfb", messages=[{"role": "user", "content": "Hi?"}])
    history = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": first.choices[0].message.content},
               {"role": "user", "content": "And then?"}]
    chunks = list(client.chat.completions.create(model="chatfb", messages=history, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == REPLY and len([c for c in chunks if c.choices and c.choices[0].delta.content]) == 5
    ids = chunks[0].chatfb
    assert ids["conversation_id"] == first.chatfb["conversation_id"]  # the same conversation, not a copy
    assert [(m["role"], m["content"], m["status"]) for m in rt.store.messages(ids["conversation_id"])] == [
        ("user", "Hi?", "ok"), ("assistant", REPLY, "ok"), ("user", "And then?", "ok"), ("assistant", REPLY, "ok")]
    assert chunks[-1].usage.completion_tokens == 5
    # a history chatfb never saw starts a conversation with it, so the model hears all of it
    other = client.chat.completions.create(model="chatfb", messages=[
        {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A from elsewhere"},
        {"role": "user", "content": "Q2"}])
    assert [m["content"] for m in rt.store.messages(other.chatfb["conversation_id"])] == ["Q", "A from elsewhere", "Q2", REPLY]


def test_a_reply_the_token_limit_cut_off_says_so(ann):
    """finish_reason "length" where max_tokens cut the reply, streamed or not (a client asks for more, or shows the
    reply was cut); "stop" where it ended on its own."""
    client, rt = ann
    ask = dict(model="chatfb", messages=[{"role": "user", "content": "Hi?"}])
    done = client.chat.completions.create(max_tokens=3, **ask)
    assert (done.choices[0].message.content, done.choices[0].finish_reason) == ("word0 word1 word2", "length")
    assert rt.store.message(done.chatfb["message_id"])["finish_reason"] == "length"
    chunks = list(client.chat.completions.create(max_tokens=2, stream=True, **ask))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "word0 word1"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    chunks = list(client.chat.completions.create(stream=True, **ask))
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]


def test_a_client_that_hangs_up_stops_the_reply(ann):
    client, rt = ann
    with client.chat.completions.create(model="chatfb", messages=[{"role": "user", "content": "Hi?"}],
                                        stream=True) as stream:
        chunks = iter(stream)
        mid = next(chunks).chatfb["message_id"]
        next(chunks)
    deadline = time.monotonic() + 10
    while rt.store.message(mid)["status"] == "pending" and time.monotonic() < deadline:
        time.sleep(0.1)
    reply = rt.store.message(mid)
    assert reply["status"] == "stopped" and REPLY.startswith(reply["content"]) and reply["content"] != REPLY


def test_a_wrong_or_revoked_key_gets_401_json_and_nothing_is_logged(app):
    url, rt = app
    made = create_key(rt.store, "bob")
    for key in ("cfb_not-a-key", "sk-whatever", made["key"]):
        if key == made["key"]:
            rt.store.revoke_api_keys("bob")
        client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
        with pytest.raises(openai.AuthenticationError) as e:
            client.chat.completions.create(model="chatfb", messages=[{"role": "user", "content": "hi"}])
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
        assert "api-key create" in e.value.body["message"]
    r = httpx.get(url + "/v1/models", timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key" and "Traceback" not in r.text
    assert rt.store.counts()["messages"] == 0


def test_a_key_an_admin_revokes_stops_working_for_the_next_request(ann):
    """The key of a request is remembered (chatfb.store.db.Store.api_key_user): revoking it, or deleting
    its user, must still end it at once, not once some cache expires."""
    client, rt = ann
    for end in (lambda: rt.admin.revoke_api_keys("ann"), lambda: rt.admin.delete_user("ann")):
        client = openai.OpenAI(base_url=str(client.base_url), api_key=create_key(rt.store, "ann")["key"], max_retries=0)
        for _ in range(2):  # the second from memory
            assert client.chat.completions.create(model="chatfb", messages=[{"role": "user", "content": "hi"}]
                                                  ).choices[0].message.content == REPLY
        end()
        with pytest.raises(openai.AuthenticationError):
            client.chat.completions.create(model="chatfb", messages=[{"role": "user", "content": "hi"}])


def test_bad_requests_get_clear_json_errors(ann):
    client, rt = ann
    with pytest.raises(openai.BadRequestError, match="last message must be the user"):
        client.chat.completions.create(model="chatfb", messages=[{"role": "assistant", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="empty"):
        client.chat.completions.create(model="chatfb", messages=[{"role": "user", "content": "  "}])
    r = httpx.post(str(client.base_url) + "chat/completions", content=b"{not json",
                   headers={"Authorization": f"Bearer {client.api_key}"}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["message"] == "The request body is not valid JSON."
    assert rt.store.counts()["messages"] == 0


def test_a_requests_sampling_is_used_within_the_operators_limit(ann, replica):
    client, rt = ann
    sent = replica[1].bodies
    ask = dict(model="chatfb", messages=[{"role": "user", "content": "Hi?"}])
    client.chat.completions.create(**ask)  # nothing asked: the settings, as in the UI
    s = rt.settings
    assert (sent[-1]["temperature"], sent[-1]["top_p"], sent[-1]["max_tokens"]) == (s.temperature, s.top_p, s.max_tokens)
    client.chat.completions.create(**ask, temperature=0, top_p=0.5, max_tokens=7)
    assert (sent[-1]["temperature"], sent[-1]["top_p"], sent[-1]["max_tokens"]) == (0, 0.5, 7)
    client.chat.completions.create(**ask, max_completion_tokens=10 ** 6)  # never above the operator's limit
    assert sent[-1]["max_tokens"] == s.max_tokens
    asked = len(sent)
    for bad in ({"temperature": 3}, {"temperature": "hot"}, {"top_p": 0}, {"max_tokens": 0}, {"max_tokens": 1.5}):
        with pytest.raises(openai.BadRequestError, match=next(iter(bad))):
            client.chat.completions.create(**ask, **bad)
    assert len(sent) == asked  # a refused request reaches no model


def test_the_api_is_rate_limited_like_the_ui(ann):
    client, rt = ann
    object.__setattr__(rt.chat.limiter, "per_minute", 2)
    for _ in range(2):
        client.chat.completions.create(model="chatfb", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.RateLimitError, match="too fast"):
        client.chat.completions.create(model="chatfb", messages=[{"role": "user", "content": "hi"}], stream=True)


def test_an_unavailable_model_is_a_503_and_the_turn_is_logged_failed(ann):
    client, rt = ann
    rt.chat.model_unavailable = lambda: "Port 8011 is taken"
    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(model="chatfb", messages=[{"role": "user", "content": "hi"}], stream=True)
    assert e.value.status_code == 503 and e.value.body["message"] == MODEL_UNAVAILABLE
    assert e.value.body["code"] == "model_unavailable"
    mid = e.value.response.headers["x-chatfb-message-id"]
    assert rt.store.message(mid)["status"] == "failed"


def test_feedback_by_message_id(ann):
    client, rt = ann
    done = client.chat.completions.create(model="chatfb", messages=[{"role": "user", "content": "Hi?"}])
    mid = done.chatfb["message_id"]
    auth = {"Authorization": f"Bearer {client.api_key}"}
    base = str(client.base_url) + "chatfb"
    r = httpx.post(f"{base}/messages/{mid}/rate", json={"rating": -1}, headers=auth, timeout=10)
    assert r.status_code == 200 and r.json()["message_id"] == mid
    r = httpx.post(f"{base}/messages/{mid}/correct", json={"text": "Hello!"}, headers=auth, timeout=10)
    assert r.status_code == 200
    r = httpx.post(f"{base}/messages/{mid}/critique", json={"critique": "Say hello."}, headers=auth, timeout=30)
    assert r.status_code == 200 and r.json()["critique_id"]
    kinds = {(f["kind"], f["rating"], f["text"], f["user_name"]) for f in rt.store.feedback_for(mid)}
    assert kinds == {("rating", -1, None, "ann"), ("correction", None, "Hello!", "ann"),
                     ("critique", None, "Say hello.", "ann")}
    # another user's key cannot touch ann's reply
    eve = {"Authorization": f"Bearer {create_key(rt.store, 'eve')['key']}"}
    r = httpx.post(f"{base}/messages/{mid}/rate", json={"rating": 1}, headers=eve, timeout=10)
    assert r.status_code == 400 and "unknown message" in r.json()["error"]["message"]
    r = httpx.post(f"{base}/messages/{mid}/rate", json={"rating": 5}, headers=auth, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_rating"


def test_critique_answers_the_proposed_revision_and_accept_stores_it(settings, store, fake_client):
    """The feedback routes over the chat service with a fake model that follows critiques (no server)."""
    from types import SimpleNamespace

    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from chatfb.app.chat_service import ChatService
    from chatfb.serving.adapters import AdapterRouter
    from chatfb.ui.openai_api import api_routes

    chat = ChatService(settings.with_(revision_candidates=2), store, fake_client, AdapterRouter("chatfb-base"))
    http = TestClient(FastAPI(routes=api_routes(SimpleNamespace(chat=chat, store=store))))
    http.headers["Authorization"] = f"Bearer {create_key(store, 'ann')['key']}"
    fake_client.enqueue("Sleep more and relax.")
    mid = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Sleep tips?"}]}
                    ).json()["chatfb"]["message_id"]
    fake_client.follows = ("- ",)
    fake_client.enqueue("Sleep more.", "- Sleep more: go to bed early.\n- Relax in a dark room.")
    r = http.post(f"/v1/chatfb/messages/{mid}/critique", json={"critique": "Use a bulleted list."}).json()
    assert r["error"] is None and r["revision"]["text"].startswith("- Sleep more"), r
    accepted = http.post(f"/v1/chatfb/revisions/{r['revision']['candidate_id']}/accept", json={}).json()
    assert accepted["message_id"] == mid
    correction = store.feedback(accepted["feedback_id"])
    assert (correction["kind"], correction["derived_from"], correction["user_name"]) == \
        ("correction", r["critique_id"], "ann")
    again = http.post(f"/v1/chatfb/revisions/{r['revision']['candidate_id']}/accept", json={})
    assert again.status_code == 400 and "already accepted" in again.json()["error"]["message"]


def test_wrong_keys_are_throttled_but_never_lock_out_a_right_one(ann):
    client, rt = ann
    url = str(client.base_url) + "models"
    codes = [httpx.get(url, headers={"Authorization": "Bearer cfb_guess"}, timeout=10).status_code for _ in range(8)]
    assert codes[:4] == [401] * 4 and codes[-1] == 429
    assert [m.id for m in client.models.list()] == ["chatfb"]  # the same address, a right key


def test_a_model_failure_mid_stream_reaches_the_client_as_an_error(ann):
    from chatfb.serving.model_client import ModelError

    client, rt = ann

    def half_a_reply(messages, model, max_tokens, temperature, top_p, result):
        result.text += "word0"
        yield "word0"
        raise ModelError("The model server is not reachable right now.")

    rt.chat.client = type("Failing", (), {"stream_chat": staticmethod(half_a_reply)})()
    stream = client.chat.completions.create(model="chatfb", messages=[{"role": "user", "content": "Hi?"}], stream=True)
    got = []
    with pytest.raises(openai.APIError, match="not reachable"):
        for chunk in stream:
            got.append(chunk)
    assert got[1].choices[0].delta.content == "word0"
    assert rt.store.message(got[0].chatfb["message_id"])["status"] == "failed"


def test_sampling_of_a_request_reads_openais_names():
    from chatfb.app.api_chat import sampling_of
    from chatfb.app.chat_service import ChatInputError

    assert sampling_of({}).max_tokens is None
    assert sampling_of({"max_completion_tokens": None, "max_tokens": 7}).max_tokens == 7  # null is not given
    assert sampling_of({"max_completion_tokens": 9, "max_tokens": 7}).max_tokens == 9
    with pytest.raises(ChatInputError, match="max_completion_tokens"):
        sampling_of({"max_completion_tokens": -1})
