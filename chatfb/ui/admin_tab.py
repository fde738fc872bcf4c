"""The admin tab: adapter versions and their gate metrics, training progress, train now,
promote / rollback, and a compare view (same prompt, base vs previous vs current adapter).

Everything is behind `check_admin` (a password from CHATFB_ADMIN_PASSWORD, or a Hugging Face
login on the CHATFB_ADMIN_HF_USERS allowlist). With neither configured the tab stays locked.
The unlocked flag lives in server-side session state, so a browser cannot forge it. Wrong
passwords are throttled per client address and overall (`unlock_admin`, chatfb.ui.throttle).
"""

from __future__ import annotations

import inspect
import json
import logging
import re
import secrets
import time

import gradio as gr
import pandas as pd

from chatfb.app.admin import AdminError, AdminService, CycleRunning
from chatfb.app.runtime import Runtime
from chatfb.learning.gate import GateReport
from chatfb.serving.adapters import AdapterError
from chatfb.serving.model_client import ModelError
from chatfb.ui.api_types import takes_ids
from chatfb.ui.throttle import GuessThrottle

log = logging.getLogger(__name__)


def check_admin(rt: Runtime, password: str | None, profile) -> bool:
    s = rt.settings
    if s.admin_password and password and secrets.compare_digest(password.encode(), s.admin_password.encode()):
        return True
    username = getattr(profile, "username", None)
    return bool(username and username in s.admin_hf_user_list)


WRONG_PASSWORD = "⚠️ Wrong password (or your account is not on the admin list)."


def unlock_admin(rt: Runtime, throttle: GuessThrottle, password: str | None, profile, client: str) -> tuple[bool, str]:
    """(unlocked, message) for one unlock attempt. An allowlisted Hugging Face login needs no password;
    a password is not even compared while `client` (or everyone) must wait after wrong guesses."""
    username = getattr(profile, "username", None)
    if username and username in rt.settings.admin_hf_user_list:
        return True, "Unlocked."
    if not password:
        return False, WRONG_PASSWORD
    wait = throttle.wait_s(client)
    if wait > 0:
        log.warning("admin unlock from %s refused unchecked: throttled for %.0f s", client, wait)
        return False, f"⚠️ Too many wrong passwords. Try again in {int(wait) + 1} s."
    if check_admin(rt, password, None):
        throttle.succeeded(client)
        log.info("admin unlocked from %s", client)
        return True, "Unlocked."
    n = throttle.failed(client)  # never log the guess itself: it may be a mistyped real password
    log.warning("admin unlock failed from %s (%d wrong since its last success or a quiet hour)", client, n)
    return False, WRONG_PASSWORD


def adapters_frame(admin: AdminService) -> pd.DataFrame:
    rows = []
    for a in admin.adapters():
        m = GateReport.from_dict(a["metrics"])
        rows.append({"name": a["name"], "for": a.get("owner") or "everyone", "status": a["status"], "parent": a["parent"] or "base",
                     "created": str(a["created_at"])[:19], "rougeL": m.candidate_rougeL,
                     "bleu": m.candidate_bleu, "control": m.control_agreement,
                     "examples": (a["data_counts"] or {}).get("train_examples"), "note": a["error"] or m.decision,
                     "deleted users' data": (f"{a['deleted_users']} user(s): kept until the next cycle retrains"
                                             if a.get("deleted_users") else "")})
    return pd.DataFrame(rows, columns=["name", "for", "status", "parent", "created", "rougeL", "bleu", "control", "examples", "note",
                                       "deleted users' data"])


def metrics_frame(admin: AdminService) -> pd.DataFrame:
    rows = []
    for a in admin.adapters():
        m = GateReport.from_dict(a["metrics"])
        bleu = None if m.candidate_bleu is None else m.candidate_bleu / 100
        for label, value in (("ROUGE-L", m.candidate_rougeL), ("BLEU/100", bleu), ("control", m.control_agreement)):
            if value is not None:
                rows.append({"adapter": a["name"], "metric": label, "value": float(value)})
    return pd.DataFrame(rows, columns=["adapter", "metric", "value"])


