"""Training: ``F.cross_entropy`` of gathered logits, rewritten before AOTAutograd.

The post-grad matchers (``eliminate_sums.py``) serve graphs without a backward.  In a
training graph they cannot: by post-grad time AOTAutograd has split the backward off, the
forward saves the log-softmax (or the logits) for it (a graph output, so the gather must
stay), and the backward computes the full-width gradient.  Only before AOTAutograd is the
loss still one call, ``F.cross_entropy``; replaced there by ``tpfuse::cross_entropy_hidden``,
whose autograd is vocab-parallel, AOTAutograd traces the op's own forward (one exchange of
per-row partials) and backward (local to each slab, no exchange) instead of the gather's.
docs/passes.md, "Training", shows the graphs this reads.

What is rewritten (Dynamo's graph, torch IR)::

    logits = <a gather of the slab x along the last axis>                  # x needs a gradient
    [.float() | .to(torch.float32)] [.contiguous()] [[..., a:b, :] slices of leading axes]
    [.view(-1, V) | .reshape(-1, V)]
    loss = F.cross_entropy(logits, target, ignore_index=..., reduction=..., label_smoothing=...)

float32 logits, 2-D at the loss (the class axis last), integer targets, no ``weight``.  It
becomes ``tpfuse::cross_entropy_hidden(x[slices][.reshape(-1, w)], target, widths, group,
ignore_index, reduction, label_smoothing)`` (the op upcasts to float32 itself).  The gathers:

- ``tpfuse.all_gather_hidden(x, group)``: one node ``tpfuse::all_gather_hidden``;
- funcol: ``_c10d_functional.all_gather_into_tensor(x, W, group)`` -> ``wait_tensor`` ->
  ``torch.chunk(W, dim=0)`` -> ``torch.cat(.., dim=-1)`` (or, every leading dim of ``x`` 1,
  a ``view`` to ``[1, .., W*w]``): ``funcol.all_gather_tensor(x, gather_dim=last)`` and
  ``torch.cat(all_gather_tensor(x, 0).chunk(W), -1)``;
- DTensor: ``d.redistribute(placements=[Replicate()]).to_local()`` (or ``d.full_tensor()``) of
  a ``d`` sharded ``Shard(last axis)`` on a 1-D mesh: torch's and transformers'
  ``ColwiseParallel`` with a replicated output (HF Llama's LM head under ``tp_plan``).  The
  slab is ``d.to_local()``.  torch 2.13's Dynamo writes the methods as method calls, earlier
  Dynamo as calls of ``prim_redistribute`` / ``prim_to_local`` (``_dtensor_call``).

**The gradient keeps each gather's meaning.**  ``cross_entropy_hidden`` returns each rank the
gradient of its own loss on its own slab.  What the gather's backward hands the slab differs:

- tpfuse's gather, and funcol's where this torch registers its autograd (a reduce-scatter
  with sum): the **sum over ranks** of every rank's gradient of the band.  The loss goes
  through ``tpfuse::sum_grad_over_ranks`` (the identity; its backward sums the loss's
  gradient, a few numbers, over the ranks): the slab's gradient is linear in it.  A torch
  whose funcol gather has no autograd kernel gives no gradient through it: kept, with that
  reason (rewritten, the slab would receive one).
- DTensor ``Shard -> Replicate``: its backward is ``Replicate -> Shard``, a **local slice** of
  this rank's own gradient (``to_local``'s ``grad_placements`` left at its default): exactly
  what the op returns, so no ``sum_grad_over_ranks``.  Other ``grad_placements`` are kept.

**Logits used elsewhere too** (HF's training forward returns them): the loss is still
rewritten on the slab (*split*) and the gather stays for the other use.  That is exact (the
gradients of the two uses add, as before) and cheaper: the loss's softmax and its saved
state cover ``V / W`` columns per rank instead of ``V``, for one more exchange of a few
numbers per row.  The gather (and, where it had one, its backward) goes only when nothing
else uses the full-width logits.  A gather whose input needs no gradient is left to the
post-grad matchers.
"""

from __future__ import annotations

import hashlib
import inspect
import operator
import pathlib
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch.fx import Graph, Node

from ..compile_ops import vocab_parallel_loss  # noqa: F401 - registers the op the rewrite emits
from ..compile_ops.vocab_parallel_loss import REDUCTIONS, TARGET_DTYPES
from .graph_facts import product
from .records import GatherElimination, NearMiss

try:
    from torch._inductor.custom_graph_pass import CustomGraphPass
