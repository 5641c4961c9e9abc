"""Training: ``F.cross_entropy`` of gathered logits, rewritten before AOTAutograd.

The post-grad matchers (``eliminate_sums.py``) serve graphs without a backward.  In a
training graph they cannot: by post-grad time AOTAutograd has split the backward off, the
forward saves the log-softmax (or the logits) for it (a graph output, so the gather must
stay), and the backward computes the full-width gradient and reduce-scatters it.  Only
before AOTAutograd is the loss still one call, ``F.cross_entropy``; replaced there by
``tpfuse::cross_entropy_hidden``, whose autograd is vocab-parallel, AOTAutograd traces the
op's own forward (one exchange of per-row partials) and backward (local to each slab, no
exchange) instead of the gather's.  docs/passes.md, "Training".

What is rewritten (Dynamo's graph, torch IR)::

    logits = torch.ops.tpfuse.all_gather_hidden.default(x, widths, group)   # needs a gradient
    [logits = logits.float() | .to(torch.float32)] [logits = logits.view(-1, V) | .reshape(-1, V)]
    loss = F.cross_entropy(logits, target, ignore_index=..., reduction=..., label_smoothing=...)

every intermediate used once, ``logits`` 2-D at the loss (the class axis is the last one),
no ``weight``.  It becomes ``tpfuse::cross_entropy_hidden(x.reshape(-1, w), target, widths,
group, ignore_index, reduction, label_smoothing)``: the op upcasts to float32 itself.  Its
gradient is each rank's own; the gather's backward (a reduce-scatter) summed every rank's, so
the loss goes through ``tpfuse::sum_grad_over_ranks`` (the identity; its backward sums the
loss's gradient over the ranks: a few numbers, not the logits).  Only
gathers through ``tpfuse.all_gather_hidden``: its autograd is known (a reduce-scatter),
so the rewrite keeps what the gradient means; a funcol gather has no gradient to keep.
A gather whose input needs no gradient is left to the post-grad matchers.
"""

from __future__ import annotations

import hashlib
import inspect
import pathlib
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch.fx import Graph, Node

from ..compile_ops import vocab_parallel_loss  # noqa: F401 - registers the op the rewrite emits
from ..compile_ops.vocab_parallel_loss import REDUCTIONS
from .graph_facts import product
from .records import GatherElimination, NearMiss

try:
    from torch._inductor.custom_graph_pass import CustomGraphPass
except ImportError:  # pragma: no cover - torch without the interface
    CustomGraphPass = object  # type: ignore[misc,assignment]

_CROSS_ENTROPY = inspect.signature(F.cross_entropy)
_UPCASTS = ("float",)


def _value(node: Node):
    return node.meta.get("example_value", node.meta.get("val"))


def _gather_of(node: Node) -> Node | None:
    return node if node.op == "call_function" and node.target in (
        torch.ops.tpfuse.all_gather_hidden.default, torch.ops.tpfuse.all_gather_hidden) else None


def _is_upcast(node: Node) -> bool:
    if node.op != "call_method":
        return False
    if node.target in _UPCASTS and len(node.args) == 1 and not node.kwargs:
        return True
    return node.target == "to" and node.args[1:] == (torch.float32,) and not node.kwargs


def _is_flatten(node: Node) -> bool:
    """``view(-1, V)`` / ``reshape(-1, V)``: leading dims merged, the last axis unchanged."""
    if node.op != "call_method" or node.target not in ("view", "reshape") or node.kwargs:
        return False
    before, after = _value(node.args[0]), _value(node)
    return (isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor) and after.dim() == 2
            and before.dim() >= 2 and after.shape[-1] == before.shape[-1])


def _chain_to_gather(logits: Node) -> tuple[Node, bool, list[Node]] | str:
    """(the gather, whether a flatten is on the way, the chain's nodes) or why not."""
    chain, node, flatten = [], logits, False
    while _gather_of(node) is None:
        if len(node.users) != 1:
            return _also_used(node)
        if _is_flatten(node):
            flatten = True
        elif not _is_upcast(node):
            return f"{node.name} ({node.target}) is neither an upcast nor a view(-1, V)"
        chain.append(node)
        node = node.args[0]
        if not isinstance(node, Node):
            return "the logits do not come from a tpfuse gather"
    if len(node.users) != 1:
        return _also_used(node)
    return node, flatten, chain


def _also_used(node: Node) -> str:
    others = ", ".join("the graph output" if u.op == "output" else u.name for u in node.users)
    return f"the logits {node.name} have {len(node.users)} users ({others}); the rewrite needs the loss as the only one"


