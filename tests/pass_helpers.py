"""Shared pieces of the pass tests: a fake world, post-grad graph capture, a compact printer.

``capture(fn, *args)`` compiles ``fn`` with Inductor far enough to run the
post-grad passes, runs the tpfuse passes on the real post-grad graph, prints
it before and after, and stops the compile there (no code generation: the
graph tests stay fast).  It compiles as ``tpfuse.enable()`` does: with the
Dynamo rule of ``tpfuse/passes/dynamo_compat.py`` applied, so that funcol's
hidden-axis gather stays in one graph on every supported torch.

The printed graphs leave out the opaque-object inputs that no node reads and
number the other inputs in order (``normalise_placeholders``): the texts do not
depend on what a torch version flattens into graph inputs.
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


_PLACEHOLDER = re.compile(r"\barg\d+_\d+\b")


def normalise_placeholders(text: str) -> str:
    """Rename the graph inputs (``argN_M``) ``arg0_1``, ``arg1_1``, ... in order of first appearance.

    One renaming for the whole text, so a graph printed before and after a rewrite
    keeps each input's name across both.  AOTAutograd numbers inputs by their flat
    position, and what is flattened into inputs varies between torch versions (newer
    torch adds each DTensor's mesh): with the unused opaque inputs left out of
    ``graph_text``, the numbering left is the inputs' order, the same on each version.
    """
    names: dict[str, str] = {}

    def rename(m: re.Match) -> str:
        return names.setdefault(m.group(0), f"arg{len(names)}_1")

    return _PLACEHOLDER.sub(rename, text)


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


def _caused_by_stop(err: BaseException) -> bool:
    while err is not None:
        if isinstance(err, _Stop):
            return True
        err = err.__cause__ or err.__context__
    return False
