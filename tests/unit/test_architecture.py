"""The house rules, as checks anyone can run: builtins read like third-party
plugins, only the registry knows the plugins, no import goes round in a circle,
no lower layer imports a higher one, and no module grows past 600 lines."""

from __future__ import annotations

import ast
from pathlib import Path

from support.helpers import REPO

PACKAGE = REPO / "xenrun"

# From the bottom up; a module imports only from its own layer or those below.
LAYERS = [
    ("values", {"xenrun", "xenrun.errors", "xenrun.settings", "xenrun.changes", "xenrun.facts", "xenrun.profiles",
                "xenrun.xlcfg", "xenrun.logs", "xenrun.config", "xenrun.domains", "xenrun.installs", "xenrun.guestmedia",
                "xenrun.netswitch", "xenrun.netconf"}),
    ("targets", {"xenrun.targets", "xenrun.plan", "xenrun.state", "xenrun.apply", "xenrun.bootcheck",
                 "xenrun.bootimages"}),
    ("plugins", {"xenrun.registry", "xenrun.hookspecs", "xenrun.hooks", "xenrun.api", "xenrun.plugins"}),
    ("flows", {"xenrun.run", "xenrun.guests", "xenrun.fleet", "xenrun.testing",
               "xenrun.report"}),
    ("cli", {"xenrun.tasks", "xenrun.domain_tasks", "xenrun.taskhelp", "xenrun.cli", "xenrun.__main__"}),
]
# xenrun.api hands plugin authors the test helpers on first use (a module
# __getattr__), without importing the flows when a plugin is loaded
ALLOWED_CLIMBS = {("xenrun.api", "xenrun.testing")}


def _name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: Path) -> set[str]:
    """Every xenrun module ``path`` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("xenrun"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("xenrun")}
    return {m for m in found if m in MODULES}


GRAPH = {m: _imports(p) - {m} for m, p in MODULES.items()}


def _layer(module: str) -> int:
    for index, (_, members) in enumerate(LAYERS):
        if any(module == m or module.startswith(m + ".") for m in members if m != "xenrun") or module == "xenrun":
            return index
    raise AssertionError(f"{module} is in no layer of tests/unit/test_architecture.py: place it")


def test_builtin_plugins_import_only_the_public_api():
    for module, path in MODULES.items():
        if module.startswith("xenrun.plugins."):
            assert GRAPH[module] <= {"xenrun.api"}, f"{path}: imports {sorted(GRAPH[module] - {'xenrun.api'})}"


def test_only_the_registry_imports_plugins():
    for module, deps in GRAPH.items():
        if module != "xenrun.registry" and not module.startswith("xenrun.plugins"):
            assert not {d for d in deps if d.startswith("xenrun.plugins")}, f"{module} imports a plugin"


def test_no_import_goes_round_in_a_circle():
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError("import circle: " + " -> ".join(path[path.index(module):] + [module]))
        if module in done:
            return
        for dep in sorted(GRAPH[module]):
            visit(dep, path + [module])
        done.add(module)

    for module in sorted(GRAPH):
        visit(module, [])


def test_no_layer_imports_a_higher_one():
    climbs = [(m, d) for m, deps in GRAPH.items() for d in deps
              if _layer(d) > _layer(m) and (m, d) not in ALLOWED_CLIMBS]
    assert not climbs, "\n".join(f"{m} ({LAYERS[_layer(m)][0]}) imports {d} ({LAYERS[_layer(d)][0]})"
                                 for m, d in sorted(climbs))


def test_the_circle_checker_finds_a_circle():
    GRAPH["xenrun.errors"].add("xenrun.run")
    try:
        try:
            test_no_import_goes_round_in_a_circle()
        except AssertionError as e:
            assert "import circle" in str(e)
        else:
            raise AssertionError("a circle went unnoticed")
    finally:
        GRAPH["xenrun.errors"].discard("xenrun.run")


def test_no_test_imports_conftest():
    """Helpers and harnesses live in the package tests/support; conftest.py holds
    only fixtures, which pytest hands out by name."""
    offenders = []
    for path in sorted([*(REPO / "tests").rglob("*.py"), *(REPO / "benchmarks").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "conftest" or n.startswith("conftest.") for n in names):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, "import conftest (use support.helpers): " + ", ".join(offenders)


MAX_LINES = 600  # a module past this is two rooms: split it along its seam


def test_no_module_is_past_600_lines():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}, f"modules over {MAX_LINES} lines: {long}"
