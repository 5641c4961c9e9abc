"""The windows of one group: a staging pair registered as NCCL symmetric windows, made at the first call.

``send`` holds one rank's slab (``[T, widest]`` bytes), ``recv`` every rank's (``[W, T, widest]``).  Both
are allocated in one ``torch.cuda.MemPool`` on the group's NCCL allocator and then registered on the
group's communicator with ``register_mem_pool(pool, symm=True)``: torch registers the segments a pool
holds when it is registered, and not every torch release makes a segment allocated later a window.  So a
call that needs more room makes a new, larger pair in a new pool, registered the same way.  Outgrown pairs
stay allocated and registered: calls already queued, and CUDA graphs captured on them, still use them.
``release_group`` deregisters them all.

Everything here that registers is collective, and runs at the same call on every rank (the choice of
backend is rank-consistent).  Every rank's software checks (support.py) are exchanged before anything is
allocated, a failed allocation is agreed on before anything is registered, and a failed registration after
it: so every rank refuses alike, with the same reason, and no rank registers while a peer does not.  A
refusal sticks to the group (auto then takes nccl; a forced call raises it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .. import launchers
from .. import workspace as workspaces
from . import support

#: the protocol's key in a workspace's ``protocols``
NAME = "nccl_symmetric"
#: the smallest slab a pair holds (bytes); pairs grow by powers of two from here
MIN_WINDOW_BYTES = 1 << 20


#: (pool, send, recv) registered on this rank while a peer's registration failed: never deregistered
#: (deregistering is collective, and the peer holds no window to join it with) and never freed, so no
#: registered memory returns to the allocator; kept for the life of the process.
STRANDED: list = []


@dataclass
class Windows:
    """The group's windows on this rank."""

    reason: str = ""  # agreed by every rank: why the group has no windows ("" while it may)
    slab_bytes: int = 0  # the largest slab per rank the current pair holds
    send: torch.Tensor | None = None  # uint8[slab_bytes], a window
    recv: torch.Tensor | None = None  # uint8[W * slab_bytes], a window
    pool: object = None
    backend: object = None  # the group's ProcessGroupNCCL on this device
    retired: list = field(default_factory=list)  # (pool, send, recv) of outgrown pairs: still registered


def windows_of(ws) -> Windows:
    """``ws``'s windows (none registered before the first call that needs room)."""
    windows = ws.protocols.get(NAME)
    if windows is None:
        windows = ws.protocols[NAME] = Windows()
    return windows


def window_bytes_for(slab_bytes: int) -> int:
    """The slab a pair grows to for a request of ``slab_bytes`` (a pure function of the size)."""
    size = MIN_WINDOW_BYTES
    while size < slab_bytes:
        size *= 2
    return size


def room_refusal(ws, slab_bytes: int) -> str:
    """Make or grow the windows to hold a ``slab_bytes`` slab (collective), or say why not: never under capture."""
    windows = windows_of(ws)
    if windows.reason or slab_bytes <= windows.slab_bytes:
        return windows.reason
    if torch.cuda.is_current_stream_capturing():
        return (f"the group's NCCL windows must be {'grown' if windows.send is not None else 'registered'} for a "
                f"{slab_bytes}-byte slab by an eager call before graph capture")
    return ensure_windows(ws, slab_bytes).reason


def ensure_windows(ws, slab_bytes: int) -> Windows:
    """``ws``'s windows, made or grown to hold ``slab_bytes`` per rank. Collective: every rank, the same call."""
    windows = windows_of(ws)
    if not windows.reason and slab_bytes > windows.slab_bytes:
        size = window_bytes_for(slab_bytes)
        workspaces.set_up(ws.device, f"registering NCCL symmetric windows for {size}-byte slabs", _grow, ws,
                          windows, size)
    return windows


def every_rank(ws, text: str) -> list[str]:
    """Every rank's ``text``, in rank order (collective)."""
    out = [None] * ws.group.world_size
    dist.all_gather_object(out, text, group=ws.group.pg)
    return out


