"""The trainer's command line (TRL's parser) and its progress lines, without training: the flags the
nightly cycle passes, the defaults (chatfb's settings, one set), and the JSON lines the admin view reads."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from chatfb import nightly
from chatfb.admin_view import training_progress, training_step
from chatfb.config import Settings
from chatfb.train import make_parser, progress_callback


@pytest.fixture(scope="module")
def parser():
    return make_parser()


def test_defaults_are_the_settings(parser):
    recipe, args = parser.parse_args_and_config(["--data", "d", "--base", "b", "--output_dir", "o"])
    s = Settings()
    assert (args.num_train_epochs, args.learning_rate, args.seed) == (s.train_epochs, s.learning_rate, s.seed)
    assert (recipe.rank, recipe.step_cap) == (s.lora_rank, s.train_max_steps)
    assert args.max_steps == -1 and args.logging_steps == 1 and args.report_to == []


def test_the_nightly_command_parses_to_its_settings(parser, monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(nightly.subprocess, "call", lambda cmd, **kw: calls.append(cmd) or 0)
    s = Settings(lora_rank=4, train_epochs=2.5, learning_rate=0.002, seed=7, train_max_steps=9)
    nightly.train_adapter(s, Path("/models/base"), tmp_path / "work", tmp_path / "adapters" / "v1", dpo=True)
    assert calls[0][1:3] == ["-m", "chatfb.train"]
    recipe, args = parser.parse_args_and_config(calls[0][3:])
    assert (recipe.data, recipe.base, args.output_dir) == (str(tmp_path / "work"), "/models/base",
                                                           str(tmp_path / "adapters" / "v1"))
    assert (recipe.rank, args.num_train_epochs, args.learning_rate, args.seed, recipe.step_cap, recipe.dpo_epochs) == \
        (4, 2.5, 0.002, 7, 9, 1.0)


def test_progress_is_one_json_object_per_step_and_the_admin_view_reads_it(capsys, tmp_path):
    cb = progress_callback("sft")
    state = SimpleNamespace(global_step=3, max_steps=12)
    cb.on_train_begin(None, state, None)
    cb.on_log(None, state, None, logs={"loss": 1.23456, "learning_rate": 0.001})
    cb.on_log(None, state, None, logs={"train_runtime": 5.0})  # the end-of-training summary: no progress line
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 1
    step = json.loads(printed[0])
    assert {k: step[k] for k in ("phase", "step", "total", "loss")} == {"phase": "sft", "step": 3, "total": 12, "loss": 1.2346}
    assert isinstance(step["eta_s"], int) and step["eta_s"] >= 0

    log = tmp_path / "nightly.log"
    log.write_text("\n".join([
        "2026-12-03 INFO chatfb.nightly training: python -m chatfb.train ...",
        '{"phase": "sft", "step": 2, "total": 12, "loss": 1.5, "eta_s": 9}',  # an older step
        printed[0],
        '{"phase": "sft", "step": "x"}',  # not a progress line
        "step 11/12 loss 0.5 eta 1s",  # prose is not read any more
        '{"ok": true, "adapter": "chatfb-v0001"}',  # the cycle's summary
    ]) + "\n")
    rt = SimpleNamespace(training_log_path=log, training_running=lambda: True)
    status, tail = training_progress(rt)
    assert status.startswith("Learning cycle running.") and "SFT step 3/12, loss 1.2346" in status
    assert "chatfb-v0001" in tail
    assert training_step("not json {") is None and training_step('{"step": 1}') is None
