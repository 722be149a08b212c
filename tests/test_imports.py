"""Every module of the package imports, the imports between its modules form no cycle, and none
reaches from a lower layer up to a higher one (docs/design.md, "Layers").

The rule: a module imports only modules of the same or a lower layer, at its top and inside its
functions alike (a lazy import keeps an optional dependency or the command line's cost off the import
path; it does not excuse a cycle). The one exception is `from autonorm import __version__`: the
version is a constant of the package, not a dependency on its API.
"""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"autonorm": ROOT / "autonorm", "autonorm.backends": ROOT / "backends",
            **{f"autonorm.{sub}": ROOT / "autonorm" / sub for sub in ("audit", "bench", "cli", "session", "tune")}}

# Lowest first. A module (or a package, for all its modules) imports only from its own layer or below.
LAYERS = [
    ("vocabulary", ["autonorm.errors", "autonorm.spec", "autonorm.config", "autonorm.settings", "autonorm.device",
                    "autonorm.hardware", "autonorm.safe_files", "autonorm.grids", "autonorm.lazy"]),
    ("codegen and truth", ["autonorm.render", "autonorm.reference", "autonorm.backends", "autonorm.verify",
                           "autonorm.traffic"]),
    ("timing and the database format", ["autonorm.measure", "autonorm.db", "autonorm.db_folder"]),
    ("hardware fit and the active databases", ["autonorm.audit", "autonorm.db_sources", "autonorm.cuda_host",
                                                "autonorm.cuda_host_build"]),
    ("tuning", ["autonorm.tune"]),
    ("the dispatcher", ["autonorm.first_use", "autonorm.dispatch", "autonorm.dispatch_records"]),
    ("the torch face", ["autonorm.ops", "autonorm.functional", "autonorm.modules", "autonorm.patch",
                        "autonorm.explain", "autonorm"]),
    ("benchmarking", ["autonorm.bench"]),
    ("the GPU session", ["autonorm.session"]),
    ("the command line", ["autonorm.cli", "autonorm.__main__"]),
]


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.glob("*.py")):
            found[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return found


MODULES = _modules()


def _imported(name: str, path: Path) -> set[str]:
    """The package modules that `name` imports, anywhere in its source."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if node.module else parent
            for alias in node.names:  # `from . import x` imports the module x; `from .x import y`, x
                if (base, alias.name) == ("autonorm", "__version__"):
                    continue
                targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {t for t in targets if t in MODULES and t != name}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a path of module names, or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_imports(name):
    importlib.import_module(name)


def test_no_import_cycle():
    graph = {name: _imported(name, path) for name, path in MODULES.items()}
    assert "autonorm.dispatch" in graph["autonorm.ops"], "the import graph missed a known import"
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def _layer(module: str) -> int:
    """The layer of `module`: that of the longest LAYERS entry naming it or a package above it."""
    best = None
    for rank, (_, names) in enumerate(LAYERS):
        for entry in names:
            if (module == entry or module.startswith(entry + ".")) and (best is None or len(entry) > len(best[1])):
                best = (rank, entry)
    assert best is not None, f"{module} is in no layer: add it to LAYERS (and to docs/design.md)"
    return best[0]


def test_no_import_from_a_lower_layer_to_a_higher_one():
    upward = [f"{name} ({LAYERS[_layer(name)][0]}) imports {target} ({LAYERS[_layer(target)][0]})"
              for name, path in MODULES.items() for target in sorted(_imported(name, path))
              if _layer(target) > _layer(name)]
    assert not upward, "\n".join(upward)


def test_layer_rule_sees_an_upward_import():
    assert _layer("autonorm.tune.study") > _layer("autonorm.measure")
    assert _layer("autonorm.cli.tune") > _layer("autonorm.tune.study")
    assert _layer("autonorm") > _layer("autonorm.dispatch")  # the package face, not every autonorm.* module
    assert _layer("autonorm.bench.run") < _layer("autonorm.session.phases") < _layer("autonorm.cli.bench")