def agreed_reason(reasons: list[str]) -> str:
    """"" when no rank has a reason; else the reason, naming the first rank that has it unless every rank
    does: the same on every rank."""
    if reasons and all(why == reasons[0] for why in reasons):
        return reasons[0]
    return next((f"rank {r}: {why}" for r, why in enumerate(reasons) if why), "")


def _grow(ws, windows: Windows, slab_bytes: int) -> None:
    local = support.software_refusal() or support.group_refusal(ws.group)
    windows.reason = agreed_reason(every_rank(ws, local))
    if windows.reason:
        return
    pair, error = _allocate(ws, slab_bytes)
    windows.reason = agreed_reason(every_rank(ws, error))
    if windows.reason:
        windows.reason = f"allocating the NCCL windows failed ({windows.reason})"
        return
    error = _register(*pair)
    windows.reason = agreed_reason(every_rank(ws, error))
    if windows.reason:
        if not error:
            STRANDED.append(pair[1:])  # registered here while a peer failed: see STRANDED
        return
    if windows.pool is not None:
        windows.retired.append((windows.pool, windows.send, windows.recv))  # queued calls, captured graphs use it
    windows.backend, windows.pool, windows.send, windows.recv = pair
    windows.slab_bytes = slab_bytes


def _allocate(ws, slab_bytes: int) -> tuple[tuple, str]:
    """(backend, pool, send, recv) in a new pool on the group's NCCL allocator, and "" or what failed (local)."""
    try:
        backend = support.nccl_backend(ws.group, ws.device)
        pool = torch.cuda.MemPool(backend.mem_allocator)
        with torch.cuda.use_mem_pool(pool):
            send = torch.empty(slab_bytes, dtype=torch.uint8, device=ws.device)
            recv = torch.empty(ws.group.world_size * slab_bytes, dtype=torch.uint8, device=ws.device)
    except Exception as err:  # noqa: BLE001 - agreed on by the caller: every rank refuses alike
        return (None, None, None, None), f"{type(err).__name__}: {err}"
    return (backend, pool, send, recv), ""


def _register(backend, pool, send, recv) -> str:
    """Register ``pool``'s segments as symmetric windows (collective); "" or what failed here."""
    try:
        backend.register_mem_pool(pool, symm=True)
    except TypeError as err:  # a torch whose register_mem_pool has no symm (support.py could not tell)
        return f"this torch cannot register symmetric windows ({err})"
    except Exception as err:  # noqa: BLE001 - agreed on by the caller
        return f"registering NCCL symmetric windows failed: {type(err).__name__}: {err}"
    return ""


def release(ws) -> None:
    """Deregister every window of ``ws``'s group (collective).  The next call registers anew."""
    windows = ws.protocols.pop(NAME, None)
    launchers.clear()  # kept launchers hold views of these windows
    if windows is None or windows.backend is None:
        return
    if ws.device.type == "cuda":
        torch.cuda.synchronize(ws.device)  # nothing queued still uses them
    for pool in [windows.pool] + [pool for pool, _, _ in windows.retired if pool is not None]:
        windows.backend.deregister_mem_pool(pool)


def release_group(group, device_index: int | None = None) -> None:
    """Deregister the windows of ``group`` (a ProcessGroup, its name or None: the default group) on this rank's
    device.  Collective: every rank calls it at the same point, after its last nccl_symmetric call, and before
    ``dist.destroy_process_group`` (a torch that cannot deregister windows when it destroys a group fails
    there).  A CUDA graph captured on the windows must not replay after this."""
    from ..groups import group_name_of, resolve_group

    resolved = resolve_group(group_name_of(group))
    index = torch.cuda.current_device() if device_index is None else device_index
    ws = workspaces.workspace(resolved, index, establish=False)
    if ws is not None:
        release(ws)
