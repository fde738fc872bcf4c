"""A real browser (Debian chromium driven by Playwright, headless) against the running app."""

import json
import re
import shutil
import time
import uuid

import pytest

from .conftest import CHROMIUM, CHROMIUM_ARGS

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def browser():
    if not shutil.which(CHROMIUM):
        pytest.fail("Debian's chromium is missing: run `bash scripts/install.sh --test`")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def open_chat(browser, app):
    ctx = browser.new_context()
    page = ctx.new_page()
    page.goto(app.url)
    page.wait_for_selector("#model-status:has-text('Model ready')", timeout=120_000)
    return ctx, page


def bot_texts(page):
    return page.locator("#chatbot [data-testid='bot']").all_inner_texts()


def send(page, text):
    box = page.locator("#msg textarea")
    box.fill(text)
    box.press("Enter")
    # Gradio drops a submit while the previous send event still runs (trigger_mode "once"; its reply may be
    # on screen already): the text then stays in the box, nothing is sent (seen in CI: the next message never
    # reached the store). Press again until the box is taken; a second press while one runs is dropped too,
    # and a refused message stays in the box, so a few tries, then the caller's own wait says what happened.
    for _ in range(8):
        page.wait_for_timeout(400)
        if box.input_value() != text:
            return
        box.press("Enter")


def test_stream_critique_and_correct_in_a_browser(browser, app):
    ctx, page = open_chat(browser, app)
    send(page, "Tell me a short story about a robot.")
    seen = set()
    for _ in range(600):  # sample the reply while it streams
        texts = bot_texts(page)
        if texts:
            seen.add(texts[-1])
            if "chatfb-base" in texts[-1]:
                break
        page.wait_for_timeout(50)
    assert any("chatfb-base" in t for t in seen), seen
    partial = [t for t in seen if t.strip() and "chatfb-base" not in t and t.strip() != "…"]
    assert partial, "the reply appeared all at once instead of streaming"
    # the critique box under the chat, opened by its button: a critique saved without a revision
    page.locator("#open-critique").click()
    tag = uuid.uuid4().hex[:6]
    critique, correction = f"Too long; keep it to two sentences ({tag}).", f"Beep the robot fixed the lighthouse ({tag})."
    page.locator("#critique textarea").fill(critique)
    page.locator("#save-critique").click()
    page.wait_for_selector("#fb-status:has-text('feedback saved')")
    # and a written correction in the secondary form
    page.get_by_text("More feedback").click()
    page.locator("#correction textarea").fill(correction)
    page.locator("#send-correction").click()
    page.wait_for_function("document.querySelector('#correction textarea').value === ''")
    page.wait_for_selector("#fb-status:has-text('feedback saved')")
    with app.snapshot_store() as s:
        rows = s._q("SELECT f.kind, f.text, m.role FROM feedback f JOIN messages m ON m.id = f.message_id"
                    " WHERE f.text IN (?, ?)", (critique, correction))
    assert sorted((r[0], r[2]) for r in rows) == [("correction", "assistant"), ("critique", "assistant")], \
        f"the critique and the correction, each stored once against the reply: {rows}"
    ctx.close()


