"""The Gradio UI: a chat tab with feedback on every reply, and a password-protected admin tab.

`ChatTab` holds the chat tab's components and its handlers (methods, wired in one place): they read
and write through the chat service and return updates keyed by component. What the chat shows is
rebuilt from the store each time (messages, this session's ratings and corrections, the revision on
offer), so nothing on screen goes stale. Feedback always targets our own message ids (kept in
per-session state), never positions in the chat widget.
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
from chatfb.ui.api_types import takes_ids
from chatfb.app.chat_service import ChatInputError, client_key
from chatfb.serving.adapters import model_label
from chatfb.critique.guidelines import looks_like_rule
from chatfb.app.runtime import Runtime

log = logging.getLogger(__name__)

CONSENT = ("**Your chats are logged** (messages, ratings, critiques and corrections) to improve this model. "
           "Do not share personal information. Ask the operator to delete your data at any time.")
CHAT_CONCURRENCY_ID = "chat"


def inert(text: str) -> str:
    """Show user and model text as text: HTML escaped, script URLs defused, images shown as links (a
    markdown image makes every reader's browser fetch its URL: a tracking pixel, or a conversation's
    secret in its query string); other markdown still renders. The "!" of "![" becomes a character
    reference, which markdown reads as text, never as syntax."""
    text = html.escape(text or "", quote=False)
    text = re.sub(r"(?i)\b(javascript|vbscript|data)\s*:", r"\1&#58;", text)
    return text.replace("![", "&#33;[")


# The page's own CSS and script (passed to launch()). Gradio's edit box (✏️ on a message) sizes itself to
# the message and at least 160 px, and opens with the markdown the chat shows: text escaped by `inert`
# and the model's name under it. The box takes the chat's width instead, and opens with the message's
# text alone (the server strips the same label again, see `edited_text`).
PAGE_CSS = """
#chatbot .message-row:has(.edit-textarea) { align-self: stretch; max-width: 100%; }
#chatbot .message-row:has(.edit-textarea) div:has(.edit-textarea) { width: 100%; }
#chatbot .edit-textarea { width: 100% !important; box-sizing: border-box; }
"""
PAGE_JS = r"""
() => {
    const label = /(?:\s*\*\(stopped\)\*)?\s*\n\n\*— [^\n]*\*\s*$/;
    const entities = {"&lt;": "<", "&gt;": ">", "&amp;": "&", "&#58;": ":", "&#33;": "!"};
    const clean = (box) => {
        if (box.dataset.chatfbClean) return;
        box.dataset.chatfbClean = "1";
        box.value = box.value.replace(label, "").replace(/&(lt|gt|amp|#58|#33);/g, (e) => entities[e]);
        box.dispatchEvent(new Event("input", {bubbles: true}));
    };
    new MutationObserver(() => setTimeout(() => {
        document.querySelectorAll("#chatbot textarea.edit-textarea").forEach(clean);
    }, 0)).observe(document.body, {childList: true, subtree: true});
}
"""


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
            learned = f" · {fb['uptake']}" if fb.get("uptake") else ""  # chatfb.learning.uptake.footer
            if fb.get("correction"):
                content = inert(fb["correction"]) + f"\n\n*— corrected by you{learned}*"
            else:
                content = reply_text(m["content"], m["status"], m.get("error"), m.get("adapter") or m.get("model"),
                                     learned)
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


def reply_text(text: str, status: str, error: str | None, label: str | None, note: str = "") -> str:
    """`note`: more for the footer line, after the model's label (whether the model learnt the feedback)."""
    body = inert(text)
    if status == "failed":
        body = (body + "\n\n" if body else "") + f"⚠️ {inert(error or 'The reply failed.')}"
    elif status == "stopped":
        body = (body + " " if body else "") + "*(stopped)*"
    return f"{body}\n\n*— {inert(model_label(label) or '')}{note}*" if label and status != "pending" else body


LABEL = re.compile(r"(?:\s*\*\(stopped\)\*)?\s*\n\n\*— [^\n]*\*\s*$")


def edited_text(value) -> str:
    """The text a user left after editing a reply in place: the widget hands back what it showed
    (escaped, with the model label under it), so both are undone."""
    text = value if isinstance(value, str) else (value or {}).get("text", "") if isinstance(value, dict) else ""
    return html.unescape(LABEL.sub("", text)).strip()


def feedback_on(text: str) -> str:
    """The line that says which reply feedback goes to."""
    return f"Feedback on: *{inert(text[:80]) + ('…' if len(text) > 80 else '')}*"


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
REVISION_READY = "**Revised following your feedback** (shown under the reply in the chat): Accept · Edit · Try again · Dismiss"
DRAFTING = "*Drafting a revision…*"
CRITIQUE_PROMPT = "Write your critique of this reply in the box under the chat; a revision is proposed right away."


def build_ui(rt: Runtime) -> gr.Blocks:
    with gr.Blocks(title="chatfb") as demo:
        ChatTab(rt).wire(demo)
        build_admin_tab(rt)
    return demo


class ChatTab:
    """The chat tab's components, and its handlers as methods: each reads through the chat service and
    returns updates keyed by the component they change (Gradio leaves the others as they are)."""

    def __init__(self, rt: Runtime):
        self.rt = rt
        self.chat = rt.chat
        self.sessions = Sessions()
        s = rt.settings
        gr.Markdown("# chatfb\nA chat model that learns from your feedback: like, critique or correct any reply.")
        gr.Markdown(CONSENT, elem_id="consent")
        if (s.data_dir / ".ephemeral").exists():
            gr.Markdown("⚠️ This Space has no persistent storage: logged chats are lost when it restarts.")
        self.status = gr.Markdown(rt.status, elem_id="model-status")
        self.secret = browser_secret(s.data_dir)  # also keys the hash of each conversation's client address
        self.browser_key = gr.BrowserState(None, storage_key="chatfb-session", secret=self.secret)
        self.conv_id = gr.State(None)
        self.ids = gr.State([])
        self.selected = gr.State(None)
        self.critique_id = gr.State(None)  # the critique the offered revision answers
        self.candidate_id = gr.State(None)  # the offered revision

        with gr.Sidebar(label="Conversations", open=False, elem_id="conversations"):
            self.conv_list = gr.Radio(label="Your conversations", choices=[], elem_id="conversation-list")
            self.conv_title = gr.Textbox(label="Title of the open conversation", elem_id="conversation-title",
                                         max_lines=1)
            with gr.Row():
                self.rename_conv = gr.Button("Rename", elem_id="rename-conversation")
                self.delete_conv = gr.Button("Delete", variant="stop", elem_id="delete-conversation")

        with gr.Tab("Chat"):
            self.chatbot = gr.Chatbot(label="Conversation", elem_id="chatbot", height=420, feedback_options=("Like", "Dislike", "Critique"),
                                      editable="all")
            # Feedback happens here, under the conversation: confirmations, the offered revision's
            # buttons, and the critique box (opened from a reply's flag menu).
            self.fb_status = gr.Markdown("", label="Status", show_label=False, elem_id="fb-status")
            with gr.Group(visible=False, elem_id="revision-panel") as self.revision_panel:
                self.revision_note = gr.Markdown("", label="Revision status", show_label=False, elem_id="revision-status")
                with gr.Row():
                    self.accept = gr.Button("Accept", variant="primary", elem_id="accept-revision")
                    self.edit = gr.Button("Edit", elem_id="edit-revision")
                    self.again = gr.Button("Try again", elem_id="retry-revision")
                    self.dismiss = gr.Button("Dismiss", elem_id="dismiss-revision")
                self.revision = gr.Textbox(label="Proposed revision", show_label=False, lines=4, interactive=False, visible=False,
                                           elem_id="revision")
            with gr.Group(visible=False, elem_id="critique-panel") as self.critique_panel:
                self.target = gr.Markdown("*Feedback goes to the latest reply; click a reply to pick another.*",
                                          label="Feedback target", show_label=False, elem_id="fb-target")
                self.critique = gr.Textbox(label="Critique (what was wrong, in plain words)", elem_id="critique")
                with gr.Row():
                    self.keep = gr.Checkbox(label="Apply from now on (keep as my guideline)", elem_id="keep-guideline")
                    self.everyone = gr.Checkbox(label="Suggest it for everyone (an admin approves it)",
                                                elem_id="guideline-everyone")
                with gr.Row():
                    self.send_critique = gr.Button("Send critique and propose a revision", variant="primary",
                                                   elem_id="send-critique")
                    self.save_critique = gr.Button("Save the critique only", elem_id="save-critique")
                    self.close_critique = gr.Button("Close", elem_id="close-critique")
            gr.Markdown("*On any reply: 👍/👎, the flag menu's **Critique**, or ✏️ edit the reply to correct it. "
                        "✏️ on your own message sends it again as edited (a new branch).*",
                        elem_id="chat-help")
            with gr.Row():
                self.msg = gr.Textbox(label="Message", placeholder="Type a message and press Enter", show_label=False, scale=6,
                                      elem_id="msg", max_lines=8)
                self.send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
            with gr.Row():
                self.stop = gr.Button("Stop", elem_id="stop")
                self.retry = gr.Button("Retry", elem_id="retry")
                self.new = gr.Button("New conversation", elem_id="new")
                self.open_critique = gr.Button("Critique a reply", elem_id="open-critique")
            with gr.Accordion("System prompt", open=False):
                self.system = gr.Textbox(value=s.system_prompt, label="System prompt", show_label=False, lines=2, elem_id="system")
            with gr.Accordion("Your guidelines", open=False, elem_id="guidelines-panel"):
                self.rules_view = gr.Markdown(guidelines_markdown([]), label="Your guidelines", show_label=False,
                                              elem_id="guidelines-list")
                with gr.Row():
                    self.rule_text = gr.Textbox(label="New guideline", scale=4, elem_id="guideline-text",
                                                placeholder="e.g. Always answer in British English")
                    self.add_rule = gr.Button("Add", scale=1, elem_id="add-guideline")
                with gr.Row():
                    self.rule_pick = takes_ids(gr.Dropdown(label="Remove a guideline", choices=[], scale=4,
                                                           elem_id="guideline-pick"))  # by id, to the API
                    self.remove_rule = gr.Button("Remove", scale=1, elem_id="remove-guideline")
            with gr.Accordion("More feedback", open=False):
                with gr.Row():
                    self.up = gr.Button("👍 Good", elem_id="thumbs-up")
                    self.down = gr.Button("👎 Bad", elem_id="thumbs-down")
                self.correction = gr.Textbox(label="Correction (the reply it should have given)", lines=3,
                                             elem_id="correction")
                self.send_correction = gr.Button("Send correction", elem_id="send-correction")
        self.timer = gr.Timer(2.0)

    def wire(self, demo: gr.Blocks) -> None:
        """Connect the events to the handlers; `api_name`s are the public API (gradio_client, the API page)."""
        s = self.rt.settings
        private = {"api_visibility": "private"}
        chat_outputs = [self.chatbot, self.conv_id, self.ids, self.selected, self.target]
        offer = [self.revision_panel, self.revision_note, self.revision, self.accept, self.edit, self.dismiss,
                 self.candidate_id, self.critique_id]
        demo.unload(self.on_unload)
        opened = chat_outputs + offer + [self.critique_panel, self.fb_status, self.conv_list, self.conv_title]
        demo.load(self.on_load, [self.browser_key], [self.browser_key, self.status, self.rules_view, self.rule_pick,
                                                     *opened], **private)
        self.conv_list.input(self.on_open_conversation, [self.conv_list], opened, **private)
        self.rename_conv.click(self.on_rename_conversation, [self.conv_id, self.conv_title],
                               [self.fb_status, self.conv_list], **private)
        self.delete_conv.click(self.on_delete_conversation, [self.conv_id], opened, **private)
        send_event = self.msg.submit(self.on_send, [self.msg, self.system, self.conv_id], chat_outputs + [self.msg],
                                     concurrency_limit=s.chat_concurrency, concurrency_id=CHAT_CONCURRENCY_ID,
                                     api_name="send")
        click_event = self.send.click(self.on_send, [self.msg, self.system, self.conv_id], chat_outputs + [self.msg],
                                      concurrency_id=CHAT_CONCURRENCY_ID, **private)
        for event in (send_event, click_event):  # a new conversation joins the list
            event.then(self.on_list_conversations, [self.conv_id], [self.conv_list], **private)
        retry_event = self.retry.click(self.on_retry, [self.system, self.conv_id], chat_outputs,
                                       concurrency_id=CHAT_CONCURRENCY_ID, api_name="retry")
        edit_event = self.chatbot.edit(self.on_edit, [self.ids, self.conv_id, self.system],
                                       [self.fb_status, self.chatbot, self.conv_id, self.ids, self.selected,
                                        self.target, self.revision_panel, self.revision_note, self.revision,
                                        self.candidate_id],
                                       concurrency_id=CHAT_CONCURRENCY_ID, **private)
        edit_event.then(self.on_list_conversations, [self.conv_id], [self.conv_list], **private)  # its title
        self.stop.click(None, cancels=[send_event, click_event, retry_event, edit_event], **private).then(
            self.on_stop, [self.conv_id], [self.chatbot, self.ids], **private)
        new_outputs = chat_outputs + [self.fb_status, self.revision_panel, self.critique_panel, self.candidate_id,
                                      self.critique_id, self.conv_list, self.conv_title]
        self.new.click(self.on_new, None, new_outputs, **private)
        self.chatbot.clear(self.on_new, None, new_outputs, **private)  # its trash icon
        self.chatbot.select(self.on_select, [self.ids], [self.selected, self.target], **private)
        self.chatbot.like(self.on_like, [self.ids, self.conv_id],
                          [self.fb_status, self.selected, self.target, self.critique_panel, self.chatbot, self.ids],
                          **private)
        self.open_critique.click(self.on_open_critique, [self.selected, self.ids],
                                 [self.critique_panel, self.selected, self.target], **private)
        self.close_critique.click(self.on_close_critique, None, [self.critique_panel], **private)
        # API clients read the first four (status, critique box, note, revision) by position
        revision_outputs = [self.fb_status, self.critique, self.revision_panel, self.revision_note, self.revision,
                            self.accept, self.edit, self.dismiss, self.critique_id, self.candidate_id, self.chatbot,
                            self.ids]
        self.send_critique.click(self.on_revise, [self.selected, self.critique, self.keep, self.everyone, self.conv_id,
                                                  self.candidate_id],
                                 revision_outputs + [self.critique_panel, self.keep, self.everyone, self.rules_view,
                                                     self.rule_pick],
                                 concurrency_id=CHAT_CONCURRENCY_ID, api_name="revise")
        self.again.click(self.on_again, [self.critique_id, self.candidate_id, self.conv_id], revision_outputs,
                         concurrency_id=CHAT_CONCURRENCY_ID, api_name="retry_revision")
        self.accept.click(self.on_accept, [self.candidate_id, self.revision, self.conv_id, self.selected],
                          [self.fb_status, self.revision_panel, self.revision_note, self.candidate_id, self.chatbot,
                           self.ids, self.selected, self.target, self.revision], api_name="accept_revision")
        self.dismiss.click(self.on_dismiss, [self.candidate_id, self.conv_id],
                           [self.fb_status, self.revision_panel, self.candidate_id, self.chatbot, self.ids,
                            self.revision],
                           api_name="reject_revision")
        self.edit.click(self.on_edit_revision, None, [self.revision], **private)
        self.add_rule.click(self.on_save_guideline, [self.rule_text],
                            [self.fb_status, self.rule_text, self.rules_view, self.rule_pick], api_name="save_guideline")
        self.remove_rule.click(self.on_remove_guideline, [self.rule_pick],
                               [self.fb_status, self.rules_view, self.rule_pick], api_name="remove_guideline")
        self.up.click(self.on_up, [self.selected], [self.fb_status], api_name="thumbs_up")
        self.down.click(self.on_down, [self.selected], [self.fb_status], api_name="thumbs_down")
        self.save_critique.click(self.on_critique, [self.selected, self.critique], [self.fb_status, self.critique],
                                 api_name="critique")
        self.send_correction.click(self.on_correct, [self.selected, self.correction],
                                   [self.fb_status, self.correction], api_name="correct")
        self.timer.tick(self.on_tick, None, [self.status, self.timer], show_progress="hidden", **private)

    # -- what the chat shows, from the store through the chat service ----------------------------
    def target_text(self, session, mid):
        m = self.chat.message(session, mid)
        if m is None:
            return NO_TARGET
        return feedback_on(self.chat.feedback_state(session, [m]).get(mid, {}).get("correction") or m["content"])

    def chat_state(self, session, cid):
        """What the chat shows, from the store: the messages, this session's ratings and corrections,
        and the revision offered to it."""
        messages = self.chat.history(session, cid)
        return messages, self.chat.feedback_state(session, messages), self.chat.offered_revision(session, messages)

    def chat_view(self, session, cid):
        return self.view(*self.chat_state(session, cid))

    @staticmethod
    def view(messages, fb, revision):
        shown, id_list = render(messages, fb, revision)
        return gr.Chatbot(value=shown, feedback_value=feedback_values(shown, id_list, fb)), id_list

    def pending_view(self, session, cid):
        """The conversation with its newest reply pending, as the store has it: replies the user
        corrected show the correction (rebuilding from the messages alone showed the originals)."""
        return with_placeholder(*self.chat_state(session, cid))

    def rules_outputs(self, session, user):
        rules = self.chat.my_guidelines(session, user)
        choices = [(g["text"][:80], g["id"]) for g in rules]
        return {self.rules_view: guidelines_markdown(rules), self.rule_pick: gr.Dropdown(choices=choices, value=None)}

    def pick(self, session, id_list, index):
        mid = id_list[index] if isinstance(index, int) and 0 <= index < len(id_list) else None
        m = self.chat.message(session, mid)
        return mid if m is not None and m["role"] == "assistant" else None

    def offer_buttons(self, offered):
        return {self.accept: gr.Button(visible=offered), self.edit: gr.Button(visible=offered),
                self.dismiss: gr.Button(visible=offered)}

    # -- page ---------------------------------------------------------------------------------
    def on_load(self, key, request: gr.Request):
        key = self.sessions.bind(request.session_hash, key)
        session, user = self.sessions(request)
        return {self.browser_key: key, self.status: self.rt.status, **self.rules_outputs(session, user),
                **self.opened(session, self.chat.latest_conversation(session))}

    def opened(self, session, cid):
        """Everything that shows one conversation: its messages, the latest reply as the feedback target,
        the revision still on offer (or none), the list of conversations with this one picked."""
        messages, fb, offer = self.chat_state(session, cid)
        shown, id_list = self.view(messages, fb, offer)
        last = next((self.pick(session, id_list, i) for i in reversed(range(len(id_list)))
                     if self.pick(session, id_list, i)), None)
        listed = self.chat.conversations(session)
        out = {self.chatbot: shown, self.conv_id: cid, self.ids: id_list, self.selected: last,
               self.target: self.target_text(session, last), self.fb_status: "",
               self.critique_panel: gr.Group(visible=False), self.conv_list: self.conversation_choices(listed, cid),
               self.conv_title: next((c["title"] for c in listed if c["id"] == cid), "")}
        if offer:  # a revision offered before: still there to accept or dismiss
            out.update({self.revision_panel: gr.Group(visible=True), self.revision_note: REVISION_READY,
                        self.revision: gr.Textbox(value=offer["text"], visible=False), **self.offer_buttons(True),
                        self.candidate_id: offer["id"], self.critique_id: offer["feedback_id"]})
        else:
            out.update({self.revision_panel: gr.Group(visible=False), self.candidate_id: None, self.critique_id: None})
        return out

    @staticmethod
    def conversation_choices(listed, cid):
        choices = [(f"{c['title'][:48]} · {c['last_at']:%Y-%m-%d %H:%M}", c["id"]) for c in listed]
        return gr.Radio(choices=choices, value=cid if any(c["id"] == cid for c in listed) else None)

    def on_list_conversations(self, cid, request: gr.Request):
        session, _ = self.sessions(request)
        return {self.conv_list: self.conversation_choices(self.chat.conversations(session), cid)}

    def on_open_conversation(self, cid, request: gr.Request):
        session, _ = self.sessions(request)
        if not self.chat.owns(session, cid):  # one of its own may be empty (its first send failed)
            return {self.fb_status: "⚠️ That conversation is not yours, or it was deleted."}
        return self.opened(session, cid)

    def on_rename_conversation(self, cid, title, request: gr.Request):
        session, _ = self.sessions(request)
        try:
            self.chat.rename_conversation(session, cid, title)
        except ChatInputError as e:
            return {self.fb_status: f"⚠️ {e}"}
        return {self.fb_status: "✅ Conversation renamed.", **self.on_list_conversations(cid, request)}

    def on_delete_conversation(self, cid, request: gr.Request):
        session, _ = self.sessions(request)
        try:
            self.chat.delete_conversation(session, cid)
        except ChatInputError as e:
            return {self.fb_status: f"⚠️ {e}"}
        gr.Info("Conversation deleted.")
        return {**self.opened(session, None), self.fb_status: "Conversation deleted."}

    def on_unload(self, request: gr.Request):
        self.sessions.forget(request.session_hash)

    def on_tick(self):
        return {self.status: self.rt.status, self.timer: gr.Timer(active=not self.rt.ready.is_set())}

    # -- chatting -------------------------------------------------------------------------------
    def stream_reply(self, session, stream, shown, id_list, cid):
        for upd in stream:
            shown[-1] = {"role": "assistant",
                         "content": reply_text(upd.text, "failed" if upd.error else ("ok" if upd.done else "pending"),
                                               upd.error, upd.model)}
            id_list[-1] = upd.message_id
            out = {self.chatbot: shown, self.conv_id: cid, self.ids: id_list, self.selected: upd.message_id}
            if upd.done:  # a reply just made has no correction yet: the target is what it said
                out[self.target] = feedback_on(upd.text)
            yield out

    def refused(self, session, cid, e):
        gr.Warning(str(e))
        shown, id_list = self.chat_view(session, cid)
        return {self.chatbot: shown, self.conv_id: cid, self.ids: id_list}

    def on_send(self, text, system_prompt, cid, request: gr.Request):
        session, user = self.sessions(request)
        client = client_key(request.client.host if getattr(request, "client", None) else None, self.secret)
        try:
            cid, stream = self.chat.send(session, cid, text, system_prompt, user, client=client)
        except ChatInputError as e:
            yield {**self.refused(session, cid, e), self.msg: text}
            return
        shown, id_list = self.pending_view(session, cid)
        for out in self.stream_reply(session, stream, shown, id_list, cid):
            yield {**out, self.msg: ""}

    def on_retry(self, system_prompt, cid, request: gr.Request):
        session, user = self.sessions(request)
        try:
            stream = self.chat.regenerate(session, cid, system_prompt, user)
        except ChatInputError as e:
            yield self.refused(session, cid, e)
            return
        shown, id_list = self.pending_view(session, cid)
        yield from self.stream_reply(session, stream, shown, id_list, cid)

    def on_stop(self, cid, request: gr.Request):
        session, _ = self.sessions(request)
        self.chat.stop(session, cid)  # the partial reply, stored and shown as stopped
        shown, id_list = self.chat_view(session, cid)
        return {self.chatbot: shown, self.ids: id_list}

    def on_new(self):
        return {self.chatbot: [], self.conv_id: None, self.ids: [], self.selected: None, self.target: NO_TARGET,
                self.fb_status: "", self.revision_panel: gr.Group(visible=False),
                self.critique_panel: gr.Group(visible=False), self.candidate_id: None, self.critique_id: None,
                self.conv_list: gr.Radio(value=None), self.conv_title: ""}

    def on_select(self, id_list, evt: gr.SelectData, request: gr.Request):
        session, _ = self.sessions(request)
        mid = self.pick(session, id_list, evt.index)
        return {self.selected: mid, self.target: self.target_text(session, mid)} if mid else {}

    # -- feedback -------------------------------------------------------------------------------
    def feedback(self, action, mid, value, request: gr.Request, field=None):
        """Store one piece of feedback; the note (also a toast when saved), and `field` emptied when saved."""
        session, user = self.sessions(request)
        try:
            action(session, mid, value, user)
        except ChatInputError as e:
            return {self.fb_status: f"⚠️ {e}"}
        note = "✅ Thanks — feedback saved (send again to revise it)."
        gr.Info(note)
        return {self.fb_status: note, **({field: ""} if field is not None else {})}

    def on_up(self, mid, request: gr.Request):
        return self.feedback(self.chat.rate, mid, 1, request)

    def on_down(self, mid, request: gr.Request):
        return self.feedback(self.chat.rate, mid, -1, request)

    def on_critique(self, mid, text, request: gr.Request):
        return self.feedback(self.chat.critique, mid, text, request, self.critique)

    def on_correct(self, mid, text, request: gr.Request):
        return self.feedback(self.chat.correct, mid, text, request, self.correction)

    def on_like(self, id_list, cid, evt: gr.LikeData, request: gr.Request):
        session, _ = self.sessions(request)
        mid = self.pick(session, id_list, evt.index)
        if evt.liked == "Critique":  # the message's own critique action: open the critique box, aimed at it
            # the chat from the store again: picking Critique took the 👎 off in the widget
            shown, id_list = self.chat_view(session, cid)
            return {self.fb_status: CRITIQUE_PROMPT, self.selected: mid, self.target: self.target_text(session, mid),
                    self.critique_panel: gr.Group(visible=True), self.chatbot: shown, self.ids: id_list}
        if evt.liked not in (True, False):
            return {}
        out = self.feedback(self.chat.rate, mid, 1 if evt.liked else -1, request)
        shown, id_list = self.chat_view(session, cid)
        return {**out, self.selected: mid, self.target: self.target_text(session, mid), self.chatbot: shown,
                self.ids: id_list}

    def on_edit(self, id_list, cid, system_prompt, evt: gr.EditData, request: gr.Request):
        """Editing a reply in place is its correction; editing the proposed revision accepts it as
        edited; editing one's own message sends it again, and the conversation goes on from it (a new
        branch, streamed). The widget edits a reply and its revision together: what is unchanged is
        not news."""
        session, user = self.sessions(request)
        text = edited_text(evt.value)
        if text == edited_text(evt.previous_value):
            yield {}
            return
        entry = id_list[evt.index] if isinstance(evt.index, int) and 0 <= evt.index < len(id_list) else None
        if isinstance(entry, str) and entry.startswith("rev:"):  # the revision sits right under its reply
            yield self.accepted(session, user, entry[4:], text, cid, id_list[evt.index - 1])
            return
        mid = self.pick(session, id_list, evt.index)
        if mid is None:  # one's own message (anything else is refused by the chat service)
            yield from self.branch(session, user, cid, entry, text, system_prompt)
            return
        out = self.feedback(self.chat.correct, mid, text, request)
        if out[self.fb_status].startswith("✅"):
            out[self.fb_status] = "✅ Correction saved: the reply now reads as you wrote it."
        out.update({self.selected: mid, self.target: self.target_text(session, mid)})
        shown, id_list = self.chat_view(session, cid)
        yield {**out, self.chatbot: shown, self.ids: id_list}

    def branch(self, session, user, cid, mid, text, system_prompt):
        """The user's edited message, sent again: the conversation from there on is the new branch."""
        try:
            stream = self.chat.edit_message(session, cid, mid, text, system_prompt, user)
        except ChatInputError as e:
            yield {**self.refused(session, cid, e), self.fb_status: f"⚠️ {e}"}
            return
        shown, id_list = self.pending_view(session, cid)
        closed = {self.fb_status: "Your edited message was sent again; the earlier replies after it are kept "
                                  "in your history.", self.revision_panel: gr.Group(visible=False),
                  self.candidate_id: None}
        for out in self.stream_reply(session, stream, shown, id_list, cid):
            yield {**out, **closed}

    def on_open_critique(self, mid, id_list, request: gr.Request):
        """The critique box, aimed at the picked reply, or the latest one."""
        session, _ = self.sessions(request)
        mid = mid or next((m for m in reversed(id_list) if self.pick(session, [m], 0)), None)
        return {self.critique_panel: gr.Group(visible=True), self.selected: mid,
                self.target: self.target_text(session, mid)}

    def on_close_critique(self):
        return {self.critique_panel: gr.Group(visible=False)}

    # -- the proposed revision ------------------------------------------------------------------
    def on_revise(self, mid, text, keep_rule, for_everyone, cid, offered, request: gr.Request):
        session, user = self.sessions(request)
        try:
            fid, stream = self.chat.revise(session, mid, text, user)
        except ChatInputError as e:
            yield {self.fb_status: f"⚠️ {e}"}
            return
        if offered:  # a new critique replaces the offer still open: one offer at a time
            try:
                self.chat.reject_revision(session, offered, status="dropped")
            except ChatInputError:
                pass  # already accepted or dismissed
        note = "✅ Critique saved."
        rules = {}
        if keep_rule:
            try:
                self.chat.save_guideline(session, text, user, bool(for_everyone), fid)
                note += " Kept as your guideline" + (" (suggested for everyone)." if for_everyone else ".")
                rules = self.rules_outputs(session, user)
            except ChatInputError as e:
                note += f" ⚠️ {e}"
        elif looks_like_rule(text):
            note += " This reads like a lasting preference: tick “apply from now on” to keep it."
        closed = {self.critique: "", self.critique_panel: gr.Group(visible=False), self.keep: False,
                  self.everyone: False, **rules}  # the ticks were for this critique only
        for out in self.revision_steps(session, cid, mid, stream, fid, note, note):
            yield {**out, **closed}

    def revision_steps(self, session, cid, mid, stream, fid, note, done_note):
        """The revision while it is drafted (in the chat, under the reply it revises), then the offer
        as stored, or why there is none; Accept, Edit and Dismiss only when there is an offer."""
        messages, fb, _ = self.chat_state(session, cid)
        for upd in stream:
            if not upd.done:
                shown, id_list = self.view(messages, fb, {"message_id": mid, "text": upd.text, "pending": True})
                yield {self.fb_status: note, self.critique: "", self.revision_panel: gr.Group(visible=True),
                       self.revision_note: DRAFTING,
                       self.revision: "", **self.offer_buttons(False),
                       self.critique_id: fid, self.candidate_id: None, self.chatbot: shown, self.ids: id_list}
                continue
            shown, id_list = self.chat_view(session, cid)
            if upd.error:
                gr.Warning(upd.error)
            yield {self.fb_status: done_note, self.critique: "", self.revision_panel: gr.Group(visible=True),
                   self.revision_note: f"⚠️ {inert(upd.error)}" if upd.error else REVISION_READY,
                   self.revision: upd.text,  # a plain value: API clients read it as text
                   **self.offer_buttons(upd.error is None), self.critique_id: fid,
                   self.candidate_id: upd.candidate_id, self.chatbot: shown, self.ids: id_list}

    def on_again(self, fid, cand, cid, request: gr.Request):
        session, user = self.sessions(request)
        try:
            stream = self.chat.revise_again(session, fid, user)  # refused (not yours, too fast): keep the offer
            if cand:
                self.chat.reject_revision(session, cand, status="dropped")
        except ChatInputError as e:
            yield {self.fb_status: f"⚠️ {e}"}
            return
        yield from self.revision_steps(session, cid, self.chat.critiqued_reply(session, fid), stream, fid,
                                       "Trying again…", "")

    def accepted(self, session, user, cand, text, cid, mid):
        """Accept the offered revision (as the user edited it) as the reply's correction."""
        try:
            self.chat.accept_revision(session, cand, text, user)
        except ChatInputError as e:
            return {self.fb_status: f"⚠️ {e}"}
        note = "✅ Revision accepted: saved as the corrected reply."
        gr.Info(note)
        shown, id_list = self.chat_view(session, cid)
        return {self.fb_status: note, self.revision_panel: gr.Group(visible=False), self.revision_note: "",
                self.revision: gr.Textbox(visible=False, interactive=False),  # Edit opens it for the next offer
                self.candidate_id: None, self.chatbot: shown, self.ids: id_list, self.selected: mid,
                self.target: self.target_text(session, mid)}

    def on_accept(self, cand, text, cid, mid, request: gr.Request):
        return self.accepted(*self.sessions(request), cand, text, cid, mid)

    def on_dismiss(self, cand, cid, request: gr.Request):
        session, _ = self.sessions(request)
        try:
            self.chat.reject_revision(session, cand)
        except ChatInputError as e:
            return {self.fb_status: f"⚠️ {e}"}
        shown, id_list = self.chat_view(session, cid)
        return {self.fb_status: "Revision dismissed (noted, so the model learns what not to say).",
                self.revision_panel: gr.Group(visible=False), self.revision: gr.Textbox(visible=False, interactive=False),
                self.candidate_id: None, self.chatbot: shown, self.ids: id_list}

    def on_edit_revision(self):
        return {self.revision: gr.Textbox(visible=True, interactive=True)}

    # -- guidelines -----------------------------------------------------------------------------
    def on_save_guideline(self, text, request: gr.Request):
        session, user = self.sessions(request)
        try:
            self.chat.save_guideline(session, text, user)
        except ChatInputError as e:
            return {self.fb_status: f"⚠️ {e}"}
        return {self.fb_status: "✅ Guideline saved: it applies to your next replies.", self.rule_text: "",
                **self.rules_outputs(session, user)}

    def on_remove_guideline(self, guideline_id, request: gr.Request):
        session, user = self.sessions(request)
        try:
            self.chat.remove_guideline(session, guideline_id, user)
        except ChatInputError as e:
            return {self.fb_status: f"⚠️ {e}"}
        return {self.fb_status: "Guideline removed.", **self.rules_outputs(session, user)}
