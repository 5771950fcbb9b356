"""The package's shape: no import cycles, the layering below, and no overlong definitions.

Read from the source with ``ast``: every import counts, at module level or inside a
function (a lazy import still ties the packages together), except those under
``if TYPE_CHECKING:``, which never run.
"""

from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EDGE = ROOT / "edge"

# Subpackages: each is one node of the package graph. Top-level modules (edge.cli,
# edge.build, edge.spec, ...) are nodes of their own.
PACKAGES = ("planning", "shards", "worker", "coordinator", "transport", "bench", "lab",
            "profiling", "export", "proto")

# The layering. A unit may import nothing named against it here (module prefixes; a
# third-party name is a top-level package).
FORBIDDEN: dict[str, tuple[str, ...]] = {
    # Tensor specs and the table of modes: the standard library only.
    "edge.spec": ("edge.", "numpy", "onnx", "onnxruntime", "grpc", "torch"),
    # The foundations everything may import: errors, file hashes, host:port addresses.
    "edge.errors": ("edge.", "numpy", "onnx", "onnxruntime", "grpc", "torch", "yaml"),
    "edge.files": ("edge.planning", "edge.shards", "edge.worker", "edge.coordinator",
                   "edge.transport", "edge.profiling", "edge.export", "edge.build", "numpy",
                   "onnx", "onnxruntime", "grpc", "torch", "yaml"),
    "edge.address": ("edge.planning", "edge.shards", "edge.worker", "edge.coordinator",
                     "edge.transport", "edge.profiling", "edge.export", "edge.build",
                     "numpy", "onnx", "onnxruntime", "grpc", "torch", "yaml"),
    # The running half reads specs and modes from edge.spec, never the planner: a worker
    # on a Pi does not load onnx (onnxruntime, which it runs shards with, is fine).
    "edge.transport": ("edge.planning", "edge.shards.build", "edge.shards.quantize",
                       "edge.shards.accuracy", "edge.build", "edge.coordinator",
                       "edge.worker", "edge.lab", "edge.bench", "edge.cli", "edge.console",
                       "edge.demo", "onnx", "torch", "transformers", "rich", "matplotlib"),
    "edge.worker": ("edge.planning", "edge.shards.build", "edge.shards.quantize",
                    "edge.shards.accuracy", "edge.build", "edge.coordinator", "edge.lab",
                    "edge.bench", "edge.cli", "edge.console", "edge.demo", "onnx", "torch",
                    "transformers", "rich", "matplotlib"),
    # The coordinator runs plans: it may re-plan (edge.build), but knows nothing of the
    # device lab (a diagnose callback comes in from the CLI), the bench or the CLI.
    "edge.coordinator": ("edge.lab", "edge.bench", "edge.cli", "edge.console", "edge.demo",
                         "edge.worker.server", "torch", "transformers", "rich"),
    # Planning is pure: it never builds shards or talks to devices.
    "edge.planning": ("edge.shards", "edge.build", "edge.worker", "edge.coordinator",
                      "edge.transport", "edge.lab", "edge.bench", "edge.profiling",
                      "edge.cli", "edge.console", "edge.demo", "torch"),
    "edge.shards": ("edge.build", "edge.worker", "edge.coordinator", "edge.transport",
                    "edge.lab", "edge.bench", "edge.cli", "edge.console", "edge.demo",
                    "torch"),
    # Process and model measurements: the transport and the worker import them.
    "edge.profiling": ("edge.coordinator", "edge.transport", "edge.worker", "edge.lab",
                       "edge.bench", "edge.cli", "edge.console", "edge.demo", "torch"),
    # Only the command line imports the command line.
    "edge.demo": ("edge.cli", "edge.bench", "edge.lab"),
    "edge.bench": ("edge.cli",),
    "edge.lab": ("edge.cli", "edge.console", "edge.demo", "edge.bench"),
    "edge.console": ("edge.cli", "edge.demo", "edge.bench"),
    "edge.build": ("edge.cli", "edge.console", "edge.worker", "edge.coordinator",
                   "edge.transport", "edge.lab", "edge.bench"),
}