def test_markup_is_inert_and_sessions_are_private(browser, app):
    ctx_a, a = open_chat(browser, app)
    secret = f"secret-of-session-a-{uuid.uuid4().hex[:6]}"
    evil = ('<img src=x onerror="window.__xss=1"> <script>window.__xss=2</script> '
            f'[click me](javascript:window.__xss=3) {secret}')
    send(a, evil)
    a.wait_for_function("document.querySelectorAll(\"#chatbot [data-testid='bot']\").length > 0 && "
                        "[...document.querySelectorAll(\"#chatbot [data-testid='bot']\")].pop().innerText.includes('chatfb-base')",
                        timeout=120_000)
    for link in a.locator("#chatbot a").all():
        link.click(no_wait_after=True) if (link.get_attribute("href") or "").startswith("javascript") else None
    a.wait_for_timeout(500)
    assert a.evaluate("window.__xss") is None, "a user's markup ran as script"
    user_text = a.locator("#chatbot [data-testid='user']").last.inner_text()
    assert "<img src=x" in user_text and "<script>" in user_text, f"markup not shown as text: {user_text!r}"
    assert a.locator("#chatbot img[src='x']").count() == 0 and a.locator("#chatbot script").count() == 0, \
        "a user's <img> or <script> became an element"
    hrefs = [l.get_attribute("href") or "" for l in a.locator("#chatbot a").all()]
    assert not any(h.lower().startswith("javascript:") for h in hrefs), f"a javascript: link was rendered: {hrefs}"
    # session B: a fresh page load shows none of A's conversation
    with app.snapshot_store() as s:
        # the user's message (the model may echo the secret in its reply)
        [(a_conv,)] = s._q("SELECT conversation_id FROM messages WHERE role = 'user' AND content LIKE ?", (f"%{secret}%",))
    ctx_b, b = open_chat(browser, app)
    b.wait_for_timeout(1000)  # the page load's own conversation has been filled in
    assert secret not in b.content(), "session B sees session A's message"
    assert b.locator("#chatbot [data-testid='user']").count() == 0, "a fresh session shows someone's messages"
    # B chats, and its next message carries A's conversation id where the UI keeps the conversation
    own, forged = f"Hello from session B ({uuid.uuid4().hex[:6]}).", f"Show me the chat ({uuid.uuid4().hex[:6]})."
    send(b, own)
    last_bot_done(b)
    sent = []

    def with_a_conversation(route):
        body = route.request.post_data_json
        if body and forged in json.dumps(body.get("data")) and len(body["data"]) == 3:
            body["data"][2] = a_conv  # on_send's inputs: message, system prompt, conversation id
            sent.append(body)
            return route.continue_(post_data=json.dumps(body))
        route.continue_()

    b.route("**/queue/join*", with_a_conversation)
    send(b, forged)
    # the server either ignores the id (its conversation state is its own: B's chat goes on) or refuses it
    b.wait_for_function("document.querySelector('.toast-body') || (() => {"
                        " const u = [...document.querySelectorAll(\"#chatbot [data-testid='user']\")].pop();"
                        " const r = [...document.querySelectorAll(\"#chatbot [data-testid='bot']\")].pop();"
                        f" return u && u.innerText.includes({forged!r}) && r && r.innerText.includes('chatfb-base'); }})()",
                        timeout=120_000)
    assert sent and a_conv in json.dumps(sent[0]["data"]), "the forged request with A's conversation id was not sent"
    assert secret not in b.content(), "a forged conversation id showed session A's messages to B"
    with app.snapshot_store() as s:
        in_a = [m for (m,) in s._q("SELECT content FROM messages WHERE conversation_id = ?", (a_conv,))]
    assert not any(own in m or forged in m for m in in_a), in_a  # nothing of B's went into A's conversation
    ctx_a.close()
    ctx_b.close()


def last_bot_done(page, timeout=120_000):
    page.wait_for_function("[...document.querySelectorAll(\"#chatbot [data-testid='bot']\")].pop()?.innerText"
                           ".includes('chatfb-base')", timeout=timeout)


def feedback_rows(app, mid_sql: str, params=()):
    with app.snapshot_store() as s:
        return s._q(mid_sql, params)


