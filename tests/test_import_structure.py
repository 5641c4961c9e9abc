"""The module structure of ``tpfuse/``: layers, no import circle, no private names across files, one reader of
the environment.

Rules (docs/design.md):

- **Layers.**  Every module sits in one layer of ``LAYERS``, top to bottom: the command line (``__main__`` and the parser in
  ``cli/__init__``), the tools (``cli/``'s demo, explain, bench, the tuner and their rank launcher), the public API (the package's ``__init__``), ``passes``,
  ``compile_ops``, ``kernels``, and the settings (``config.py``).  A module imports from its own layer or
  below: a kernel does not know what an op is, an op does not know what a pass is, and the settings know
  nothing else.  A new module under ``passes/``, ``compile_ops/`` or ``kernels/`` is placed by its folder; a
  new top-level module fails until it is placed.
- **No import circle**, counting imports inside functions and ``importlib.import_module`` calls: a circle
  cannot be hidden by moving an import into a function or spelling it as a call.
- **No private name across files**: ``from m import _x``, ``m._x`` (``m`` bound by any import form, including
  ``import tpfuse.a.m`` then ``tpfuse.a.m._x``, or ``importlib.import_module``), ``getattr(m, "_x")`` and
  ``vars(m)["_x"]``.
- **The environment is read in ``config.py`` only** (its table is the one list of variables, docs/api.md):
  no ``os.environ[...]``, ``os.environ.get``, ``os.getenv``, ``from os import environ``/``getenv`` or other
  use of ``os.environ`` elsewhere; writing it (``os.environ[k] = v``, ``.update``, ``del``) is allowed.

Each rule is a function of a ``Tree`` (module name -> source text; nothing is imported, so it runs anywhere).
The tests run each one on the real package and on small trees that break it, which it must catch.

An import edge: ``import tpfuse.a.b`` and ``from tpfuse.a import b`` (``b`` a module) go to ``tpfuse.a.b``;
``from tpfuse.a import name`` goes to ``tpfuse.a`` (its package ``__init__``).  A package's ``__init__``
importing its own submodules is the package exposing them, not a dependency of those submodules on it, and
is no edge for circles.
"""

from __future__ import annotations

import ast
import os
from dataclasses import dataclass, field

import pytest

from protocol_walk import python_sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "tpfuse")
TOP = "tpfuse"

#: every module in one layer, top to bottom; a module may import from its own layer or any layer below it.
#: An entry names a module, or a package and everything under it (``tpfuse`` alone is the ``__init__`` only).
LAYERS = (
    # ``tpfuse.cli`` is the parser (``tpfuse/cli/__init__.py``); its commands are tools
    ("command line", ("tpfuse.__main__", "tpfuse.cli")),
    ("tools", ("tpfuse.cli.demo", "tpfuse.cli.demo_compile", "tpfuse.cli.explain", "tpfuse.cli.bench",
               "tpfuse.cli.errors", "tpfuse.ranks", "tpfuse.tune", "tpfuse.tune_gpu", "tpfuse.cli.tune")),
    ("public API", ("tpfuse",)),
    ("passes", ("tpfuse.passes",)),
    ("compile_ops", ("tpfuse.compile_ops",)),
    ("kernels", ("tpfuse.kernels",)),
    ("settings", ("tpfuse.config",)),
)

#: the one module that reads the environment
SETTINGS = "tpfuse.config"

#: environment uses outside config.py that are known and accepted, each with its reason: (module, line text).
#: Every entry must still be found (a stale one fails), so the list only shrinks.
ENVIRONMENT_ALLOWED = {
    # The benchmark launcher copies the whole environment into its child processes (plus the GPU safety
    # variables); it reads no variable's value.  Reported to the lead: a helper in config.py that returns
    # the copy would retire this entry.
    ("tpfuse.cli.bench", "env = dict(os.environ, **SAFE_GPU_ENV)"),
}


# --------------------------------------------------------------------------- the tree


@dataclass(frozen=True)
class Tree:
    """The modules of one package: ``{dotted name: source}``, and which of them are packages."""

    sources: dict[str, str]
    packages: frozenset[str]

    def __contains__(self, module: str) -> bool:
        return module in self.sources