def feedback_frame(admin: AdminService) -> pd.DataFrame:
    return pd.DataFrame([{"day": str(d), "kind": k, "count": n} for d, k, n in admin.feedback_per_day()],
                        columns=["day", "kind", "count"])


CANDIDATE_COLUMNS = ["score", "verdict", "status", "critique", "candidate", "prompt", "cycle", "author", "kind", "scope"]  # the judgement first


def candidates_frame(admin: AdminService, limit: int = 200) -> pd.DataFrame:
    """What the learning cycles would train on and what they dropped (newest first): every candidate
    answer made from a critique or guideline, its score and verdict, kept or dropped."""
    rows = [{"cycle": c["cycle"], "critique": c["details"].get("critique", ""), "prompt": c["details"].get("prompt", ""),
             "candidate": c["text"], "score": None if c["score"] is None else round(c["score"], 3),
             "verdict": c["verdict"], "status": c["status"], "author": c["details"].get("author", ""),
             "kind": c["details"].get("feedback_kind", ""), "scope": c["details"].get("scope", "")}
            for c in admin.candidates(limit)]
    return pd.DataFrame(rows, columns=CANDIDATE_COLUMNS)


def topics_frame(admin: AdminService, top: int = 10) -> pd.DataFrame:
    """Most-critiqued topics: critiques grouped by meaning (AdminService.critique_topics), each named by its
    most central critique."""
    rows = [{"topic": label if len(label) <= 60 else label[:59] + "…", "critiques": n}
            for label, n in admin.critique_topics(top)]
    return pd.DataFrame(rows, columns=["topic", "critiques"])


RETIRE_FROM_PROMPT_AT = 0.9  # the live adapter follows a guideline this often without it: the prompt may drop it


def guidelines_frame(admin: AdminService) -> pd.DataFrame:
    """Guidelines for everyone (suggested or approved), with how often the live adapter follows each
    without it in the prompt (the gate's `guideline_follow`), and whether to retire it from the prompt."""
    live = admin.live_adapter()
    follow = GateReport.from_dict((live or {}).get("metrics")).guideline_follow
    rows = []
    for g in admin.global_guidelines():
        rate = follow.get(g["id"])
        advice = ""
        if g["status"] == "pending":
            advice = "awaiting approval"
        elif g["status"] == "active" and rate is not None and rate >= RETIRE_FROM_PROMPT_AT:
            advice = f"the live adapter follows it {rate:.0%} of the time: retire it from the prompt"
        rows.append({"id": g["id"], "text": g["text"], "status": g["status"], "suggested by": g["user_name"] or "-",
                     "live adapter follows": None if rate is None else round(rate, 2), "advice": advice})
    return pd.DataFrame(rows, columns=["id", "text", "status", "suggested by", "live adapter follows", "advice"])


def guideline_choices(admin: AdminService) -> list[tuple[str, str]]:
    """(what the admin reads, the guideline's id) for picking a guideline to approve, edit or retire."""
    out = []
    for g in admin.global_guidelines():
        text = g["text"] if len(g["text"]) <= 80 else g["text"][:79] + "…"
        out.append((f"[{g['status']}] {text}", g["id"]))
    return out


def guideline_text(admin: AdminService, guideline_id: str | None) -> str:
    """The text of the guideline picked (empty when none is)."""
    return next((g["text"] for g in admin.global_guidelines() if g["id"] == guideline_id), "")


def compare_view(admin: AdminService, prompt: str) -> tuple[str, str, str]:
    """The compare view's three replies; where a version does not exist, why."""
    base, prev, cur = admin.compare(prompt)
    previous, live = admin.compare_names()
    if prev == "(none)" and previous is None:
        prev = "(no previous version: the base model is live)" if live is None else "(no previous version yet)"
    if cur == "(none)" and live is None:
        cur = "(no adapter is live: the base model answers)"
    return base, prev, cur


def set_guideline(admin: AdminService, guideline_id: str, action: str, text: str = "") -> str:
    if action == "edit":
        admin.edit_guideline(guideline_id, text)
        return "Guideline edited."
    admin.set_guideline_status(guideline_id, "active" if action == "approve" else "retired")
    return "Guideline approved: it applies to all new replies." if action == "approve" else "Guideline retired."