def _loss_options(node: Node) -> dict | str:
    try:
        bound = _CROSS_ENTROPY.bind(*node.args, **node.kwargs)
    except TypeError as err:
        return f"unreadable arguments ({err})"
    bound.apply_defaults()
    options = bound.arguments
    if options["weight"] is not None or options["size_average"] is not None or options["reduce"] is not None:
        return "class weights or the legacy size_average/reduce arguments"
    if not (isinstance(options["ignore_index"], int) and options["reduction"] in REDUCTIONS
            and isinstance(options["label_smoothing"], (int, float))):
        return "ignore_index, reduction or label_smoothing is not a literal"
    return options


#: The name records of this rewrite carry, and the section that explains them.
PASS_NAME = "cross_entropy_before_autograd"
DOC = "docs/passes.md#training"


def rewrite_cross_entropy(graph: Graph, dry_run: bool = False, records: list | None = None) -> list[str]:
    """Rewrite every matching ``F.cross_entropy`` (module docstring); returns one line per loss
    rewritten and one per loss of gathered logits left alone, with the reason.

    ``dry_run``: find and say what would be rewritten, change nothing.  ``records``: a list that
    receives a ``GatherElimination`` per loss rewritten and a ``NearMiss`` per loss kept, for
    ``tpfuse.report()``."""
    lines = []
    records = [] if records is None else records
    for node in [n for n in graph.nodes if n.op == "call_function" and n.target is F.cross_entropy]:
        options = _loss_options(node)
        found = _chain_to_gather(options["input"]) if isinstance(options, dict) else options
        reason = found if isinstance(found, str) else _why_not_rewritable(options["input"], found[0].args[0])
        if reason is not None:
            lines.append(f"kept {node.name}: {reason}")
            records.append(NearMiss(PASS_NAME, reason, (node.name,), doc=DOC))
            continue
        gather, flatten, chain = found
        local, widths, group = gather.args[:3]
        record = _record(node, gather, chain, options)
        if dry_run:
            lines.append(f"would rewrite {node.name}: tpfuse::cross_entropy_hidden of {local.name}")
            records.append(record)
            continue
        with graph.inserting_before(node):
            slab = graph.call_method("reshape", (local, -1, _value(local).shape[-1])) if flatten else local
            local_loss = graph.call_function(torch.ops.tpfuse.cross_entropy_hidden.default, (
                slab, options["target"], list(widths), group, options["ignore_index"], options["reduction"],
                float(options["label_smoothing"])))
            # the gather's backward summed every rank's gradient (a reduce-scatter): keep that meaning
            loss = graph.call_function(torch.ops.tpfuse.sum_grad_over_ranks.default, (local_loss, group))
        loss.meta.update(node.meta)
        node.replace_all_uses_with(loss)
        for dead in [node, *chain, gather]:
            graph.erase_node(dead)
        lines.append(f"rewrote {node.name}: tpfuse::cross_entropy_hidden of {local.name}")
        records.append(replace(record, replacement=loss.name))
    return lines


def _why_not_rewritable(logits: Node, local: Node) -> str | None:
    value = _value(logits)
    if not (isinstance(value, torch.Tensor) and value.dim() == 2):
        return "the logits are not 2-D [N, V] at the loss"
    if not _needs_grad(local):
        return "the gather's input needs no gradient (post-grad matchers serve it)"
    return None


def _record(loss: Node, gather: Node, chain: list[Node], options: dict) -> GatherElimination:
    """What the report says of one rewrite: the gather that goes (and, in the backward, its
    reduce-scatter of the same bytes), what travels instead."""
    value, widths, group = _value(gather), tuple(gather.args[1]), gather.args[2]
    rows = product(value.shape[:-1])  # the op takes the slab as [rows, w]
    # the op's partials per row, float32: max, sum of exp, the target's logit, and the logits'
    # sum when smoothing (docs/passes.md, "Gather elimination: the sum family")
    words = 3 + int(options["label_smoothing"] > 0)
    return GatherElimination(
        gather=gather.name,
        consumers=("cross_entropy, before autograd",),
        matchers=(PASS_NAME,),
        nodes=(loss.name,),
        group_name=group,
        world_size=len(widths),
        hidden_widths=widths,
        dtype=value.dtype,
        steps=tuple(str(n.target) for n in reversed(chain)),
        gathered_bytes=str(rows * sum(widths) * value.dtype.itemsize),
        partial_bytes=str(rows * words * len(widths) * 4),
        partials=f"[{rows}, {words}] float32",
    )


def _needs_grad(node: Node) -> bool:
    value = _value(node)
    return isinstance(value, torch.Tensor) and value.requires_grad


class CrossEntropyBeforeAutograd(CustomGraphPass):
    """Inductor's ``pre_grad_custom_pass``: ``rewrite_cross_entropy`` on each graph.
    ``last`` keeps the lines of the latest graph, for tests and reports."""

    def __init__(self) -> None:
        self.last: list[str] = []

    def __call__(self, graph: Graph) -> None:
        self.last = rewrite_cross_entropy(graph)

    def uuid(self) -> str:
        return hashlib.sha256(pathlib.Path(__file__).read_bytes()).hexdigest()
