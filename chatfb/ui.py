"""The Gradio UI: a chat tab with feedback on every reply, and a password-protected admin tab.

Handlers are thin: they call the chat service / runtime and return updates. Feedback always
targets our own message ids (kept in per-session state), never positions in the chat widget.
"""

from __future__ import annotations

import html
import logging
import re

import gradio as gr

from chatfb.admin_view import build as build_admin_tab
from chatfb.chat import ChatInputError
from chatfb.runtime import Runtime

log = logging.getLogger(__name__)

CONSENT = ("**Your chats are logged** (messages, ratings, critiques and corrections) to improve this model. "
           "Do not share personal information. Ask the operator to delete your data at any time.")
CHAT_CONCURRENCY_ID = "chat"


def inert(text: str) -> str:
    """Show user and model text as text: HTML escaped, script URLs defused; markdown still renders."""
    text = html.escape(text or "", quote=False)
    return re.sub(r"(?i)\b(javascript|vbscript|data)\s*:", r"\1&#58;", text)


def render(messages: list[dict]) -> tuple[list[dict], list[str | None]]:
    """Chatbot value + the message id behind each displayed item."""
    shown, ids = [], []
    for m in messages:
        if m["role"] == "user":
            shown.append({"role": "user", "content": inert(m["content"])})
        else:
            shown.append({"role": "assistant", "content": reply_text(m["content"], m["status"], m.get("error"),
                                                                     m.get("adapter") or m.get("model"))})
        ids.append(m["id"])
    return shown, ids


def with_placeholder(messages: list[dict]) -> tuple[list[dict], list[str | None]]:
    """Render a conversation whose newest reply is still pending, with a "…" in its place."""
    shown, ids = render([m for m in messages if m["status"] != "pending"])
    return shown + [{"role": "assistant", "content": "…"}], ids + [None]


def reply_text(text: str, status: str, error: str | None, label: str | None) -> str:
    body = inert(text)
    if status == "failed":
        body = (body + "\n\n" if body else "") + f"⚠️ {inert(error or 'The reply failed.')}"
    elif status == "stopped":
        body += " *(stopped)*"
    return f"{body}\n\n*— {inert(label or '')}*" if label and status != "pending" else body


def _session(request: gr.Request) -> tuple[str, str | None]:
    return request.session_hash, getattr(request, "username", None)