REVIEW_COLUMNS = ["group", "would teach", "id", "author", "kind", "question", "text", "why it waits"]


def review_view(admin: AdminService) -> tuple[str, pd.DataFrame, list[tuple[str, str]]]:
    """The review queue (chatfb.learning.trust): how much waits, in one line (the policy is the line above the
    queue, `policy_line`), the rows waiting, grouped by what they would teach, and the choices to select them by."""
    groups = admin.review_queue()
    rows, choices = [], []
    for n, g in enumerate(groups, 1):
        teaches = (f"{g['question'][:60]} → {g['teaches'][:80]} ({len(g['rows'])} row(s) from {g['authors']} "
                   f"author(s), {g['users']} counted as agreeing)")
        for r in g["rows"]:
            rows.append({"group": n, "would teach": teaches, "id": r["id"], "author": r["author"],
                         "kind": r["feedback_kind"], "question": r["question"], "text": r["text"], "why it waits": r["reason"]})
            choices.append((f"{n}: {r['author']}: {r['text'][:60]}", r["id"]))
    head = (f"**{len(rows)} row(s)** in {len(groups)} group(s) wait for review: approve to teach everyone, reject "
            "to keep what they teach out of every shared adapter." if groups else "Nothing waits for review.")
    return head, pd.DataFrame(rows, columns=REVIEW_COLUMNS), choices


UPTAKE_COLUMNS = ["learned", "question", "adapter", "model", "author", "kind", "measure", "score", "answer", "id"]


def uptake_view(admin: AdminService, name: str | None = None) -> tuple[str, pd.DataFrame, pd.DataFrame]:
    """Uptake (AdminService.uptake): the share learnt in one line, per cluster of similar questions, per item."""
    try:
        report = admin.uptake(name)
    except AdminError as e:
        return f"⚠️ {e}", gr.update(), gr.update()
    head = (f"Learned **{report['learned']} of {report['checked']}** items checked ({report['share']:.0%})."
            if report["checked"] else "No uptake checked yet: a cycle checks what it trained on when it promotes an adapter.")
    clusters = pd.DataFrame([{"share learned": c["share"], "learned": c["learned"], "items": c["items"],
                              "questions like": c["topic"]} for c in report["clusters"]],
                            columns=["share learned", "learned", "items", "questions like"])
    items = pd.DataFrame([{"learned": "yes" if i["learned"] else "no", "question": i["question"], "adapter": i["adapter"],
                           "model": i["model"], "author": i["author"], "kind": i["feedback_kind"], "measure": i["measure"],
                           "score": i["score"], "answer": i["answer"], "id": i["feedback_id"]} for i in report["items"]],
                         columns=UPTAKE_COLUMNS)
    return head, clusters, items


def policy_line(admin: AdminService) -> str:
    """Whose feedback the shared model learns from, in one line (chatfb.learning.trust.Policy.describe)."""
    from chatfb.learning.trust import Policy

    policy = Policy.from_settings(admin.settings)
    return ("⚠️ " if policy.mode == "open" else "") + f"**Trust policy:** {policy.describe()}."


def decide_review(admin: AdminService, ids: list[str], decision: str) -> str:
    """Approve or reject the selected rows; a row that no longer exists fails the whole decision, clearly."""
    if not ids:
        return "⚠️ Select the rows to decide on."
    try:
        admin.review(list(ids), decision)
    except AdminError as e:
        return f"⚠️ {e}"
    return (f"{len(ids)} row(s) {decision}: " + ("they train the shared model from the next cycle on."
                                                 if decision == "approved" else
                                                 "they, and anything on their question, never train the shared model."))


class StepClock:
    """When this process first saw each training step in the log, so an ETA rests on measured step times:
    remaining steps × the mean seconds per step between the steps seen (none before two were seen)."""

    def __init__(self):
        self.seen: dict[tuple, dict[int, float]] = {}

    def eta_s(self, phase_key: tuple, step: int, total: int, now: float) -> float | None:
        times = self.seen.setdefault(phase_key, {})
        times.setdefault(step, now)
        if len(self.seen) > 50:  # old cycles' phases
            self.seen.pop(next(iter(self.seen)))
        if len(times) < 2:
            return None
        (s0, t0), (s1, t1) = min(times.items()), max(times.items())
        if s1 <= s0 or t1 <= t0:
            return None
        return (t1 - t0) / (s1 - s0) * max(total - step, 0)