except ImportError:  # pragma: no cover - torch without the interface
    CustomGraphPass = object  # type: ignore[misc,assignment]

_CROSS_ENTROPY = inspect.signature(F.cross_entropy)

#: The name records of this rewrite carry, and the section that explains them.
PASS_NAME = "cross_entropy_before_autograd"
DOC = "docs/passes.md#training"

#: What the gather's backward hands the slab (module docstring).
SUM_OVER_RANKS, OWN_SLICE = "sum over ranks", "own slice"

#: How far above an unreplayable step the walk looks for a gather, to say why it stopped.
_LOOK_UP = 8


def _value(node):
    return node.meta.get("example_value", node.meta.get("val")) if isinstance(node, Node) else None


def _calls(node: Node, *targets) -> bool:
    return node.op == "call_function" and node.target in targets


def _method(node: Node, *names: str) -> bool:
    return node.op == "call_method" and node.target in names


# --------------------------------------------------------------------------- the gathers


@dataclass(frozen=True)
class Gathered:
    """One gather of ``slab_of`` along the last axis, as Dynamo's graph spells it."""

    form: str  # "tpfuse", "funcol" or "dtensor"
    anchor: Node  # the collective (or the redistribute): gone means the gather went
    nodes: tuple[Node, ...]  # the gather's nodes, anchor first, the full-width logits last
    slab_of: Node  # the slab itself, or (DTensor) the sharded tensor whose to_local() it is
    widths: tuple[int, ...]
    group_name: str
    gradient: str  # SUM_OVER_RANKS or OWN_SLICE


def _op_targets(namespace: str, name: str) -> tuple:
    """The op ``namespace::name`` as Dynamo's graph may call it (packet or default overload);
    () where this torch has no such op."""
    packet = getattr(getattr(torch.ops, namespace), name, None)
    return () if packet is None else (packet, packet.default)


def _tpfuse_gather(node: Node) -> Gathered | None:
    if not _calls(node, *_op_targets("tpfuse", "all_gather_hidden")):
        return None
    local, widths, group = node.args[:3]
    return Gathered("tpfuse", node, (node,), local, tuple(widths), group, SUM_OVER_RANKS)


def _funcol_gather_targets() -> tuple:
    return _op_targets("_c10d_functional", "all_gather_into_tensor") + \
        _op_targets("_c10d_functional_autograd", "all_gather_into_tensor")


def funcol_gather_has_autograd() -> bool:
    """Whether this torch's ``_c10d_functional.all_gather_into_tensor`` has a backward (a
    reduce-scatter with sum, torch 2.13); without one no gradient passes through it."""
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("_c10d_functional::all_gather_into_tensor", "Autograd")
    except Exception:  # noqa: BLE001 - feature detection of a private API
        return False


def _funcol_gather(node: Node) -> Gathered | str | None:
    """``node`` is the ``cat`` (or ``view``) ending a funcol gather along the last axis."""
    found = _funcol_cat(node) if _calls(node, torch.cat) else _funcol_view(node)
    if found is None:
        return None
    gather, parts = found
    local, size, group = gather.args[:3]
    width = _value(local).shape[-1] if isinstance(_value(local), torch.Tensor) else None
    if not isinstance(width, int) or not isinstance(group, str):
        return "the funcol gather's width or group is not static"
    autograd = gather.target in _op_targets("_c10d_functional_autograd", "all_gather_into_tensor")
    if not (autograd or funcol_gather_has_autograd()):
        return ("this torch's _c10d_functional.all_gather_into_tensor has no autograd kernel: no gradient "
                "passes through the gather, and the rewrite would give the slab one")
    return Gathered("funcol", gather, (gather, *parts, node), local, (width,) * size, group, SUM_OVER_RANKS)


def _wait_of_gather(node) -> tuple[Node, Node] | None:
    """(the gather, its wait) when ``node`` is ``wait_tensor(all_gather_into_tensor(...))``."""
    if not (isinstance(node, Node) and _calls(node, *_op_targets("_c10d_functional", "wait_tensor"))):
        return None
    gather = node.args[0]
    return (gather, node) if isinstance(gather, Node) and _calls(gather, *_funcol_gather_targets()) else None


