"""The docs cannot drift from the tree: every file, module, test and link that README.md, docs/*.md and
bench/README.md name exists, and README.md stays the newcomer's page with the two commands CI runs."""

import ast
import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
DOCS = [ROOT / "README.md", ROOT / "bench" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PATH = re.compile(r"(?<![\w/.-])((?:chatfb|tests|bench|scripts|docs|assets)/[\w/.-]*\w)(?:::(\w+))?")
MODULE = re.compile(r"(?<![\w/.-])((?:chatfb|bench)(?:\.\w+)+)")  # chatfb.learning.cycle, chatfb.store.db.Store
NOT_MODULES = ("chatfb.duckdb", "chatfb.example")  # the database file's name, the tests' e-mail domain
NOT_IN_GIT = ("bench/results/raw",)  # made by a run (.gitignore)
BARE_FILE = re.compile(r"(?<![\w/.-])(\w+\.py)\b")  # chat_tab.py in a diagram, test_faults.py::… in a table
TEST_NAME = re.compile(r"(?<![\w/])(test_\w+)\b(?!\.py)")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@cache
def functions(path: Path) -> frozenset[str]:
    return frozenset(n.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.FunctionDef))


@cache
def python_files() -> frozenset[str]:
    trees = [ROOT.glob("*.py"), *((ROOT / d).rglob("*.py") for d in ("chatfb", "tests", "bench", "scripts"))]
    return frozenset(p.name for tree in trees for p in tree)


@cache
def defined_tests() -> frozenset[str]:
    return frozenset().union(*(functions(p) for p in (ROOT / "tests").rglob("*.py")))


def module_problem(name: str) -> str | None:
    """None when `name` is a module of this tree, or a module followed by a name its source defines."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        base = ROOT.joinpath(*parts[:i])
        source = base.with_suffix(".py") if base.with_suffix(".py").exists() else base / "__init__.py"
        if source.exists():
            rest = parts[i:]
            if rest and not re.search(rf"\b{re.escape(rest[0])}\b", source.read_text()):
                return f"{source.relative_to(ROOT)} has no {rest[0]}"
            return None
    return "no such module"


def problems(doc: Path) -> list[str]:
    text, found = doc.read_text(), []
    for m in PATH.finditer(text):
        path, test = m.groups()
        if not (ROOT / path).exists() and not path.startswith(NOT_IN_GIT):
            found.append(f"{path}: no such file")
        elif test and test not in functions(ROOT / path):
            found.append(f"{path}::{test}: no such test")
    for m in MODULE.finditer(text):
        if not m.group(1).startswith(NOT_MODULES) and (why := module_problem(m.group(1))):
            found.append(f"{m.group(1)}: {why}")
    for m in BARE_FILE.finditer(text):
        if m.group(1) not in python_files():
            found.append(f"{m.group(1)}: no file of that name")
    for m in TEST_NAME.finditer(text):
        if m.group(1) not in defined_tests():
            found.append(f"{m.group(1)}: no test of that name under tests/")
    for m in LINK.finditer(text):
        if not m.group(1).startswith(("http://", "https://")) and not (doc.parent / m.group(1)).exists():
            found.append(f"link {m.group(1)}: no such file")
    return found


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_what_the_docs_name_exists(doc):
    assert problems(doc) == [], f"{doc.relative_to(ROOT)} names what the tree does not have"


def test_the_checker_sees_a_stale_name(tmp_path):
    stale = tmp_path / "stale.md"
    stale.write_text("`chatfb/ui.py`, admin_view.py, `chatfb.nightly`, `chatfb.learning.cycle.run_cycles`, "
                     "`tests/test_config.py::test_gone`, `test_never_written`, [x](nowhere.md), "
                     "fine: `chatfb/learning/cycle.py`, `chatfb.learning.cycle.run_cycle`, chatfb.duckdb")
    assert [p.split(":")[0] for p in problems(stale)] == [
        "chatfb/ui.py", "tests/test_config.py", "chatfb.nightly", "chatfb.learning.cycle.run_cycles",
        "admin_view.py", "test_gone", "test_never_written", "link nowhere.md"]


def test_readme_is_the_newcomers_page():
    readme = (ROOT / "README.md").read_text()
    assert readme.startswith("---\ntitle: chatfb\n") and "\napp_file: app.py\n" in readme, "Space front matter first"
    assert len(readme.splitlines()) < 150, "README.md is the newcomer's page: the reference belongs in docs/"
    for command in ("bash scripts/install.sh && python app.py", "bash scripts/install.sh --test && python -m pytest"):
        assert command in readme, f"README.md lost the command {command!r}"
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"](docs/{page.name})" in readme, f"README.md does not link docs/{page.name}"
