"""How Inductor must treat a zero-copy gather's result: never recycle its storage.

With ``zero_copy=True`` (granted only by the barrier-elision pass)
``tpfuse::all_gather_hidden`` and ``tpfuse::linear_all_gather_hidden`` return
a view of a symmetric workspace slot.
The pass proved that every reader inside the graph finishes before any peer
writes that slot again.  Inductor does not know the buffer is shared: after
the last reader it may hand the storage to a later kernel (buffer reuse) or let
a pointwise consumer write its result into it (in-place update), and peers
pushing into the slot would then race with that kernel.  This lowering is the
op's usual extern fallback, plus, for a zero-copy call, the output's name in
``V.graph.never_reuse_buffers``, which Inductor checks for both.

The same lowering keeps the exchanges of gather elimination in the graph's order
(``EXCHANGES``: ``max_hidden``, ``topk_hidden``, the softmax statistics, ...).
Each pairs its call with the peers' calls in the order the ranks issue them
(docs/contract.md §8), and those ops are functional: Inductor's
``reorder_for_peak_memory`` picks among the orders the data allows by estimated
memory, which differs between ranks whose graphs differ (DTensor pads only the
ranks of a shorter vocabulary shard before its gather).  Two exchanges of the
same size then pair with each other's peers and every rank returns wrong
numbers.  The graph's order is the program's on every rank, so each exchange
gets an ordering-only dependency (Inductor's ``additional_buffer_deps``, which
extends no buffer's life) on the exchange before it and on the gathers since
that one, and each gather on the exchange before it.  Gathers among themselves
stay free, as barrier elision assumes (docs/barrier_elision.md §3).

Registered by ``tpfuse.enable()``, ``enabled()`` and ``backend()``.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

_registered = False


def is_registered() -> bool:
    """Whether Inductor would keep a zero-copy result's storage; the op copies out otherwise."""
    return _registered


def _zero_copy(index, args, kwargs) -> bool:
    """The call's ``zero_copy`` argument; ``index`` is its position in the op's schema."""
    if "zero_copy" in kwargs:
        return bool(kwargs["zero_copy"])
    return len(args) > index and bool(args[index])


def register() -> None:
    """Install the lowering once per process (idempotent)."""
    global _registered
    if _registered:
        return
    try:
        from torch._inductor.lowering import fallback_handler, register_lowering
        from torch._inductor.virtualized import V
    except ImportError as err:  # pragma: no cover - another torch: zero-copy stays unavailable
        log.warning("tpfuse: no Inductor lowering for the gather (%s); zero_copy will be ignored", err)
        return

    # Both ops (and the EXCHANGES) are defined by the package ``tpfuse.compile_ops``, which Python
    # imports before this module.  This module imports neither op's module: they import it (``is_registered``),
    # and an import back would close a circle.
    for op in (torch.ops.tpfuse.all_gather_hidden.default, torch.ops.tpfuse.linear_all_gather_hidden.default):
        _lower(op, fallback_handler, register_lowering, V)
    for name in EXCHANGES:
        _lower_exchange(getattr(torch.ops.tpfuse, name).default, fallback_handler, register_lowering, V)
    _registered = True


#: the ops besides the gathers that exchange partials with the group's other ranks (each through one or two
#: gathers inside its kernel): gather elimination's replacements and the vocab-parallel losses
EXCHANGES = ("max_hidden", "topk_hidden", "softmax_stats_hidden", "logsumexp_hidden", "target_logprobs_hidden",
             "cross_entropy_hidden", "entropy_hidden", "sum_over_ranks")


def _lower(op, fallback_handler, register_lowering, V) -> None:
    extern = fallback_handler(op, add_to_fallback_set=False)
    _keep_default_layout_constraint(op)
    index = [a.name for a in op._schema.arguments].index("zero_copy")

    @register_lowering(op, type_promotion_kind=None)
    def lowering(*args, **kwargs):
        out = _in_program_order(V, lambda: extern(*args, **kwargs), gather=True)
        if _zero_copy(index, args, kwargs):
            V.graph.never_reuse_buffers.add(out.get_name())
        return out


def _lower_exchange(op, fallback_handler, register_lowering, V) -> None:
    extern = fallback_handler(op, add_to_fallback_set=False)
    _keep_default_layout_constraint(op)

    @register_lowering(op, type_promotion_kind=None)
    def lowering(*args, **kwargs):
        return _in_program_order(V, lambda: extern(*args, **kwargs), gather=False)


def _in_program_order(V, lower, gather: bool):
    """``lower()``, its kernels ordered after the graph's previous exchange (and, for an exchange, after the
    gathers since that one): the module docstring says why."""
    graph = V.graph
    deps = getattr(graph, "additional_buffer_deps", None)
    if deps is None:  # pragma: no cover - a torch without ordering-only dependencies: Inductor's own order
        return lower()
    first = len(graph.operations)
    out = lower()
    kernels = _kernels(graph.operations[first:])
    # (the graph's latest exchange, the gathers lowered since it), kept on the graph being lowered
    previous, gathers = getattr(graph, "_tpfuse_exchanges", (None, ()))
    before = ((previous,) if previous else ()) + (() if gather else gathers)
    for kernel in kernels:
        deps[kernel.get_operation_name()].update(before)
    names = tuple(k.get_name() for k in kernels)
    graph._tpfuse_exchanges = (previous, gathers + names) if gather else (names[-1] if names else previous, ())
    return out


def _kernels(operations) -> list:
    """The extern kernels a lowering added (not the copies of its inputs, nor the outputs it indexes)."""
    from torch._inductor import ir

    return [op for op in operations if isinstance(op, ir.ExternKernel) and not isinstance(op, ir.MultiOutput)]


def _keep_default_layout_constraint(op) -> None:
    """Inductor's implicit fallback for a custom op also registers the default layout
    constraint of custom ops; an explicit lowering skips that, so register it here
    (best effort: the op accepts any strides, this only keeps the layout as before)."""
    try:
        from torch._inductor.lowering import add_layout_constraint, tag_to_layout_constraint
        from torch._library.utils import get_layout_constraint_tag

        constraint = tag_to_layout_constraint(get_layout_constraint_tag(op, with_default=True))
    except Exception:  # noqa: BLE001 - another torch: leave the layout to Inductor
        return
    if constraint is not None:
        add_layout_constraint(op, constraint)

