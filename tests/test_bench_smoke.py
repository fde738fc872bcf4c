"""The logging benchmark's smoke mode: real threads writing through the real Store to a real DuckDB file.

(The serving and refresh benchmarks need a vLLM server: tests/integration/test_bench_smoke.py.)
"""

import json

from bench import logging_bench


def test_logging_bench_smoke_writes_results_and_loses_no_row(tmp_path):
    results = logging_bench.main(["--smoke", "--out-dir", str(tmp_path)])

    saved = json.loads((tmp_path / "logging_bench.json").read_text())
    assert saved["levels"] == json.loads(json.dumps(results["levels"]))
    assert [lv["writers"] for lv in saved["levels"]] == [lv["writers"] for lv in saved["paced"]] == [1, 8, 32]
    assert {lv["pause_s"] for lv in saved["levels"]} == {0.0} and {lv["pause_s"] for lv in saved["paced"]} == {0.05}
    for lv in saved["levels"] + saved["paced"]:
        assert lv["errors"] == []
        rows = lv["writers"] * lv["turns_per_writer"] * 3  # per turn: user message + reply + one feedback row
        assert lv["turns_per_writer"] == (5 if lv["pause_s"] == 0 else 2)
        assert lv["wall_s"] >= lv["turns_per_writer"] * lv["pause_s"] * 0.5
        assert lv["rows_acknowledged"] == lv["rows_in_file"] == lv["rows_in_file_total"] == rows
        assert 0 < lv["turn_p50_ms"] <= lv["turn_p99_ms"]
        assert 0 < lv["feedback_p50_ms"] <= lv["feedback_p99_ms"]
        assert lv["writes_per_s"] > 0
    assert {t["name"]: t["ok"] for t in saved["targets"]}["rows in file / rows acknowledged"] is True

    markdown = (tmp_path / "logging_bench.md").read_text()
    assert "| writers | turn p50 ms | turn p99 ms |" in markdown
    assert markdown.count("\n| 32 | ") == 2 and "Paced like chats" in markdown
    assert (tmp_path / "logging_bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_efficacy_report_never_prints_an_unmeasured_number(fake_client, monkeypatch, tmp_path):
    """The base row and a mode whose cycle trained nothing have no retention, control cosine or leak to
    report (there is nothing to compare the base answers with): n/a in the table, null in the JSON."""
    import chatfb.critique.similarity
    from bench import efficacy_bench as eb

    families = list(eb.FAMILIES[:2])
    args = eb.make_parser().parse_args(["--heldout", "1", "--controls", "2", "--seeds", "1"])
    base = eb.judge(fake_client, "chatfb-base", families, args, [])
    base_control = base.pop("control_replies")
    assert (base["retention"], base["control_cosine"], base["leak"]) == (None, None, None)
    monkeypatch.setattr(chatfb.critique.similarity, "paired_cosines", lambda a, b: [0.9, 0.3])
    trained = eb.judge(fake_client, "adapter", families, args, base_control)
    assert (trained["retention"], trained["control_cosine"], trained["leak"]) == (0.5, 0.6, 0)  # measured
    trained.pop("control_replies")
    nothing = {"adapter": None, "path": None, "summary": {"reason": "no usable training examples"}, "cycle_wall_s": 9.0,
               "peak_rss_gib": 1.0, "selection": None, "accept": None}
    monkeypatch.setattr(eb, "run_mode", lambda *a, **kw: nothing)  # a cycle that trained nothing
    untrained = eb.one_run("critique", families, args, None, fake_client, {}, tmp_path, 0, base, base_control)
    assert untrained["trained"] is False and untrained["cycle_wall_s"] == 9.0
    modes = {"base": eb.aggregate([dict(base, trained=False)], families),
             "sft": eb.aggregate([dict(trained, trained=True)], families),
             "critique": eb.aggregate([untrained], families)}
    results = {"args": {"items": "2", "heldout": "1", "controls": "2", "seeds": "1"}, "modes": modes,
               "machine": {"host_cpus": 2, "load_avg_1m_at_start": 0.0, "time_utc": "now"}}
    markdown = eb.report(results, families)
    main_table = markdown.split("\n\n")[2]  # after the title and its legend
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in main_table.splitlines()
            if line.startswith("| ")}
    retention, cosine, leak = (rows["mode"].index(h) for h in ("retention", "control cos", "leak"))
    for mode in ("base", "critique"):
        assert [rows[mode][i] for i in (retention, cosine, leak)] == ["n/a"] * 3, rows[mode]
        assert modes[mode]["retention"] is modes[mode]["control_cosine"] is modes[mode]["leak"] is None
    assert [rows["sft"][i] for i in (retention, cosine, leak)] == ["0.50", "0.60", "0.0"]
    # follows / right / both beside it: the fake's "ok" follows nothing and answers nothing right
    assert "mean both" in markdown and "| base | 0.00 / 0.00 / 0.00 | 0.00 / 0.00 / 0.00 |" in markdown