STEP_CLOCK = StepClock()
PHASES = {"preparing data": "preparing data", "selecting candidates": "selecting candidates (drafting and scoring answers)",
          "gating": "gating: judging the new adapter on held-out feedback"}
TRAINER_PHASES = {"sft": "training", "dpo": "training (preference step)"}
LOG_PREFIX = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (INFO|WARNING|ERROR|CRITICAL) ([\w.]+): (.*)$")


def cycle_phase(lines: list[str], now: float | None = None, clock: StepClock | None = None) -> str:
    """The running cycle's phase in words, from the worker's "phase:" lines and the trainer's progress lines."""
    clock = clock or STEP_CLOCK
    for n in range(len(lines) - 1, -1, -1):
        line = lines[n]
        p = training_step(line)
        if p:
            what = TRAINER_PHASES.get(p.get("phase"), "training")
            text = f"{what}: step {p['step']} of {p['total']}"
            if p.get("loss") is not None:
                text += f", loss {p['loss']}"
            starts = sum(1 for x in lines[:n] if "phase: preparing data" in x)  # which job of the cycle
            eta = clock.eta_s((starts, p.get("phase"), p["total"]), p["step"], p["total"],
                              time.monotonic() if now is None else now)
            return text + (f", about {_duration(eta)} left (measured step times)" if eta is not None else "")
        if line.startswith('{"phase": "done"'):
            return "training finished; gating next"
        m = LOG_PREFIX.match(line)
        if m and m.group(3).startswith("phase: "):
            return PHASES.get(m.group(3)[7:], m.group(3)[7:])
        if m and m.group(3).startswith("training: "):
            return "training: loading the model"
    return "preparing data"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def shown_log(lines: list[str], keep: int = 25) -> str:
    """The log lines an admin reads: chatfb's own, and warnings or errors from anything; not the internal
    trainer command, its progress JSON, the cycle's summary, or libraries' raw output (all in the log file)."""
    out = []
    for line in lines:
        m = LOG_PREFIX.match(line)
        if not m:
            continue
        level, name, message = m.groups()
        ours = name.startswith("chatfb") or name == "__main__"  # the cycle's child and trainer run as __main__
        if level == "INFO" and (not ours or message.startswith("training: ")):
            continue
        out.append(line)
    return "\n".join(out[-keep:])


def outcome_line(result: dict, who: str = "") -> str:
    """One learning job's outcome in words (a CycleResult as a dict)."""
    adapter, reason = result.get("adapter"), result.get("reason") or ""
    head = f"{who}: " if who else ""
    if result.get("promoted"):
        counts = result.get("counts") or {}
        learnt = (f"; learned {counts['uptake_learned']} of the {counts['uptake_checked']} trained items asked again"
                  if counts.get("uptake_checked") else "")  # chatfb.learning.uptake
        return f"{head}promoted {adapter}: {reason}{learnt}"
    if not adapter:
        return f"{head}nothing trained: {reason}"
    if not result.get("ok"):
        return f"{head}{adapter} failed: {reason}"
    return f"{head}not promoted ({adapter}): {reason}"


def cycle_outcome(admin: AdminService) -> str:
    """The last finished cycle's outcome in words: the shared model's, then each personal adapter's."""
    result = admin.last_cycle()
    if not result:  # none finished since the app started: the newest adapter row says what its gate decided
        rows = [a for a in admin.adapters() if not a.get("owner")]
        if not rows:
            return ""
        a = max(rows, key=lambda r: str(r["created_at"]))
        why = a["error"] or GateReport.from_dict(a["metrics"]).decision
        said = {"live": "is live", "rejected": "was not promoted", "failed": "failed", "candidate": "passed the gate, not promoted",
                "retired": "was retired", "training": "is training"}.get(a["status"], a["status"])
        return f"{a['name']} {said}" + (f": {why}" if why else "")
    owners = {a["name"]: a.get("owner") for a in admin.adapters()}
    lines = [outcome_line(result, "Shared model" if result.get("personal") else "")]
    for p in result.get("personal") or []:
        lines.append(outcome_line(p, f"Personal adapter of {owners.get(p.get('adapter')) or 'a user'}"))
    return "\n".join(f"- {line}" for line in lines) if len(lines) > 1 else lines[0]


