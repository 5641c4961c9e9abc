"""The walk goal (docs/design.md, "Reading a protocol's path"): following a call through a protocol's prepare
path returns to a file it has left at most once.

``protocol_walk.walk`` follows the calls from a backend's ``prepare`` through the source (nothing run, no GPU)
and lists the files in the order the path enters them.  Each registered backend's gather path (``prepare``) and
fused linear path (``prepare_linear``) is checked; small trees show that the checker finds a braided path and
follows the call forms the protocols use.
"""

import pytest

import protocol_walk as pw
from tpfuse.compile_ops import dispatch
from tpfuse.compile_ops.backend import GatherBackend

#: per protocol, files its prepare path must reach: a walk that stopped early would pass for nothing
REACHES = {
    "p2p": {"tpfuse/compile_ops/barrier/launcher.py", "tpfuse/compile_ops/barrier/slots.py",
            "tpfuse/kernels/barrier/push_gather.py", "tpfuse/compile_ops/workspace.py"},
    "multimem": {"tpfuse/compile_ops/barrier/launcher.py", "tpfuse/kernels/barrier/push_gather.py"},
    "flag": {"tpfuse/compile_ops/flag/launcher.py", "tpfuse/compile_ops/flag/buffers.py",
             "tpfuse/kernels/flag/gather.py", "tpfuse/compile_ops/workspace.py"},
    "gloo": {"tpfuse/compile_ops/collective.py"},
    "nccl": {"tpfuse/compile_ops/collective.py"},
    "nccl_symmetric": {"tpfuse/compile_ops/nccl_symmetric/launcher.py", "tpfuse/compile_ops/nccl_symmetric/windows.py",
                       "tpfuse/compile_ops/workspace.py"},
}


#: the fused op's path: whether the call fuses (the rule, the kernel's facts), the launcher, the compiled kernel,
#: the barrier protocol's slots
FUSED_PATH = {"tpfuse/compile_ops/linear_decision.py", "tpfuse/compile_ops/linear_cost.py",
              "tpfuse/compile_ops/linear_push.py", "tpfuse/kernels/linear_push.py", "tpfuse/compile_ops/compiled.py",
              "tpfuse/compile_ops/barrier/slots.py"}
#: per backend with a fused kernel (its own ``prepare_linear``), files that path must reach
FUSED_REACHES = {"p2p": FUSED_PATH, "multimem": FUSED_PATH}

@pytest.fixture(scope="module")
def package():
    return pw.read_tree()


def _prepare_walk(package, backend, method="prepare"):
    owner = pw.defining_class(type(backend), method)
    return pw.walk(package, owner.__module__, f"{owner.__name__}.{method}",
                   self_class=(type(backend).__module__, type(backend).__name__))


def _braided(files):
    """The files a path returns to more than once."""
    return {f: n for f, n in pw.returns(files).items() if n > 1}


@pytest.mark.parametrize("backend", dispatch.BACKENDS, ids=lambda b: b.name)
def test_a_prepare_path_returns_to_a_file_at_most_once(package, backend):
    walker = _prepare_walk(package, backend)
    assert REACHES[backend.name] <= set(walker.files), (backend.name, pw.runs(walker.files))
    braided = _braided(walker.files)
    assert not braided, (f"{backend.name}: the prepare path returns to {braided} more than once; the path, "
                         f"file by file: {pw.runs(walker.files)}")


def _has_fused_kernel(backend):
    return pw.defining_class(type(backend), "prepare_linear") is not GatherBackend


def test_every_fused_kernel_path_is_held_to_what_it_must_reach():
    """A backend that has a fused kernel is walked with the files its path must reach: one without an entry
    here would pass on a path that stopped early."""
    assert {b.name for b in dispatch.BACKENDS if _has_fused_kernel(b)} == set(FUSED_REACHES)


@pytest.mark.parametrize("backend", dispatch.BACKENDS, ids=lambda b: b.name)
def test_a_fused_prepare_path_returns_to_a_file_at_most_once(package, backend):
    """The fused op's path (``prepare_linear``), the kernel module's source builder included."""
    walker = _prepare_walk(package, backend, "prepare_linear")
    assert FUSED_REACHES.get(backend.name, set()) <= set(walker.files), (backend.name, pw.runs(walker.files))
    braided = _braided(walker.files)
    assert not braided, (f"{backend.name}: the fused prepare path returns to {braided} more than once; the path, "
                         f"file by file: {pw.runs(walker.files)}")


