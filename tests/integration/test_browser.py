"""A real browser (Debian chromium driven by Playwright, headless) against the running app."""

import shutil

import pytest

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run"]


@pytest.fixture(scope="module")
def browser():
    if not shutil.which(CHROMIUM):
        pytest.fail("Debian's chromium is missing: run `bash scripts/install.sh --test`")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
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
    page.locator("#msg textarea").fill(text)
    page.locator("#msg textarea").press("Enter")


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
    page.locator("#critique textarea").fill("Too long; keep it to two sentences.")
    page.locator("#send-critique").click()
    page.wait_for_selector("#fb-status:has-text('feedback saved')")
    page.locator("#correction textarea").fill("Beep the robot fixed the lighthouse and everyone cheered.")
    page.locator("#send-correction").click()
    page.wait_for_function("document.querySelector('#correction textarea').value === ''")
    page.wait_for_selector("#fb-status:has-text('feedback saved')")
    with app.snapshot_store() as s:
        rows = s._q("SELECT f.kind, f.text, m.role FROM feedback f JOIN messages m ON m.id = f.message_id"
                    " WHERE f.text IN (?, ?)", ("Too long; keep it to two sentences.",
                                                  "Beep the robot fixed the lighthouse and everyone cheered."))
    assert sorted(r[0] for r in rows) == ["correction", "critique"] and {r[2] for r in rows} == {"assistant"}
    ctx.close()


def test_markup_is_inert_and_sessions_are_private(browser, app):
    ctx_a, a = open_chat(browser, app)
    ctx_b, b = open_chat(browser, app)
    evil = ('<img src=x onerror="window.__xss=1"> <script>window.__xss=2</script> '
            '[click me](javascript:window.__xss=3) secret-of-session-a')
    send(a, evil)
    a.wait_for_function("document.querySelectorAll(\"#chatbot [data-testid='bot']\").length > 0 && "
                        "[...document.querySelectorAll(\"#chatbot [data-testid='bot']\")].pop().innerText.includes('chatfb-base')",
                        timeout=120_000)
    for link in a.locator("#chatbot a").all():
        link.click(no_wait_after=True) if (link.get_attribute("href") or "").startswith("javascript") else None
    a.wait_for_timeout(500)
    assert a.evaluate("window.__xss") is None
    user_text = a.locator("#chatbot [data-testid='user']").last.inner_text()
    assert "<img src=x" in user_text and "<script>" in user_text  # shown as text
    assert a.locator("#chatbot img[src='x']").count() == 0 and a.locator("#chatbot script").count() == 0
    assert all(not (l.get_attribute("href") or "").lower().startswith("javascript:") for l in a.locator("#chatbot a").all())
    b.wait_for_timeout(1000)
    assert "secret-of-session-a" not in b.content()
    ctx_a.close()
    ctx_b.close()