def tree_of(files: dict[str, str]) -> Tree:
    """A ``Tree`` from ``{"tpfuse/a/b.py": source}`` (``/``-separated paths, ``.py`` files only)."""
    sources, packages = {}, set()
    for path, source in files.items():
        parts = path[: -len(".py")].split("/")
        if parts[-1] == "__init__":
            parts = parts[:-1]
            packages.add(".".join(parts))
        sources[".".join(parts)] = source
    return Tree(sources, frozenset(packages))


def read_package(package_dir: str) -> Tree:
    """The ``Tree`` of every ``.py`` file under ``package_dir``, read from disk (new modules included)."""
    return tree_of(python_sources(package_dir, os.path.dirname(package_dir)))


# --------------------------------------------------------------------------- one module's references


@dataclass
class Scan:
    """What one module reaches in other modules: imports and private names, each ``(target, name, line)``."""

    imports: list[tuple[str, str | None, int]] = field(default_factory=list)
    private: list[tuple[str, str, int]] = field(default_factory=list)


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _rooted(name: str) -> bool:
    return name.split(".")[0] == TOP


def _own_package(module: str, tree: Tree) -> str:
    return module if module in tree.packages else module.rpartition(".")[0]


def _absolute(module: str, tree: Tree, level: int, name: str | None) -> str:
    """The absolute name of ``from <level dots><name> import ...`` written in ``module``."""
    if not level:
        return name or ""
    base = _own_package(module, tree).split(".")
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


