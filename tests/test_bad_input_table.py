"""The bad-input table in README.md (section "Bad input and faults") is backed by real tests:
every row names a test function that exists, each quoted message fragment and each parametrize
case it cites appears in that test's file, each error class it names exists, and there are at
least 60 rows across the Python API, the CLI, files and HTTP."""

from __future__ import annotations

import ast
import builtins
import re
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Set

import pytest

import personacore as pc
from personacore import extract, judges, steering, vectors
from personacore.screen import samples

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Bad input and faults"
TEST_ID = re.compile(r"^`(tests/[\w/]+\.py)::(\w+)(?:\[([^\]]+)\])?`$")
FRAGMENT = re.compile(r'`"(.+?)"`')
ERROR_NAME = re.compile(r"`(\w+(?:Error|Warning))`")
# Classes the table names that are not personacore's: the openai client's.
FOREIGN = {"AuthenticationError"}


def _rows() -> List[Dict[str, str]]:
    text = (ROOT / "README.md").read_text()
    start = text.index(SECTION)
    end = text.index("\n## ", start + len(SECTION))
    rows = []
    for line in text[start:end].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if len(cells) == 5 and cells[0].isdigit():
            rows.append(dict(zip(("n", "where", "input", "result", "test"), cells)))
    return rows


ROWS = _rows()


@lru_cache(maxsize=None)
def _functions(path: str) -> Set[str]:
    tree = ast.parse((ROOT / path).read_text())
    return {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}


def _known_class(name: str) -> bool:
    modules = (pc, pc.errors, vectors, steering, extract, judges, samples, builtins)
    return name in FOREIGN or any(isinstance(getattr(m, name, None), type) for m in modules)


def test_the_table_is_large_and_covers_every_surface():
    assert len(ROWS) >= 60
    assert [int(r["n"]) for r in ROWS] == list(range(1, len(ROWS) + 1))
    where = {r["where"] for r in ROWS}
    assert where == {"API", "CLI", "file", "HTTP"}
    for kind in where:
        assert sum(r["where"] == kind for r in ROWS) >= 8, kind


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r["n"])
def test_each_row_names_a_real_test_and_real_messages(row):
    m = TEST_ID.match(row["test"])
    assert m, f"row {row['n']}: test cell {row['test']!r} is not `tests/FILE.py::FUNC[CASE]`"
    path, func, case = m.groups()
    assert (ROOT / path).is_file(), f"row {row['n']}: {path} does not exist"
    assert func in _functions(path), f"row {row['n']}: {path} has no test {func}"
    source = (ROOT / path).read_text()
    if case is not None:
        assert f'"{case}"' in source, f"row {row['n']}: case {case!r} not in {path}"
    for fragment in FRAGMENT.findall(row["result"]):
        assert fragment in source, f"row {row['n']}: {fragment!r} not in {path}"
    for name in ERROR_NAME.findall(row["result"]):
        assert _known_class(name), f"row {row['n']}: no error class {name}"