def test_feedback_on_the_message_itself_and_a_revision_accepted(browser, app):
    ctx, page = open_chat(browser, app)
    # A question the 135M model answers on its subject. Retries revise the same reply, so a reply off its own
    # subject sinks every try: drafts must keep the critiqued reply's content. "Give me tips for keeping a desk
    # tidy." once got "Use a Bamboo Toilet Set" and 4 tries found nothing to offer (CI, stop 31); this question
    # got an offer at the first try 12 times in 12 (a fresh reply each time, this machine).
    question = "What is a volcano?"
    send(page, question)
    last_bot_done(page)
    # the message's own like button, stored against our message id, and shown again after a reload
    page.locator("#chatbot button[aria-label='Like']").last.click()
    page.wait_for_selector("#fb-status:has-text('feedback saved')", timeout=60_000)
    page.reload()
    page.wait_for_selector("#chatbot [data-testid='bot']", timeout=30_000)
    assert question in page.locator("#chatbot [data-testid='user']").last.inner_text(), "the chat is gone after a reload"
    page.wait_for_selector("#chatbot button[aria-label='Liked']", timeout=10_000)  # the stored like, shown again
    # critique opened from the message, revision proposed, edited, accepted
    page.locator("#chatbot button[aria-label='Feedback']").last.click()
    page.locator("#chatbot .extra-feedback-option", has_text="Critique").click()
    page.wait_for_selector("#fb-status:has-text('Write your critique')")
    # a critique the 135M model can follow: its lists are numbered, so a "- " list critique is met so rarely
    # that the filters (rightly) drop every draft, and the flow under test would not be reached
    critique = "Too long. Answer in one short sentence."
    page.locator("#critique textarea").fill(critique)
    page.locator("#send-critique").click()
    page.wait_for_selector("#revision-panel")
    for attempt in range(4):  # a 135M model: a few tries may be needed for a draft the scorer keeps
        page.wait_for_function("['Revised following', 'None of the drafts', 'could not be made'].some(t => "
                               "document.querySelector('#revision-status').innerText.includes(t))", timeout=180_000)
        note = page.locator("#revision-status").inner_text()
        assert "could not be made" not in note, f"a failed generation with the server up: {note!r}"
        if "Revised following" in note or attempt == 3:
            break
        page.locator("#retry-revision").click()
        page.wait_for_function("!document.querySelector('#revision-status').innerText.includes('None of the drafts')")
    note = page.locator("#revision-status").inner_text()
    assert "Revised following" in note, f"no draft kept in 4 tries: {note!r}"
    # the proposed revision is in the conversation, under the reply it revises
    offered = page.locator("#chatbot [data-testid='bot']").last.inner_text()
    assert "Proposed revision of the reply above" in offered, offered
    page.locator("#edit-revision").click()
    box = page.locator("#revision textarea")
    edited = box.input_value().strip() + "\nIt can erupt again after centuries."
    box.fill(edited)
    page.locator("#accept-revision").click()
    page.wait_for_selector("#fb-status:has-text('Revision accepted')")
    shown = page.locator("#chatbot [data-testid='bot']").last.inner_text()
    assert "corrected by you" in shown, f"the accepted revision is not shown as the reply: {shown!r}"
    rows = feedback_rows(app, "SELECT f.kind, f.rating, f.text, f.derived_from, c.text FROM feedback f JOIN messages m"
                         " ON m.id = f.message_id LEFT JOIN feedback c ON c.id = f.derived_from"
                         " WHERE m.conversation_id = (SELECT conversation_id FROM messages WHERE content = ? ORDER BY created_at DESC"
                         " LIMIT 1)"
                         " AND f.superseded_at IS NULL", (question,))
    kinds = {r[0]: r for r in rows}
    assert {"rating", "critique", "correction"} <= set(kinds), rows
    assert kinds["rating"][1] == 1 and kinds["critique"][2] == critique, rows
    assert kinds["correction"][2] == edited.strip(), "the stored correction is not the edited revision"
    assert kinds["correction"][4] == critique, "the correction is not linked to the critique it came from"
    ctx.close()


def test_edit_in_place_is_the_correction(browser, app):
    ctx, page = open_chat(browser, app)
    send(page, "What is a volcano?")
    last_bot_done(page)
    page.locator("#chatbot button[aria-label='Edit']").last.click()
    fixed = f"A volcano is an opening in the Earth's crust where lava & ash escape <quickly> ({uuid.uuid4().hex[:6]})."
    page.locator("#chatbot textarea").fill(fixed)
    page.locator("#chatbot button[aria-label='Submit']").click()
    page.wait_for_selector("#fb-status:has-text('Correction saved')")
    shown = page.locator("#chatbot [data-testid='bot']").last.inner_text()
    assert fixed in shown, f"the edit is not shown as the reply: {shown!r}"
    rows = feedback_rows(app, "SELECT f.text FROM feedback f WHERE f.kind = 'correction' AND f.text = ?", (fixed,))
    assert rows == [(fixed,)]
    # the correction stays in view when the conversation goes on (it showed the original again)
    send(page, "Thanks. And what is lava?")
    page.wait_for_function("document.querySelectorAll(\"#chatbot [data-testid='bot']\").length >= 2", timeout=30_000)
    last_bot_done(page)
    assert fixed in page.locator("#chatbot [data-testid='bot']").first.inner_text()
    ctx.close()


