"""The c10d paths: gloo for CPU tensors (the reference), NCCL for CUDA tensors.

A hidden-axis gather through a c10d collective is "gather along dim 0, then
rearrange": every rank sends its ``[T, w_r]`` slab padded to ``[T, max_w]``,
``all_gather_into_tensor`` stacks them into ``[W, T, max_w]``, and one
``torch.cat(..., out=)`` writes the bands in rank order into the caller's
tensor.  Padding is only needed for uneven widths; with even widths the send
buffer is the (contiguous) input itself.

The backward of the gather, a reduce-scatter over the hidden axis, is the
mirror image: scatter the gradient's bands into ``[W, T, max_w]`` and let
``reduce_scatter_tensor`` sum band ``r`` of every rank onto rank ``r``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .backend import Backend, GatherBackend, GatherCall
from .groups import Group, all_gather_single

# gloo has no float8 kernels; moving bytes through a same-sized integer view
# keeps the gather bit-exact.
_WIRE_DTYPE = {torch.float8_e4m3fn: torch.uint8, torch.float8_e5m2: torch.uint8}

_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _on_wire(t: torch.Tensor) -> torch.Tensor:
    wire = _WIRE_DTYPE.get(t.dtype)
    return t if wire is None else t.view(wire)


def gather_hidden(
    x: torch.Tensor, hidden_widths: list[int], group: Group
) -> torch.Tensor:
    """``cat([x_0, ..., x_{W-1}], dim=-1)`` across the ranks of ``group``."""
    lead = x.shape[:-1]
    tokens = x.numel() // x.shape[-1] if x.shape[-1] else 0
    out = x.new_empty(*lead, sum(hidden_widths))
    if tokens == 0:  # every rank has the same shape, so every rank skips
        return out
    width, max_width = x.shape[-1], max(hidden_widths)
    slab = x.reshape(tokens, width)
    if width == max_width:
        send = slab.contiguous()
    else:
        send = x.new_empty(tokens, max_width)
        send[:, :width].copy_(slab)
    stacked = x.new_empty(group.world_size, tokens, max_width)
    all_gather_single(_on_wire(stacked).view(-1), _on_wire(send).view(-1), group=group.pg)
    bands = [stacked[r, :, :w] for r, w in enumerate(hidden_widths)]
    torch.cat(bands, dim=-1, out=out.view(tokens, -1))
    return out


def reduce_scatter_hidden(
    grad: torch.Tensor, hidden_widths: list[int], group: Group
) -> torch.Tensor:
    """Rank ``r`` gets ``sum over ranks of grad[..., band r]``."""
    lead = grad.shape[:-1]
    width = hidden_widths[group.rank]
    tokens = grad.numel() // grad.shape[-1] if grad.shape[-1] else 0
    if tokens == 0:
        return grad.new_empty(*lead, width)
    max_width = max(hidden_widths)
    rows = grad.reshape(tokens, -1)
    uneven = any(w != max_width for w in hidden_widths)
    # Padding columns are reduced too but never read; zero them so the sum is
    # clean (no NaN/Inf from uninitialised memory).
    send = (grad.new_zeros if uneven else grad.new_empty)(group.world_size, tokens, max_width)
    offset = 0
    for r, w in enumerate(hidden_widths):
        send[r, :, :w].copy_(rows[:, offset : offset + w])
        offset += w
    recv = grad.new_empty(tokens, max_width)
    _reduce_scatter_single(recv.view(-1), send.view(-1), group=group.pg)
    return recv[:, :width].reshape(*lead, width).contiguous()


class C10dBackend(GatherBackend):
    """gloo for CPU tensors (the reference), NCCL for CUDA tensors (the fallback): they never refuse."""

    def __init__(self, name: str, device: str):
        self.name, self.devices = name, (device,)

    def refusal(self, call: GatherCall) -> str:
        return "" if call.device_type in self.devices else f"{self.name} moves {self.devices[0]} tensors"

    def why_taken(self, call: GatherCall) -> str:
        return f"{call.device_type} tensors go through {self.name}"

    def gather(self, x, hidden_widths, group, slot=-1, skip_entry_sync=False, zero_copy=False):
        # The op has run the agreement check already where it applies (all_gather_hidden.py).
        return gather_hidden(x, hidden_widths, group)


GLOO = C10dBackend(Backend.GLOO.value, "cpu")
NCCL = C10dBackend(Backend.NCCL.value, "cuda")
