"""Shared pieces of the pass tests: a fake world, post-grad graph capture, a compact printer; Dynamo's
torch-IR graph (what the pre-grad passes see) and its printer.

``capture(fn, *args)`` compiles ``fn`` with Inductor far enough to run the
post-grad passes, runs the tpfuse passes on the real post-grad graph, prints
it before and after, and stops the compile there (no code generation: the
graph tests stay fast).  It compiles as ``tpfuse.enable()`` does: with the
Dynamo rule of ``tpfuse/passes/dynamo_compat.py`` applied, so that funcol's
hidden-axis gather stays in one graph on every supported torch.

The printed graphs leave out the opaque-object inputs that no node reads and
number the other inputs in order of first use (``normalise_placeholders``): the
texts do not depend on what a torch version flattens into graph inputs, nor on
the order it puts them in.
"""

from __future__ import annotations

import contextlib
import operator
import re

import torch
import torch.distributed as dist
from torch.fx import Node

from tpfuse.passes import run_passes
from tpfuse.passes.dynamo_compat import allow_funcol_gather_tracing
from tpfuse.passes.manager import PassConfig

try:
    from torch._inductor.custom_graph_pass import CustomGraphPass
except ImportError:  # pragma: no cover
    CustomGraphPass = object

try:
    from torch._library.fake_class_registry import FakeScriptObject
except ImportError:  # pragma: no cover - a torch without opaque graph inputs
    FakeScriptObject = ()


@contextlib.contextmanager
def fake_world(world_size: int):
    """A ``backend="fake"`` default process group of ``world_size`` ranks (rank 0)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


class FakeWorld:
    """A test case mixin: every test runs in ``fake_world(WORLD_SIZE)``; ``class T(FakeWorld, TestCase)``."""

    WORLD_SIZE = 2

    def setUp(self):
        super().setUp()
        self.enterContext(fake_world(self.WORLD_SIZE))


def _arg(a) -> str:
    if isinstance(a, Node):
        return a.name
    if isinstance(a, (list, tuple)):
        inner = ", ".join(_arg(x) for x in a)
        return f"[{inner}]"
    if isinstance(a, torch.dtype):
        return str(a).removeprefix("torch.")
    if isinstance(a, str):
        return repr(a)
    return str(a)


def _target(node: Node) -> str:
    t = node.target
    if t is operator.getitem:
        return "getitem"
    if isinstance(t, torch._ops.OpOverload):
        name = str(t).removesuffix(".default")
        return name.removeprefix("aten.")
    return getattr(t, "__name__", str(t))


def _unused_opaque_input(node: Node) -> bool:
    """An opaque-object input that no node reads: torch 2.13 flattens each DTensor into its local
    tensor and its device mesh (an opaque object), torch 2.11 into the local tensor alone."""
    return not node.users and isinstance(node.meta.get("val"), FakeScriptObject)


def graph_text(graph) -> str:
    """One line per node: ``name = op(args)``; placeholders on one line (unused opaque ones left out)."""
    inputs = [n.name for n in graph.nodes if n.op == "placeholder" and not _unused_opaque_input(n)]
    lines = [f"inputs: {', '.join(inputs)}"]
    for n in graph.nodes:
        if n.op == "placeholder":
            continue
        if n.op == "output":
            lines.append(f"return {_arg(n.args[0])}")
            continue
        args = [_arg(a) for a in n.args]
        args += [f"{k}={_arg(v)}" for k, v in n.kwargs.items() if k not in ("device", "pin_memory", "layout")]
        lines.append(f"{n.name} = {_target(n)}({', '.join(args)})")
    return "\n".join(lines)


def dynamo_graph(fn, *args):
    """Dynamo's graph of ``fn`` on ``args`` (torch IR, what Inductor's pre-grad passes see)."""
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    torch.compile(fn, backend=keep, fullgraph=True)(*args)
    return graphs[0]


def torch_ir_text(gm) -> str:
    """One line per call of a torch-IR graph, ``name = target(args)``: the pre-grad graphs' printer."""
    lines = []
    for n in gm.graph.nodes:
        if n.op in ("call_function", "call_method"):
            target = n.target if n.op == "call_method" else getattr(n.target, "__name__", str(n.target))
            lines.append(f"{n.name} = {target}({', '.join(getattr(a, 'name', repr(a)) for a in n.args)})")
    return "\n".join(lines)


_PLACEHOLDER = re.compile(r"\barg\d+_\d+\b")
_INPUTS = "inputs: "