def test_the_edit_box_is_wide_with_the_text_and_an_own_message_edited_makes_a_new_branch(browser, app):
    ctx, page = open_chat(browser, app)
    tag = uuid.uuid4().hex[:6]
    question = f"What are volcanoes & geysers <{tag}>? ![pixel](http://127.0.0.1:9/{tag}.png)"
    send(page, question)
    last_bot_done(page)
    assert page.locator(f"#chatbot img[src*='{tag}']").count() == 0, "a markdown image in the chat was fetched"
    chat_width = page.locator("#chatbot").bounding_box()["width"]
    page.locator("#chatbot button[aria-label='Edit']").last.click()  # the reply's edit box
    box = page.locator("#chatbot textarea")
    page.wait_for_timeout(300)
    with app.snapshot_store() as s:
        [(reply,)] = s._q("SELECT r.content FROM messages u JOIN messages r ON r.conversation_id = u.conversation_id"
                          " AND r.seq = u.seq + 1 WHERE u.content = ?", (question,))
    assert box.input_value() == reply.strip(), f"the edit box holds more than the reply's text: {box.input_value()!r}"
    assert box.bounding_box()["width"] > 0.8 * chat_width, (box.bounding_box()["width"], chat_width)
    page.locator("#chatbot button[aria-label='Cancel']").click()
    # the user's own message: its text as written, edited and sent again
    old_reply = bot_texts(page)[-1]
    page.locator("#chatbot button[aria-label='Edit']").first.click()
    page.wait_for_timeout(300)
    assert box.input_value() == question, box.input_value()
    edited = f"What is a geyser ({tag})?"
    box.fill(edited)
    page.locator("#chatbot button[aria-label='Submit']").click()
    page.wait_for_function(f"document.querySelector(\"#chatbot [data-testid='user']\")?.innerText.includes({edited!r})",
                           timeout=30_000)
    # the new reply, finished (the widget shows the edited text at once, beside the old reply)
    page.wait_for_function("(() => { const b = [...document.querySelectorAll(\"#chatbot [data-testid='bot']\")].pop();"
                           f" return b && b.innerText.includes('chatfb-base') && b.innerText !== {old_reply!r}; }})()",
                           timeout=120_000)
    assert page.locator("#chatbot [data-testid='user']").count() == 1, "the old branch is still in view"
    assert question not in page.locator("#chatbot").inner_text()
    with app.snapshot_store() as s:
        rows = s._q("SELECT m.content, m.role, m.replaced, m.status FROM messages m WHERE m.conversation_id ="
                    " (SELECT conversation_id FROM messages WHERE content = ?) ORDER BY m.seq", (question,))
    assert [(r[0], r[2]) for r in rows[:3]] == [(question, True), (reply, True), (edited, False)], rows
    assert rows[3][1:] == ("assistant", False, "ok"), rows
    page.reload()  # the new branch is the conversation
    page.wait_for_selector("#chatbot [data-testid='user']", timeout=30_000)
    assert edited in page.locator("#chatbot [data-testid='user']").last.inner_text()
    ctx.close()


def test_guidelines_panel_saves_shows_inert_and_removes(browser, app):
    ctx, page = open_chat(browser, app)
    page.locator("#guidelines-panel").click()
    rule = "Always sign off with <b>Ciao</b> at the end."
    page.locator("#guideline-text textarea").fill(rule)
    page.locator("#add-guideline").click()
    page.wait_for_selector("#fb-status:has-text('Guideline saved')")
    assert rule in page.locator("#guidelines-list").inner_text(), "the saved guideline is not listed as text"
    assert page.locator("#guidelines-list b").count() == 0, "a guideline's markup became an element"
    send(page, "Say hello.")
    last_bot_done(page)
    rows = feedback_rows(app, "SELECT r.guidelines FROM messages u JOIN messages r ON r.conversation_id = u.conversation_id"
                         " AND r.seq = u.seq + 1 WHERE u.content = 'Say hello.'")
    assert any(g and len(g) > 2 for (g,) in rows), f"the reply was not generated under the guideline: {rows}"
    page.locator("#guideline-pick input").click()
    page.locator("#guideline-pick [data-testid='dropdown-option']").first.click()
    page.locator("#remove-guideline").click()
    page.wait_for_selector("#fb-status:has-text('Guideline removed')")
    assert rule not in page.locator("#guidelines-list").inner_text(), "the removed guideline is still listed"
    ctx.close()


