"""Follow a call through the source, statically: the files a backend's prepare path visits, in order.

``walk(tree, module, qualname)`` starts at one function and follows every call it can
resolve from the source alone, depth first and in source order, entering each function
once; it returns the file of each function as it is entered.  ``returns(files)`` counts,
per file, how often the walk comes back to it after having left it.  The walk goal
(docs/design.md, "Reading a protocol's path"): from a backend's ``prepare`` and ``prepare_linear``, no file is
returned to more than once.

What it resolves (nothing is imported, so it runs on any tree of sources):
- a name defined at the top of the same module, or imported from a tpfuse module
  (``from .x import f``, following re-exports);
- ``m.f`` and ``m.sub.f`` where ``m`` is a tpfuse module bound by an import;
- ``self.f`` inside a method: the method of the object's class (``self_class``), else of the class the
  method is defined in, or of a base class (bases found by name);
- ``NAME.f`` where ``NAME = Cls(...)`` at the top of a module: ``Cls``'s method;
- a class called like a function: its ``__init__``, where the class defines one.
A function defined inside another (a launcher's closure) is walked as part of it.  Calls on
other objects (``ws.order.next_call()``) are not followed: the walk is a lower bound on the
path, never a made-up one.
"""

from __future__ import annotations

import ast
import os
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOP = "tpfuse"


@dataclass
class Module:
    name: str
    path: str
    is_package: bool
    syntax: ast.Module
    functions: dict = field(default_factory=dict)  # qualname -> FunctionDef (top-level and methods)
    classes: dict = field(default_factory=dict)  # name -> ClassDef
    imported: dict = field(default_factory=dict)  # local name -> (module, attribute or None)
    instances: dict = field(default_factory=dict)  # local name -> class name called to make it


def python_sources(folder: str, relative_to: str) -> dict[str, str]:
    """``{"tpfuse/a/b.py": source}`` for every ``.py`` file under ``folder`` (new files included), the paths
    relative to ``relative_to`` with ``/``."""
    files = {}
    for base, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(base, name)
                with open(path, encoding="utf-8") as f:
                    files[os.path.relpath(path, relative_to).replace(os.sep, "/")] = f.read()
    return files


def read_tree(root: str = ROOT, top: str = TOP) -> dict[str, Module]:
    """Every module under ``root/top``, parsed."""
    return tree_of(python_sources(os.path.join(root, top), root))


def tree_of(files: dict[str, str]) -> dict[str, Module]:
    """Modules from ``{"tpfuse/a/b.py": source}``."""
    modules = {}
    for path, source in files.items():
        parts = path[: -len(".py")].split("/")
        package = parts[-1] == "__init__"
        if package:
            parts = parts[:-1]
        name = ".".join(parts)
        modules[name] = Module(name, path, package, ast.parse(source, path))
    for module in modules.values():
        _index(module, modules)
    return modules


def _absolute(module: Module, level: int, name: str | None) -> str:
    if not level:
        return name or ""
    base = module.name.split(".") if module.is_package else module.name.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _index(module: Module, modules: dict[str, Module]) -> None:
    for node in module.syntax.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            module.functions[node.name] = node
        elif isinstance(node, ast.ClassDef):
            module.classes[node.name] = node
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    module.functions[f"{node.name}.{item.name}"] = item
        elif (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
              and isinstance(node.value.func, ast.Name)):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    module.instances[target.id] = node.value.func.id
    for node in ast.walk(module.syntax):  # imports anywhere in the file, function-level ones too
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == TOP:
                    if alias.asname:
                        module.imported[alias.asname] = (alias.name, None)
                    else:
                        module.imported.setdefault(TOP, (TOP, None))
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(module, node.level, node.module)
            if source.split(".")[0] != TOP:
                continue
            for alias in node.names:
                local = alias.asname or alias.name
                if f"{source}.{alias.name}" in modules:
                    module.imported[local] = (f"{source}.{alias.name}", None)
                else:
                    module.imported[local] = (source, alias.name)


