"""How Inductor must treat a zero-copy gather's result: never recycle its storage.

With ``zero_copy=True`` (granted only by the barrier-elision pass)
``tpfuse::all_gather_hidden`` returns a view of a symmetric workspace slot.
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

import torch

_registered = False


def _zero_copy(args, kwargs) -> bool:
    # schema: (x, hidden_widths, group_name, slot=-1, skip_entry_sync=False, zero_copy=False)
    if "zero_copy" in kwargs:
        return bool(kwargs["zero_copy"])
    return len(args) > 5 and bool(args[5])


def register() -> None:
    """Install the lowering once per process (idempotent)."""
    global _registered
    if _registered:
        return
    from torch._inductor.lowering import fallback_handler, register_lowering
    from torch._inductor.virtualized import V

    op = torch.ops.tpfuse.all_gather_hidden.default
    extern = fallback_handler(op, add_to_fallback_set=False)

    @register_lowering(op, type_promotion_kind=None)
    def all_gather_hidden(*args, **kwargs):
        out = extern(*args, **kwargs)
        if _zero_copy(args, kwargs):
            V.graph.never_reuse_buffers.add(out.get_name())
        return out

    _registered = True