def build_ui(rt: Runtime) -> gr.Blocks:
    s = rt.settings
    chat = rt.chat

    with gr.Blocks(title="chatfb") as demo:
        gr.Markdown("# chatfb\nA chat model that learns from your feedback: rate, critique or correct any reply.")
        gr.Markdown(CONSENT, elem_id="consent")
        if (s.data_dir / ".ephemeral").exists():
            gr.Markdown("⚠️ This Space has no persistent storage: logged chats are lost when it restarts.")
        status = gr.Markdown(rt.status, elem_id="model-status")
        conv_id = gr.State(None)
        ids = gr.State([])
        selected = gr.State(None)

        with gr.Tab("Chat"):
            chatbot = gr.Chatbot(elem_id="chatbot", height=420, feedback_options=("Like", "Dislike"))
            with gr.Row():
                msg = gr.Textbox(placeholder="Type a message and press Enter", show_label=False, scale=6,
                                 elem_id="msg", max_lines=8)
                send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
            with gr.Row():
                stop = gr.Button("Stop", elem_id="stop")
                retry = gr.Button("Retry", elem_id="retry")
                new = gr.Button("New conversation", elem_id="new")
            with gr.Accordion("System prompt", open=False):
                system = gr.Textbox(value=s.system_prompt, show_label=False, lines=2, elem_id="system")
            with gr.Group():
                target = gr.Markdown("*Feedback goes to the latest reply; click a reply to pick another.*",
                                     elem_id="fb-target")
                with gr.Row():
                    up = gr.Button("👍 Good", elem_id="thumbs-up")
                    down = gr.Button("👎 Bad", elem_id="thumbs-down")
                critique = gr.Textbox(label="Critique (what was wrong, in plain words)", elem_id="critique")
                send_critique = gr.Button("Send critique", elem_id="send-critique")
                correction = gr.Textbox(label="Correction (the reply it should have given)", lines=3,
                                        elem_id="correction")
                send_correction = gr.Button("Send correction", elem_id="send-correction")
                fb_status = gr.Markdown("", elem_id="fb-status")

        def target_text(mid):
            m = rt.store.message(mid) if mid else None
            if m is None:
                return "*No reply selected yet.*"
            snippet = inert(m["content"][:80]) + ("…" if len(m["content"]) > 80 else "")
            return f"Feedback on: *{snippet}*"

        def stream_reply(stream, shown, id_list, cid):
            for upd in stream:
                shown[-1] = {"role": "assistant",
                             "content": reply_text(upd.text, "failed" if upd.error else ("ok" if upd.done else "pending"),
                                                   upd.error, upd.model)}
                id_list[-1] = upd.message_id
                yield shown, cid, id_list, upd.message_id, target_text(upd.message_id) if upd.done else gr.update()

        def on_send(text, system_prompt, cid, request: gr.Request):
            session, user = _session(request)
            try:
                cid, stream = chat.send(session, cid, text, system_prompt, user)
            except ChatInputError as e:
                gr.Warning(str(e))
                shown, id_list = render(chat.history(session, cid))
                yield shown, cid, id_list, gr.update(), gr.update(), text
                return
            shown, id_list = with_placeholder(chat.history(session, cid))
            for out in stream_reply(stream, shown, id_list, cid):
                yield *out, ""

        def on_retry(system_prompt, cid, request: gr.Request):
            session, user = _session(request)
            try:
                stream = chat.regenerate(session, cid, system_prompt, user)
            except ChatInputError as e:
                gr.Warning(str(e))
                shown, id_list = render(chat.history(session, cid))
                yield shown, cid, id_list, gr.update(), gr.update()
                return
            shown, id_list = with_placeholder(chat.history(session, cid))
            yield from stream_reply(stream, shown, id_list, cid)

        def on_stop(cid, request: gr.Request):
            shown, id_list = render(chat.history(request.session_hash, cid))
            return shown, id_list

        def on_new():
            return [], None, [], None, "*No reply selected yet.*", ""

        def on_select(id_list, evt: gr.SelectData):
            mid = id_list[evt.index] if isinstance(evt.index, int) and evt.index < len(id_list) else None
            m = rt.store.message(mid) if mid else None
            if m is None or m["role"] != "assistant":
                return gr.update(), gr.update()
            return mid, target_text(mid)

        def feedback(action, mid, value, request: gr.Request):
            session, user = _session(request)
            try:
                action(session, mid, value, user)
            except ChatInputError as e:
                return f"⚠️ {e}", gr.update()
            return "✅ Thanks — feedback saved (send again to revise it).", ""

        def on_like(id_list, evt: gr.LikeData, request: gr.Request):
            mid = id_list[evt.index] if isinstance(evt.index, int) and evt.index < len(id_list) else None
            return feedback(chat.rate, mid, 1 if evt.liked else -1, request)[0], mid

        chat_outputs = [chatbot, conv_id, ids, selected, target]
        send_event = msg.submit(on_send, [msg, system, conv_id], chat_outputs + [msg],
                                concurrency_limit=s.chat_concurrency, concurrency_id=CHAT_CONCURRENCY_ID, api_name="send")
        click_event = send.click(on_send, [msg, system, conv_id], chat_outputs + [msg],
                                 concurrency_id=CHAT_CONCURRENCY_ID, api_visibility="private")
        retry_event = retry.click(on_retry, [system, conv_id], chat_outputs, concurrency_id=CHAT_CONCURRENCY_ID,
                                   api_name="retry")
        stop.click(None, cancels=[send_event, click_event, retry_event]).then(on_stop, [conv_id], [chatbot, ids])
        new.click(on_new, None, chat_outputs + [fb_status])
        chatbot.select(on_select, [ids], [selected, target])
        chatbot.like(on_like, [ids], [fb_status, selected])
        def on_up(mid, request: gr.Request):
            return feedback(chat.rate, mid, 1, request)[0]

        def on_down(mid, request: gr.Request):
            return feedback(chat.rate, mid, -1, request)[0]

        def on_critique(mid, text, request: gr.Request):
            return feedback(chat.critique, mid, text, request)

        def on_correct(mid, text, request: gr.Request):
            return feedback(chat.correct, mid, text, request)

        up.click(on_up, [selected], [fb_status], api_name="thumbs_up")
        down.click(on_down, [selected], [fb_status], api_name="thumbs_down")
        send_critique.click(on_critique, [selected, critique], [fb_status, critique], api_name="critique")
        send_correction.click(on_correct, [selected, correction], [fb_status, correction], api_name="correct")

        timer = gr.Timer(2.0)
        timer.tick(lambda: (rt.status, gr.Timer(active=not rt.ready.is_set())), None, [status, timer],
                   show_progress="hidden")

        build_admin_tab(rt)
    return demo
