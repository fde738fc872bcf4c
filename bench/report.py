"""What every benchmark prints and writes: percentiles, markdown tables, target checks, result files.

Full runs write bench/results/<name>.json and .md (and .png); --smoke runs write to
bench/results/raw/ (git-ignored) so a quick check never overwrites the published numbers.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def add_output_flags(p, smoke_help: str) -> None:
    """--smoke, --out-dir and --no-plot, the same for every benchmark."""
    p.add_argument("--smoke", action="store_true", help=smoke_help)
    p.add_argument("--out-dir", type=Path, default=None,
                   help="where results go (default bench/results, or bench/results/raw with --smoke)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG plot")


def default_out_dir(smoke: bool) -> Path:
    return RESULTS / "raw" if smoke else RESULTS


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100); NaN for no values."""
    xs = sorted(values)
    if not xs:
        return math.nan
    k = (len(xs) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def fmt(x, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def target(name: str, value: float | None, op: str, goal: float, unit: str = "") -> dict:
    """One target check; `ok` is None when the value could not be measured."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        ok = None
    else:
        ok = {"<": value < goal, "<=": value <= goal, ">=": value >= goal, "==": value == goal}[op]
    return {"name": name, "value": value, "target": f"{op} {goal:g}{(' ' + unit) if unit else ''}", "ok": ok}


def targets_table(targets: list[dict]) -> str:
    verdict = {True: "met", False: "MISSED", None: "not measured"}
    return markdown_table(["target", "measured", "goal", "result"],
                          [[t["name"], t["value"], t["target"], verdict[t["ok"]]] for t in targets])


def machine() -> dict:
    """Where the numbers came from: a shared, loaded machine gives noisy numbers."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"host_cpus": os.cpu_count(), "load_avg_1m_at_start": round(load[0], 2) if load else None,
            "platform": platform.platform(), "python": platform.python_version(),
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def write_results(out_dir: Path, name: str, results: dict, markdown: str) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    json_path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    md_path.write_text(markdown + "\n")
    return json_path, md_path


def publish(out_dir: Path, name: str, results: dict, markdown: str, draw=None) -> None:
    """Print the markdown, write <name>.json/.md and, given `draw` (a function of the plot's path),
    the plot <name>.png; say where they went."""
    print("\n" + markdown)
    json_path, md_path = write_results(out_dir, name, results, markdown)
    if draw is not None:
        draw(plot_path(out_dir, name))
    print(f"\nwrote {json_path} and {md_path}")


def plot_path(out_dir: Path, name: str) -> Path:
    return Path(out_dir) / f"{name}.png"


def pyplot():
    """matplotlib's pyplot on the file-only backend (benchmarks run headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path) -> None:
    """Lay out, write and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat's fields after the command name (field 3, the state, is index 0): the name may hold spaces."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process (all its threads), from /proc."""
    utime, stime = _stat_fields(pid)[11:13]  # fields 14 and 15
    return (int(utime) + int(stime)) / os.sysconf("SC_CLK_TCK")


def process_group(pgid: int) -> list[int]:
    """The pids of process group `pgid` (e.g. a vLLM server and its engine), from /proc."""
    pids = []
    for d in os.listdir("/proc"):
        try:
            if d.isdigit() and int(_stat_fields(int(d))[2]) == pgid:  # field 5
                pids.append(int(d))
        except OSError:
            continue
    return pids