def _funcol_cat(cat: Node) -> tuple[Node, tuple[Node, ...]] | None:
    """``cat([chunk(wait, W, 0)[0], ..[W-1]], last axis)``: the gather and the nodes between."""
    parts = cat.args[0] if cat.args else cat.kwargs.get("tensors")
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    value = _value(cat)
    if not (isinstance(parts, (list, tuple)) and isinstance(value, torch.Tensor) and isinstance(dim, int)
            and dim % value.dim() == value.dim() - 1):
        return None
    pieces = [p.args for p in parts if isinstance(p, Node) and _calls(p, operator.getitem)]
    chunk = pieces[0][0] if pieces and len(pieces) == len(parts) else None
    if chunk is None or pieces != [(chunk, i) for i in range(len(parts))] or not _chunk_dim0(chunk):
        return None
    found = _wait_of_gather(chunk.args[0])
    if found is None or found[0].args[1] != len(parts):
        return None
    return found[0], (found[1], chunk, *parts)


def _chunk_dim0(node: Node) -> bool:
    if not (_calls(node, torch.chunk) or _method(node, "chunk")):
        return False
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    chunks = node.args[1] if len(node.args) > 1 else node.kwargs.get("chunks")
    return dim == 0 and chunks == len(node.users)


def _funcol_view(view: Node) -> tuple[Node, tuple[Node, ...]] | None:
    """``wait.view([1, .., W*w])`` of a gathered ``[W, 1, .., w]``: funcol's form when every
    leading dim of the slab is 1."""
    found = _wait_of_gather(view.args[0]) if _method(view, "view", "reshape") and view.args else None
    if found is None:
        return None
    local, out = _value(found[0].args[0]), _value(view)
    if not (isinstance(local, torch.Tensor) and isinstance(out, torch.Tensor) and local.dim() == out.dim()):
        return None
    leading, size = list(local.shape[:-1]), found[0].args[1]
    if leading != [1] * len(leading) or list(out.shape) != [*leading, size * local.shape[-1]]:
        return None
    return found[0], (found[1],)