class _Scanner:
    """Binds names to tpfuse modules (every import form, ``importlib``, plain assignment) and finds the
    imports and private names they reach.  Bindings are file-wide: an import inside a function counts."""

    def __init__(self, module: str, tree: Tree, source: str):
        self.module, self.tree = module, tree
        self.syntax = ast.parse(source, module)
        self.bound: dict[str, str] = {}  # name -> tpfuse module
        self.importlib: set[str] = set()  # names bound to the importlib module
        self.import_module: set[str] = {"__import__"}  # names bound to a function that imports by name
        self.sys: set[str] = set()  # names bound to the sys module (``sys.modules["tpfuse.x"]``)
        self.scan = Scan()

    def run(self) -> Scan:
        for node in ast.walk(self.syntax):
            if isinstance(node, ast.Import):
                self._import(node)
            elif isinstance(node, ast.ImportFrom):
                self._import_from(node)
        for _ in range(3):  # assignments of modules to names, and chains of them
            for node in ast.walk(self.syntax):
                if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                    target = self.resolve(node.value)
                    if target:
                        self.bound[node.targets[0].id] = target
        for node in ast.walk(self.syntax):
            if isinstance(node, ast.Call):
                self._dynamic_import(node)
                self._private_by_name(node)
            elif isinstance(node, ast.Attribute) and _private(node.attr):
                target = self.resolve(node.value)
                if target:
                    self.scan.private.append((target, node.attr, node.lineno))
            elif isinstance(node, ast.Subscript):
                self._private_in_namespace(node)
        return self.scan

    def _import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name == "importlib":
                self.importlib.add(alias.asname or alias.name)
            if alias.name == "sys":
                self.sys.add(alias.asname or alias.name)
            if not _rooted(alias.name):
                continue
            self.scan.imports.append((alias.name, None, node.lineno))
            # ``import tpfuse.a.b`` binds ``tpfuse``; ``import tpfuse.a.b as m`` binds ``m`` to ``tpfuse.a.b``
            self.bound[alias.asname or TOP] = alias.name if alias.asname else TOP

    def _import_from(self, node: ast.ImportFrom) -> None:
        source = _absolute(self.module, self.tree, node.level, node.module)
        if source == "importlib":
            self.import_module.update(a.asname or a.name for a in node.names if a.name == "import_module")
        if not _rooted(source):
            return
        for alias in node.names:
            submodule = f"{source}.{alias.name}"
            if submodule in self.tree:  # ``from pkg import module``: an edge to that module
                self.scan.imports.append((submodule, None, node.lineno))
                self.bound[alias.asname or alias.name] = submodule
            else:
                self.scan.imports.append((source, alias.name, node.lineno))

    def resolve(self, expr: ast.expr) -> str | None:
        """The tpfuse module ``expr`` evaluates to, where the source says so, else None."""
        if isinstance(expr, ast.Name):
            return self.bound.get(expr.id)
        if isinstance(expr, ast.Attribute):
            base = self.resolve(expr.value)
            return f"{base}.{expr.attr}" if base and f"{base}.{expr.attr}" in self.tree else None
        if isinstance(expr, ast.Call):
            return self._imported_by_call(expr)
        if (isinstance(expr, ast.Subscript) and isinstance(expr.value, ast.Attribute) and expr.value.attr == "modules"
                and isinstance(expr.value.value, ast.Name) and expr.value.value.id in self.sys):
            name = self._text(expr.slice)
            return name if name in self.tree else None
        return None

    def _is_import_call(self, call: ast.Call) -> bool:
        func = call.func
        if isinstance(func, ast.Name):
            return func.id in self.import_module
        return (isinstance(func, ast.Attribute) and func.attr == "import_module"
                and isinstance(func.value, ast.Name) and func.value.id in self.importlib)

    def _imported_by_call(self, call: ast.Call) -> str | None:
        """The module an ``importlib.import_module(...)`` / ``__import__(...)`` call imports, when written out."""
        if not self._is_import_call(call) or not call.args:
            return None
        name = self._text(call.args[0])
        package = self._text(call.args[1]) if len(call.args) > 1 else None
        package = next((self._text(k.value) for k in call.keywords if k.arg == "package"), package)
        if name is None:
            return None
        if name.startswith("."):
            level = len(name) - len(name.lstrip("."))
            anchor = package if package is not None else _own_package(self.module, self.tree)
            base = anchor.split(".")[: len(anchor.split(".")) - (level - 1)]
            name = ".".join(base + ([name.lstrip(".")] if name.lstrip(".") else []))
        return name if _rooted(name) else None

    def _text(self, expr: ast.expr) -> str | None:
        """A string the source spells out: a literal, ``__name__``/``__package__``, or an f-string of those."""
        if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
            return expr.value
        if isinstance(expr, ast.Name) and expr.id == "__name__":
            return self.module
        if isinstance(expr, ast.Name) and expr.id == "__package__":
            return _own_package(self.module, self.tree)
        if isinstance(expr, ast.FormattedValue):
            return self._text(expr.value)
        if isinstance(expr, ast.JoinedStr):
            parts = [self._text(v) for v in expr.values]
            return None if None in parts else "".join(parts)
        return None

    def _dynamic_import(self, call: ast.Call) -> None:
        target = self._imported_by_call(call)
        if target:
            self.scan.imports.append((target, None, call.lineno))

    def _private_by_name(self, call: ast.Call) -> None:
        """``getattr(m, "_x")`` (and has/set/delattr) on a tpfuse module."""
        func = call.func
        if not (isinstance(func, ast.Name) and func.id in ("getattr", "hasattr", "setattr", "delattr")):
            return
        if len(call.args) >= 2:
            name = self._text(call.args[1])
            target = self.resolve(call.args[0])
            if target and name and _private(name):
                self.scan.private.append((target, name, call.lineno))

    def _private_in_namespace(self, node: ast.Subscript) -> None:
        """``vars(m)["_x"]`` and ``m.__dict__["_x"]`` on a tpfuse module."""
        owner = node.value
        if isinstance(owner, ast.Call) and isinstance(owner.func, ast.Name) and owner.func.id == "vars" and owner.args:
            target = self.resolve(owner.args[0])
        elif isinstance(owner, ast.Attribute) and owner.attr == "__dict__":
            target = self.resolve(owner.value)
        else:
            return
        name = self._text(node.slice)
        if target and name and _private(name):
            self.scan.private.append((target, name, node.lineno))


def scan_module(module: str, tree: Tree) -> Scan:
    return _Scanner(module, tree, tree.sources[module]).run()


# --------------------------------------------------------------------------- the rules


def layer_of(module: str, layers=LAYERS) -> int | None:
    """The index of ``module``'s layer: the longest entry that names it or a package above it."""
    best, best_len = None, -1
    for index, (_, entries) in enumerate(layers):
        for entry in entries:
            covers = module == entry or (entry != TOP and module.startswith(entry + "."))
            if covers and len(entry) > best_len:
                best, best_len = index, len(entry)
    return best


def modules_without_a_layer(tree: Tree, layers=LAYERS) -> list[str]:
    return sorted(m for m in tree.sources if layer_of(m, layers) is None)


