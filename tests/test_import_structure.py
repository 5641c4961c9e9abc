"""The module structure of ``tpfuse/``: no import circle, no private names across files, imports run down.

The house has three layers, ``passes`` -> ``compile_ops`` -> ``kernels`` (docs/design.md):
a kernel does not know what an op is, and an op does not know what a pass is.  This test
reads every module with ``ast`` (nothing is imported, so it runs anywhere) and builds the
graph of imports between tpfuse modules: absolute (``tpfuse.x``) and relative (``.x``,
``..x``) ones, at module level and **inside functions alike**.  A function-level import
breaks an import-time circle but the two modules still depend on each other, so it counts
as an edge here; a circle cannot be hidden by moving an import into a function.

``import tpfuse.a.b`` and ``from tpfuse.a import b`` (where ``b`` is a module) are edges to
``tpfuse.a.b``; ``from tpfuse.a import name`` is an edge to ``tpfuse.a`` (its package
``__init__``).  A package's ``__init__`` importing its own submodules is the package
exposing them, not a dependency of those submodules on it, and is not an edge for circles.
"""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "tpfuse")

#: the layers, top to bottom; a module may import from its own layer or any layer below it
LAYERS = ("tpfuse.passes", "tpfuse.compile_ops", "tpfuse.kernels")


def _modules():
    """``{dotted module name: path}`` for every ``.py`` file under ``tpfuse/``."""
    found = {}
    for base, dirs, names in os.walk(PACKAGE):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in names:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(base, name), ROOT)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                found[".".join(rel)] = os.path.join(base, name)
    return found


def _is_package(module, modules):
    return modules[module].endswith("__init__.py")


def _imports(module, path, modules):
    """``(target module, imported name or None, line)`` for every tpfuse import in ``path``, at any depth."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    package = module if _is_package(module, modules) else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names if a.name.split(".")[0] == "tpfuse"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != "tpfuse":
                continue
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                if submodule in modules:  # ``from pkg import module``: an edge to that module
                    out.append((submodule, None, node.lineno))
                else:
                    out.append((source, alias.name, node.lineno))
    return out


def _private_attributes(module, path, modules):
    """``(target module, name, line)`` for ``alias._name`` where ``alias`` is a tpfuse module this file
    imported (``from . import push`` then ``push._x``): reaching a private name without importing it."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    package = module if _is_package(module, modules) else module.rpartition(".")[0]
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases.update({a.asname: a.name for a in node.names if a.asname and a.name in modules})
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                source = ".".join(base[:len(base) - (node.level - 1)] + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                if f"{source}.{alias.name}" in modules:
                    aliases[alias.asname or alias.name] = f"{source}.{alias.name}"
    return [(aliases[n.value.id], n.attr, n.lineno) for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in aliases
            and n.attr.startswith("_") and not n.attr.startswith("__")]


def _graph():
    modules = _modules()
    return modules, {m: _imports(m, p, modules) for m, p in modules.items()}


def _find_cycle(edges):
    """One import circle as a list of modules, or None (depth-first search, colours)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def _cycle_edges(modules, imports):
    edges = {}
    for module, found in imports.items():
        for target, _, _ in found:
            # a package exposing its own submodules (``tpfuse/passes/__init__`` importing
            # ``tpfuse.passes.manager``) is not a dependency of the submodule on the package
            if _is_package(module, modules) and target.startswith(module + "."):
                continue
            if target in modules and target != module:
                edges.setdefault(module, set()).add(target)
    return edges


def test_the_graph_sees_the_modules_and_their_imports():
    # a graph of nothing has no circle: make sure the scan reads the tree and finds the known edges
    modules, imports = _graph()
    assert {"tpfuse.passes.barrier_elision", "tpfuse.compile_ops.all_gather_hidden",
            "tpfuse.kernels.push_gather"} <= set(modules)
    targets = {t for t, _, _ in imports["tpfuse.kernels.flag_gather"]}
    assert {"tpfuse.kernels.push_gather", "tpfuse.kernels.peer_args"} <= targets


def test_cycle_finder_finds_a_circle_through_a_function_level_import():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_relative_and_function_level_imports_are_edges(tmp_path):
    pkg = tmp_path / "tpfuse" / "compile_ops"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .b import _private\n    from ..kernels import k\n")
    modules = {"tpfuse.compile_ops": str(pkg / "__init__.py"), "tpfuse.compile_ops.a": str(pkg / "a.py"),
               "tpfuse.compile_ops.b": "b.py", "tpfuse.kernels": "k/__init__.py", "tpfuse.kernels.k": "k.py"}
    found = _imports("tpfuse.compile_ops.a", str(pkg / "a.py"), modules)
    assert ("tpfuse.compile_ops.b", "_private", 2) in found
    assert ("tpfuse.kernels.k", None, 3) in found
    (pkg / "c.py").write_text("from . import b as bee\n\ndef g():\n    return bee._hidden\n")
    modules["tpfuse.compile_ops.c"] = str(pkg / "c.py")
    assert _private_attributes("tpfuse.compile_ops.c", str(pkg / "c.py"), modules) == [
        ("tpfuse.compile_ops.b", "_hidden", 4)]


def test_no_import_circle():
    modules, imports = _graph()
    cycle = _find_cycle(_cycle_edges(modules, imports))
    assert cycle is None, (
        "import circle (function-level imports count): " + " -> ".join(cycle)
        + "; move the shared piece into a module both can import")


def test_no_private_name_imported_from_another_module():
    modules, imports = _graph()
    bad = [f"{module}:{line}: from {target} import {name}"
           for module, found in imports.items() for target, name, line in found
           if name and name.startswith("_") and not name.startswith("__") and target != module]
    bad += [f"{module}:{line}: {target}.{name}"
            for module, path in modules.items() for target, name, line in _private_attributes(module, path, modules)
            if target != module]
    assert not bad, "private names used across files; make them public in one place:\n" + "\n".join(bad)


@pytest.mark.parametrize("layer", range(1, len(LAYERS)))
def test_imports_run_down_the_layers(layer):
    _, imports = _graph()
    above = LAYERS[:layer]
    bad = [f"{module}:{line}: imports {target}"
           for module, found in imports.items() if module.startswith(LAYERS[layer])
           for target, _, line in found
           if any(target == a or target.startswith(a + ".") for a in above)]
    assert not bad, f"{LAYERS[layer]} must not import from {', '.join(above)}:\n" + "\n".join(bad)
