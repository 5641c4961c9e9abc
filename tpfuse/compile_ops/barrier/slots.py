"""The barrier protocol's buffers on one group: two ping-pong slots in one symmetric allocation.

A call writes one slot; with ``slot=-1`` the op alternates them (``take_slot``, the
same sequence on every rank), and a pass may name them to prove an entry barrier
redundant (docs/barrier_elision.md).  A call that needs more room grows both slots;
every rank grows at the same call because the sizes come from the (identical)
shapes.  Old buffers stay alive: kernels already queued may still use them.  The
signal pads the barriers count in are the workspace's (workspace.py says why).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...kernels.barrier import next_slot
from .. import workspace as workspaces

#: the protocol's key in a workspace's ``protocols``
NAME = "barrier"
#: the smallest slot (bytes); slots grow by powers of two from here
MIN_SLOT_BYTES = 1 << 20


@dataclass
class Slots:
    slot_bytes: int = 0
    buffer: torch.Tensor | None = None
    handle: object = None
    pointer_args: tuple = ()  # 8 buffer then 8 signal-pad addresses, zero past W: the kernels' scalar arguments
    multicast_ptr: int = 0  # non-zero only when every rank has a multicast address
    next: int = 0  # the slot a call with slot=-1 takes: 0, 1, 0, ...
    retired: list = field(default_factory=list)  # outgrown buffers, kept for the kernels still queued on them


def slots_of(ws) -> Slots:
    """``ws``'s slots (none allocated before the first call that needs room)."""
    slots = ws.protocols.get(NAME)
    if slots is None:
        slots = ws.protocols[NAME] = Slots()
    return slots


def slot_bytes_for(nbytes: int) -> int:
    """The slot size a request of ``nbytes`` grows to (a pure function of the size)."""
    size = MIN_SLOT_BYTES
    while size < nbytes:
        size *= 2
    return size


def room_refusal(ws, nbytes: int) -> str:
    """Grow both slots to hold ``nbytes`` (collective), or say why not: never under CUDA-graph capture."""
    if nbytes > slots_of(ws).slot_bytes and torch.cuda.is_current_stream_capturing():
        return f"the group's slots must be grown to {nbytes} bytes by an eager call before graph capture"
    ensure_capacity(ws, nbytes)  # every rank grows at this call
    return ""


def ensure_capacity(ws, nbytes: int) -> Slots:
    """``ws``'s slots, grown to hold ``nbytes`` each. Collective: every rank grows at the same call."""
    slots = slots_of(ws)
    if nbytes > slots.slot_bytes:
        workspaces.set_up(ws.device, f"growing the symmetric slots to {slot_bytes_for(nbytes)} bytes", _grow, ws,
                          slots, slot_bytes_for(nbytes))
    return slots


def _grow(ws, slots: Slots, slot_bytes: int) -> None:
    buffer, handle = workspaces.symmetric_buffer(ws, 2 * slot_bytes, "the symmetric slots")
    # Multicast: only when every rank has an address (never on our shared
    # hosts, where TORCH_SYMM_MEM_DISABLE_MULTICAST=1 makes it 0).
    multicast = int(getattr(handle, "multicast_ptr", 0) or 0)
    multicast_everywhere = workspaces.agree(multicast != 0, ws.group, ws.device)
    if slots.buffer is not None:
        slots.retired.append((slots.buffer, slots.handle))  # queued kernels may still use it
    slots.buffer, slots.handle, slots.slot_bytes = buffer, handle, slot_bytes
    slots.pointer_args = workspaces.padded(handle.buffer_ptrs) + ws.signal_pad_args
    slots.multicast_ptr = multicast if multicast_everywhere else 0


def take_slot(slots: Slots, slot: int) -> int:
    """The slot this call uses: ``slot`` if given, else alternate (same sequence on every rank)."""
    if slot >= 0:
        return slot
    chosen = slots.next
    slots.next = next_slot(chosen)
    return chosen