def imports_up_the_layers(tree: Tree, layers=LAYERS) -> list[str]:
    bad = []
    for module in sorted(tree.sources):
        own = layer_of(module, layers)
        for target, _, line in scan_module(module, tree).imports:
            theirs = layer_of(target, layers)
            if own is not None and theirs is not None and theirs < own:
                bad.append(f"{module}:{line}: imports {target} ({layers[own][0]} must not import from "
                           f"{layers[theirs][0]}, a layer above it)")
    return bad


def import_edges(tree: Tree) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for module in tree.sources:
        for target, _, _ in scan_module(module, tree).imports:
            # a package exposing its own submodules (``tpfuse/passes/__init__`` importing
            # ``tpfuse.passes.manager``) is not a dependency of the submodule on the package
            if module in tree.packages and target.startswith(module + "."):
                continue
            if target in tree and target != module:
                edges.setdefault(module, set()).add(target)
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
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


def import_circles(tree: Tree) -> list[str]:
    cycle = find_cycle(import_edges(tree))
    return [" -> ".join(cycle)] if cycle else []


def private_names_across_modules(tree: Tree) -> list[str]:
    bad = []
    for module in sorted(tree.sources):
        scan = scan_module(module, tree)
        bad += [f"{module}:{line}: from {target} import {name}" for target, name, line in scan.imports
                if name and _private(name) and target != module]
        bad += [f"{module}:{line}: {target}.{name}" for target, name, line in scan.private if target != module]
    return bad


#: the names in ``os`` that read the process environment
_ENVIRONMENT_NAMES = ("environ", "environb", "getenv", "getenvb")


def environment_uses(source: str, filename: str = "<source>") -> list[tuple[int, str]]:
    """``(line, line text)`` of every read of the process environment in ``source``.

    A read is any use of ``os.environ`` (``os`` under any alias) other than writing it
    (``os.environ[k] = v``, ``del os.environ[k]``, ``os.environ.update(...)``), ``os.getenv``,
    ``getattr(os, "environ")`` and the like (the name spelled as a string), and importing
    ``environ``/``getenv`` from ``os`` (whatever is done with them then)."""
    syntax = ast.parse(source, filename)
    lines = source.splitlines()
    parents = {child: node for node in ast.walk(syntax) for child in ast.iter_child_nodes(node)}
    os_names = {a.asname or "os" for n in ast.walk(syntax) if isinstance(n, ast.Import)
                for a in n.names if a.name == "os" or (a.name.startswith("os.") and not a.asname)}
    found = []
    for node in ast.walk(syntax):
        if isinstance(node, ast.ImportFrom) and node.module == "os" and not node.level:
            if any(a.name in (*_ENVIRONMENT_NAMES, "*") for a in node.names):
                found.append(node.lineno)
        elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in os_names
              and node.attr in _ENVIRONMENT_NAMES):
            if not (node.attr.startswith("environ") and _writes_environment(node, parents)):
                found.append(node.lineno)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
              and len(node.args) >= 2 and isinstance(node.args[0], ast.Name) and node.args[0].id in os_names
              and isinstance(node.args[1], ast.Constant) and node.args[1].value in _ENVIRONMENT_NAMES):
            found.append(node.lineno)
    return [(line, lines[line - 1].strip()) for line in sorted(set(found))]


def _writes_environment(environ: ast.Attribute, parents) -> bool:
    parent = parents.get(environ)
    if isinstance(parent, ast.Subscript) and parent.value is environ:
        return isinstance(parent.ctx, (ast.Store, ast.Del))
    if isinstance(parent, ast.Attribute) and parent.attr == "update":
        return isinstance(parents.get(parent), ast.Call) and parents[parent].func is parent
    return False


def environment_reads_outside_settings(tree: Tree, allowed=frozenset()) -> list[str]:
    return [f"{module}:{line}: {text}" for module in sorted(tree.sources) if module != SETTINGS
            for line, text in environment_uses(tree.sources[module], module) if (module, text) not in allowed]


# --------------------------------------------------------------------------- the real package


@pytest.fixture(scope="module")
def package():
    return read_package(PACKAGE)


