"""The shape of the code, checked like behaviour: sizes, one-way imports, no reaching into privates.

These are the structure rules of the project (issue 11): a newcomer can hold
each module in their head, dependencies point one way, and no module uses
another's ``_private`` names. The checks read the source with ``ast``; they
fail with the module and line to fix.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "daemon" / "sessionguard"
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 60
#: What the library half (imported by a server) may depend on: no daemon, socket, systemd or watchdog.
LIBRARY = {"__init__", "errors", "naming", "count", "rules", "retention", "fsutil", "locks", "hint", "spares", "pins",
           "versions", "storedir", "store", "migrate", "restore", "recovery", "guard", "events", "metaload", "config",
           "paths", "testing"}
#: Third-party imports the library half must not make.
DAEMON_ONLY_PACKAGES = {"watchdog", "structlog", "systemd", "asyncio", "simdjson"}


def modules() -> Iterator[tuple[str, ast.Module, str]]:
    for path in sorted(PACKAGE.glob("*.py")):
        text = path.read_text()
        yield path.stem, ast.parse(text, str(path)), text


def local_imports(tree: ast.Module) -> Iterator[tuple[str, list[str], int]]:
    """``(module, names, line)`` for every ``from . import x`` / ``from .x import y``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module is None:
                for alias in node.names:
                    yield alias.name, [], node.lineno
            else:
                yield node.module, [a.name for a in node.names], node.lineno


def test_no_module_is_over_the_limit() -> None:
    long = {name: text.count("\n") for name, _, text in modules() if text.count("\n") > MAX_MODULE_LINES}
    assert long == {}, f"modules over {MAX_MODULE_LINES} lines: split them by job"


def test_no_function_is_over_the_limit() -> None:
    long = []
    for name, tree, _ in modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                size = (node.end_lineno or node.lineno) - node.lineno + 1
                if size > MAX_FUNCTION_LINES:
                    long.append(f"{name}.py:{node.lineno} {node.name} ({size} lines)")
    assert long == []


def test_no_module_uses_another_modules_private_names() -> None:
    found = []
    for name, tree, _ in modules():
        imported_modules = set()
        for mod, names, line in local_imports(tree):
            if not names:
                imported_modules.add(mod)
            found += [f"{name}.py:{line} imports {mod}.{n}" for n in names
                      if n.startswith("_") and not n.startswith("__")]
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in imported_modules and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                found.append(f"{name}.py:{node.lineno} uses {node.value.id}.{node.attr}")
    assert found == []


def graph() -> dict[str, set[str]]:
    return {name: {mod.split(".")[0] for mod, _, _ in local_imports(tree)} for name, tree, _ in modules()}


def test_imports_point_one_way() -> None:
    """No cycles (a module never needs one that needs it back), and nothing imports the daemon."""
    deps = graph()
    assert not any("daemon" in d for d in deps.values()), "daemon.py wires the rest; nothing imports it"
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        if state.get(node) == 1:
            pytest.fail("import cycle: " + " -> ".join([*path, node]))
        if state.get(node) == 2:
            return
        state[node] = 1
        for dep in sorted(deps.get(node, ())):
            if dep in deps:
                visit(dep, [*path, node])
        state[node] = 2

    for node in sorted(deps):
        visit(node, [])


def test_the_library_half_needs_nothing_of_the_daemon() -> None:
    """What a server embeds imports only library modules and no daemon-side package."""
    deps = graph()
    wrong = {name: sorted(d - LIBRARY) for name, d in deps.items() if name in LIBRARY and d - LIBRARY}
    assert wrong == {}
    for name, tree, _ in modules():
        if name not in LIBRARY:
            continue
        for node in ast.walk(tree):
            roots = []
            if isinstance(node, ast.Import):
                roots = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                roots = [node.module.split(".")[0]]
            bad = DAEMON_ONLY_PACKAGES.intersection(roots)
            assert not bad, f"{name}.py:{node.lineno} imports {sorted(bad)}"


def test_the_package_says_it_is_typed() -> None:
    assert (PACKAGE / "py.typed").is_file()