# Longest definitions allowed, in lines (decorators and docstring included).
MAX_FUNCTION_LINES = 80
MAX_CLASS_LINES = 300
# edge/proto is generated (and skipped).
LENGTH_EXEMPT: set[str] = set()
# Over the limit today and not yet split (issue 13): this list only shrinks. A definition
# named here that grows, or any other that passes the limit, fails.
KNOWN_LONG: dict[str, int] = {}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@lru_cache(maxsize=1)
def _sources() -> dict[str, tuple[Path, ast.Module]]:
    out = {}
    for path in sorted(EDGE.rglob("*.py")):
        if "proto" in path.relative_to(EDGE).parts[:1]:
            continue
        out[_module_name(path)] = (path, ast.parse(path.read_text(), str(path)))
    return out


def _unit(module: str) -> str:
    """The graph node a module belongs to: its subpackage, or itself at top level."""
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in PACKAGES:
        return ".".join(parts[:2])
    return ".".join(parts[:2]) if len(parts) >= 2 else module


def _type_checking_nodes(tree: ast.Module) -> set[int]:
    """ids of the import nodes under ``if TYPE_CHECKING:``."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for inner in node.body:
                skip.update(id(n) for n in ast.walk(inner))
    return skip


def _imports(module: str, path: Path, tree: ast.Module) -> list[tuple[str, int]]:
    """(imported module, line) for every import in ``tree``, relative ones resolved."""
    skip = _type_checking_nodes(tree)
    modules = _sources()
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                pkg = pkg[:len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            out.append((base, node.lineno))
            # `from edge.lab import cgroups` imports the module edge.lab.cgroups.
            out += [(f"{base}.{a.name}", node.lineno) for a in node.names
                    if f"{base}.{a.name}" in modules]
    return out


def _package_graph() -> dict[str, dict[str, list[str]]]:
    """unit -> imported unit -> where (``module:line``), within edge only."""
    graph: dict[str, dict[str, list[str]]] = {}
    for module, (path, tree) in _sources().items():
        for target, line in _imports(module, path, tree):
            if target.split(".")[0] != "edge" or target == "edge":
                continue
            a, b = _unit(module), _unit(target)
            if a != b and not b.startswith("edge.proto"):
                graph.setdefault(a, {}).setdefault(b, []).append(f"{module}:{line}")
    return graph


def _cycle(graph: dict[str, dict[str, list[str]]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, {})):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_no_import_cycle_between_packages():
    graph = _package_graph()
    cycle = _cycle(graph)
    if cycle:
        hops = [f"{a} -> {b} ({', '.join(graph[a][b][:3])})" for a, b in zip(cycle, cycle[1:])]
        pytest.fail("import cycle: " + "; ".join(hops))


def test_the_checker_sees_lazy_imports_and_cycles():
    tree = ast.parse("def f():\n    from edge.shards.build import build_shard\n")
    assert ("edge.shards.build", 2) in _imports("edge.planning.x", EDGE / "planning/x.py", tree)
    assert _cycle({"a": {"b": []}, "b": {"a": []}}) == ["a", "b", "a"]
    assert _cycle({"a": {"b": []}, "b": {}}) is None


@pytest.mark.parametrize("unit", sorted(FORBIDDEN))
def test_layering(unit):
    bad = []
    for module, (path, tree) in _sources().items():
        if module != unit and not module.startswith(unit + "."):
            continue
        for target, line in _imports(module, path, tree):
            for prefix in FORBIDDEN[unit]:
                if target == prefix.rstrip(".") or target.startswith(prefix.rstrip(".") + "."):
                    bad.append(f"{module}:{line} imports {target}")
    assert not bad, f"{unit} must not import {', '.join(FORBIDDEN[unit])}:\n" + "\n".join(bad)


def test_no_overlong_definitions():
    long = []
    for module, (path, tree) in _sources().items():
        rel = path.relative_to(ROOT).as_posix()
        if rel in LENGTH_EXEMPT:
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                limit = MAX_FUNCTION_LINES
            elif isinstance(node, ast.ClassDef):
                limit = MAX_CLASS_LINES
            else:
                continue
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            lines = node.end_lineno - first + 1
            if lines > max(limit, KNOWN_LONG.get(f"{rel}:{node.name}", 0)):
                long.append(f"{rel}:{node.lineno} {node.name}: {lines} lines (> {limit})")
    assert not long, "split these:\n" + "\n".join(sorted(long))
