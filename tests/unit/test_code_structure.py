"""The shape of the package (issue 11), checked on every run so it stays that way: no import
cycle among megalite's modules (imports inside functions count: they are edges too), no private
name (``_x``) imported from another package (the compiled extension ``megalite._C`` is
the package's own), and no file over 500 lines.

Read from the source with ``ast`` (nothing is imported); a module is ``megalite.a.b`` for
``megalite/a/b.py`` and ``megalite.a`` for ``megalite/a/__init__.py``.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "megalite"
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict) -> list[tuple[str, str | None]]:
    """(imported module, imported name or None) for every megalite import in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, None) for a in node.names if a.name.startswith("megalite")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            if base.startswith("megalite"):
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    found.append((sub, None) if sub in modules else (base, a.name))
    return found


def _graph():
    modules = _modules()
    edges = {m: set() for m in modules}
    private = []
    for name, path in modules.items():
        for target, imported in _imports(name, path, modules):
            if target in modules and target != name:
                edges[name].add(target)
            if imported and imported.startswith("_") and not imported.startswith("__") \
                    and (target, imported) != ("megalite", "_C"):   # the compiled extension
                if target.split(".")[:2] != name.split(".")[:2]:
                    private.append(f"{name} imports {target}.{imported}")
    return modules, edges, private


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
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
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    _, edges, _ = _graph()
    assert _cycles(edges) == []


def test_the_cycle_check_finds_a_cycle():
    """The check itself finds a two-module cycle, and no cycle in a chain."""
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_private_name_imported_across_packages():
    _, _, private = _graph()
    assert private == []


def test_no_file_over_500_lines():
    long = {str(p.relative_to(PACKAGE.parent)): n for p in _modules().values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}