def training_progress(admin: AdminService, now: float | None = None) -> tuple[str, str]:
    cycle = admin.cycle_log()
    if cycle is None:
        return "No learning cycle has run yet.", ""
    running, lines = cycle
    if running:
        return f"**Learning cycle running:** {cycle_phase(lines, now)}.", shown_log(lines)
    outcome = cycle_outcome(admin)
    head = "**Learning cycle finished:** " + ("\n" + outcome if outcome.startswith("- ") else outcome or "see the log.")
    return head, shown_log(lines)


def training_step(line: str) -> dict | None:
    """One of the trainer's progress lines (chatfb.learning.train prints a JSON object per optimizer step), else None."""
    if not line.startswith("{"):
        return None
    try:
        p = json.loads(line)
    except ValueError:
        return None
    ok = isinstance(p, dict) and isinstance(p.get("step"), int) and isinstance(p.get("total"), int)
    return p if ok else None


def replicas_frame(admin: AdminService) -> pd.DataFrame:
    """Each model replica behind the router and the version it serves (asked now, one token each)."""
    answers = {True: "yes", False: "NO", None: "-"}
    rows = [{"replica": r.url, "up": "yes" if r.up else "DOWN", "versions loaded": ", ".join(r.adapters) or "-",
             "answers with the live version": answers[r.serves_live]} for r in admin.replica_states()]
    return pd.DataFrame(rows, columns=["replica", "up", "versions loaded", "answers with the live version"])


def gate_plot() -> gr.ScatterPlot:
    """Gate metrics per adapter version as points: a line through a single version draws nothing."""
    return gr.ScatterPlot(x="adapter", y="value", color="metric", title="Gate metrics per adapter version",
                          y_lim=[0, None])


def topics_plot() -> gr.BarPlot:
    """Critiques per topic, counted from 0."""
    return gr.BarPlot(x="topic", y="critiques", title="Most-critiqued topics (critiques grouped by meaning)",
                      y_lim=[0, None], x_label_angle=-30, sort="-y")


