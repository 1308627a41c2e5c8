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


def test_the_ground_floor_imports_nothing_above_it():
    graph = edges(imports())
    floor = [m for m in graph if m.startswith("sos_aug.ops")]
    assert floor, "sos_aug.ops (the shared operations) is missing"
    for m in floor:
        above = [t for t in graph[m] if not t.startswith("sos_aug.ops")]
        assert not above, f"{m} imports {above} from above the ground floor"


@pytest.mark.parametrize("room", ["sos_aug.layout", "sos_aug.bank.store", "sos_aug.coco"])
def test_lower_rooms_do_not_reach_up(room):
    """Data flows bank -> layout -> composite -> relight -> transforms: the lower rooms never import
    compositing, relighting or the transform."""
    adj = edges(imports())
    seen, todo = set(), [room]
    while todo:
        m = todo.pop()
        for n in adj.get(m, ()):
            if n not in seen:
                seen.add(n)
                todo.append(n)
    upper = {"sos_aug.paste", "sos_aug.copy_paste", "sos_aug.relight", "sos_aug.cli"}
    assert not (seen & upper), f"{room} reaches {sorted(seen & upper)}"


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
