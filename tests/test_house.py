"""The house rules of issue 18, measured on the source: sizes, constructor widths, layering.

Every rule reads ``src/protogmm`` with ``ast`` (nothing is imported), so a file that breaks
one fails here with its name and number, not in review.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from helpers import REPO_ROOT

SOURCE = REPO_ROOT / "src" / "protogmm"
MAX_FILE_LINES = 450
MAX_FUNCTION_LINES = 80
MAX_CONSTRUCTOR_PARAMETERS = 20
#: Packages that must run without Lightning and never reach up into training or the CLI.
BRICKS = ("prototypes", "objectives", "diagnostics", "evaluation", "models", "data", "hosts")


def python_files() -> list[Path]:
    return sorted(SOURCE.rglob("*.py"))


def functions(tree: ast.AST) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def parameters(function: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Named parameters, without ``self`` / ``cls``."""
    args = function.args
    named = [*args.posonlyargs, *args.args, *args.kwonlyargs]
    return len([a for a in named if a.arg not in ("self", "cls")])


def test_no_file_is_over_the_limit() -> None:
    long = {
        str(path.relative_to(SOURCE)): n
        for path in python_files()
        if (n := len(path.read_text().splitlines())) > MAX_FILE_LINES
    }
    assert long == {}


def test_no_function_is_over_the_limit() -> None:
    long = {}
    for path in python_files():
        for function in functions(ast.parse(path.read_text())):
            length = function.end_lineno - function.lineno + 1  # type: ignore[operator]
            if length > MAX_FUNCTION_LINES:
                long[f"{path.relative_to(SOURCE)}:{function.name}"] = length
    assert long == {}


WIDE_CONSTRUCTORS: dict[str, int] = {}


def test_no_constructor_takes_more_than_twenty_parameters() -> None:
    wide = {}
    for path in python_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ClassDef):
                continue
            for function in node.body:
                if isinstance(function, ast.FunctionDef) and function.name == "__init__":
                    if (count := parameters(function)) > MAX_CONSTRUCTOR_PARAMETERS:
                        wide[f"{path.relative_to(SOURCE)}:{node.name}"] = count
    assert wide == WIDE_CONSTRUCTORS


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", BRICKS)
def test_bricks_import_no_lightning_training_or_cli(package: str) -> None:
    offending = {
        str(path.relative_to(SOURCE)): sorted(
            name
            for name in imported_modules(path)
            if name.split(".")[0] in ("lightning", "pytorch_lightning")
            or name.startswith(("protogmm.training", "protogmm.cli"))
        )
        for path in (SOURCE / package).rglob("*.py")
    }
    assert {path: names for path, names in offending.items() if names} == {}


def test_the_training_step_reads_the_host_once() -> None:
    """The host is chosen by class: no module branches on a host's name."""
    branching = []
    for path in python_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and any(
                isinstance(c, ast.Constant) and c.value in ("ibot", "carp")
                for c in node.comparators
            ):
                branching.append(f"{path.relative_to(SOURCE)}:{node.lineno}")
    assert branching == []
