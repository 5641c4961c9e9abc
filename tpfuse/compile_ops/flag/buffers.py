"""The flag protocol's memory on one group: one zeroed symmetric buffer and the epoch slots.

The buffer holds both parities and one region per source rank, each sized for the
largest slab the protocol serves (layout: kernels/flag/; ``region_offset`` places
the regions on the device).  The epochs live in device memory and advance in the
kernel.  Both are made at the first flag call on the group: every rank makes them
at the same call (the protocol choice is rank-consistent).  They are separate from
the barrier protocol's slots, so the two protocols interleave on one group in any order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...kernels import flag as protocol
from .. import workspace as workspaces

#: the protocol's key in a workspace's ``protocols``
NAME = "flag"


@dataclass
class FlagBuffers:
    """The flag protocol's memory on this rank."""

    max_slab_bytes: int  # the largest slab one region holds
    region_units: int
    buffer: torch.Tensor  # symmetric, zeroed at birth
    handle: object
    buffer_args: tuple  # 8 flag-buffer addresses, zero past W: the kernel's scalar arguments
    epochs: torch.Tensor  # int32[EPOCH_SLOTS], local; advanced by the kernel


def buffers_of(ws) -> FlagBuffers | None:
    """``ws``'s flag buffers, None before the group's first flag call."""
    return ws.protocols.get(NAME)


def capacity_refusal(slab_bytes: int, max_slab_bytes: int = protocol.MAX_SLAB_BYTES) -> str:
    """Why a slab of ``slab_bytes`` cannot go through the buffers ("" when it fits)."""
    if slab_bytes > max_slab_bytes:
        return f"a slab of {slab_bytes} bytes exceeds the flag buffers' {max_slab_bytes}"
    return ""


def ensure_buffers(ws) -> FlagBuffers:
    """``ws``'s flag buffers, made at the first call. Collective: every rank makes them at the same call."""
    if buffers_of(ws) is None:
        workspaces.set_up(ws.device, "setting up the flag-protocol buffers", _make, ws)
    return buffers_of(ws)


def _make(ws) -> None:
    nbytes = protocol.buffer_bytes(ws.group.world_size)
    buffer, handle = workspaces.symmetric_buffer(ws, nbytes, "the flag buffers", zeroed=True)  # flag 0: unwritten
    epochs = torch.zeros(protocol.EPOCH_SLOTS, dtype=torch.int32, device=ws.device)
    ws.protocols[NAME] = FlagBuffers(protocol.MAX_SLAB_BYTES, protocol.region_units(), buffer, handle,
                                     workspaces.padded(handle.buffer_ptrs), epochs)