def test_logging_bench_smoke_side_by_side_with_a_baseline_store(tmp_path):
    results = logging_bench.main(["--smoke", "--writers", "1", "2", "--out-dir", str(tmp_path), "--no-plot",
                                  "--baseline", "HEAD"])
    base = results["baseline"]
    assert base["rev"] == "HEAD" and len(base["levels"]) == len(results["levels"]) == 2
    assert all(lv["rows_in_file"] == lv["rows_acknowledged"] > 0 for lv in base["levels"] + base["paced"])
    assert "Side by side with the store at HEAD" in (tmp_path / "logging_bench.md").read_text()


def test_every_efficacy_family_has_known_answers_that_its_corrections_get_right():
    """Issue 23: a family checks the answer beside the preference; its own corrected replies are both."""
    from bench import efficacy_bench as eb

    assert sum(not f.tuned for f in eb.FAMILIES) >= 2
    for fam in eb.FAMILIES:
        assert fam.right is not None, fam.name
        for q, corrected in fam.teach:
            assert fam.check(corrected) and fam.right(q, corrected), (fam.name, q)
        assert not any(fam.right(q, "I am not sure.") for q in fam.heldout), fam.name  # every held-out prompt is checked
    assert set(eb.CONTROL_PROMPTS) <= set(eb.CONTROL_ANSWERS)


def test_the_scale_report_sets_the_cycle_with_kept_answers_beside_the_one_without():
    """scale_bench --again: the same cycle with the answers of the cycles before kept and with them removed."""
    from bench.scale_bench import report

    again = [{"answers": k, "cycle_wall_s": s, "timings": {"train_s": 50.0}, "answers_reused": r, "answers_asked": a}
             for k, s, r, a in (("kept", 100.0, 48, 16), ("removed", 140.0, 0, 64), ("kept", 110.0, 48, 16))]
    md = report({"cycles": [], "again": again, "duckdb": {"turns": 1, "mib": 1, "mib_per_10k_turns": 1, "write_s": 1},
                 "machine": {"host_cpus": 2, "load_avg_1m_at_start": 0, "time_utc": "now"}})
    assert "| kept | 100.00 | 48 | 16 |" in md and "| removed | 140.00 | 0 | 64 |" in md
    assert "105.0 s with the answers kept, 140.0 s without (0.75x)" in md


def test_the_efficacy_results_name_inherited_settings_never_secrets_or_its_own():
    """The results say which CHATFB_ settings the cycles inherited (e.g. CHATFB_CANDIDATE_PATIENCE=0 for an A/B run),
    never a secret, an address or users' names, nor a setting the bench or a mode sets itself."""
    import argparse

    from bench import efficacy_bench as eb

    env = {"CHATFB_CANDIDATE_PATIENCE": "0", "CHATFB_ADMIN_PASSWORD": "pw", "CHATFB_API_KEY": "k",
           "CHATFB_VLLM_URL": "http://u:pw@host", "CHATFB_REFINER_URL": "http://u:pw@big", "CHATFB_TRUSTED_USERS": "ann", "CHATFB_TRAIN_MODE": "semi",
           "CHATFB_DATA_DIR": "/x", "CHATFB_REPLAY_EXAMPLES": "8", "HOME": "/root"}
    full = argparse.Namespace(smoke=False, epochs=None)
    assert eb.inherited_settings(full, env) == {"CHATFB_CANDIDATE_PATIENCE": "0", "CHATFB_REPLAY_EXAMPLES": "8"}
    assert eb.inherited_settings(argparse.Namespace(smoke=True, epochs=1.0), env) == {"CHATFB_CANDIDATE_PATIENCE": "0"}