class Walker:
    def __init__(self, modules: dict[str, Module], self_class: tuple[str, str] | None = None):
        self.modules = modules
        #: (module, class) of the object the walk starts on: ``self.f`` resolves on it first (a bound method)
        self.self_class = self_class
        self.seen: set[tuple[str, str]] = set()
        self.files: list[str] = []
        self.steps: list[str] = []  # "path:qualname", as entered

    # ------------------------------------------------------------------ resolving names

    def _definition(self, module: str, name: str, depth: int = 0):
        """(module, qualname) of ``name`` as seen from ``module``: defined there or imported (re-exports followed)."""
        mod = self.modules.get(module)
        if mod is None or depth > 8:
            return None
        if name in mod.functions or name in mod.classes:
            return module, name
        if name in mod.imported:
            target, attribute = mod.imported[name]
            if attribute is None:
                return ("module", target)
            return self._definition(target, attribute, depth + 1)
        if name in mod.instances:
            return ("instance", module, mod.instances[name])
        return None

    def _module_of(self, module: str, expr: ast.expr) -> str | None:
        """The tpfuse module ``expr`` names, seen from ``module``."""
        if isinstance(expr, ast.Name):
            found = self._definition(module, expr.id)
            return found[1] if found and found[0] == "module" else None
        if isinstance(expr, ast.Attribute):
            base = self._module_of(module, expr.value)
            if base and f"{base}.{expr.attr}" in self.modules:
                return f"{base}.{expr.attr}"
        return None

    def _method(self, module: str, cls: str, name: str, depth: int = 0):
        """(module, "Cls.name") of a method of ``cls`` (defined in ``module``) or of its tpfuse bases."""
        mod = self.modules.get(module)
        if mod is None or cls not in mod.classes or depth > 8:
            return None
        if f"{cls}.{name}" in mod.functions:
            return module, f"{cls}.{name}"
        for base in mod.classes[cls].bases:
            found = None
            if isinstance(base, ast.Name):
                found = self._definition(module, base.id)
            elif isinstance(base, ast.Attribute):
                owner = self._module_of(module, base.value)
                found = self._definition(owner, base.attr) if owner else None
            if found and found[0] not in ("module", "instance"):
                method = self._method(found[0], found[1], name, depth + 1)
                if method:
                    return method
        return None

    def _callee(self, module: str, cls: str | None, call: ast.Call):
        func = call.func
        if isinstance(func, ast.Name):
            found = self._definition(module, func.id)
        elif isinstance(func, ast.Attribute):
            value = func.value
            if isinstance(value, ast.Name) and value.id == "self" and cls:
                bound = self._method(*self.self_class, func.attr) if self.self_class else None
                return bound or self._method(module, cls, func.attr)
            owner = self._module_of(module, value)
            if owner:
                found = self._definition(owner, func.attr)
            elif isinstance(value, ast.Name):
                holder = self._definition(module, value.id)
                if holder and holder[0] == "instance":
                    made = self._definition(holder[1], holder[2])
                    return self._method(*made, func.attr) if made and made[0] not in ("module", "instance") else None
                if holder and holder[0] not in ("module", "instance") and holder[1] in self.modules[holder[0]].classes:
                    return self._method(holder[0], holder[1], func.attr)
                return None
            else:
                return None
        else:
            return None
        if not found or found[0] in ("module", "instance"):
            return None
        target_module, name = found
        if name in self.modules[target_module].classes:
            return self._method(target_module, name, "__init__")
        return target_module, name

    # ------------------------------------------------------------------ walking

    def enter(self, module: str, qualname: str) -> None:
        if (module, qualname) in self.seen:
            return
        self.seen.add((module, qualname))
        mod = self.modules[module]
        self.files.append(mod.path)
        self.steps.append(f"{mod.path}:{qualname}")
        cls = qualname.split(".")[0] if "." in qualname else None
        for call in _calls_in_order(mod.functions[qualname]):
            callee = self._callee(module, cls, call)
            if callee:
                self.enter(*callee)


def _calls_in_order(function: ast.AST) -> list[ast.Call]:
    """The calls in ``function``'s body (nested functions included), in source order."""
    calls = []

    class Visitor(ast.NodeVisitor):
        def visit_Call(self, node):
            self.generic_visit(node)  # arguments are evaluated first
            calls.append(node)

    for statement in function.body:
        Visitor().visit(statement)
    return calls


def walk(modules: dict[str, Module], module: str, qualname: str, self_class: tuple[str, str] | None = None) -> Walker:
    """The walk from ``module``'s function ``qualname`` (``"Cls.method"`` for a method).  ``self_class``:
    (module, class) of the object whose method it is, where that is a subclass of the defining class."""
    walker = Walker(modules, self_class)
    walker.enter(module, qualname)
    return walker


def runs(files: list[str]) -> list[str]:
    """``files`` with consecutive repeats merged: the files as the walk moves between them."""
    return [f for i, f in enumerate(files) if i == 0 or files[i - 1] != f]


def returns(files: list[str]) -> dict[str, int]:
    """Per file, how often the walk comes back to it after leaving it (files never returned to left out)."""
    counts: dict[str, int] = {}
    for f in runs(files):
        counts[f] = counts.get(f, 0) + 1
    return {f: n - 1 for f, n in counts.items() if n > 1}


def defining_class(cls: type, method: str) -> type:
    """The class in ``cls``'s MRO whose body defines ``method``."""
    return next(c for c in cls.__mro__ if method in c.__dict__)
