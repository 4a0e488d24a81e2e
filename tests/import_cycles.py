"""Import circles among a tree's modules, found by reading their imports with ``ast`` (nothing is
imported, so no dependency needs to be installed and no module's side effects run).

    graph = import_graph(REPO, ["tools"])        # module -> the modules of the tree it imports
    import_cycles(graph)                         # [] or e.g. [["tools.a", "tools.b"]]

Modules are named by their path below ``root`` (``tools/measure/setup.py`` -> ``tools.measure.setup``,
a package by its folder). Every import statement counts, wherever it stands (a function's lazy
import still ties the two modules together). An import names the deepest module of the tree it
reaches: ``import a.b.c`` and ``from a.b import c`` (``c`` a module) point at ``a.b.c``,
``from a.b import name`` at ``a.b``; relative imports are resolved from the importing module's
package (``from ..training import x`` in ``nodes/y.py`` -> ``training.x``). A top-level name that is
not a module of the tree is also looked up beside the importing file, as scripts that put their own
folder on ``sys.path`` import their neighbours (``import bench_peers`` in ``tools/bench.py``).
Modules outside the tree (the standard library, torch, ...) are left out, and so are absolute
imports of the top-level names in ``foreign``: in a ComfyUI pack whose own code imports itself
relatively, ``import nodes`` is ComfyUI's node registry, not the pack's ``nodes/``.
"""
from __future__ import annotations

import ast
import os
from typing import Dict, Iterable, List, Set


def module_files(root: str, folders: Iterable[str]) -> Dict[str, str]:
    """``{module name: file}`` for every ``.py`` file below ``root/<folder>`` (caches skipped)."""
    out = {}
    for folder in folders:
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, folder)):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not d.startswith("."))
            for filename in sorted(filenames):
                if not filename.endswith(".py"):
                    continue
                path = os.path.join(dirpath, filename)
                parts = os.path.relpath(path, root)[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                out[".".join(parts)] = path
    return out


def _deepest(name: str, modules, foreign=()) -> str | None:
    """The longest dotted prefix of ``name`` (itself included) that is a module of the tree."""
    parts = name.split(".")
    if parts[0] in foreign:
        return None
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules:
            return candidate
    return None


def imports_of(module: str, path: str, modules, foreign: Iterable[str] = ()) -> Set[str]:
    """The modules of ``modules`` that ``module`` (its source at ``path``) imports; absolute imports
    of a top-level name in ``foreign`` are not the tree's."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    is_package = os.path.basename(path) == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]  # also the file's folder
    found = set()

    def add(name: str, beside: bool, relative: bool = False) -> None:
        target = _deepest(name, modules, () if relative else foreign)
        if target is None and beside and package:  # a neighbour imported through sys.path
            target = _deepest(f"{package}.{name}", modules)
            if target == package:  # not a neighbour (``__future__``, ``torch``, ...)
                target = None
        if target is not None and target != module:
            found.add(target)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, beside=True)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                if node.level - 1 > len(base):
                    continue  # beyond the tree's top
                base = base[:len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
                beside = False
            else:
                prefix, beside = node.module, True
            for alias in node.names:
                full = f"{prefix}.{alias.name}" if prefix else alias.name
                if full in modules:  # ``from pkg import submodule``
                    add(full, beside=False, relative=bool(node.level))
                elif prefix:
                    add(prefix, beside, relative=bool(node.level))
    return found


def foreign_imports(path: str, modules, foreign: Iterable[str] = ()) -> Set[str]:
    """The top-level names of the absolute imports in the file at ``path`` that are not modules of
    the tree (``modules``), plus any in ``foreign``: ``torch``, ``comfy``, ComfyUI's ``nodes``..."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names.add(node.module)
    foreign = set(foreign)
    return {n.split(".")[0] for n in names
            if n.split(".")[0] in foreign or _deepest(n, modules) is None}


def import_graph(root: str, folders: Iterable[str], foreign: Iterable[str] = ()) -> Dict[str, Set[str]]:
    """``{module: the modules of the tree it imports}`` for the modules below ``root/<folders>``
    (``foreign``: see :func:`imports_of`)."""
    files = module_files(root, folders)
    foreign = tuple(foreign)
    return {name: imports_of(name, path, files, foreign) for name, path in files.items()}


def import_cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Every import circle of ``graph``: its strongly connected components of two or more modules
    (a module cannot import itself here), each sorted, in sorted order (Tarjan's algorithm)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(cycles)