def normalise_placeholders(text: str) -> str:
    """Rename the graph inputs (``argN_M``) ``arg0_1``, ``arg1_1``, ... in order of first use.

    AOTAutograd numbers inputs by their flat position, and that order is not the
    same on every torch: for ``x @ w.t()`` torch 2.13 places ``w`` first and torch
    2.11 places ``x`` first, while both graphs compute ``permute(w)`` and then
    ``mm(x, permute)``.  So the numbering follows the nodes that read the inputs
    (the ``inputs:`` lines are read last, for inputs no node reads) and each
    ``inputs:`` line is listed in the new numbering.  One renaming for the whole
    text, taken in text order (the graph before the rewrite comes first): a
    rewrite that swaps two inputs still shows the swap.
    """
    lines = text.split("\n")
    names: dict[str, str] = {}
    for line in [ln for ln in lines if not ln.startswith(_INPUTS)] + [ln for ln in lines if ln.startswith(_INPUTS)]:
        for name in _PLACEHOLDER.findall(line):
            names.setdefault(name, f"arg{len(names)}_1")
    return "\n".join(_renamed_line(line, names) for line in lines)


def _renamed_line(line: str, names: dict[str, str]) -> str:
    renamed = _PLACEHOLDER.sub(lambda m: names[m.group(0)], line)
    inputs = renamed[len(_INPUTS):].split(", ")
    if line.startswith(_INPUTS) and all(_PLACEHOLDER.fullmatch(n) for n in inputs):
        return _INPUTS + ", ".join(sorted(inputs, key=_input_number))
    return renamed


def _input_number(name: str) -> int:
    return int(name[len("arg"):].split("_")[0])


class _Stop(Exception):
    pass


class _CaptureAndStop(CustomGraphPass):
    def __init__(self, config, mutate=None):
        self.config, self.mutate, self.text, self.graph_report = config, mutate, None, None

    def __call__(self, graph):
        if self.mutate is not None:
            self.mutate(graph)
        before = graph_text(graph)
        self.graph_report = run_passes(graph, self.config)
        graph.lint()  # run_passes leaves linting to Inductor; the tests check every rewrite
        after = graph_text(graph)
        self.text = normalise_placeholders(f"{before}\n---- after tpfuse ----\n{after}")
        raise _Stop

    def uuid(self):
        return None


def capture(fn, *args, dynamic=None, mutate=None, **config):
    """(before/after text, GraphReport) of the first post-grad graph of ``fn(*args)``."""
    import torch._inductor.config as inductor_config

    allow_funcol_gather_tracing()  # as tpfuse.enable() does (torch 2.11 would break the graph at funcol's gather)
    torch._dynamo.reset()
    hook = _CaptureAndStop(PassConfig(**config), mutate)
    with inductor_config.patch(post_grad_custom_post_pass=hook, fx_graph_cache=False), torch.no_grad():
        try:
            torch.compile(fn, fullgraph=True, dynamic=dynamic)(*args)
        except Exception as err:  # noqa: BLE001 - the stop is expected; anything else is not
            if not _caused_by_stop(err):
                raise
    assert hook.text is not None, "no post-grad graph reached the passes"
    return hook.text, hook.graph_report


#: the torch function in which an older funcol guards on the gathered leading dim (torch/_utils.py)
_FUNCOL_VIEW_OR_CAT = "_maybe_view_chunk_cat"
_DATA_DEPENDENT_GUARD = re.compile(r"Could not guard on data-dependent expression (\S+\(.*?\))")


def torch_cannot_trace_unbacked_gather(err: BaseException) -> str | None:
    """Why this torch cannot trace funcol's hidden-axis gather of an unbacked T, or None when ``err`` is not that.

    ``funcol.all_gather_tensor(x, gather_dim=d)`` with ``d > 0`` chooses a view or
    chunk + cat in ``torch._utils._maybe_view_chunk_cat``.  torch 2.11 asks
    ``shape[0] == group_size`` outright: for an unbacked T that is a guard on
    ``Eq(W*u0, W)``, which Dynamo refuses before any tpfuse pass runs.  Newer torch
    asks ``guard_or_false`` and takes chunk + cat.  Only that refusal counts here:
    a data-dependent guard anywhere else (tpfuse's own code included) is None.
    """
    from torch._dynamo.exc import UserError
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    for e in _chain(err):
        message = str(e)
        found = _DATA_DEPENDENT_GUARD.search(message)
        if isinstance(e, (UserError, GuardOnDataDependentSymNode)) and found and _FUNCOL_VIEW_OR_CAT in message:
            return (f"torch {torch.__version__}: funcol's own gather ({_FUNCOL_VIEW_OR_CAT}) guards on "
                    f"{found.group(1)} for an unbacked T, which Dynamo refuses; newer torch decides it without a guard")
    return None


def _chain(err: BaseException | None):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _caused_by_stop(err: BaseException) -> bool:
    return any(isinstance(e, _Stop) for e in _chain(err))