def test_the_scan_sees_the_modules_and_their_imports(package):
    # a tree of nothing passes every rule: make sure the scan reads the package and finds known edges
    assert {"tpfuse.passes.barrier_elision", "tpfuse.compile_ops.all_gather_hidden",
            "tpfuse.kernels.barrier.push_gather",
            "tpfuse.config", "tpfuse.__main__", "tpfuse.cli", "tpfuse.cli.demo", "tpfuse"} <= set(package.sources)
    edges = import_edges(package)
    assert {"tpfuse.kernels.compiler", "tpfuse.kernels.peer_args"} <= edges["tpfuse.kernels.flag.gather"]
    assert "tpfuse.config" in edges["tpfuse.compile_ops.dispatch"]
    assert any(environment_uses(package.sources[SETTINGS]))


def test_every_module_is_in_a_layer(package):
    missing = modules_without_a_layer(package)
    assert not missing, ("modules in no layer; add each to LAYERS in tests/test_import_structure.py at the "
                         "level of what it may import:\n" + "\n".join(missing))


def test_imports_run_down_the_layers(package):
    bad = imports_up_the_layers(package)
    assert not bad, "imports up the layers (docs/design.md):\n" + "\n".join(bad)


def test_no_import_circle(package):
    bad = import_circles(package)
    assert not bad, ("import circle (function-level and importlib imports count): " + bad[0]
                     + "; move the shared piece into a module both can import")


def test_no_private_name_used_across_modules(package):
    bad = private_names_across_modules(package)
    assert not bad, "private names used across files; make them public in one place:\n" + "\n".join(bad)


def test_the_environment_is_read_in_config_only(package):
    bad = environment_reads_outside_settings(package, ENVIRONMENT_ALLOWED)
    assert not bad, ("environment read outside tpfuse/config.py; add the variable to config.VARIABLES "
                     "(and docs/api.md) and read it through config:\n" + "\n".join(bad))


def test_every_allowed_environment_use_is_still_there(package):
    found = {(m, text) for m in package.sources for _, text in environment_uses(package.sources[m], m)}
    stale = sorted(ENVIRONMENT_ALLOWED - found)
    assert not stale, f"remove these from ENVIRONMENT_ALLOWED, the code no longer has them: {stale}"


# --------------------------------------------------------------------------- small trees that break a rule

#: a small tree with one module per layer that keeps every rule; each case below changes one file of it
CLEAN = {
    "tpfuse/__init__.py": "from .passes import manager\nfrom .compile_ops import dispatch\n",
    "tpfuse/__main__.py": "from .cli import main\n",
    "tpfuse/cli/__init__.py": "from .explain import run\n\ndef main():\n    from . import demo\n",
    "tpfuse/cli/demo.py": "import tpfuse\nfrom ..ranks import run_ranks\nfrom . import demo_compile\n",
    "tpfuse/cli/demo_compile.py": "from ..ranks import run_ranks\n",
    "tpfuse/cli/explain.py": "import importlib\n\ndef run(name):\n    return importlib.import_module(name)\n",
    "tpfuse/cli/bench.py": "import os\nfrom ..ranks import SAFE\n",
    "tpfuse/ranks.py": "import os\nSAFE = {}\n\ndef run_ranks():\n    os.environ.update(SAFE)\n"
                       "    os.environ['RANK'] = '0'\n    del os.environ['RANK']\n",
    "tpfuse/config.py": "import os\n\ndef read(name):\n    return os.environ.get(name)\n",
    "tpfuse/passes/__init__.py": "from . import manager\n",
    "tpfuse/passes/manager.py": "from .. import config as settings\nfrom ..compile_ops import dispatch\n\n"
                                "def backend():\n    return dispatch.parse_forced(settings.read('TPFUSE_BACKEND'))\n",
    "tpfuse/compile_ops/__init__.py": "",
    "tpfuse/compile_ops/dispatch.py": "from .. import config as settings\nfrom ..kernels import push\n\n"
                                      "def parse_forced(raw):\n    return _parse_forced(raw)\n\n"
                                      "def _parse_forced(raw):\n    return raw\n",
    "tpfuse/kernels/__init__.py": "",
    "tpfuse/kernels/push.py": "from tpfuse import config\n",
    "tpfuse/kernels/barrier.py": "from . import push\n",
}

