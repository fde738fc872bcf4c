"""Take the README's screenshots (assets/*.png) from a real app in headless chromium.

Starts `python app.py` on a fresh temp data folder (the embedded model, a managed vLLM), the way the
integration tests do, then drives the page as a user and an admin would:

  assets/chat.png           a conversation, the conversation list open beside it
  assets/revision.png       a critique and the proposed revision, in the conversation under the reply
  assets/admin.png          the admin tab after one learning cycle: its outcome in words, the adapter table
  assets/review.png         the admin's review queue: feedback waiting to teach everyone, grouped
  assets/guideline.png      a saved guideline with a phrase to begin with: the next reply framed by it
  assets/personal.png       a browser's own corrections, its personal adapter after one cycle: "your model v1"
                            under its replies (nobody vouched for them, so they teach only this browser)

Needs Debian's chromium and an emoji font (`bash scripts/install.sh --test` installs both), ~12 minutes
on 2 cores (two short learning cycles). Run it alone: it starts its own vLLM server.

    python scripts/screenshots.py                 # writes assets/
    python scripts/screenshots.py --out /tmp/shots
    python scripts/screenshots.py --only personal # one of them
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.integration.conftest import ADMIN_PASSWORD, CHROMIUM, CHROMIUM_ARGS, launch_app, stop_app  # noqa: E402

DONE = "[...document.querySelectorAll(\"#chatbot [data-testid='bot']\")].pop()?.innerText.includes('chatfb-base')"


def send(page, text: str) -> None:
    page.locator("#msg textarea").fill(text)
    page.locator("#msg textarea").press("Enter")
    page.wait_for_function(DONE, timeout=180_000)


def untrusted_feedback(path: Path) -> Path:
    """Feedback from three anonymous people (an import that vouches for nothing): the review queue's rows."""
    rows = [{"prompt": [{"role": "user", "content": q}], "reply": r, "kind": "correction", "text": t, "user": u}
            for q, r, t, u in [
                ("How do I reach support?", "Use the website.", "Email support@chatfb.example; we answer within a day.", "ana"),
                ("Who do I write to for help?", "Ask around.", "Write to support@chatfb.example.", "ben"),
                ("What is the capital of Australia?", "Sydney.", "Canberra.", "cy"),
                ("Is Sydney Australia's capital?", "Yes.", "No: the capital is Canberra.", "ana")]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


PERSONAL_ENV = {  # one personal adapter, few steps (as tests/integration/test_learning.py's personal test,
    # with its gate tolerance: 14 steps on rows that all say one sentence may leave one control answer collapsed)
    "CHATFB_SHARED_RULES": "review", "CHATFB_PERSONAL_MAX_PER_CYCLE": "1", "CHATFB_TRAIN_MAX_STEPS": "14",
    "CHATFB_REPLAY_EXAMPLES": "12", "CHATFB_EVAL_MAX_EXAMPLES": "8", "CHATFB_GATE_MAX_CONTROL_COLLAPSED": "1"}


def guideline_shot(browser, app, out: Path) -> None:
    """A guideline with a phrase to begin with, saved in the panel; the next reply opens with it, its answer the
    model's own (chatfb.critique.constraints.framed)."""
    page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
    page.goto(app.url)
    page.wait_for_selector("#model-status:has-text('Model ready')", timeout=180_000)
    page.locator("#guidelines-panel").click()
    page.locator("#guideline-text textarea").fill("Begin every answer with 'Good question!'")
    page.locator("#add-guideline").click()
    page.wait_for_function("document.querySelector('#guidelines-list')?.innerText.includes('Good question')",
                           timeout=60_000)
    send(page, "What is the capital of Japan?")
    page.wait_for_timeout(800)
    page.screenshot(path=str(out / "guideline.png"))


def personal_shot(browser, app, out: Path, corrections: int = 30) -> bool:
    """One browser corrects `corrections` replies itself (the support address), one cycle trains its personal
    adapter, and its next reply comes from it. False (and why, on stderr) when the gate kept it back."""
    rows = [json.loads(line) for line in (ROOT / "tests" / "data" / "support_email.jsonl").read_text().splitlines()]
    page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
    page.goto(app.url)
    page.wait_for_selector("#model-status:has-text('Model ready')", timeout=180_000)
    page.get_by_text("More feedback").click()
    for i, r in enumerate(rows[:corrections]):
        send(page, r["prompt"])
        page.locator("#correction textarea").fill(r["text"])
        page.locator("#send-correction").click()
        try:
            page.wait_for_function("document.querySelector('#correction textarea')?.value === ''", timeout=60_000)
        except Exception:
            print(f"correction {i} not taken: {page.locator('#fb-status').inner_text()!r}", file=sys.stderr)
            page.screenshot(path=str(out / "personal-failed.png"))
            raise
        page.locator("#new").click()
        # the next message only once the new conversation is open (sent sooner, it went to the old one and the
        # new conversation's reset then cleared which reply the correction is for)
        page.wait_for_function("document.querySelectorAll(\"#chatbot [data-testid='bot']\").length === 0",
                               timeout=60_000)
    run = subprocess.run([sys.executable, "-m", "chatfb", "nightly"], cwd=ROOT, env=dict(app.env, **PERSONAL_ENV),
                         capture_output=True, text=True, timeout=1800)
    result = json.loads(run.stdout[run.stdout.index("{"):]) if "{" in run.stdout else {}
    personal = [p for p in result.get("personal", []) if p.get("promoted")]
    if not personal:
        print(f"no personal adapter went live: {result.get('personal') or run.stderr[-2000:]}", file=sys.stderr)
        return False
    page.reload()
    page.wait_for_selector("#model-status:has-text('Model ready')", timeout=180_000)
    page.locator("#new").click()
    page.locator("#msg textarea").fill("I have an issue with my order, how can I reach you?")
    page.locator("#msg textarea").press("Enter")
    page.wait_for_function("[...document.querySelectorAll(\"#chatbot [data-testid='bot']\")].pop()"
                           "?.innerText.includes('your model v1')", timeout=180_000)
    page.wait_for_timeout(800)
    page.screenshot(path=str(out / "personal.png"))
    return True


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "assets", help="where the PNGs go")
    p.add_argument("--only", choices=("personal", "guideline"), help="take only this one (on a fresh app of its own)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="chatfb-shots-") as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        app = launch_app(data)
        try:
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                if args.only == "personal":
                    return 0 if personal_shot(browser, app, args.out) else 1
                if args.only == "guideline":
                    guideline_shot(browser, app, args.out)
                    return 0
                app.cli("import-feedback", str(untrusted_feedback(Path(tmp) / "anon.jsonl")))
                page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
                page.goto(app.url)
                page.wait_for_selector("#model-status:has-text('Model ready')", timeout=180_000)
                send(page, "Name three colours of the rainbow.")
                page.locator("#new").click()
                send(page, "What is the capital of France?")
                page.locator("button[aria-label='Toggle Sidebar']").click()
                page.wait_for_timeout(800)
                page.screenshot(path=str(args.out / "chat.png"))
                page.locator("button[aria-label='Toggle Sidebar']").click()
                # critique -> revision, in the conversation under the reply
                page.locator("#chatbot button[aria-label='Feedback']").last.click()
                page.locator("#chatbot .extra-feedback-option", has_text="Critique").click()
                page.locator("#critique textarea").fill("Too long. Answer in one short sentence.")
                page.locator("#send-critique").click()
                for _ in range(8):  # a 135M model: a few tries may be needed for a draft the checks keep
                    page.wait_for_function("['Revised following', 'None of the drafts', 'could not be made'].some(t => "
                                           "document.querySelector('#revision-status')?.innerText.includes(t))",
                                           timeout=180_000)
                    if "Revised following" in page.locator("#revision-status").inner_text():
                        break
                    page.locator("#retry-revision").click()
                    page.wait_for_function("!document.querySelector('#revision-status').innerText.includes('None of the drafts')")
                else:
                    print("no draft kept in 8 tries: revision.png shows the last try", file=sys.stderr)
                for close in page.locator(".toast-close").all():  # the tries' notices
                    close.click()
                page.wait_for_timeout(800)
                page.screenshot(path=str(args.out / "revision.png"))
                guideline_shot(browser, app, args.out)
                # one short cycle, so the admin tab has an outcome to tell
                env = dict(app.env, CHATFB_TRAIN_MAX_STEPS="4", CHATFB_REPLAY_EXAMPLES="4", CHATFB_DISTILL_PROMPTS="2")
                subprocess.run([sys.executable, "-m", "chatfb", "nightly", "--no-promote"], cwd=ROOT, env=env,
                               capture_output=True, timeout=1800)
                admin = browser.new_context(viewport={"width": 1280, "height": 1400}).new_page()
                admin.goto(app.url)
                admin.wait_for_selector("#model-status:has-text('Model ready')", timeout=120_000)
                admin.get_by_role("tab", name="Admin").click()
                admin.locator("#admin-password input").fill(ADMIN_PASSWORD)
                admin.locator("#admin-unlock").click()
                admin.wait_for_selector("#train-progress:has-text('Learning cycle finished')", timeout=60_000)
                admin.wait_for_timeout(1500)
                admin.screenshot(path=str(args.out / "admin.png"))
                admin.get_by_text("Review queue: what may teach everyone").click()
                admin.get_by_role("button", name="Load the review queue").click()
                admin.wait_for_selector("#admin-review-pick label", timeout=60_000)
                admin.locator("#admin-review-policy").scroll_into_view_if_needed()
                admin.wait_for_timeout(800)
                admin.screenshot(path=str(args.out / "review.png"))
                shot = personal_shot(browser, app, args.out)
                browser.close()
        finally:
            stop_app(app)
    for name in ("chat", "revision", "guideline", "admin", "review", "personal")[:None if shot else 5]:
        print(args.out / f"{name}.png")
    return 0 if shot else 1


if __name__ == "__main__":
    sys.exit(main())
