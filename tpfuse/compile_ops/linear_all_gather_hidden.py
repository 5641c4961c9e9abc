"""``tpfuse::linear_all_gather_hidden``: a column linear followed by the hidden-axis all-gather, as one op.

Schema (see docs/op.md, "linear_all_gather_hidden")::

    tpfuse::linear_all_gather_hidden(Tensor x, Tensor weight, Tensor? bias, int[] hidden_widths,
                                     str group_name, int slot=-1, bool skip_entry_sync=False,
                                     bool zero_copy=False) -> Tensor

Every rank passes the same ``x [..., K]`` and its own column band of the
weight, ``weight [w_rank, K]`` (``nn.Linear`` layout) and ``bias [w_rank]``.
The result is ``cat_r(linear(x, W_r, b_r), dim=-1)``, ``[..., sum(hidden_widths)]``,
owned by the caller -- exactly ``all_gather_hidden(linear(x, weight, bias), ...)``.

Backends:
- CPU: the reference composite, ``linear`` then the gloo gather.
- CUDA: dispatch chooses a backend for the call (rank-consistent; the flag
  protocol takes no fused call) and the op asks it for its fused kernel
  (``GatherBackend.prepare_linear``).  The barrier backends have one and run it
  where the cost rule (``linear_cost.decide``: T, K, the widths, the dtype and
  the GPU model every rank agreed on) picks it: one Triton kernel per rank
  computes the linear and pushes each output tile into every peer.  Otherwise
  cuBLAS ``linear`` then ``all_gather_hidden`` with the same permissions.
  ``TPFUSE_LINEAR_PUSH=auto|fused|unfused`` (identical on every rank) forces
  the choice for benchmarks and tests (compile_ops/linear_decision.py).

``slot``, ``skip_entry_sync`` and ``zero_copy`` are the gather's permissions,
with the same meaning (only a pass that proved them sets them; ``zero_copy``
is honoured by the fused P2P kernel and the gather, and only where the op's
Inductor lowering keeps the result's storage: ``inductor_lowering.py``).

Autograd: the forward is the op itself, whether or not a gradient is wanted,
so every rank runs the same kernels (a rank that wants a gradient must not
take the unfused composite while its peer takes the fused kernel: the two
pair their barriers differently, docs/contract.md §2).  The backward is
``reduce_scatter_hidden`` (rank r gets the sum over ranks of band r of the
gradient), then ``linear``'s backward on this rank's band.

Agreement: where the ranks check that they mean the same call (gloo; CUDA with
``TPFUSE_CHECK=1``), the op's own checks of x, the weight and the bias run
before that exchange and are agreed, so a call one rank refuses is refused by
every rank (agreement.py).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import config as settings
from . import agreement, inductor_lowering
from .all_gather_hidden import agreement_applies, refused_alike
from .backend import GatherCall
from .dispatch import choose, forced_backend
from .groups import group_name_of, resolve_group
from .validation import check_linear_args, check_linear_shapes, whole_widths, world_size_of

_lib = torch.library.Library("tpfuse", "FRAGMENT")
_lib.define(
    "linear_all_gather_hidden(Tensor x, Tensor weight, Tensor? bias, int[] hidden_widths, str group_name, "
    "int slot=-1, bool skip_entry_sync=False, bool zero_copy=False) -> Tensor"
)


def _linear_all_gather_hidden_impl(x, weight, bias, hidden_widths, group_name, slot=-1, skip_entry_sync=False,
                                   zero_copy=False):
    group = resolve_group(group_name)
    if agreement_applies(x.device.type, group, settings.raw_dispatch_values()[-1]):
        # Collective and first: this rank's checks are agreed, so no rank raises while its peers
        # wait in the gather (agreement.py).
        agreement.check(x, hidden_widths, group,
                        lambda: check_linear_args(x, weight, bias, hidden_widths, group, slot),
                        agreement.CallView.of_linear(x, hidden_widths, agreement.expects_backward()))
    check_linear_args(x, weight, bias, hidden_widths, group, slot)
    if x.device.type == "cuda":
        agreement.agree_on_settings(group, x.device)  # collective where not yet agreed (agreement.py)
        call = GatherCall.of(x, hidden_widths, group, forced_backend(), fused_linear=True)
        launch = choose(call).prepare_linear(x, weight, bias, hidden_widths, group, slot, skip_entry_sync,
                                             zero_copy and inductor_lowering.is_registered())
        if launch is not None:
            return launch(x, weight, bias)
    # The reference composite (CPU), and CUDA where the chosen backend runs no fused kernel for this call
    # (the gather applies its own zero-copy guard).
    y = F.linear(x, weight, bias)
    return torch.ops.tpfuse.all_gather_hidden.default(y, hidden_widths, group_name, slot, skip_entry_sync,
                                                      zero_copy)


for _device in ("CPU", "CUDA"):
    _lib.impl("linear_all_gather_hidden", _linear_all_gather_hidden_impl, _device)


@torch.library.register_fake("tpfuse::linear_all_gather_hidden", lib=_lib)
def _(x, weight, bias, hidden_widths, group_name, slot=-1, skip_entry_sync=False, zero_copy=False):
    # Shape only: never touches a process group; symbolic leading dims are fine.
    check_linear_shapes(x, weight, hidden_widths)
    return x.new_empty(*x.shape[:-1], sum(hidden_widths))


class _LinearGatherHidden(torch.autograd.Function):
    """Forward: the op below autograd, the same kernels as without a gradient.  Backward: the reduce-scatter
    over the hidden axis, then ``linear``'s backward on this rank's band."""

    @staticmethod
    def forward(ctx, x, weight, bias, hidden_widths, group_name, slot, skip_entry_sync, zero_copy):
        ctx.save_for_backward(x, weight)
        ctx.hidden_widths, ctx.group_name, ctx.has_bias = hidden_widths, group_name, bias is not None
        with torch._C._AutoDispatchBelowAutograd(), agreement.forward_of_a_graph():
            return torch.ops.tpfuse.linear_all_gather_hidden.default(
                x, weight, bias, hidden_widths, group_name, slot, skip_entry_sync, zero_copy)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        width, k = weight.shape
        # Every rank that runs this backward joins the reduce-scatter, whichever inputs want a gradient here.
        grad_band = torch.ops.tpfuse.reduce_scatter_hidden.default(grad.contiguous(), ctx.hidden_widths, width,
                                                                   ctx.group_name)
        rows = grad_band.reshape(-1, width)
        needs = ctx.needs_input_grad
        grad_x = grad_band.matmul(weight) if needs[0] else None
        grad_weight = rows.t().matmul(x.reshape(-1, k)) if needs[1] else None
        grad_bias = rows.sum(0) if ctx.has_bias and needs[2] else None
        return grad_x, grad_weight, grad_bias, None, None, None, None, None


def _linear_all_gather_hidden_autograd(x, weight, bias, hidden_widths, group_name, slot=-1,
                                       skip_entry_sync=False, zero_copy=False):
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
    if needs_grad:
        return _LinearGatherHidden.apply(x, weight, bias, hidden_widths, group_name, slot, skip_entry_sync,
                                         zero_copy)
    with torch._C._AutoDispatchBelowAutograd():
        return torch.ops.tpfuse.linear_all_gather_hidden.default(
            x, weight, bias, hidden_widths, group_name, slot, skip_entry_sync, zero_copy)


_lib.impl("linear_all_gather_hidden", _linear_all_gather_hidden_autograd, "Autograd")


def linear_all_gather_hidden(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    group: "torch.distributed.ProcessGroup | str | None" = None,
    hidden_widths: Sequence[int] | None = None,
) -> Tensor:
    """``cat_r(F.linear(x, W_r, b_r), dim=-1)``: this rank's column band of a linear, gathered.

    ``weight`` is this rank's ``[w_rank, K]`` band; ``hidden_widths`` lists
    every rank's ``w_r`` (by default all equal to ``weight.shape[0]``)."""
    name = group_name_of(group)
    def call():
        widths = [weight.shape[0]] * world_size_of(name) if hidden_widths is None else hidden_widths
        return torch.ops.tpfuse.linear_all_gather_hidden(x, weight, bias, whole_widths(widths), name)
    return call() if torch.compiler.is_compiling() else refused_alike(x, name, call)
