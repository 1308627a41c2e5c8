"""The package's import graph: a ground floor and one-way flow. Every import between sos_aug's
modules counts, function-local ones too (a local import must not hide a cycle), and no module takes
a private name from another."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "sos_aug"
OPTIONAL = {"sos_aug.paste.kernel", "sos_aug.relight.pixel_kernel", "sos_aug.relight.lab_kernel"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` names."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports() -> dict[str, list[tuple[str, str, int]]]:
    """module -> [(imported module, imported name or '', line)] for imports inside sos_aug."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, list[tuple[str, str, int]]] = {m: [] for m in modules}
    for mod, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = resolve(mod, path.name == "__init__.py", node)
                if not target.startswith("sos_aug"):
                    continue
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    if sub in modules:  # `from . import kernels`: the module itself
                        graph[mod].append((sub, "", node.lineno))
                    else:
                        graph[mod].append((target, alias.name, node.lineno))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("sos_aug"):
                        graph[mod].append((alias.name, "", node.lineno))
    return graph


def edges(graph) -> dict[str, set[str]]:
    out = {m: set() for m in graph}
    for mod, targets in graph.items():
        for target, _, _ in targets:
            if target != mod and target in graph:
                out[mod].add(target)
    return out


def find_cycle(adj: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(adj[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(adj):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_import_graph_has_no_cycle():
    adj = edges(imports())
    # a package's __init__ re-exports its modules; a module importing through its own package's
    # __init__ would make every such re-export a cycle, so modules import the module they mean
    cycle = find_cycle(adj)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_module_imports_a_private_name_from_another():
    bad = [f"{mod}:{line} takes {name} from {target}" for mod, targets in imports().items()
           for target, name, line in targets if name.startswith("_") and target != mod]
    assert not bad, "\n".join(bad)


def reach(adj: dict[str, set[str]], start: str) -> set[str]:
    """Every module ``start`` imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        for n in adj.get(todo.pop(), ()):
            if n not in seen:
                seen.add(n)
                todo.append(n)
    return seen


def within(module: str, room: str) -> bool:
    return module == room or module.startswith(room + ".")


def test_the_ground_floor_imports_nothing_above_it():
    graph = edges(imports())
    floor = [m for m in graph if within(m, "sos_aug.ops") or m == "sos_aug.names"]
    assert "sos_aug.ops.color" in floor and "sos_aug.ops.files" in floor, "the ground floor's rooms are missing"
    for m in floor:
        above = [t for t in graph[m] if not (within(t, "sos_aug.ops") or t == "sos_aug.names")]
        assert not above, f"{m} imports {above} from above the ground floor"


# data flows bank -> layout -> paste -> relight -> copy_paste -> referring expressions / adapters: each
# room, and everything it imports, stays clear of the rooms above it
ABOVE = {
    "sos_aug.coco": ["sos_aug.bank", "sos_aug.layout", "sos_aug.paste", "sos_aug.relight", "sos_aug.copy_paste"],
    "sos_aug.bank": ["sos_aug.layout", "sos_aug.paste", "sos_aug.relight", "sos_aug.copy_paste"],
    "sos_aug.layout": ["sos_aug.paste", "sos_aug.relight", "sos_aug.copy_paste", "sos_aug.referring"],
    "sos_aug.paste": ["sos_aug.relight", "sos_aug.copy_paste", "sos_aug.segments", "sos_aug.referring",
                      "sos_aug.integrations", "sos_aug.cli"],
    "sos_aug.relight": ["sos_aug.relight.training", "sos_aug.copy_paste", "sos_aug.paste", "sos_aug.referring",
                        "sos_aug.integrations", "sos_aug.cli"],
    "sos_aug.referring": ["sos_aug.copy_paste", "sos_aug.paste", "sos_aug.relight", "sos_aug.cli"],
    "sos_aug.copy_paste": ["sos_aug.integrations", "sos_aug.synthesis", "sos_aug.preview", "sos_aug.cli",
                           "sos_aug.relight.training"],
}


@pytest.mark.parametrize("room", sorted(ABOVE))
def test_rooms_do_not_reach_up(room):
    """A room's modules (a package's too, the relighting runtime without its training sub-package)
    never import, even through others, what stands above it."""
    adj = edges(imports())
    modules = [m for m in adj if within(m, room) and not within(m, "sos_aug.relight.training")]
    assert modules, f"{room} is missing"
    for m in modules:
        upper = sorted(n for n in reach(adj, m) for up in ABOVE[room]
                       if within(n, up) and (within(up, room) or not within(n, room)))
        assert not upper, f"{m} reaches {upper}"


def test_the_public_names_resolve_and_the_package_imports_lazily():
    """``sos_aug.X`` for every public name, and ``import sos_aug`` alone does not load torch (so
    ``sos-aug --help`` answers at once)."""
    import subprocess
    import sys

    import sos_aug

    assert sorted(sos_aug.__all__) == sorted(sos_aug._HOMES)
    for name in sos_aug.__all__:
        assert getattr(sos_aug, name).__name__ == name
    code = "import sys, sos_aug, sos_aug.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
