"""The Gradio UI: a chat tab with feedback on every reply, and a password-protected admin tab.

Handlers are thin: they call the chat service / runtime and return updates. Feedback always
targets our own message ids (kept in per-session state), never positions in the chat widget.
"""

from __future__ import annotations

import html
import logging
import os
import re
import secrets
import threading
from collections import OrderedDict

import gradio as gr

from chatfb.ui.admin_tab import build as build_admin_tab
from chatfb.app.chat_service import ChatInputError
from chatfb.critique.guidelines import looks_like_rule
from chatfb.app.runtime import Runtime

log = logging.getLogger(__name__)

CONSENT = ("**Your chats are logged** (messages, ratings, critiques and corrections) to improve this model. "
           "Do not share personal information. Ask the operator to delete your data at any time.")
CHAT_CONCURRENCY_ID = "chat"


def inert(text: str) -> str:
    """Show user and model text as text: HTML escaped, script URLs defused; markdown still renders."""
    text = html.escape(text or "", quote=False)
    return re.sub(r"(?i)\b(javascript|vbscript|data)\s*:", r"\1&#58;", text)


REVISION_TITLE = "✍️ Proposed revision of the reply above: Accept · Edit · Try again · Dismiss"
DRAFTING_TITLE = "✍️ Drafting a revision following your critique…"


def render(messages: list[dict], feedback: dict | None = None,
           revision: dict | None = None) -> tuple[list[dict], list[str | None]]:
    """Chatbot value + the message id behind each displayed item. A reply the user corrected shows
    the correction (what they made it say), marked as theirs. `revision` (a proposed revision: its
    "message_id", "text", and "id" once offered, or "pending" while drafted) is shown under the reply
    it revises, as a titled block; its id entry is "rev:<candidate id>" (None while drafted)."""
    feedback = feedback or {}
    shown, ids = [], []
    for m in messages:
        if m["role"] == "user":
            shown.append({"role": "user", "content": inert(m["content"])})
        else:
            fb = feedback.get(m["id"], {})
            if fb.get("correction"):
                content = inert(fb["correction"]) + "\n\n*— corrected by you*"
            else:
                content = reply_text(m["content"], m["status"], m.get("error"), m.get("adapter") or m.get("model"))
            shown.append({"role": "assistant", "content": content})
        ids.append(m["id"])
        if revision and revision["message_id"] == m["id"] and m["role"] == "assistant":
            pending = bool(revision.get("pending"))
            meta = {"title": DRAFTING_TITLE if pending else REVISION_TITLE}
            if pending:
                meta["status"] = "pending"
            shown.append({"role": "assistant", "content": inert(revision["text"]) or "…", "metadata": meta})
            ids.append(f"rev:{revision['id']}" if revision.get("id") else None)
    return shown, ids


def feedback_values(shown: list[dict], ids: list[str | None], feedback: dict) -> list[str | None]:
    """The Chatbot's like/dislike state from the store: one entry per run of assistant items (the widget
    shows consecutive items of one role as one bubble, so a revision shares its reply's)."""
    values = {1: "Like", -1: "Dislike"}
    out, previous = [], None
    for item, mid in zip(shown, ids):
        if item["role"] == "assistant" and previous != "assistant":
            out.append(values.get(feedback.get(mid, {}).get("rating")))
        previous = item["role"]
    return out


def with_placeholder(messages: list[dict], feedback: dict | None = None,
                     revision: dict | None = None) -> tuple[list[dict], list[str | None]]:
    """Render a conversation whose newest reply is still pending, with a "…" in its place."""
    shown, ids = render([m for m in messages if m["status"] != "pending"], feedback, revision)
    return shown + [{"role": "assistant", "content": "…"}], ids + [None]


def reply_text(text: str, status: str, error: str | None, label: str | None) -> str:
    body = inert(text)
    if status == "failed":
        body = (body + "\n\n" if body else "") + f"⚠️ {inert(error or 'The reply failed.')}"
    elif status == "stopped":
        body = (body + " " if body else "") + "*(stopped)*"
    return f"{body}\n\n*— {inert(label or '')}*" if label and status != "pending" else body