PRIVATE_ACROSS = [
    "import tpfuse.compile_ops.dispatch\n\ndef f():\n    return tpfuse.compile_ops.dispatch._parse_forced\n",
    "import tpfuse.compile_ops.dispatch as dispatch\n\ndef f():\n    return dispatch._parse_forced\n",
    "import tpfuse.compile_ops.dispatch\ndispatch = tpfuse.compile_ops.dispatch\nx = dispatch._parse_forced\n",
    "import sys\n\ndef f():\n    return sys.modules['tpfuse.compile_ops.dispatch']._parse_forced\n",
    "from ..compile_ops import dispatch\n\ndef f():\n    return getattr(dispatch, '_parse_forced')\n",
    "import importlib\nm = importlib.import_module('tpfuse.compile_ops.dispatch')\nx = getattr(m, '_x')\n",
    "from importlib import import_module\n\ndef f():\n"
    "    return import_module('..compile_ops.dispatch', __package__)._x\n",
    "from tpfuse import compile_ops as ops\nd = ops.dispatch\nx = d._parse_forced\n",
    "def f():\n    from ..compile_ops.dispatch import _parse_forced\n",
    "from ..compile_ops import dispatch\nx = vars(dispatch)['_parse_forced']\n",
]

UP_THE_LAYERS = [
    ("tpfuse/config.py", "from . import passes\n"),
    ("tpfuse/config.py", "def f():\n    import tpfuse.passes.manager\n"),
    ("tpfuse/kernels/push.py", "from tpfuse.compile_ops import dispatch\n"),
    ("tpfuse/compile_ops/dispatch.py", "def f():\n    from tpfuse import enable\n"),
    ("tpfuse/compile_ops/dispatch.py", "def f():\n    from ..passes.manager import backend\n"),
    ("tpfuse/kernels/push.py", "import importlib\nm = importlib.import_module('tpfuse.passes.manager')\n"),
    ("tpfuse/passes/manager.py", "from ..ranks import run_ranks\n"),
    ("tpfuse/ranks.py", "from . import __main__\n"),
    ("tpfuse/kernels/push.py", "def f():\n    return __import__('tpfuse.passes.manager')\n"),
    ("tpfuse/kernels/push.py", "import importlib\nm = importlib.import_module('..passes.manager', package=__package__)\n"),
    ("tpfuse/ranks.py", "from .cli import main\n"),
    ("tpfuse/cli/demo.py", "from . import main\n"),
    ("tpfuse/cli/bench.py", "def f():\n    from tpfuse.cli import main\n"),
]

CIRCLES = [
    {"tpfuse/kernels/push.py": "from . import barrier\n"},
    {"tpfuse/kernels/push.py": "def f():\n    from .barrier import x\n"},
    {"tpfuse/kernels/push.py": "import importlib\n\ndef f():\n"
                               "    return importlib.import_module('tpfuse.kernels.barrier')\n"},
    {"tpfuse/kernels/push.py": "import importlib as il\nm = il.import_module('.barrier', __package__)\n"},
    {"tpfuse/kernels/push.py": "from importlib import import_module\nm = import_module(f'{__package__}.barrier')\n"},
    {"tpfuse/compile_ops/a.py": "from . import b\n", "tpfuse/compile_ops/b.py": "def f():\n    from .a import g\n"},
]

ENVIRONMENT_READS = [
    "from os import environ\n\ndef f():\n    return environ.get('TPFUSE_BACKEND')\n",
    "from os import getenv\n",
    "import os\nx = os.environ['TPFUSE_BACKEND']\n",
    "import os\nx = os.environ.get('TPFUSE_BACKEND', 'auto')\n",
    "import os\nx = os.getenv('TPFUSE_BACKEND')\n",
    "import os as system\nx = system.environ.get('TPFUSE_BACKEND')\n",
    "import os.path\nx = os.environ.copy()\n",
    "import os\nenv = os.environ\n",
    "import os\nx = 'TPFUSE_BACKEND' in os.environ\n",
    "import os\nx = os.environ.setdefault('TPFUSE_BACKEND', 'auto')\n",
    "import os\nx = getattr(os, 'environ')['TPFUSE_BACKEND']\n",
    "import os as system\nread = getattr(system, 'getenv')\n",
    "import os\nx = os.environb.get(b'TPFUSE_BACKEND')\n",
]


def _broken(changes: dict[str, str]) -> Tree:
    return tree_of({**CLEAN, **changes})


def test_the_clean_tree_keeps_every_rule():
    # the cases below differ from it in one file: what a rule finds there is that file's doing
    tree = tree_of(CLEAN)
    assert not modules_without_a_layer(tree)
    assert not imports_up_the_layers(tree)
    assert not import_circles(tree)
    assert not private_names_across_modules(tree)
    assert not environment_reads_outside_settings(tree)
    assert environment_uses(CLEAN["tpfuse/config.py"])  # config reads it: that is allowed, not unseen


