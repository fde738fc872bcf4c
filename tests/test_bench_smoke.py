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