LABEL = re.compile(r"(?:\s*\*\(stopped\)\*)?\s*\n\n\*— [^\n]*\*\s*$")


def edited_text(value) -> str:
    """The text a user left after editing a reply in place: the widget hands back what it showed
    (escaped, with the model label under it), so both are undone."""
    text = value if isinstance(value, str) else (value or {}).get("text", "") if isinstance(value, dict) else ""
    return html.unescape(LABEL.sub("", text)).strip()


def guidelines_markdown(rules: list[dict]) -> str:
    if not rules:
        return "*No guidelines yet. Tick “apply from now on” when you send a critique, or add one here.*"
    return "\n".join(f"{i}. {inert(g['text'])}" for i, g in enumerate(rules, 1))


class Sessions:
    """Which chat session a browser tab belongs to. Gradio's session hash changes with every page
    load; a random key kept in the browser's localStorage (gr.BrowserState) survives reloads, so a tab
    finds its conversation, ratings and guidelines again. Clients without one (the API) keep the hash.
    The two kinds of id are prefixed apart, so a browser cannot claim an API client's session."""

    KEY = re.compile(r"[A-Za-z0-9_-]{22,64}")

    def __init__(self, cap: int = 100_000):
        self._keys: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()
        self.cap = cap

    def bind(self, session_hash: str, key: str | None) -> str:
        """Tie a page load to the browser's key (a new one when it has none, or a malformed one). The
        first binding of a page load stays: a later call cannot move a live tab to another key."""
        if not (isinstance(key, str) and self.KEY.fullmatch(key)):
            key = secrets.token_urlsafe(24)
        with self._lock:
            key = self._keys.setdefault(session_hash, key)
            self._keys.move_to_end(session_hash)
            while len(self._keys) > self.cap:
                self._keys.popitem(last=False)
        return key

    def forget(self, session_hash: str) -> None:
        with self._lock:
            self._keys.pop(session_hash, None)

    def __call__(self, request: gr.Request) -> tuple[str, str | None]:
        with self._lock:
            key = self._keys.get(request.session_hash)
        session = f"k:{key}" if key else f"h:{request.session_hash}"
        return session, getattr(request, "username", None)


def browser_secret(data_dir) -> str:
    """The key that encrypts the browser's stored session key: kept in the data folder, so a restarted
    app still reads what browsers stored (a new one per process would lose every tab's conversation)."""
    from pathlib import Path

    from chatfb.layout import DataLayout

    path = DataLayout(Path(data_dir)).browser_secret
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(32))
        return path.read_text().strip()


NO_TARGET = "*No reply selected yet.*"
REVISION_READY = "**Revised following your critique** (shown under the reply in the chat): Accept · Edit · Try again · Dismiss"
DRAFTING = "*Drafting a revision…*"
CRITIQUE_PROMPT = "Write your critique of this reply in the box under the chat; a revision is proposed right away."