# --------------------------------------------------------------------------- the checker itself

#: a backend whose prepare goes back and forth between its file and a helper file (the old push path's shape)
BRAIDED = {
    "tpfuse/__init__.py": "",
    "tpfuse/proto/__init__.py": "",
    "tpfuse/proto/backend.py": (
        "from . import helpers\n\n"
        "class Toy:\n"
        "    def prepare(self, x):\n"
        "        ws = helpers.workspace(x)\n"
        "        plan = self.plan(ws)\n"  # back here, then out again, then back
        "        helpers.grow(ws)\n"
        "        return launch(plan)\n\n"
        "    def plan(self, ws):\n"
        "        return ws\n\n"
        "def launch(plan):\n"
        "    return plan\n"),
    "tpfuse/proto/helpers.py": "def workspace(x):\n    return x\n\ndef grow(ws):\n    return ws\n",
}

#: the same work, each file's part in one piece
LAYERED = {
    **BRAIDED,
    "tpfuse/proto/backend.py": (
        "from . import helpers\n\n"
        "class Toy:\n"
        "    def prepare(self, x):\n"
        "        plan = self.plan(x)\n"
        "        ws = helpers.workspace(x)\n"
        "        helpers.grow(ws)\n"
        "        return plan\n\n"
        "    def plan(self, ws):\n"
        "        return ws\n"),
}


def test_the_checker_catches_a_braided_path():
    walker = pw.walk(pw.tree_of(BRAIDED), "tpfuse.proto.backend", "Toy.prepare")
    assert pw.runs(walker.files) == ["tpfuse/proto/backend.py", "tpfuse/proto/helpers.py", "tpfuse/proto/backend.py",
                                     "tpfuse/proto/helpers.py", "tpfuse/proto/backend.py"]
    assert pw.returns(walker.files) == {"tpfuse/proto/backend.py": 2, "tpfuse/proto/helpers.py": 1}


def test_the_checker_passes_the_same_work_layered():
    walker = pw.walk(pw.tree_of(LAYERED), "tpfuse.proto.backend", "Toy.prepare")
    assert pw.runs(walker.files) == ["tpfuse/proto/backend.py", "tpfuse/proto/helpers.py"]
    assert pw.returns(walker.files) == {}


#: every call form the protocols' paths use, one step each: base-class method in another module, a function
#: imported by name through a re-export, a module attribute, a module-level instance's method, a constructor,
#: and a call inside a nested function (a launcher's closure)
FORMS = {
    "tpfuse/__init__.py": "",
    "tpfuse/p/__init__.py": "from .leaf import reexported\n",
    "tpfuse/p/base.py": "from . import mod\n\nclass Base:\n    def inherited(self):\n        return mod.by_module()\n",
    "tpfuse/p/leaf.py": "def reexported():\n    return 1\n",
    "tpfuse/p/mod.py": "def by_module():\n    return 2\n",
    "tpfuse/p/made.py": ("class Made:\n    def __init__(self):\n        pass\n\n"
                         "    def method(self):\n        return 3\n\nINSTANCE = Made()\n"),
    "tpfuse/p/closure.py": "def inner():\n    return 4\n",
    "tpfuse/p/entry.py": (
        "from . import closure\n"
        "from . import reexported\n"
        "from .base import Base\n"
        "from .made import INSTANCE, Made\n\n"
        "class Entry(Base):\n"
        "    def prepare(self):\n"
        "        self.inherited()\n"
        "        reexported()\n"
        "        INSTANCE.method()\n"
        "        Made()\n\n"
        "        def launch():\n"
        "            return closure.inner()\n\n"
        "        return launch\n"),
}


def test_the_walk_follows_every_call_form_the_paths_use():
    walker = pw.walk(pw.tree_of(FORMS), "tpfuse.p.entry", "Entry.prepare")
    assert walker.steps == ["tpfuse/p/entry.py:Entry.prepare", "tpfuse/p/base.py:Base.inherited",
                            "tpfuse/p/mod.py:by_module", "tpfuse/p/leaf.py:reexported", "tpfuse/p/made.py:Made.method",
                            "tpfuse/p/made.py:Made.__init__", "tpfuse/p/closure.py:inner"]
