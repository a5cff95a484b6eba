"""Check the package's import graph: no cycle between modules (imports inside functions
count too) and no ``from x import _private`` across modules.

Run from the repository root: ``python scripts/check_imports.py``; exit 1 lists each problem.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = "htsr_cli"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` names."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def main() -> int:
    root = Path(__file__).resolve().parent.parent
    files = sorted((root / PACKAGE).rglob("*.py"))
    modules = {module_name(f, root): f for f in files}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    problems: list[str] = []
    for mod, path in modules.items():
        is_pkg = path.name == "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                src = resolve(mod, is_pkg, node)
                targets = []
                for alias in node.names:
                    sub = f"{src}.{alias.name}"
                    targets.append(sub if sub in modules else src)
                    if (
                        alias.name.startswith("_")
                        and not alias.name.startswith("__")
                        and src.startswith(PACKAGE)
                        and src != mod
                    ):
                        problems.append(
                            f"{path.relative_to(root)}:{node.lineno}: imports the "
                            f"private name {alias.name} from {src}"
                        )
            else:
                continue
            for t in targets:
                if t in modules and t != mod:
                    edges[mod].add(t)
    problems += [f"import cycle: {' -> '.join(c)}" for c in cycles(edges)]
    for p in problems:
        print(p)
    print(
        f"{len(modules)} modules, {sum(map(len, edges.values()))} imports, "
        f"{len(problems)} problem(s)",
        file=sys.stderr,
    )
    return 1 if problems else 0


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


if __name__ == "__main__":
    sys.exit(main())
