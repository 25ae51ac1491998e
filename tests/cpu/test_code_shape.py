"""Every function in deployments/ fits on a screen: at most 60 lines from `def` to its last
line (decorators aside), as the code stands after `ruff format` (make lint checks that it
is formatted). PagedEngine.__init__ stays a short list of build steps (under 30 lines)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

MAX_LINES = 60
MAX_ENGINE_INIT_LINES = 29
ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "deployments"

Function = ast.FunctionDef | ast.AsyncFunctionDef


def functions(tree: ast.AST, prefix: str = "") -> Iterator[tuple[str, Function]]:
    """Every function and method in `tree`, nested ones too, with its qualified name."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            name = f"{prefix}{node.name}"
            if not isinstance(node, ast.ClassDef):
                yield name, node
            yield from functions(node, f"{name}.")
        else:
            yield from functions(node, prefix)


def lines(node: Function) -> int:
    assert node.end_lineno is not None
    return node.end_lineno - node.lineno + 1


def all_functions() -> list[tuple[str, str, Function]]:
    return [
        (str(path.relative_to(ROOT)), name, node)
        for path in sorted(PACKAGE.rglob("*.py"))
        for name, node in functions(ast.parse(path.read_text(), str(path)))
    ]


def test_the_scan_finds_the_package_and_its_nested_functions():
    found = {(path, name) for path, name, _ in all_functions()}
    assert len(found) > 500
    assert ("deployments/engine/paged/engine.py", "PagedEngine.__init__") in found
    source = "def outer():\n    def inner():\n        pass\n    return inner\n"
    assert [name for name, _ in functions(ast.parse(source))] == ["outer", "outer.inner"]


def test_no_function_in_deployments_is_longer_than_a_screen():
    long = [
        f"{path}:{node.lineno} {name} ({lines(node)} lines)"
        for path, name, node in all_functions()
        if lines(node) > MAX_LINES
    ]
    assert not long, f"functions over {MAX_LINES} lines (split them):\n" + "\n".join(long)


def test_paged_engine_init_is_a_short_list_of_steps():
    inits = [
        node
        for path, name, node in all_functions()
        if path == "deployments/engine/paged/engine.py" and name == "PagedEngine.__init__"
    ]
    assert len(inits) == 1
    assert lines(inits[0]) <= MAX_ENGINE_INIT_LINES, (
        f"PagedEngine.__init__ is {lines(inits[0])} lines; keep it under 30"
    )


def test_make_test_runs_the_lint_target_with_the_format_check_first():
    makefile = (ROOT / "Makefile").read_text()
    assert "\ntest: lint\n" in makefile
    lint = makefile.split("\nlint: ", 1)[1].split("\n\n", 1)[0]
    assert "ruff check deployments tests" in lint
    assert "ruff format --check deployments tests" in lint
