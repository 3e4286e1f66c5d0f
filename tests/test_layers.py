"""The layers import one way: app -> dtrak_core; evaluation and bench -> attribution.

Checked statically with ``ast`` over every ``.py`` file (no module is imported, so a layer
break is reported even in a module no other test loads):

- nothing under ``dtrak_core/`` imports ``dtrak_app``, ``pages`` or ``streamlit``;
- nothing under ``dtrak_core/attribution/`` imports ``dtrak_core.bench`` or ``dtrak_core.evaluation``
  (they build on attribution; the reverse would be a cycle);
- nothing under ``dtrak_core/`` touches ``sys.path`` (or ``site.addsitedir``): a library finds its
  imports as installed, never by editing the search path.

Files are found by walking the folders, so modules can be added, split or renamed freely.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CORE = REPO / "dtrak_core"
ATTRIBUTION = CORE / "attribution"

#: Top-level packages the library must never import.
APP_SIDE = ("dtrak_app", "pages", "streamlit")
#: Packages that build on attribution, so attribution must not import them.
ABOVE_ATTRIBUTION = ("dtrak_core.bench", "dtrak_core.evaluation")


@dataclass(frozen=True)
class Use:
    """One import (or ``sys.path`` use) found in a file: what and where."""

    name: str
    line: int

    def __str__(self) -> str:
        return f"{self.name} (line {self.line})"


def module_name(path: Path) -> str:
    """``dtrak_core/attribution/cli.py`` -> ``dtrak_core.attribution.cli`` (a package -> its name)."""
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module of ``from <node.module> import ...``, relative levels resolved."""
    if node.level == 0:
        return node.module or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    base = package[:len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imported_names(source: str, module: str, is_package: bool = False) -> list[Use]:
    """Every module an import statement may bind, as absolute dotted names.

    ``from a.b import c`` yields both ``a.b`` and ``a.b.c`` (``c`` may be a submodule);
    ``importlib.import_module("x")`` and ``__import__("x")`` with a literal name count too.
    """
    uses = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            uses += [Use(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node, module, is_package)
            uses.append(Use(base, node.lineno))
            uses += [Use(f"{base}.{alias.name}", node.lineno) for alias in node.names if alias.name != "*"]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__")))):
            uses.append(Use(node.args[0].value, node.lineno))
    return uses


def search_path_edits(source: str) -> list[Use]:
    """Uses of ``sys.path`` (however ``sys`` is named), ``from sys import path`` and ``site.addsitedir``."""
    tree = ast.parse(source)
    sys_names = {"sys"} | {alias.asname for node in ast.walk(tree) if isinstance(node, ast.Import)
                           for alias in node.names if alias.name == "sys" and alias.asname}
    uses = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
                and node.value.id in sys_names):
            uses.append(Use("sys.path", node.lineno))
        elif isinstance(node, ast.ImportFrom) and node.module == "sys" and any(a.name == "path" for a in node.names):
            uses.append(Use("from sys import path", node.lineno))
        elif isinstance(node, ast.Attribute) and node.attr == "addsitedir":
            uses.append(Use("site.addsitedir", node.lineno))
    return uses


def within(name: str, packages: tuple[str, ...]) -> bool:
    """``name`` is one of ``packages`` or inside one (``dtrak_core.bench_x`` is not inside ``dtrak_core.bench``)."""
    return any(name == p or name.startswith(p + ".") for p in packages)


def python_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def violations(folder: Path, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    """Per file under ``folder``: the imports of ``forbidden`` packages it makes."""
    found = {}
    for path in python_files(folder):
        uses = imported_names(path.read_text(), module_name(path), path.name == "__init__.py")
        bad = sorted({str(u) for u in uses if within(u.name, forbidden)})
        if bad:
            found[str(path.relative_to(REPO))] = bad
    return found


# ----------------------------------------------------------------------------- the rules

def test_the_checks_see_the_packages():
    # Guards against a vacuous pass (a moved folder, a wrong root): both trees hold modules.
    assert len(python_files(CORE)) >= 20
    assert len(python_files(ATTRIBUTION)) >= 5 and CORE / "cli.py" in python_files(CORE)


def test_dtrak_core_never_imports_the_app():
    assert violations(CORE, APP_SIDE) == {}


def test_attribution_never_imports_bench_or_evaluation():
    assert violations(ATTRIBUTION, ABOVE_ATTRIBUTION) == {}


def test_dtrak_core_never_edits_the_search_path():
    found = {str(p.relative_to(REPO)): [str(u) for u in search_path_edits(p.read_text())]
             for p in python_files(CORE)}
    assert {path: uses for path, uses in found.items() if uses} == {}


# ----------------------------------------------------------------------------- the checker itself

@pytest.mark.parametrize(("source", "module", "expected"), [
    ("import streamlit as st", "dtrak_core.x", "streamlit"),
    ("from dtrak_app import common", "dtrak_core.x", "dtrak_app.common"),
    ("from pages.attribute import run", "dtrak_core.x", "pages.attribute"),
    ("from .. import bench", "dtrak_core.attribution.x", "dtrak_core.bench"),
    ("from ..evaluation.metrics import spearman", "dtrak_core.attribution.x", "dtrak_core.evaluation.metrics"),
    ("from dtrak_core import evaluation", "dtrak_core.attribution.x", "dtrak_core.evaluation"),
    ("def f():\n    from dtrak_core.bench import bench_featurize", "dtrak_core.attribution.x", "dtrak_core.bench"),
    ("import importlib\nimportlib.import_module('dtrak_app.views')", "dtrak_core.x", "dtrak_app.views"),
])
def test_the_checker_finds_every_kind_of_import(source, module, expected):
    assert expected in {u.name for u in imported_names(source, module)}


def test_the_checker_resolves_relative_imports_of_a_package_and_spares_lookalikes():
    # In dtrak_core/attribution/__init__.py, "." is dtrak_core.attribution itself.
    names = {u.name for u in imported_names("from . import scorers\nfrom .. import bench", "dtrak_core.attribution",
                                            is_package=True)}
    assert {"dtrak_core.attribution.scorers", "dtrak_core.bench"} <= names
    assert not within("dtrak_core.bench_tools", ABOVE_ATTRIBUTION) and within("dtrak_core.bench", ABOVE_ATTRIBUTION)
    assert not within("streamlit_like", APP_SIDE) and within("streamlit.testing.v1", APP_SIDE)
    assert not within("dtrak_core.attribution.scorers", ABOVE_ATTRIBUTION)


@pytest.mark.parametrize("source", [
    "import sys\nsys.path.insert(0, 'x')",
    "import sys as system\nsystem.path.append('x')",
    "import sys\nsys.path = ['x']",
    "from sys import path",
    "import site\nsite.addsitedir('x')",
])
def test_the_checker_finds_search_path_edits(source):
    assert search_path_edits(source)


def test_the_checker_leaves_other_paths_alone():
    assert search_path_edits("import os\nfrom pathlib import Path\nos.path.join('a')\nPath('x').parent") == []
