"""OpenAI-shaped chat requests as chatfb turns, for the OpenAI-compatible API (chatfb.ui.openai_api).

An OpenAI client sends the whole conversation with every request; chatfb keeps conversations itself.
The request's last message is the user's new turn; the messages before it pick the conversation it
continues: the one given by id (`conversation_id`), else the user's conversation whose visible
history is exactly those messages, else a new one that starts with them. Either way the turn goes
through the chat service like a UI turn: validated, rate-limited, logged, answered by the model
live for that user with their guidelines.
"""

from __future__ import annotations

from typing import Iterator

from chatfb.app.chat_service import ChatInputError, ChatService, ReplyUpdate, Sampling, utf8_text

ROLES = ("system", "developer", "user", "assistant")
MAX_MESSAGES = 500


def api_session(user_name: str) -> str:
    """The session an API user's turns and feedback belong to: one per user, whichever key they use
    (a browser's sessions are "k:…" or "h:…", so none can claim it)."""
    return f"api:{user_name}"


def message_text(message) -> tuple[str, str]:
    """(role, text) of one request message; text parts of a content list are joined."""
    if not isinstance(message, dict) or message.get("role") not in ROLES:
        raise ChatInputError(f"Each message needs a role: one of {', '.join(ROLES)}.")
    content = message.get("content")
    if isinstance(content, list):
        if any(not isinstance(p, dict) or p.get("type") != "text" for p in content):
            raise ChatInputError("Only text content is supported.")
        content = "".join(str(p.get("text") or "") for p in content)
    if content is None:
        content = ""
    if not isinstance(content, str):
        raise ChatInputError("A message's content is a string or a list of text parts.")
    return message["role"], utf8_text(content)


def sampling_of(body: dict) -> Sampling:
    """The request's `temperature`, `top_p` and `max_tokens` (or `max_completion_tokens`), checked as
    OpenAI checks them; `max_tokens` above the operator's limit is answered with the limit's length."""
    def number(name: str, low: float, high: float) -> float | None:
        v = body.get(name)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not low <= v <= high:
            raise ChatInputError(f"`{name}` is a number from {low:g} to {high:g}.")
        return float(v)

    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    tokens = body.get(name)
    if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
        raise ChatInputError(f"`{name}` is a whole number of at least 1.")
    return Sampling(temperature=number("temperature", 0, 2), top_p=number("top_p", 0.01, 1), max_tokens=tokens)


def start_turn(chat: ChatService, user_name: str, messages, conversation_id: str | None = None,
               sampling: Sampling | None = None) -> tuple[str, Iterator[ReplyUpdate]]:
    """Send the request's last message as `user_name`'s turn; returns (conversation id, reply stream).
    Raises ChatInputError (nothing sent) for a request chatfb cannot take."""
    if not isinstance(messages, list) or not messages:
        raise ChatInputError("`messages` must be a non-empty list.")
    if len(messages) > MAX_MESSAGES:
        raise ChatInputError(f"At most {MAX_MESSAGES} messages per request.")
    parsed = [message_text(m) for m in messages]
    system = "\n\n".join(text for role, text in parsed if role in ("system", "developer"))
    dialogue = [(role, text) for role, text in parsed if role in ("user", "assistant")]
    if not dialogue or dialogue[-1][0] != "user":
        raise ChatInputError("The last message must be the user's.")
    session = api_session(user_name)
    if conversation_id is not None and not isinstance(conversation_id, str):
        raise ChatInputError("`conversation_id` is a string (from an earlier reply's `chatfb` field).")
    history = None
    if not conversation_id and len(dialogue) > 1:
        conversation_id = _continued(chat, session, dialogue[:-1])
        # else a new conversation starts with the client's history (replies it got elsewhere, or edited), written
        # by send only once the turn passed its checks and the rate limit: a refused request writes nothing
        history = None if conversation_id else dialogue[:-1]
    return chat.send(session, conversation_id or None, dialogue[-1][1], system, user_name, history=history,
                     sampling=sampling)


def _continued(chat: ChatService, session: str, earlier: list[tuple[str, str]]) -> str | None:
    """The session's conversation whose visible, finished messages are exactly `earlier`."""
    last_reply = next((text for role, text in reversed(earlier) if role == "assistant"), None)
    if last_reply is None:
        return None
    for cid in chat.store.find_api_conversation(session, last_reply):
        shown = [(m["role"], m["content"]) for m in chat.history(session, cid) if m["status"] == "ok"]
        if shown == earlier:
            return cid
    return None

