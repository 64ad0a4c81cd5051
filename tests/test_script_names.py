"""No file in bench/ or tests/ is named like an importable top-level module (issue 25).

``python bench/x.py`` puts bench/ first on sys.path, and pytest puts tests/ there, so a file named like an
installed package shadows it: bench/kernels.py hid the ``kernels`` package that transformers 5.25 imports."""

from __future__ import annotations

import pkgutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FOLDERS = (REPO / "bench", REPO / "tests")


def _importable_top_level_names() -> set[str]:
    """Built-in and standard-library modules, and those on sys.path outside this checkout's own folders."""
    own = {REPO, *FOLDERS}
    paths = [p for p in sys.path if p and Path(p).resolve() not in own]
    found = {m.name for m in pkgutil.iter_modules(paths)}
    return set(sys.builtin_module_names) | set(sys.stdlib_module_names) | found


def test_no_bench_or_test_file_shadows_an_importable_module():
    names = _importable_top_level_names()
    assert {"json", "torch"} <= names, "the search missed the standard library or site-packages"
    clashes = sorted(f"{p.relative_to(REPO)}" for folder in FOLDERS for p in folder.glob("*.py") if p.stem in names)
    assert not clashes, f"named like an importable module, which they would hide when run: {clashes}"


def test_tests_import_their_helpers_as_ci_finds_them():
    """pytest puts tests/ on sys.path, not the repository root: ``from tests.helpers import x`` works only
    where something else adds the root (a developer's PYTHONPATH), so it turned a fresh clone's CI red."""
    import re

    rooted = re.compile(r"^\s*(from tests[.\s]|import tests\b)", re.M)
    offenders = sorted(p.name for p in (REPO / "tests").glob("*.py") if rooted.search(p.read_text(encoding="utf-8")))
    assert not offenders, f"import tests' helpers as `from helpers import ...`: {offenders}"
