"""``tpfuse::all_gather_hidden``: the hidden-axis all-gather as a custom op.

Schema (see docs/op.md for the full contract)::

    tpfuse::all_gather_hidden(Tensor x, int[] hidden_widths, str group_name,
                              int slot=-1, bool skip_entry_sync=False,
                              bool zero_copy=False) -> Tensor

``slot``, ``skip_entry_sync`` and ``zero_copy`` are *permissions* that only a
pass which has proven them safe sets (docs/contract.md §1, §3).  A backend that cannot use
one ignores it and still returns a correct, caller-owned tensor.

Its backward is ``tpfuse::reduce_scatter_hidden``: rank ``r`` receives the sum
over ranks of column band ``r`` of the gradient.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from .. import config as settings
from . import agreement, collective, failures, inductor_lowering, launchers
from .backend import GatherCall
from .dispatch import choose, chosen, forced_backend
from .groups import Group, group_name_of, resolve_group
from .validation import (check_gather_args, check_gather_shapes, check_not_scalar, check_reduce_scatter_args,
                         whole_widths, world_size_of)


# The ops are registered through torch.library.Library rather than the
# custom_op decorator: an eager call then costs one dispatcher hop into plain
# Python (no generic autograd wrapper, no aliasing re-check), which matters for
# the host-cost target (about one elementwise op).  opcheck covers the same
# contract (schema, fake, autograd registration, aot_dispatch_dynamic).
_lib = torch.library.Library("tpfuse", "DEF")
_lib.define(
    "all_gather_hidden(Tensor x, int[] hidden_widths, str group_name, int slot=-1, "
    "bool skip_entry_sync=False, bool zero_copy=False) -> Tensor"
)
_lib.define("reduce_scatter_hidden(Tensor grad, int[] hidden_widths, int local_width, str group_name) -> Tensor")


def _all_gather_hidden_impl(
    x: Tensor,
    hidden_widths: list[int],
    group_name: str,
    slot: int = -1,
    skip_entry_sync: bool = False,
    zero_copy: bool = False,
) -> Tensor:
    group = resolve_group(group_name)
    if failures.failed_groups:  # a group whose push call timed out stays failed (failures.py)
        failures.raise_if_group_failed(group)
    # A view of the slot is safe only where Inductor is kept from recycling it (tpfuse.enable()
    # and backend() install that lowering); anywhere else the permission is ignored.
    zero_copy = zero_copy and inductor_lowering.is_registered()
    variables, device = settings.raw_dispatch_values(), x.device
    if agreement_applies(device.type, group, variables[-1]):
        # Collective, on every call and before anything that could raise on one rank only or
        # set up shared state: ranks that disagree all raise here, and so do the peers of a rank
        # whose own checks refuse the call (agreement.py).
        agreement.check(x, hidden_widths, group, lambda: check_gather_args(x, hidden_widths, group, slot))
    key = (group_name, tuple(hidden_widths), x.shape, x.dtype, device, slot, skip_entry_sync, zero_copy, variables)
    kept = launchers.find(key, group)
    if kept is not None:  # this call shape was checked and dispatched before (launchers.py)
        name, launch = kept
        chosen[name] += 1
        return launch(x)
    check_gather_args(x, hidden_widths, group, slot)
    if device.type == "cuda":  # collective where not yet agreed: every rank dispatches on the same settings
        agreement.agree_on_settings(group, device)
    backend = choose(GatherCall.of(x, hidden_widths, group, forced_backend()))
    launch = backend.prepare(x, hidden_widths, group, slot, skip_entry_sync, zero_copy)
    if not (x.is_cuda and torch.cuda.is_current_stream_capturing()):
        launchers.keep(key, group, backend.name, launch)
    return launch(x)


def agreement_applies(device_type: str, group: Group, check_raw) -> bool:
    """CPU tensors on a gloo group: always.  CUDA tensors on an NCCL group: with ``TPFUSE_CHECK=1``,
    outside graph capture.  (A tensor on a device its group cannot move gets the op's own error.)"""
    if device_type == "cpu":
        return "gloo" in group.backend
    return (check_raw is not None and device_type == "cuda" and "nccl" in group.backend
            and bool(settings.get("TPFUSE_CHECK")) and not torch.cuda.is_current_stream_capturing())


def _reduce_scatter_hidden_impl(
    grad: Tensor, hidden_widths: list[int], local_width: int, group_name: str
) -> Tensor:
    group = resolve_group(group_name)
    check_reduce_scatter_args(grad, hidden_widths, local_width, group)
    return collective.reduce_scatter_hidden(grad, hidden_widths, group)


for _device in ("CPU", "CUDA"):
    _lib.impl("all_gather_hidden", _all_gather_hidden_impl, _device)
    _lib.impl("reduce_scatter_hidden", _reduce_scatter_hidden_impl, _device)


@torch.library.register_fake("tpfuse::all_gather_hidden", lib=_lib)
def _(x, hidden_widths, group_name, slot=-1, skip_entry_sync=False, zero_copy=False):
    # Shape only: never touches a process group, works for symbolic leading dims.
    check_gather_shapes(x, hidden_widths)
    return x.new_empty(*x.shape[:-1], sum(hidden_widths))


@torch.library.register_fake("tpfuse::reduce_scatter_hidden", lib=_lib)
def _(grad, hidden_widths, local_width, group_name):
    return grad.new_empty(*grad.shape[:-1], local_width)


class _GatherHidden(torch.autograd.Function):
    """Forward: the gather (below autograd). Backward: reduce-scatter over the hidden axis."""

    @staticmethod
    def forward(ctx, x, hidden_widths, group_name, slot, skip_entry_sync, zero_copy):
        ctx.hidden_widths, ctx.group_name, ctx.local_width = hidden_widths, group_name, x.shape[-1]
        # Where the ranks check agreement they also agree that this call has a backward (a collective).
        with torch._C._AutoDispatchBelowAutograd(), agreement.forward_of_a_graph():
            return torch.ops.tpfuse.all_gather_hidden.default(
                x, hidden_widths, group_name, slot, skip_entry_sync, zero_copy
            )

    @staticmethod
    def backward(ctx, grad):
        grad_x = torch.ops.tpfuse.reduce_scatter_hidden.default(
            grad.contiguous(), ctx.hidden_widths, ctx.local_width, ctx.group_name
        )
        return grad_x, None, None, None, None, None


#: the dispatch keys below Autograd that a tensor may carry and whose kernels must see the
#: call (functionalization, Python subclasses), as a bit mask of a key set
_BELOW_AUTOGRAD_MASK = torch._C.DispatchKeySet(torch._C.DispatchKey.Functionalize).add(
    torch._C.DispatchKey.Python).raw_repr()


def _plain(x: Tensor) -> bool:
    """No mode, subclass or functionalization sits between Autograd and the device kernel for ``x``."""
    return (type(x) is Tensor and not torch._C._len_torch_dispatch_stack()
            and not torch._C._dispatch_keys(x).raw_repr() & _BELOW_AUTOGRAD_MASK)


def _all_gather_hidden_autograd(x, hidden_widths, group_name, slot=-1, skip_entry_sync=False, zero_copy=False):
    # The common inference call needs no graph: skip the autograd.Function.
    if not (x.requires_grad and torch.is_grad_enabled()):
        if _plain(x):
            # Nothing would intercept the call below Autograd: run the device kernel here rather
            # than through a second dispatcher hop (each hop boxes the int[] and str arguments).
            return _all_gather_hidden_impl(x, hidden_widths, group_name, slot, skip_entry_sync, zero_copy)
        with torch._C._AutoDispatchBelowAutograd():
            return torch.ops.tpfuse.all_gather_hidden.default(
                x, hidden_widths, group_name, slot, skip_entry_sync, zero_copy
            )
    return _GatherHidden.apply(x, hidden_widths, group_name, slot, skip_entry_sync, zero_copy)


_lib.impl("all_gather_hidden", _all_gather_hidden_autograd, "Autograd")


def all_gather_hidden(
    x: Tensor,
    group: "torch.distributed.ProcessGroup | str | None" = None,
    hidden_widths: Sequence[int] | None = None,
) -> Tensor:
    """Gather every rank's ``[..., w_r]`` slab along the last axis, in rank order.

    ``group`` is a ProcessGroup, a group name, or ``None`` for the default
    group.  ``hidden_widths`` lists every rank's width (identical on all
    ranks); by default all ranks have ``x.shape[-1]`` columns.  Returns a
    fresh ``[..., sum(hidden_widths)]`` tensor owned by the caller.
    """
    if torch.compiler.is_compiling():
        check_not_scalar(x)  # tracing is rank-local: refuse here, where the message reaches the user unwrapped
    name = group_name_of(group)
    if hidden_widths is None:
        # Eager, a scalar gets widths of -1, so that a scalar on one rank only meets the agreement
        # check with its peers (every rank raises) rather than failing here alone; the op
        # refuses scalars after that check.
        hidden_widths = [x.shape[-1] if x.dim() else -1] * world_size_of(name)
    def call():
        return torch.ops.tpfuse.all_gather_hidden.default(x, whole_widths(hidden_widths), name)
    return call() if torch.compiler.is_compiling() else refused_alike(x, name, call)


@torch.compiler.disable
def refused_alike(x: Tensor, group_name: str, dispatch: Callable[[], Any]) -> Any:
    """``dispatch()``: a public wrapper's eager call of its op.  Where it raises on this rank before the
    op's agreement check began (an argument the op's schema cannot take: a width or a k that is not a whole
    number, a target that is not a tensor), the peers, whose same call waits in that check's exchange, raise
    too: this rank joins the exchange as a refusing rank first (``agreement.refuse_early``).

    The wrappers call ``dispatch()`` itself while Dynamo traces (tracing is rank-local, so the message
    reaches the user unwrapped); never traced, so that a frame Dynamo runs eagerly after a graph break
    does not compile this one around the op."""
    begun = agreement.checks_begun()
    try:
        return dispatch()
    except Exception as err:
        if agreement.checks_begun() == begun:
            _refuse_on_every_rank(x, group_name, err)
        raise


def _refuse_on_every_rank(x: Tensor, group_name: str, err: Exception) -> None:
    """Raise ``err`` after the exchange of a refusing rank, where the ranks agree on calls; else return."""
    try:
        group = resolve_group(group_name)
    except Exception:  # noqa: BLE001 - no group to tell: the caller raises its own error
        return
    device = x.device if isinstance(x, Tensor) else torch.device("cpu")
    if group.backend != "fake" and agreement_applies(device.type, group, settings.raw_dispatch_values()[-1]):
        agreement.refuse_early(device, group, err)
