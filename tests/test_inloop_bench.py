"""bench/inloop_bench.py's report: the share of offered revisions and guided replies that follow the critique
AND keep the prompt's known answer (issue 23: a revision in the requested form that is wrong is no revision)."""

from bench.inloop_bench import report

MACHINE = {"host_cpus": 2, "load_avg_1m_at_start": 0.1, "time_utc": "2026-12-06T00:00:00Z"}


def rev(offered: bool, passes: bool, right) -> dict:
    return {"ttft_s": 0.1, "offered_s": 1.0, "offered": offered, "passes": passes, "right": right,
            "both": None if right is None else bool(right and passes)}


def test_the_report_counts_revisions_and_replies_that_follow_and_stay_right():
    results = {"machine": MACHINE, "families": {
        "capitals": {"revisions": [rev(True, True, True), rev(True, True, False), rev(False, False, False)],
                     "guideline": {"with": [True, True, False], "with_right": [True, False, True],
                                   "without": [False, True, False], "without_right": [True, True, True]}},
        "tone": {"revisions": [rev(True, True, None)],  # no known answer: never counted as right or wrong
                 "guideline": {"with": [True], "without": [False], "with_right": [], "without_right": []}},
    }}
    md = report(results)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in md.splitlines()
            if line.startswith("| capitals") or line.startswith("| tone")}
    assert rows["capitals"] == ["2/3", "2/3", "1/3", "2/3", "1/3", "1/3", "1/3"]
    assert rows["tone"] == ["1/1", "1/1", "n/a", "1/1", "n/a", "0/1", "n/a"]


def test_patience_values_compared_side_by_side_get_a_line_each():
    """--patience 0 2: the same prompts critiqued once per value; each value's offers and times apart."""
    def timed(patience, offered_s, offered=True, right=True):
        return dict(rev(offered, offered, right), patience=patience, offered_s=offered_s)

    revs = [timed(0, 12.0), timed(2, 6.0), timed(0, 20.0, right=False), timed(2, 8.0, offered=False)]
    md = report({"machine": MACHINE, "families": {"capitals": {"revisions": revs, "guideline": {
        "with": [], "without": [], "with_right": [], "without_right": []}}}})
    lines = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in md.splitlines()
             if line.startswith("| patience ")}
    assert lines["patience 0"] == ["2", "2", "16.00", "16.00", "1/2"], lines
    assert lines["patience 2"] == ["2", "1", "6.00", "7.00", "1/2"], lines
    # one value (the default): no such table
    assert "| way |" not in report({"machine": MACHINE, "families": {"capitals": {"revisions": revs[:1],
                                         "guideline": {"with": [], "without": []}}}})


def test_each_way_compared_gets_a_line_and_the_headline_is_the_first_ways():
    """Rows that name their way (a patience value, or another variant a run compared): each way apart."""
    revs = [dict(rev(True, True, True), variant="patience 2", patience=2, offered_s=9.0),
            dict(rev(False, False, None), variant="patience 2, no second look", patience=2, offered_s=7.0)]
    md = report({"machine": MACHINE, "families": {"capitals": {"revisions": revs, "guideline": {
        "with": [], "without": [], "with_right": [], "without_right": []}}}})
    lines = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in md.splitlines()
             if line.startswith("| patience ")}
    assert lines == {"patience 2": ["1", "1", "9.00", "9.00", "1/1"],
                     "patience 2, no second look": ["1", "0", "nan", "7.00", "0/0"]}, lines
    # the headline and the per-family table are the first way's alone
    assert "| capitals | 1/1 |" in md and "median 9.00 s" in md, md
