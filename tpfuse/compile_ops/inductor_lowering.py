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

    # Both ops are defined by the package ``tpfuse.compile_ops``, which Python imports before
    # this module.  This module imports neither op's module: they import it (``is_registered``),
    # and an import back would close a circle.
    for op in (torch.ops.tpfuse.all_gather_hidden.default, torch.ops.tpfuse.linear_all_gather_hidden.default):
        _lower(op, fallback_handler, register_lowering, V)
    _registered = True


def _lower(op, fallback_handler, register_lowering, V) -> None:
    extern = fallback_handler(op, add_to_fallback_set=False)
    _keep_default_layout_constraint(op)
    index = [a.name for a in op._schema.arguments].index("zero_copy")

    @register_lowering(op, type_promotion_kind=None)
    def lowering(*args, **kwargs):
        out = extern(*args, **kwargs)
        if _zero_copy(index, args, kwargs):
            V.graph.never_reuse_buffers.add(out.get_name())
        return out


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