@pytest.mark.parametrize("source", PRIVATE_ACROSS)
def test_a_private_name_across_modules_is_caught(source):
    bad = private_names_across_modules(_broken({"tpfuse/passes/manager.py": source}))
    assert bad and all(b.startswith("tpfuse.passes.manager:") for b in bad), bad
    assert any("tpfuse.compile_ops.dispatch" in b for b in bad), bad


def test_a_module_may_reach_its_own_private_names():
    own = "import tpfuse.compile_ops.dispatch as me\nx = me._parse_forced\ny = getattr(me, '_parse_forced')\n"
    assert not private_names_across_modules(_broken({"tpfuse/compile_ops/dispatch.py": own}))


@pytest.mark.parametrize("path, source", UP_THE_LAYERS)
def test_an_import_up_the_layers_is_caught(path, source):
    module = path[: -len(".py")].replace("/", ".")
    bad = imports_up_the_layers(_broken({path: source}))
    assert bad and all(b.startswith(module + ":") for b in bad), bad


def test_a_new_top_level_module_must_be_placed_in_a_layer():
    tree = _broken({"tpfuse/extra.py": "from .passes import manager\n"})
    assert modules_without_a_layer(tree) == ["tpfuse.extra"]
    # a new top-level package too, with everything in it
    tree = _broken({"tpfuse/extras/__init__.py": "", "tpfuse/extras/more.py": "from ..passes import manager\n"})
    assert modules_without_a_layer(tree) == ["tpfuse.extras", "tpfuse.extras.more"]


def test_a_new_command_line_module_is_placed_by_its_folder():
    # tpfuse/cli/new.py sits with the parser (command line): a tool importing it imports up the layers
    tree = _broken({"tpfuse/cli/new.py": "from ..ranks import run_ranks\n",
                    "tpfuse/cli/demo.py": "from . import new\n"})
    assert not modules_without_a_layer(tree)
    assert imports_up_the_layers(tree) == [
        "tpfuse.cli.demo:1: imports tpfuse.cli.new (tools must not import from command line, a layer above it)"]


def test_new_modules_of_a_layer_package_are_placed_by_their_folder():
    tree = _broken({"tpfuse/compile_ops/reduce_hidden.py": "from ..passes import manager\n",
                    "tpfuse/passes/eliminate_sums.py": "from ..compile_ops import reduce_hidden\n"})
    assert not modules_without_a_layer(tree)
    assert imports_up_the_layers(tree) == [
        "tpfuse.compile_ops.reduce_hidden:1: imports tpfuse.passes.manager (compile_ops must not import from "
        "passes, a layer above it)"]


@pytest.mark.parametrize("changes", CIRCLES)
def test_an_import_circle_is_caught(changes):
    bad = import_circles(_broken(changes))
    assert bad, changes
    assert all(m.replace("/", ".")[: -len(".py")] in bad[0] for m in changes), bad


def test_a_package_exposing_its_submodules_is_no_circle():
    tree = _broken({"tpfuse/passes/manager.py": "from . import x\n", "tpfuse/passes/__init__.py":
                    "from . import manager\nx = 1\n"})
    assert not import_circles(tree)


@pytest.mark.parametrize("source", ENVIRONMENT_READS)
def test_an_environment_read_outside_config_is_caught(source):
    bad = environment_reads_outside_settings(_broken({"tpfuse/compile_ops/dispatch.py": source}))
    assert bad and all(b.startswith("tpfuse.compile_ops.dispatch:") for b in bad), bad


def test_writing_the_environment_is_no_read():
    assert not environment_uses(CLEAN["tpfuse/ranks.py"])


def test_an_allowed_environment_use_is_allowed_only_where_listed():
    source = "import os\nenv = dict(os.environ, **SAFE_GPU_ENV)\n"
    allowed = {("tpfuse.cli.bench", "env = dict(os.environ, **SAFE_GPU_ENV)")}
    assert not environment_reads_outside_settings(_broken({"tpfuse/cli/bench.py": source}), allowed)
    assert environment_reads_outside_settings(_broken({"tpfuse/ranks.py": source}), allowed)
