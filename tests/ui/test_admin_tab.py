"""The admin tab's views, from a Runtime on a temp store (no model server, nothing launched)."""

import json

import pytest

from chatfb.app.runtime import Runtime
from chatfb.ui import admin_tab
from chatfb.ui.admin_tab import (CANDIDATE_COLUMNS, StepClock, candidates_frame, cycle_phase, gate_plot, guideline_choices,
                                 shown_log, topics_frame, topics_plot, training_progress)


@pytest.fixture
def rt(settings):
    rt = Runtime(settings.with_(vllm_url="http://127.0.0.1:9", request_timeout_s=1))
    yield rt
    rt.store.close()


def write_log(rt, lines):
    path = rt.settings.layout.nightly_log
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def test_cycle_outcome_in_words(rt, monkeypatch):
    reason = "worse on held-out feedback (ROUGE-L): ROUGE-L 0.163 vs 0.18"
    rt.store.add_adapter("chatfb-v0003", None, "training", "chatfb-v0003")
    rt.store.add_adapter("chatfb-v0004", None, "training", "chatfb-v0004", owner="alice")
    rt.store.update_adapter("chatfb-v0003", status="rejected", metrics={"decision": reason})
    write_log(rt, ["{", '  "ok": true', "}"])
    head, _ = training_progress(rt.admin)  # the app restarted since: the newest shared adapter's row says it
    assert head == "**Learning cycle finished:** chatfb-v0003 was not promoted: " + reason, head
    rt._last_cycle = (1, {"ok": True, "adapter": "chatfb-v0003", "promoted": False, "reason": reason,
                          "personal": [{"ok": True, "adapter": "chatfb-v0004", "promoted": True,
                                        "reason": "better on held-out feedback: ROUGE-L 0.300 vs 0.2"}]})
    write_log(rt, ["2026-12-05 10:00:00,000 INFO chatfb.learning.cycle: cycle done", "{", '  "ok": true', "}"])
    head, _ = training_progress(rt.admin)
    assert "not promoted (chatfb-v0003): " + reason in head, head
    assert "Personal adapter of alice: promoted chatfb-v0004: better on held-out feedback" in head, head
    rt._last_cycle = (2, {"ok": True, "adapter": "chatfb-v0005", "promoted": True, "reason": "better: ROUGE-L 0.2 vs 0.18",
                          "personal": []})
    head, _ = training_progress(rt.admin)
    assert head == "**Learning cycle finished:** promoted chatfb-v0005: better: ROUGE-L 0.2 vs 0.18", head


def test_progress_phases_hide_noise_and_eta_is_measured(rt, monkeypatch):
    monkeypatch.setattr(rt, "training_running", lambda: True)
    t = "2026-12-05 10:00:00,000 INFO "
    lines = [t + "chatfb.learning.worker: phase: preparing data"]
    write_log(rt, lines)
    assert "preparing data" in training_progress(rt.admin)[0]
    lines += [t + "__main__: phase: selecting candidates", "Loading weights: 100%|███| 103/103",
              t + "transformers.modeling_utils: loading file config.json",
              t + "__main__: training: /usr/bin/python -m chatfb.learning.train --data /x"]
    write_log(rt, lines)
    head, box = training_progress(rt.admin)
    assert "loading the model" in head, head
    assert "Loading weights" not in box and "chatfb.learning.train" not in box and "--data" not in box, box
    assert "phase: selecting candidates" in box and "config.json" not in box, box
    clock = StepClock()
    step = lambda n, eta: json.dumps({"phase": "sft", "step": n, "total": 10, "loss": 1.5, "eta_s": eta})  # noqa: E731
    lines.append(step(1, 747))
    first = cycle_phase(lines, now=100.0, clock=clock)
    assert first.startswith("training: step 1 of 10") and "left" not in first, first  # one step: nothing measured yet
    lines.append(step(3, 747))
    later = cycle_phase(lines, now=120.0, clock=clock)  # 2 steps in 20 s: 10 s a step, 7 to go
    assert "step 3 of 10" in later and "about 1 min 10 s left" in later and "747" not in later, later
    assert step(3, 747) not in shown_log(lines)
    lines.append(t + "chatfb.learning.worker: phase: gating")
    assert "gating" in cycle_phase(lines, now=130.0, clock=clock)


def test_gate_plot_shows_one_point_and_topics_start_at_zero():
    assert type(gate_plot()).__name__ == "ScatterPlot"  # a line through one version draws nothing
    assert topics_plot().y_lim[0] == 0


def test_topics_are_clusters_of_critiques(rt, monkeypatch):
    critiques = ["Too long, please be more concise.", "The answer is far too long.", "Way too long, shorten it.",
                 "Stop using so many emojis.", "Please do not use emojis.", "The code example has a syntax error."]
    monkeypatch.setattr(rt.admin, "critique_texts", lambda: critiques)
    frame = topics_frame(rt.admin)
    assert frame["critiques"].sum() == len(critiques)
    assert frame["critiques"].iloc[0] == 3 and "long" in frame["topic"].iloc[0].lower(), frame
    assert frame["topic"].iloc[1] in critiques[3:5] and frame["critiques"].iloc[1] == 2, frame


def test_guidelines_are_picked_by_text(rt):
    gid = rt.store.add_guideline("Answer in British English.", "global", "pending")
    choices = guideline_choices(rt.admin)
    assert choices == [("[pending] Answer in British English.", gid)]
    assert admin_tab.guideline_text(rt.admin, gid) == "Answer in British English."  # Edit starts from it
    assert "approved" in admin_tab.set_guideline(rt.admin, choices[0][1], "approve")


def test_candidates_show_score_and_verdict_first():
    assert CANDIDATE_COLUMNS[:2] == ["score", "verdict"]


def test_compare_says_why_there_is_no_previous_version(rt):
    class Client:
        def complete(self, messages, model, max_tokens):
            return ("base says hi", None)

    rt.admin.client = Client()
    base, prev, cur = admin_tab.compare_view(rt.admin, "hi")
    assert base == "base says hi"
    assert prev == "(no previous version: the base model is live)", prev
    assert "base model" in cur, cur
    assert candidates_frame(rt.admin).empty