def test_stop_keeps_the_partial_reply(browser, app):
    ctx, page = open_chat(browser, app)
    tag = uuid.uuid4().hex[:6]
    send(page, f"Write a long story about a dragon called {tag} who learns to bake bread.")
    page.wait_for_function("(() => { const b = [...document.querySelectorAll(\"#chatbot [data-testid='bot']\")].pop();"
                           " return b && b.innerText.trim().length > 20 && !b.innerText.includes('chatfb-base'); })()",
                           timeout=120_000)
    page.locator("#stop").click()
    page.wait_for_function("[...document.querySelectorAll(\"#chatbot [data-testid='bot']\")].pop()?.innerText"
                           ".includes('(stopped)')", timeout=30_000)
    shown = page.locator("#chatbot [data-testid='bot']").last.inner_text()
    rows = feedback_rows(app, "SELECT r.status, r.content FROM messages u JOIN messages r ON r.conversation_id = "
                         "u.conversation_id AND r.seq = u.seq + 1 WHERE u.content LIKE ?", (f"%dragon called {tag}%",))
    [(status, content)] = rows
    assert status == "stopped" and len(content) > 10 and content.split()[0] in shown, \
        f"the stopped reply's partial text must be kept and shown: {status} {content!r} / {shown!r}"
    # the page settles on the whole stored text up to Stop (it used to miss the last word the store kept);
    # a stream chunk in flight at the click may show for a moment before the stopped view replaces it
    last_word = re.sub(r"\W", "", content.split()[-1])

    def shown_last_word():
        text = page.locator("#chatbot [data-testid='bot']").last.inner_text()
        return re.sub(r"\W", "", text.split("(stopped)")[0].split()[-1]), text

    deadline = time.monotonic() + 15
    while shown_last_word()[0] != last_word and time.monotonic() < deadline:
        page.wait_for_timeout(250)
    assert shown_last_word()[0] == last_word, f"the page's stopped text ends unlike the stored one: {shown_last_word()[1]!r} / {content!r}"
    ctx.close()


def test_the_conversation_list_finds_renames_and_deletes_conversations(browser, app):
    ctx, page = open_chat(browser, app)
    tag = uuid.uuid4().hex[:6]
    first = f"Name a colour ({tag})."
    send(page, first)
    last_bot_done(page)
    page.locator("#new").click()
    send(page, f"Name a fruit ({tag}).")
    last_bot_done(page)
    page.locator("button[aria-label='Toggle Sidebar']").click()
    # the list refreshed after the second send (it lists the new conversation): a click before that refresh
    # lands on a list about to be drawn again
    page.wait_for_selector(f"#conversation-list label:has-text('Name a fruit ({tag})')", timeout=30_000)
    entry = page.locator("#conversation-list label", has_text=f"Name a colour ({tag})")
    entry.click()  # the first conversation, opened from the list
    page.wait_for_function(f"document.querySelector(\"#chatbot [data-testid='user']\")?.innerText.includes({first!r})")
    assert page.locator("#chatbot [data-testid='user']").count() == 1
    page.locator("#conversation-title input").fill(f"Colours {tag}")
    page.locator("#rename-conversation").click()
    page.wait_for_selector(f"#conversation-list label:has-text('Colours {tag}')")
    page.reload()  # private to this browser, and still there after a reload
    page.wait_for_selector("#chatbot [data-testid='bot']", timeout=30_000)
    page.locator("button[aria-label='Toggle Sidebar']").click()
    page.wait_for_selector(f"#conversation-list label:has-text('Colours {tag}')")
    ctx_b = browser.new_context()
    other = ctx_b.new_page()
    other.goto(app.url)
    other.wait_for_selector("#model-status:has-text('Model ready')", timeout=120_000)
    other.wait_for_timeout(1000)
    assert tag not in other.locator("#conversation-list").inner_text()
    ctx_b.close()
    page.locator("#conversation-list label", has_text=f"Colours {tag}").click()
    page.wait_for_function(f"document.querySelector(\"#chatbot [data-testid='user']\")?.innerText.includes({first!r})")
    page.locator("#delete-conversation").click()
    page.wait_for_selector("#fb-status:has-text('Conversation deleted')")
    assert page.locator(f"#conversation-list label:has-text('Colours {tag}')").count() == 0
    assert feedback_rows(app, "SELECT count(*) FROM messages WHERE content = ?", (first,)) == [(0,)]
    ctx.close()
