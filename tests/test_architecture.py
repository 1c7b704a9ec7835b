"""The package's shape, checked on its source: what docs/architecture.md promises stays true.

- the module-level import graph of ``src/secateurs`` (first-party imports) has no cycle and at
  most 12 levels (a module stands one level above everything it imports); so has the coarser
  graph that counts every import, deferred ones inside functions too, and takes each
  subpackage as one node (how the 19 levels of the redesign's issue were counted);
- no module imports another module's private names;
- the layering rules: units import only adapters, plan and errors (and each other); the flow
  never imports a criterion; allocation is model-free; the checkpoint files module imports no
  export or record; commands reach the library through the spec and the orchestrator;
- no function is longer than 60 lines, no public function takes more than 10 parameters.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SOURCE / "secateurs"


@cache
def modules() -> dict[str, ast.Module]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(SOURCE).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = ast.parse(path.read_text(encoding="utf-8"))
    return found


def _module_of(name: str) -> str | None:
    while name and name not in modules():
        name = name.rpartition(".")[0]
    return name or None


def imports(module: str) -> list[tuple[str, str]]:
    """(imported module, name) of every first-party import at module level (run time only:
    ``if TYPE_CHECKING`` blocks are not imports)."""
    found = []
    for node in modules()[module].body:
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("secateurs"):
            for alias in node.names:
                child = _module_of(f"{node.module}.{alias.name}")
                is_child = child is not None and child.startswith(node.module + ".")
                found.append((child if is_child else _module_of(node.module), alias.name))
        elif isinstance(node, ast.Import):
            found += [
                (_module_of(a.name), "") for a in node.names if a.name.startswith("secateurs")
            ]
    return [(target, name) for target, name in found if target and target != module]


def graph() -> dict[str, set[str]]:
    return {module: {target for target, _ in imports(module)} for module in modules()}


def levels() -> dict[str, int]:
    edges, level = graph(), {}

    def visit(module: str, path: tuple[str, ...]) -> int:
        if module in path:
            raise AssertionError(f"import cycle: {' -> '.join(path[path.index(module) :])}")
        if module not in level:
            below = [visit(target, (*path, module)) for target in edges[module]]
            level[module] = 1 + max(below, default=0)
        return level[module]

    for module in edges:
        visit(module, ())
    return level


def test_the_import_graph_has_no_cycle_and_at_most_12_levels():
    level = levels()
    deepest = max(level, key=level.get)
    assert level[deepest] <= 12, (deepest, level[deepest])


def part_of(module: str) -> str:
    """The node of the coarse graph: a subpackage as a whole, or a top-level module."""
    return ".".join(module.split(".")[:2])


def every_import(module: str) -> set[str]:
    """Parts that ``module`` imports anywhere: at module level or deferred inside a function."""
    found = set()
    for node in ast.walk(modules()[module]):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("secateurs"):
            found |= {_module_of(f"{node.module}.{a.name}") or node.module for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("secateurs")}
    return {part_of(target) for target in found} - {part_of(module), "secateurs"}


def test_the_graph_of_every_import_between_subpackages_has_at_most_12_levels():
    edges: dict[str, set[str]] = {}
    for module in modules():
        edges.setdefault(part_of(module), set()).update(every_import(module))
    level: dict[str, int] = {}

    def visit(part: str, path: tuple[str, ...]) -> int:
        if part in path:
            raise AssertionError(f"import cycle: {' -> '.join(path[path.index(part) :])}")
        if part not in level:
            level[part] = 1 + max((visit(t, (*path, part)) for t in edges[part]), default=0)
        return level[part]

    deepest = max(edges, key=lambda part: visit(part, ()))
    assert level[deepest] <= 12, (deepest, level[deepest])


def test_no_module_imports_another_modules_private_names():
    private = [
        (module, target, name)
        for module in modules()
        for target, name in imports(module)
        if name.startswith("_") and not name.startswith("__")
    ]
    assert private == []


LAYERS = {
    # module prefix: first-party prefixes it may import at module level
    "secateurs.units": (
        "secateurs.units", "secateurs.adapters", "secateurs.plan", "secateurs.errors",
    ),
    "secateurs.allocate": ("secateurs.errors",),
    "secateurs.checkpoint": ("secateurs.errors", "secateurs.outputs"),
    "secateurs.session.flow": (
        "secateurs.session", "secateurs.edits", "secateurs.plan", "secateurs.units",
    ),
    "secateurs.commands.prune": ("secateurs.commands",),
    "secateurs.commands.score": ("secateurs.commands", "secateurs.errors"),
}  # fmt: skip


@pytest.mark.parametrize("module", sorted(LAYERS))
def test_layering_rules(module):
    allowed = LAYERS[module]
    checked = [m for m in modules() if m == module or m.startswith(module + ".")]
    for name in checked:
        for target, _ in imports(name):
            assert target.startswith(allowed), f"{name} imports {target}"


def functions():
    for module, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                yield module, node


def test_no_function_is_longer_than_60_lines():
    long = [
        f"{module}.{node.name}: {node.end_lineno - node.lineno + 1} lines"
        for module, node in functions()
        if node.end_lineno - node.lineno + 1 > 60
    ]
    assert long == []


def test_no_public_function_takes_more_than_10_parameters():
    wide = []
    for module, node in functions():
        args = node.args
        names = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
        names = [n for n in names if n not in ("self", "cls")]
        if not node.name.startswith("_") and len(names) > 10:
            wide.append(f"{module}.{node.name}: {len(names)} parameters")
    assert wide == []