def build(rt: Runtime) -> None:
    s, admin = rt.settings, rt.admin
    with gr.Tab("Admin"):
        unlocked = gr.State(False)
        if not s.admin_enabled:
            gr.Markdown("Admin actions are **off**: set `CHATFB_ADMIN_PASSWORD` (or `CHATFB_ADMIN_HF_USERS` on a Space).")
            return
        with gr.Row():
            password = gr.Textbox(label="Admin password", type="password", elem_id="admin-password")
            unlock = gr.Button("Unlock", elem_id="admin-unlock")
            if s.admin_hf_user_list:
                gr.LoginButton()
        login_msg = gr.Markdown("", label="Login status", show_label=False)
        with gr.Column(visible=False) as panel:
            with gr.Row():
                train = gr.Button("Train now", variant="primary", elem_id="train-now")
                refresh = gr.Button("Refresh")
                export = gr.Button("Export data")
                rollback = gr.Button("Roll back")
                name = gr.Textbox(label="Adapter to promote", placeholder="chatfb-v0001", scale=1)
                promote = gr.Button("Promote")
            action_msg = gr.Markdown("", label="Outcome", show_label=False, elem_id="admin-msg")
            progress = gr.Markdown("", elem_id="train-progress")
            train_log = gr.Textbox(label="Learning cycle log", lines=8, max_lines=8, interactive=False)
            table = gr.Dataframe(label="Adapter versions", interactive=False)
            plot = gate_plot()
            with gr.Row():
                per_day = gr.BarPlot(x="day", y="count", color="kind", title="Feedback per day")
                topics = topics_plot()
            if admin.replicated:
                with gr.Accordion("Model replicas", open=True):
                    check_replicas = gr.Button("Check replicas")
                    replica_table = gr.Dataframe(label="Each replica behind the router", interactive=False,
                                                 elem_id="admin-replicas")
                check_replicas.click(lambda ok: replicas_frame(admin) if ok else gr.update(), [unlocked], [replica_table],
                                     api_visibility="private")
            with gr.Accordion("Guidelines for everyone", open=True):
                guide_table = gr.Dataframe(label="Suggested and approved guidelines", interactive=False,
                                           elem_id="admin-guidelines")
                with gr.Row():
                    guide_id = takes_ids(gr.Dropdown(label="Guideline (pick by its text)", choices=[], scale=2,
                                                     elem_id="admin-guideline-id",
                                                     allow_custom_value=True))  # the API and CLI name it by id
                    guide_text = gr.Textbox(label="New text (Edit)", scale=3)
                    approve_g = gr.Button("Approve", elem_id="admin-approve-guideline")
                    edit_g = gr.Button("Edit")
                    retire_g = gr.Button("Retire")
            with gr.Accordion("Training candidates from critiques (audit)", open=False):
                cand_table = gr.Dataframe(label="Kept ones train in the cycle named; dropped ones say why", interactive=False,
                                          wrap=True, elem_id="admin-candidates")
            trust_line = gr.Markdown("", elem_id="admin-trust-policy")  # an open install is named here at once
            with gr.Accordion("Review queue: what may teach everyone", open=False):
                review_head = gr.Markdown("", elem_id="admin-review-policy")
                load_review = gr.Button("Load the review queue")
                review_table = gr.Dataframe(label="Waiting rows, grouped by what they would teach", interactive=False,
                                            wrap=True, elem_id="admin-review")
                review_pick = takes_ids(gr.CheckboxGroup(label="Select rows", choices=[], elem_id="admin-review-pick"),
                                        many=True)
                with gr.Row():
                    approve_r = gr.Button("Approve selected", elem_id="admin-review-approve")
                    reject_r = gr.Button("Reject selected", elem_id="admin-review-reject")
            with gr.Accordion("Uptake: what the models learnt of the feedback they trained on", open=False):
                with gr.Row():
                    uptake_name = gr.Textbox(label="Adapter (empty: the live ones)", scale=2, elem_id="admin-uptake-name")
                    load_uptake = gr.Button("Load uptake", elem_id="admin-uptake-load")
                uptake_head = gr.Markdown("", elem_id="admin-uptake-head")
                uptake_clusters = gr.Dataframe(label="Per cluster of similar questions", interactive=False, wrap=True,
                                               elem_id="admin-uptake-clusters")
                uptake_items = gr.Dataframe(label="Per item", interactive=False, wrap=True, elem_id="admin-uptake-items")
            with gr.Accordion("Compare", open=True):
                prompt = gr.Textbox(label="Prompt", elem_id="compare-prompt")
                compare = gr.Button("Compare base / previous / current")
                with gr.Row():
                    out_base = gr.Textbox(label="Base model", lines=6)
                    out_prev = gr.Textbox(label="Previous adapter", lines=6)
                    out_cur = gr.Textbox(label="Current adapter", lines=6)

        def views(ok):
            if not ok:
                return [gr.update()] * 7
            p, logtext = training_progress(admin)
            return adapters_frame(admin), metrics_frame(admin), feedback_frame(admin), topics_frame(admin), p, logtext, ""

        view_outputs = [table, plot, per_day, topics, progress, train_log, action_msg]

        throttle = GuessThrottle()

        def on_unlock(pw, request: gr.Request, profile: gr.OAuthProfile | None = None):
            client = request.client.host if request and request.client else getattr(request, "session_hash", "?")
            ok, msg = unlock_admin(rt, throttle, pw, profile, client)
            return ok, msg, gr.update(visible=ok), ""

        def guarded(fn):
            def run(ok, *args):
                if not ok:
                    return "⚠️ Unlock the admin tab first."
                try:
                    return fn(*args)
                except (AdminError, AdapterError, ModelError) as e:
                    return f"⚠️ {e}"
            # the API names run's parameters after fn's (`*args` would be param_1, param_2 ...)
            unlocked_flag = inspect.Parameter("ok", inspect.Parameter.POSITIONAL_OR_KEYWORD)
            run.__signature__ = inspect.signature(fn).replace(
                parameters=[unlocked_flag, *inspect.signature(fn).parameters.values()])
            return run

        def on_train():
            try:
                admin.start_cycle()
            except CycleRunning:
                return "A learning cycle is already running."
            return "Learning cycle started."

        def on_promote(adapter):
            admin.promote(adapter)
            return f"Now serving {adapter}."

        def on_rollback():
            target = admin.rollback()
            return f"Rolled back; now serving {target or 'the base model'}."

        def on_export():
            out = admin.export_all()
            return f"Exported to `{out.relative_to(s.data_dir)}` (sft / dpo / kto JSONL)."

        def guidelines_views(ok):
            if not ok:
                return gr.update(), gr.update()
            return guidelines_frame(admin), gr.update(choices=guideline_choices(admin), value=None)

        def on_compare(ok, text):
            if not ok:
                return "⚠️ Unlock first.", "", ""
            return compare_view(admin, text)

        unlock.click(on_unlock, [password], [unlocked, login_msg, panel, password], api_name="admin_unlock").then(
            views, [unlocked], view_outputs, api_visibility="private").then(
            guidelines_views, [unlocked], [guide_table, guide_id], api_visibility="private")
        refresh.click(views, [unlocked], view_outputs, api_visibility="private")
        train.click(guarded(on_train), [unlocked], [action_msg], api_name="train_now")
        promote.click(guarded(on_promote), [unlocked, name], [action_msg], api_name="promote").then(
            lambda ok: views(ok)[:-1], [unlocked], view_outputs[:-1], api_visibility="private")
        rollback.click(guarded(on_rollback), [unlocked], [action_msg], api_name="rollback").then(
            lambda ok: views(ok)[:-1], [unlocked], view_outputs[:-1], api_visibility="private")
        export.click(guarded(on_export), [unlocked], [action_msg], api_name="export")
        compare.click(on_compare, [unlocked, prompt], [out_base, out_prev, out_cur], api_name="compare")
        for event in (unlocked.change, refresh.click):
            event(lambda ok: candidates_frame(admin) if ok else gr.update(), [unlocked], [cand_table], api_visibility="private")
        for button, action in ((approve_g, "approve"), (edit_g, "edit"), (retire_g, "retire")):
            button.click(guarded(lambda guideline_id, text, action=action: set_guideline(admin, guideline_id, action, text)),
                         [unlocked, guide_id, guide_text], [action_msg], api_name=f"{action}_guideline").then(
                guidelines_views, [unlocked], [guide_table, guide_id], api_visibility="private")
        refresh.click(guidelines_views, [unlocked], [guide_table, guide_id], api_visibility="private")
        guide_id.change(lambda ok, gid: guideline_text(admin, gid) if ok else gr.update(), [unlocked, guide_id], [guide_text],
                        api_visibility="private")  # Edit starts from the picked guideline's text
        def review_views(ok):
            if not ok:
                return gr.update(), gr.update(), gr.update()
            head, frame, choices = review_view(admin)
            return head, frame, gr.update(choices=choices, value=[])

        review_outputs = [review_head, review_table, review_pick]
        unlocked.change(lambda ok: policy_line(admin) if ok else gr.update(), [unlocked], [trust_line],
                        api_visibility="private")
        load_review.click(review_views, [unlocked], review_outputs, api_visibility="private")
        load_uptake.click(lambda ok, n: uptake_view(admin, n) if ok else ("⚠️ Unlock first.", gr.update(), gr.update()),
                          [unlocked, uptake_name], [uptake_head, uptake_clusters, uptake_items], api_visibility="private")
        for button, decision, api_name in ((approve_r, "approved", "review_approve"), (reject_r, "rejected", "review_reject")):
            button.click(guarded(lambda feedback_ids, decision=decision: decide_review(admin, feedback_ids, decision)),
                         [unlocked, review_pick], [action_msg], api_name=api_name).then(
                review_views, [unlocked], review_outputs, api_visibility="private")
        timer = gr.Timer(3.0)
        timer.tick(lambda ok: training_progress(admin) if ok else (gr.update(), gr.update()), [unlocked],
                   [progress, train_log], show_progress="hidden", api_visibility="private")