def _dtensor_gather(node: Node) -> Gathered | str | None:
    """``d.redistribute(placements=[Replicate()]).to_local()`` or ``d.full_tensor()`` of ``d``
    sharded on its last axis."""
    full, local = _dtensor_call(node, "full_tensor"), _dtensor_call(node, "to_local")
    if full is not None:
        sharded, nodes, options = node.args[0], (node,), full
    elif local is not None and _replicates(node.args[0]):
        sharded, nodes, options = node.args[0].args[0], (node.args[0], node), local
    else:
        return None
    classes = _dtensor_classes()
    value = _value(sharded)
    if classes is None or not isinstance(value, classes[0]):
        return None
    _, replicate, shard = classes
    mesh, placements = value.device_mesh, tuple(value.placements)
    if mesh.ndim != 1 or not (isinstance(placements[0], shard) and placements[0].dim % value.dim() == value.dim() - 1):
        return (f"the DTensor {sharded.name} is {placements} on a {mesh.ndim}-D mesh; the rewrite takes "
                "Shard(last axis) on a 1-D mesh")
    grad = options[1].get("grad_placements")
    if options[0] or not (grad is None or all(isinstance(p, replicate) for p in grad)):
        return f"{_name(node)}(grad_placements={grad}): the gather's backward is not a local slice"
    vocab, size = value.shape[-1], mesh.size()
    if not isinstance(vocab, int):
        return "the DTensor's vocabulary size is not static"
    chunk = -(-vocab // size)  # DTensor shards as torch.chunk does: the last ranks may hold fewer, or none
    widths = tuple(max(0, min(chunk, vocab - r * chunk)) for r in range(size))
    return Gathered("dtensor", nodes[0], nodes, sharded, widths, mesh.get_group(0).group_name, OWN_SLICE)


def _dtensor_classes():
    """(DTensor, Replicate, Shard), or None on a torch built without them."""
    try:
        from torch.distributed.tensor import DTensor, Replicate, Shard
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    return DTensor, Replicate, Shard


def _dtensor_call(node: Node, method: str) -> tuple[tuple, dict] | None:
    """(args, kwargs) after the DTensor of ``d.<method>(...)`` at ``node``, or None.  torch 2.13's
    Dynamo writes a method call; earlier Dynamo a ``call_function`` of a function it makes on the
    fly, named ``prim_<method>``, holding the arguments in its closure (``args_as_value``,
    ``kwargs_as_value``)."""
    if node.op == "call_method" and node.target == method and node.args:
        return tuple(node.args[1:]), dict(node.kwargs)
    if node.op != "call_function" or getattr(node.target, "__name__", None) != f"prim_{method}" or len(node.args) != 1:
        return None
    try:
        captured = inspect.getclosurevars(node.target).nonlocals
    except (TypeError, ValueError):
        return None
    args, kwargs = captured.get("args_as_value"), captured.get("kwargs_as_value")
    return (tuple(args), dict(kwargs)) if isinstance(args, (list, tuple)) and isinstance(kwargs, dict) else None


def _name(node: Node) -> str:
    """The DTensor method ``node`` calls, as the user wrote it (torch 2.11's ``prim_to_local`` reads ``to_local``)."""
    if node.op == "call_method":
        return node.target
    return getattr(node.target, "__name__", str(node.target)).removeprefix("prim_")


def _replicates(node) -> bool:
    """``node`` is ``d.redistribute(placements=[Replicate(), ...])``, casting nothing."""
    call = _dtensor_call(node, "redistribute") if isinstance(node, Node) else None
    classes = _dtensor_classes()
    if call is None or classes is None:
        return False
    try:
        options = inspect.signature(classes[0].redistribute).bind(node.args[0], *call[0], **call[1]).arguments
    except TypeError:
        return False
    placements = options.get("placements")
    return (isinstance(placements, (list, tuple)) and all(isinstance(p, classes[1]) for p in placements)
            and options.get("forward_dtype") is None and options.get("backward_dtype") is None)


_FORMS = (_tpfuse_gather, _funcol_gather, _dtensor_gather)


def gathered(node: Node) -> Gathered | str | None:
    """The gather whose full-width result ``node`` is, why it cannot be rewritten, or None."""
    for form in _FORMS:
        found = form(node)
        if found is not None:
            return found
    return None


def might_rewrite(graph: Graph) -> bool:
    """Whether ``graph`` has a loss and something that may gather (a cheap look, before the walk)."""
    anchors = (*_op_targets("tpfuse", "all_gather_hidden"), *_funcol_gather_targets())
    losses = gathers = False
    for n in graph.nodes:
        losses = losses or _calls(n, F.cross_entropy)
        gathers = gathers or _calls(n, *anchors) or _method(n, "redistribute", "full_tensor") or (
            n.op == "call_function" and getattr(n.target, "__name__", None) == "prim_redistribute")
    return losses and gathers


# --------------------------------------------------------------------------- from the loss to the gather


def _is_upcast(node: Node) -> bool:
    if not _method(node, "float", "to"):
        return False
    if node.target == "float":
        return len(node.args) == 1 and not node.kwargs
    return (node.args[1:] == (torch.float32,) and not node.kwargs) or (
        len(node.args) == 1 and node.kwargs == {"dtype": torch.float32})


def _is_contiguous(node: Node) -> bool:
    return _method(node, "contiguous") and len(node.args) == 1 and not node.kwargs


def _is_flatten(node: Node) -> bool:
    """``view(-1, V)`` / ``reshape(-1, V)``: leading dims merged, the last axis unchanged."""
    if not _method(node, "view", "reshape") or node.kwargs:
        return False
    before, after = _value(node.args[0]), _value(node)
    return (isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor) and after.dim() == 2
            and before.dim() >= 2 and after.shape[-1] == before.shape[-1])


def _is_leading_slice(node: Node) -> bool:
    """``x[..., a:b, :]``: slices of the leading axes only (HF's ``logits[..., :-1, :]``), which
    commute with a gather along the last axis, forward and backward."""
    if not (_calls(node, operator.getitem) and len(node.args) == 2):
        return False
    index, value = node.args[1], _value(node.args[0])
    index = index if isinstance(index, tuple) else (index,)
    if not isinstance(value, torch.Tensor) or not all(isinstance(i, slice) or i is Ellipsis for i in index):
        return False
    if list(index).count(Ellipsis) > 1 or any(isinstance(v, Node) for i in index if isinstance(i, slice)
                                              for v in (i.start, i.stop, i.step)):
        return False
    last_untouched = index[-1] is Ellipsis or (Ellipsis not in index and len(index) < value.dim())
    return last_untouched or index[-1] == slice(None, None, None)


_STEPS = (_is_upcast, _is_contiguous, _is_flatten, _is_leading_slice)


@dataclass(frozen=True)
class Chain:
    gather: Gathered
    steps: tuple[Node, ...]  # from the gather to the loss


