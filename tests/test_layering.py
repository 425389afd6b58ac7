"""The layering the design promises, checked on the source: `actors` and `kernels`
never import `mesh` or each other, and no module imports itself back through others
at import time (a cycle among module-level imports)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parents[1]
PACKAGES = ("actors", "kernels", "mesh")


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, known: set[str], *, top_level_only: bool) -> set[str]:
    """The project modules ``name`` imports (every import, or only those run at import time)."""
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in nodes:
        if isinstance(node, ast.If) and top_level_only:  # `if TYPE_CHECKING:` imports never run
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def test_actors_and_kernels_never_import_mesh_or_each_other():
    modules = _modules()
    known = set(modules)
    wrong = []
    for name, path in modules.items():
        top = name.split(".")[0]
        for target in _imports(name, path, known, top_level_only=False):
            other = target.split(".")[0]
            if top in ("actors", "kernels") and other != top:
                wrong.append(f"{name} imports {target}")
    assert not wrong, wrong


def test_no_import_cycles_between_modules():
    modules = _modules()
    known = set(modules)
    graph = {n: _imports(n, p, known, top_level_only=True) for n, p in modules.items()}
    # a package's __init__ importing its own submodules is how packages work, not a cycle
    graph = {n: {t for t in targets if not n.startswith(t + ".")} for n, targets in graph.items()}
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, cycles