def build_ui(rt: Runtime) -> gr.Blocks:
    s = rt.settings
    chat = rt.chat
    private = {"api_visibility": "private"}
    _session = Sessions()

    with gr.Blocks(title="chatfb") as demo:
        gr.Markdown("# chatfb\nA chat model that learns from your feedback: like, critique or correct any reply.")
        gr.Markdown(CONSENT, elem_id="consent")
        if (s.data_dir / ".ephemeral").exists():
            gr.Markdown("⚠️ This Space has no persistent storage: logged chats are lost when it restarts.")
        status = gr.Markdown(rt.status, elem_id="model-status")
        browser_key = gr.BrowserState(None, storage_key="chatfb-session", secret=browser_secret(s.data_dir))
        conv_id = gr.State(None)
        ids = gr.State([])
        selected = gr.State(None)
        critique_id = gr.State(None)  # the critique the offered revision answers
        candidate_id = gr.State(None)  # the offered revision

        with gr.Tab("Chat"):
            chatbot = gr.Chatbot(elem_id="chatbot", height=420, feedback_options=("Like", "Dislike", "Critique"),
                                 editable="all")
            # Feedback happens here, under the conversation: confirmations, the offered revision's
            # buttons, and the critique box (opened from a reply's flag menu).
            fb_status = gr.Markdown("", elem_id="fb-status")
            with gr.Group(visible=False, elem_id="revision-panel") as revision_panel:
                revision_note = gr.Markdown("", elem_id="revision-status")
                with gr.Row():
                    accept = gr.Button("Accept", variant="primary", elem_id="accept-revision")
                    edit = gr.Button("Edit", elem_id="edit-revision")
                    again = gr.Button("Try again", elem_id="retry-revision")
                    dismiss = gr.Button("Dismiss", elem_id="dismiss-revision")
                revision = gr.Textbox(show_label=False, lines=4, interactive=False, visible=False, elem_id="revision")
            with gr.Group(visible=False, elem_id="critique-panel") as critique_panel:
                target = gr.Markdown("*Feedback goes to the latest reply; click a reply to pick another.*",
                                     elem_id="fb-target")
                critique = gr.Textbox(label="Critique (what was wrong, in plain words)", elem_id="critique")
                with gr.Row():
                    keep = gr.Checkbox(label="Apply from now on (keep as my guideline)", elem_id="keep-guideline")
                    everyone = gr.Checkbox(label="Suggest it for everyone (an admin approves it)",
                                           elem_id="guideline-everyone")
                with gr.Row():
                    send_critique = gr.Button("Send critique and propose a revision", variant="primary",
                                              elem_id="send-critique")
                    save_critique = gr.Button("Save the critique only", elem_id="save-critique")
                    close_critique = gr.Button("Close", elem_id="close-critique")
            gr.Markdown("*On any reply: 👍/👎, the flag menu's **Critique**, or ✏️ edit the reply to correct it.*",
                        elem_id="chat-help")
            with gr.Row():
                msg = gr.Textbox(placeholder="Type a message and press Enter", show_label=False, scale=6,
                                 elem_id="msg", max_lines=8)
                send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
            with gr.Row():
                stop = gr.Button("Stop", elem_id="stop")
                retry = gr.Button("Retry", elem_id="retry")
                new = gr.Button("New conversation", elem_id="new")
                open_critique = gr.Button("Critique a reply", elem_id="open-critique")
            with gr.Accordion("System prompt", open=False):
                system = gr.Textbox(value=s.system_prompt, show_label=False, lines=2, elem_id="system")
            with gr.Accordion("Your guidelines", open=False, elem_id="guidelines-panel"):
                rules_view = gr.Markdown(guidelines_markdown([]), elem_id="guidelines-list")
                with gr.Row():
                    rule_text = gr.Textbox(label="New guideline", placeholder="e.g. Always answer in British English",
                                           scale=4, elem_id="guideline-text")
                    add_rule = gr.Button("Add", scale=1, elem_id="add-guideline")
                with gr.Row():
                    rule_pick = gr.Dropdown(label="Remove a guideline", choices=[], scale=4, elem_id="guideline-pick")
                    remove_rule = gr.Button("Remove", scale=1, elem_id="remove-guideline")
            with gr.Accordion("More feedback", open=False):
                with gr.Row():
                    up = gr.Button("👍 Good", elem_id="thumbs-up")
                    down = gr.Button("👎 Bad", elem_id="thumbs-down")
                correction = gr.Textbox(label="Correction (the reply it should have given)", lines=3,
                                        elem_id="correction")
                send_correction = gr.Button("Send correction", elem_id="send-correction")

        def target_text(session, mid):
            m = chat.message(session, mid)
            if m is None:
                return NO_TARGET
            text = chat.feedback_state(session, [m]).get(mid, {}).get("correction") or m["content"]
            snippet = inert(text[:80]) + ("…" if len(text) > 80 else "")
            return f"Feedback on: *{snippet}*"

        def chat_state(session, cid):
            """What the chat shows, from the store: the messages, this session's ratings and corrections,
            and the revision offered to it."""
            messages = chat.history(session, cid)
            return messages, chat.feedback_state(session, messages), chat.offered_revision(session, messages)

        def chat_view(session, cid):
            messages, fb, offer = chat_state(session, cid)
            return view(messages, fb, offer)

        def view(messages, fb, revision):
            shown, id_list = render(messages, fb, revision)
            return gr.Chatbot(value=shown, feedback_value=feedback_values(shown, id_list, fb)), id_list

        def pending_view(session, cid):
            """The conversation with its newest reply pending, as the store has it: replies the user
            corrected show the correction (rebuilding from the messages alone showed the originals)."""
            return with_placeholder(*chat_state(session, cid))

        def rules_outputs(session, user):
            rules = chat.my_guidelines(session, user)
            choices = [(g["text"][:80], g["id"]) for g in rules]
            return guidelines_markdown(rules), gr.Dropdown(choices=choices, value=None)

        def stream_reply(session, stream, shown, id_list, cid):
            for upd in stream:
                shown[-1] = {"role": "assistant",
                             "content": reply_text(upd.text, "failed" if upd.error else ("ok" if upd.done else "pending"),
                                                   upd.error, upd.model)}
                id_list[-1] = upd.message_id
                yield (shown, cid, id_list, upd.message_id,
                       target_text(session, upd.message_id) if upd.done else gr.update())

        def on_send(text, system_prompt, cid, request: gr.Request):
            session, user = _session(request)
            try:
                cid, stream = chat.send(session, cid, text, system_prompt, user)
            except ChatInputError as e:
                gr.Warning(str(e))
                shown, id_list = chat_view(session, cid)
                yield shown, cid, id_list, gr.update(), gr.update(), text
                return
            shown, id_list = pending_view(session, cid)
            for out in stream_reply(session, stream, shown, id_list, cid):
                yield *out, ""

        def on_retry(system_prompt, cid, request: gr.Request):
            session, user = _session(request)
            try:
                stream = chat.regenerate(session, cid, system_prompt, user)
            except ChatInputError as e:
                gr.Warning(str(e))
                shown, id_list = chat_view(session, cid)
                yield shown, cid, id_list, gr.update(), gr.update()
                return
            shown, id_list = pending_view(session, cid)
            yield from stream_reply(session, stream, shown, id_list, cid)

        def on_stop(cid, request: gr.Request):
            session, _ = _session(request)
            chat.stop(session, cid)  # the partial reply, stored and shown as stopped
            return chat_view(session, cid)

        def on_new():
            return {chatbot: [], conv_id: None, ids: [], selected: None, target: NO_TARGET, fb_status: "",
                    revision_panel: gr.Group(visible=False), critique_panel: gr.Group(visible=False),
                    candidate_id: None, critique_id: None}

        def pick(session, id_list, index):
            mid = id_list[index] if isinstance(index, int) and 0 <= index < len(id_list) else None
            m = chat.message(session, mid)
            return mid if m is not None and m["role"] == "assistant" else None

        def on_select(id_list, evt: gr.SelectData, request: gr.Request):
            session, _ = _session(request)
            mid = pick(session, id_list, evt.index)
            return (mid, target_text(session, mid)) if mid else (gr.update(), gr.update())

        def feedback(action, mid, value, request: gr.Request):
            session, user = _session(request)
            try:
                action(session, mid, value, user)
            except ChatInputError as e:
                return f"⚠️ {e}", gr.update()
            note = "✅ Thanks — feedback saved (send again to revise it)."
            gr.Info(note)
            return note, ""

        def on_like(id_list, cid, evt: gr.LikeData, request: gr.Request):
            session, _ = _session(request)
            mid = pick(session, id_list, evt.index)
            if evt.liked == "Critique":  # the message's own critique action: open the critique box, aimed at it
                # the chat from the store again: picking Critique took the 👎 off in the widget
                shown, id_list = chat_view(session, cid)
                return {fb_status: CRITIQUE_PROMPT, selected: mid, target: target_text(session, mid),
                        critique_panel: gr.Group(visible=True), chatbot: shown, ids: id_list}
            if evt.liked not in (True, False):
                return {}
            note = feedback(chat.rate, mid, 1 if evt.liked else -1, request)[0]
            shown, id_list = chat_view(session, cid)
            return {fb_status: note, selected: mid, target: target_text(session, mid), chatbot: shown, ids: id_list}

        def on_edit(id_list, cid, evt: gr.EditData, request: gr.Request):
            """Editing a reply in place is its correction; editing the proposed revision accepts it as
            edited. The widget edits a reply and its revision together: what is unchanged is not news."""
            session, user = _session(request)
            text = edited_text(evt.value)
            if text == edited_text(evt.previous_value):
                return {}
            entry = id_list[evt.index] if isinstance(evt.index, int) and 0 <= evt.index < len(id_list) else None
            if isinstance(entry, str) and entry.startswith("rev:"):  # the revision sits right under its reply
                return accepted(session, user, entry[4:], text, cid, id_list[evt.index - 1])
            mid = pick(session, id_list, evt.index)
            if mid is None:
                note = "⚠️ Only replies can be corrected; send a new message instead of editing yours."
            else:
                note = feedback(chat.correct, mid, text, request)[0]
                if note.startswith("✅"):
                    note = "✅ Correction saved: the reply now reads as you wrote it."
            shown, id_list = chat_view(session, cid)
            out = {fb_status: note, chatbot: shown, ids: id_list}
            if mid is not None:
                out.update({selected: mid, target: target_text(session, mid)})
            return out

        def on_revise(mid, text, keep_rule, for_everyone, cid, offered, request: gr.Request):
            session, user = _session(request)
            try:
                fid, stream = chat.revise(session, mid, text, user)
            except ChatInputError as e:
                yield {fb_status: f"⚠️ {e}"}
                return
            if offered:  # a new critique replaces the offer still open: one offer at a time
                try:
                    chat.reject_revision(session, offered, status="dropped")
                except ChatInputError:
                    pass  # already accepted or dismissed
            note = "✅ Critique saved."
            rules = {}
            if keep_rule:
                try:
                    chat.save_guideline(session, text, user, bool(for_everyone), fid)
                    note += " Kept as your guideline" + (" (suggested for everyone)." if for_everyone else ".")
                    rules = dict(zip((rules_view, rule_pick), rules_outputs(session, user)))
                except ChatInputError as e:
                    note += f" ⚠️ {e}"
            elif looks_like_rule(text):
                note += " This reads like a lasting preference: tick “apply from now on” to keep it."
            closed = {critique: "", critique_panel: gr.Group(visible=False), keep: False, everyone: False, **rules}
            for out in revision_steps(session, cid, mid, stream, fid, note, note):
                yield {**out, **closed}  # the ticks were for this critique only

        def revision_steps(session, cid, mid, stream, fid, note, done_note):
            """The revision while it is drafted (in the chat, under the reply it revises), then the offer
            as stored, or why there is none; Accept, Edit and Dismiss only when there is an offer."""
            messages, fb, _ = chat_state(session, cid)
            for upd in stream:
                if not upd.done:
                    shown, id_list = view(messages, fb, {"message_id": mid, "text": upd.text, "pending": True})
                    yield {fb_status: note, revision_panel: gr.Group(visible=True), revision_note: DRAFTING,
                           revision: gr.Textbox(value="", visible=False), **offer_buttons(False), critique_id: fid,
                           candidate_id: None, chatbot: shown, ids: id_list}
                    continue
                shown, id_list = chat_view(session, cid)
                if upd.error:
                    gr.Warning(upd.error)
                yield {fb_status: done_note, revision_panel: gr.Group(visible=True),
                       revision_note: f"⚠️ {inert(upd.error)}" if upd.error else REVISION_READY,
                       revision: gr.Textbox(value=upd.text, visible=False, interactive=False),
                       **offer_buttons(upd.error is None), critique_id: fid, candidate_id: upd.candidate_id,
                       chatbot: shown, ids: id_list}

        def offer_buttons(offered):
            return {accept: gr.Button(visible=offered), edit: gr.Button(visible=offered),
                    dismiss: gr.Button(visible=offered)}

        def on_again(fid, cand, cid, request: gr.Request):
            session, user = _session(request)
            try:
                stream = chat.revise_again(session, fid, user)  # refused (not yours, too fast): keep the offer
                if cand:
                    chat.reject_revision(session, cand, status="dropped")
            except ChatInputError as e:
                yield {fb_status: f"⚠️ {e}"}
                return
            yield from revision_steps(session, cid, chat.critiqued_reply(session, fid), stream, fid,
                                      "Trying again…", "")

        def accepted(session, user, cand, text, cid, mid):
            """Accept the offered revision (as the user edited it) as the reply's correction."""
            try:
                chat.accept_revision(session, cand, text, user)
            except ChatInputError as e:
                return {fb_status: f"⚠️ {e}"}
            note = "✅ Revision accepted: saved as the corrected reply."
            gr.Info(note)
            shown, id_list = chat_view(session, cid)
            return {fb_status: note, revision_panel: gr.Group(visible=False), revision_note: "", candidate_id: None,
                    chatbot: shown, ids: id_list, selected: mid, target: target_text(session, mid)}

        def on_accept(cand, text, cid, mid, request: gr.Request):
            return accepted(*_session(request), cand, text, cid, mid)

        def on_dismiss(cand, cid, request: gr.Request):
            session, _ = _session(request)
            try:
                chat.reject_revision(session, cand)
            except ChatInputError as e:
                return {fb_status: f"⚠️ {e}"}
            shown, id_list = chat_view(session, cid)
            return {fb_status: "Revision dismissed (noted, so the model learns what not to say).",
                    revision_panel: gr.Group(visible=False), candidate_id: None, chatbot: shown, ids: id_list}

        def on_open_critique(mid, id_list, request: gr.Request):
            """The critique box, aimed at the picked reply, or the latest one."""
            session, _ = _session(request)
            mid = mid or next((m for m in reversed(id_list) if pick(session, [m], 0)), None)
            return {critique_panel: gr.Group(visible=True), selected: mid, target: target_text(session, mid)}

        def on_save_guideline(text, request: gr.Request):
            session, user = _session(request)
            try:
                chat.save_guideline(session, text, user)
            except ChatInputError as e:
                return f"⚠️ {e}", text, gr.update(), gr.update()
            return "✅ Guideline saved: it applies to your next replies.", "", *rules_outputs(session, user)

        def on_remove_guideline(gid, request: gr.Request):
            session, user = _session(request)
            try:
                chat.remove_guideline(session, gid, user)
            except ChatInputError as e:
                return f"⚠️ {e}", gr.update(), gr.update()
            return "Guideline removed.", *rules_outputs(session, user)

        def on_load(key, request: gr.Request):
            key = _session.bind(request.session_hash, key)
            session, user = _session(request)
            cid = chat.latest_conversation(session)
            messages, fb, offer = chat_state(session, cid)
            shown, id_list = view(messages, fb, offer)
            last = next((pick(session, id_list, i) for i in reversed(range(len(id_list)))
                         if pick(session, id_list, i)), None)
            out = {browser_key: key, status: rt.status, chatbot: shown, conv_id: cid, ids: id_list, selected: last,
                   target: target_text(session, last), **dict(zip((rules_view, rule_pick), rules_outputs(session, user)))}
            if offer:  # a revision offered before the reload: still there to accept or dismiss
                out.update({revision_panel: gr.Group(visible=True), revision_note: REVISION_READY,
                            revision: gr.Textbox(value=offer["text"], visible=False), **offer_buttons(True),
                            candidate_id: offer["id"], critique_id: offer["feedback_id"]})
            return out

        def on_unload(request: gr.Request):
            _session.forget(request.session_hash)

        demo.unload(on_unload)

        offer_outputs = [revision_panel, revision_note, revision, accept, edit, dismiss, candidate_id, critique_id]
        demo.load(on_load, [browser_key], [browser_key, status, chatbot, conv_id, ids, selected, target, rules_view,
                                           rule_pick, *offer_outputs], **private)
        chat_outputs = [chatbot, conv_id, ids, selected, target]
        send_event = msg.submit(on_send, [msg, system, conv_id], chat_outputs + [msg],
                                concurrency_limit=s.chat_concurrency, concurrency_id=CHAT_CONCURRENCY_ID, api_name="send")
        click_event = send.click(on_send, [msg, system, conv_id], chat_outputs + [msg],
                                 concurrency_id=CHAT_CONCURRENCY_ID, **private)
        retry_event = retry.click(on_retry, [system, conv_id], chat_outputs, concurrency_id=CHAT_CONCURRENCY_ID,
                                   api_name="retry")
        stop.click(None, cancels=[send_event, click_event, retry_event], **private).then(
            on_stop, [conv_id], [chatbot, ids], **private)
        new_outputs = chat_outputs + [fb_status, revision_panel, critique_panel, candidate_id, critique_id]
        new.click(on_new, None, new_outputs, **private)
        chatbot.clear(on_new, None, new_outputs, **private)  # its trash icon
        chatbot.select(on_select, [ids], [selected, target], **private)
        chatbot.like(on_like, [ids, conv_id], [fb_status, selected, target, critique_panel, chatbot, ids], **private)
        chatbot.edit(on_edit, [ids, conv_id], [fb_status, chatbot, ids, selected, target, revision_panel,
                                               revision_note, candidate_id], **private)
        open_critique.click(on_open_critique, [selected, ids], [critique_panel, selected, target], **private)
        close_critique.click(lambda: gr.Group(visible=False), None, [critique_panel], **private)

        def on_up(mid, request: gr.Request):
            return feedback(chat.rate, mid, 1, request)[0]

        def on_down(mid, request: gr.Request):
            return feedback(chat.rate, mid, -1, request)[0]

        def on_critique(mid, text, request: gr.Request):
            return feedback(chat.critique, mid, text, request)

        def on_correct(mid, text, request: gr.Request):
            return feedback(chat.correct, mid, text, request)

        revision_outputs = [fb_status, revision_panel, revision_note, revision, accept, edit, dismiss, critique_id,
                            candidate_id, chatbot, ids]
        send_critique.click(on_revise, [selected, critique, keep, everyone, conv_id, candidate_id],
                            revision_outputs + [critique, critique_panel, keep, everyone, rules_view, rule_pick],
                            concurrency_id=CHAT_CONCURRENCY_ID, api_name="revise")
        again.click(on_again, [critique_id, candidate_id, conv_id], revision_outputs, concurrency_id=CHAT_CONCURRENCY_ID,
                    api_name="retry_revision")
        accept.click(on_accept, [candidate_id, revision, conv_id, selected],
                     [fb_status, revision_panel, revision_note, candidate_id, chatbot, ids, selected, target],
                     api_name="accept_revision")
        dismiss.click(on_dismiss, [candidate_id, conv_id], [fb_status, revision_panel, candidate_id, chatbot, ids],
                      api_name="reject_revision")
        edit.click(lambda: gr.Textbox(visible=True, interactive=True), None, [revision], **private)
        add_rule.click(on_save_guideline, [rule_text], [fb_status, rule_text, rules_view, rule_pick],
                       api_name="save_guideline")
        remove_rule.click(on_remove_guideline, [rule_pick], [fb_status, rules_view, rule_pick], api_name="remove_guideline")
        up.click(on_up, [selected], [fb_status], api_name="thumbs_up")
        down.click(on_down, [selected], [fb_status], api_name="thumbs_down")
        save_critique.click(on_critique, [selected, critique], [fb_status, critique], api_name="critique")
        send_correction.click(on_correct, [selected, correction], [fb_status, correction], api_name="correct")

        timer = gr.Timer(2.0)
        timer.tick(lambda: (rt.status, gr.Timer(active=not rt.ready.is_set())), None, [status, timer],
                   show_progress="hidden", **private)

        build_admin_tab(rt)
    return demo