def _chain_to_gather(logits: Node) -> Chain | str | None:
    """The gather and the steps from it to the loss; why not (a gather is there); None (none is)."""
    steps, node = [], logits
    while isinstance(node, Node):
        found = gathered(node)
        if found is not None:
            return Chain(found, tuple(reversed(steps))) if isinstance(found, Gathered) else found
        if not any(is_step(node) for is_step in _STEPS):
            return _unreplayable(node)
        steps.append(node)
        node = node.args[0]
    return None


def _unreplayable(node: Node) -> str | None:
    """Why the walk stopped at ``node`` when a gather is just above it; None when none is."""
    above = node
    for _ in range(_LOOK_UP):
        inputs = [a for a in above.args if isinstance(a, Node)]
        if not inputs:
            return None
        above = inputs[0]
        if isinstance(gathered(above), Gathered):
            return f"{node.name} ({node.target}) between the gather and the loss is not a step the rewrite replays"
    return None


def _outside_use(chain: Chain, loss: Node) -> Node | None:
    """A node of the gather or of the steps that something else uses too (the gather then stays)."""
    region = {*chain.gather.nodes, *chain.steps, loss}
    for node in (*chain.gather.nodes, *chain.steps):
        for user in node.users:
            if user not in region:
                return user
    return None


def _describe(user: Node) -> str:
    return "the graph output" if user.op == "output" else f"{user.name} ({user.target})"


# --------------------------------------------------------------------------- the loss


def _loss_options(node: Node) -> dict | str:
    try:
        bound = _CROSS_ENTROPY.bind(*node.args, **node.kwargs)
    except TypeError as err:
        return f"unreadable arguments ({err})"
    bound.apply_defaults()
    return bound.arguments


def _why_not_rewritable(options: dict, chain: Chain) -> str | None:
    if options["weight"] is not None or options["size_average"] is not None or options["reduce"] is not None:
        return "class weights or the legacy size_average/reduce arguments"
    if not (isinstance(options["ignore_index"], int) and options["reduction"] in REDUCTIONS
            and isinstance(options["label_smoothing"], (int, float))):
        return "ignore_index, reduction or label_smoothing is not a literal"
    logits, target = _value(options["input"]), _value(options["target"])
    if not (isinstance(logits, torch.Tensor) and logits.dim() == 2):
        return "the logits are not 2-D [N, V] at the loss"
    if not (isinstance(target, torch.Tensor) and target.dim() == 1 and target.dtype in TARGET_DTYPES):
        return "the target is not one class index per row (class probabilities are not taken)"
    if logits.dtype != torch.float32:
        return (f"the loss is computed on {logits.dtype} logits; the op computes in float32 (it replaces "
                "a loss of logits upcast with .float())")
    if not _needs_grad(chain.gather.slab_of):
        return "the gather's input needs no gradient (post-grad matchers serve it)"
    return None


def _needs_grad(node: Node) -> bool:
    value = _value(node)
    return isinstance(value, torch.Tensor) and value.requires_grad


# --------------------------------------------------------------------------- the rewrite


def rewrite_cross_entropy(graph: Graph, dry_run: bool = False, records: list | None = None) -> list[str]:
    """Rewrite every matching ``F.cross_entropy`` (module docstring); returns one line per loss
    rewritten or split and one per loss of gathered logits left alone, with the reason.  A loss
    of logits that no gather produced is not mentioned.

    ``dry_run``: find and say what would be rewritten, change nothing.  ``records``: a list that
    receives a ``GatherElimination`` per gather that goes and a ``NearMiss`` per loss kept or
    split (the gather stays), for ``tpfuse.report()``."""
    lines = []
    records = [] if records is None else records
    for node in [n for n in graph.nodes if _calls(n, F.cross_entropy)]:
        options = _loss_options(node)
        chain = _chain_to_gather(options["input"]) if isinstance(options, dict) else None
        if chain is None:
            continue  # no gather behind these logits: nothing came close
        reason = chain if isinstance(chain, str) else _why_not_rewritable(options, chain)
        if reason is not None:
            lines.append(f"kept {node.name}: {reason}")
            records.append(NearMiss(PASS_NAME, reason, (node.name,), doc=DOC))
            continue
        other = _outside_use(chain, node)
        record = _record(node, chain, options, other)
        if not dry_run:
            loss = _replace_loss(graph, node, chain, options)
            record = replace(record, replacement=loss.name) if isinstance(record, GatherElimination) else record
        lines.append(_line(node, chain, other, dry_run))
        records.append(record)
    return lines


def _line(loss: Node, chain: Chain, other: Node | None, dry_run: bool) -> str:
    verb = ("would split" if dry_run else "split") if other is not None else ("would rewrite" if dry_run else "rewrote")
    line = f"{verb} {loss.name}: tpfuse::cross_entropy_hidden of {chain.gather.slab_of.name}"
    return line if other is None else f"{line}; {_gather_stays_for(other)}"


def _gather_stays_for(other: Node) -> str:
    # Only what this pass did: the passes after autograd may still eliminate the gather for that other
    # use (an argmax, say), and their own line in the report says whether they did.
    return f"the gather stays before autograd for its other use, {_describe(other)}"


def _kept_for(other: Node) -> str:
    return f"loss split (computed on each rank's slab); {_gather_stays_for(other)}"


def _replace_loss(graph: Graph, node: Node, chain: Chain, options: dict) -> Node:
    gather = chain.gather
    with graph.inserting_before(node):
        slab = gather.slab_of
        if gather.form == "dtensor":
            slab = graph.call_method("to_local", (slab,))  # grad placements: the shard's own (a local slice)
        slab = _replay(graph, slab, chain.steps)
        loss = graph.call_function(torch.ops.tpfuse.cross_entropy_hidden.default, (
            slab, options["target"], list(gather.widths), gather.group_name, options["ignore_index"],
            options["reduction"], float(options["label_smoothing"])))
        if gather.gradient == SUM_OVER_RANKS:
            # the gather's backward summed every rank's gradient (a reduce-scatter): keep that meaning
            loss = graph.call_function(torch.ops.tpfuse.sum_grad_over_ranks.default, (loss, gather.group_name))
    loss.meta.update(node.meta)
    node.replace_all_uses_with(loss)
    for dead in (node, *reversed(chain.steps), *reversed(gather.nodes)):
        if not dead.users:
            graph.erase_node(dead)
    return loss


def _replay(graph: Graph, slab: Node, steps: tuple[Node, ...]) -> Node:
    """The steps on the slab: leading-axis slices as they were, the flatten as ``reshape(-1, w)``
    (``flatten(0, -2)`` where the width is not one static number); upcasts and ``contiguous``
    dropped (the op upcasts, and reads any layout)."""
    for step in steps:
        if _is_leading_slice(step):
            slab = graph.call_function(operator.getitem, (slab, step.args[1]))
        elif _is_flatten(step):
            width = _value(slab).shape[-1] if isinstance(_value(slab), torch.Tensor) else None
            slab = (graph.call_method("reshape", (slab, -1, width)) if isinstance(width, int)
                    else graph.call_method("flatten", (slab, 0, -2)))
    return slab


def _record(loss: Node, chain: Chain, options: dict, other: Node | None) -> GatherElimination | NearMiss:
    """What the report says of one rewrite: the gather that goes (and, in the backward, its
    reduce-scatter of the same bytes where it had one), what travels instead; or, split, why
    the gather stays."""
    if other is not None:
        return NearMiss(PASS_NAME, _kept_for(other), (loss.name, chain.gather.anchor.name), doc=DOC)
    gather = chain.gather
    value = _value(gather.nodes[-1])
    rows = product(value.shape[:-1])  # the op takes the slab as [rows, w]
    # the op's partials per row, float32: max, sum of exp, the target's logit, and the logits'
    # sum when smoothing (docs/passes.md, "Gather elimination: the sum family")
    words = 3 + int(options["label_smoothing"] > 0)
    return GatherElimination(
        gather=gather.anchor.name,
        consumers=("cross_entropy, before autograd",),
        matchers=(PASS_NAME,),
        nodes=(loss.name,),
        group_name=gather.group_name,
        world_size=len(gather.widths),
        hidden_widths=gather.widths,
        dtype=value.dtype,
        steps=tuple(str(n.target) for n in chain.steps),
        gathered_bytes=str(rows * sum(gather.widths) * value.dtype.itemsize),
        partial_bytes=str(rows * words * len(gather.widths) * 4),
        partials=f"[{rows}, {words}] float32",
    )


class CrossEntropyBeforeAutograd(CustomGraphPass):
    """Inductor's ``pre_grad_custom_pass``: ``rewrite_cross_entropy`` on each graph.
    ``last`` keeps the lines of the latest graph, for tests and reports."""

    def __init__(self) -> None:
        self.last: list[str] = []

    def __call__(self, graph: Graph) -> None:
        self.last = rewrite_cross_entropy(graph)

    def uuid(self) -> str:
        return hashlib.sha256(pathlib.Path(__file__).read_bytes()).hexdigest()
