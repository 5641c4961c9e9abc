"""The symmetric workspace of the push backends, one per (group, device).

What lives here:
- **Group facts**, established collectively once per group (one all-gather):
  whether every rank can use symmetric memory, whether all ranks share one
  host, the smallest multiprocessor count (the grid cap).  Dispatch decides
  only from these agreed facts, so every rank takes the same path
  (docs/contract.md §2).
- **Signal pads**: a small symmetric allocation that is never freed or
  regrown, whose signal pads hold the barrier slots.  Its size is set before
  our first allocation.  The slots balance after every call, so they carry
  over from call to call and across buffer growth.
- **Data buffers**: two ping-pong slots in one symmetric allocation.  A call
  that needs more room grows them; every rank grows at the same call because
  the sizes come from the (identical) shapes.  Old buffers are kept alive:
  kernels already queued may still use them.
- **Flag buffers** (the flag protocol, kernels/flag_protocol.py): one
  zeroed symmetric allocation, both parities and one region per source rank,
  sized for the largest slab the protocol serves, and the local epoch slots.
  Made at the first flag call on the group (every rank makes it at the same
  call: the protocol choice is rank-consistent); separate from the barrier
  slots, so the two protocols interleave on one group in any order.
- **Status word**: host-mapped pinned memory that the kernels write when a
  barrier or a flag wait times out (the failure and the failed call's number,
  kernels/failure.py), readable by the host without synchronising; the
  watchdog (watchdog.py) reads it even while CUDA graphs replay.
- **Program order** (program_order.py): the lock and the last stream that keep
  the group's calls in host issue order on the GPU.

Set-up and growth are collective and allocate small device tensors that NCCL
keeps alive after the call.  They run on a worker thread (``_set_up``):
CUDA-graph trees (``mode="reduce-overhead"``) route the calling thread's
allocations to the graph's memory pool during warm-up and refuse any that
outlive the call untracked.  Neither may happen during stream capture: the
first call of a group, or one that needs bigger slots, must run once eagerly
(warm-up) before capture, and is refused with that message otherwise.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import socket
import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .. import config as settings
from ..kernels.barrier import blocks_that_fit, next_slot, signal_pad_bytes  # noqa: F401  (the protocol's sizing)
from ..kernels.failure import STATUS_WORDS
from . import failures
from .groups import Group
from .program_order import ProgramOrder

#: the most ranks the push kernels handle (one barrier lane per peer)
MAX_PUSH_WORLD_SIZE = 8
#: the smallest slot (bytes); slots grow by powers of two from here
MIN_SLOT_BYTES = 1 << 20
#: the largest slab (bytes per rank) the flag buffers hold: T=32 of a 4096-wide bf16 band
FLAG_MAX_SLAB_BYTES = 256 << 10


@dataclass
class GroupFacts:
    """What every rank of a group agreed on, once."""

    push_ok: bool
    reason: str  # why push is off ("" when on)
    max_blocks: int = 0  # grid cap: min multiprocessor count, and what the signal pads hold
    device_name: str = ""  # the GPU model, when every rank has the same one ("" otherwise)


@dataclass
class FlagBuffers:
    """The flag protocol's memory on this rank (layout: kernels/flag_protocol.py)."""

    max_slab_bytes: int  # the largest slab one region holds
    region_units: int
    buffer: torch.Tensor  # symmetric, zeroed at birth
    handle: object
    buffer_args: tuple  # 8 flag-buffer addresses, zero past W: the kernel's scalar arguments
    epochs: torch.Tensor  # int32[EPOCH_SLOTS], local; advanced by the kernel


@dataclass
class Workspace:
    group: Group
    device: torch.device
    facts: GroupFacts
    signal_handle: object = None
    signal_pad_ptrs: tuple = ()  # rank r's signal pad address at index r
    slot_bytes: int = 0
    buffer: torch.Tensor | None = None
    buffer_handle: object = None
    pointer_args: tuple = ()  # 8 buffer then 8 signal-pad addresses, zero past W: the kernels' scalar arguments
    multicast_ptr: int = 0  # non-zero only when every rank has a multicast address
    status: torch.Tensor | None = None  # pinned int32[STATUS_WORDS], host-mapped (kernels/failure.py)
    status_view: object = None  # numpy view of it: a host read costs ~100 ns, no sync
    status_ptr: int = 0
    timeout_ns: int = 0
    next_slot: int = 0  # for slot=-1: alternate 0, 1, 0, ...
    retired: list = field(default_factory=list)
    plans: dict = field(default_factory=dict)  # launch plans, filled by push.py
    flags: "FlagBuffers | None" = None  # the flag protocol's buffers, made at its first call
    order: ProgramOrder = field(default_factory=ProgramOrder)  # host issue order of the group's calls

    def failure_code(self) -> int:
        """The status word: 0, or the code of a wait that timed out (host read, no sync)."""
        return int(self.status_view[0]) if self.status_view is not None else 0

    def failed_call(self) -> int:
        """The number of the call that failed (0 if none, or not yet recorded)."""
        view = self.status_view
        return int(view[1]) if view is not None and len(view) > 1 else 0


_workspaces: dict[tuple[str, int], Workspace] = {}
_retired_workspaces: list[Workspace] = []  # of destroyed groups: kept alive, never used


def barrier_timeout_ns() -> int:
    """How long a barrier spins before it reports the missing peer.

    ``TPFUSE_BARRIER_TIMEOUT_S`` (default 60 s): long enough for a peer that is
    still compiling or warming up, short of NCCL's 10-minute watchdog.
    """
    return int(settings.get("TPFUSE_BARRIER_TIMEOUT_S") * 1e9)


def _host_id() -> int:
    """A 62-bit id of this host (hostname and boot id): equal ids mean one host."""
    boot = ""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        pass
    digest = hashlib.sha256(f"{socket.gethostname()}/{boot}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2


def _local_reason(group: Group, device: torch.device) -> str:
    """Why this rank alone cannot push ("" if it can)."""
    if settings.get("TPFUSE_DISABLE_PUSH"):
        return "TPFUSE_DISABLE_PUSH is set"
    if group.world_size < 2:
        return "a group of one rank needs no push"
    if group.world_size > MAX_PUSH_WORLD_SIZE:
        return f"world size {group.world_size} > {MAX_PUSH_WORLD_SIZE}"
    if not torch.cuda.is_available() or device.type != "cuda":
        return "no CUDA device"
    try:
        import torch.distributed._symmetric_memory as symm_mem  # noqa: F401
        import triton  # noqa: F401
    except Exception as err:  # pragma: no cover - depends on the build
        return f"symmetric memory or triton unavailable: {err}"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return "GPU older than sm_80"
    return ""


def _set_up(device: torch.device, what: str, fn, *args):
    """Run the collective set-up ``fn(*args)`` (described by ``what``) on a worker thread.

    CUDA-graph trees' warm-up routes every allocation *of the calling thread* to
    the graph's pool and then refuses live ones it does not track; the set-up's
    small tensors (kept alive by NCCL after the call) must not land there.  A
    worker thread allocates from the ordinary pool; the caller waits for it."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return fn(*args)
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"tpfuse: {what} is collective and cannot run inside CUDA-graph capture; call the op "
            "once eagerly with the same shapes before capturing (torch.compile's "
            "mode='reduce-overhead' does this warm-up itself)"
        )
    torch.cuda.current_stream(device).synchronize()  # what the caller queued comes first

    def run():
        with torch.cuda.device(device):
            result = fn(*args)
            torch.cuda.synchronize(device)
            return result

    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tpfuse-set-up") as pool:
        return pool.submit(run).result()


def _all_gather_ints(values: list[int], group: Group, device: torch.device) -> torch.Tensor:
    mine = torch.tensor(values, dtype=torch.int64, device=device)
    everyone = torch.empty(group.world_size * len(values), dtype=torch.int64, device=device)
    # all_gather_single where torch has it: its older name warns as deprecated on every call
    (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(everyone, mine, group=group.pg)
    return everyone.view(group.world_size, len(values)).cpu()


def _agree(ok: bool, group: Group, device: torch.device) -> bool:
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group.pg)
    return bool(flag.item())


def _rendezvous(tensor: torch.Tensor, group: Group):
    import torch.distributed._symmetric_memory as symm_mem

    # Older torch needs the group registered first; newer torch does it itself
    # (and warns that the call is deprecated).
    enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
    enabled = getattr(symm_mem, "is_symm_mem_enabled_for_group", lambda name: False)
    if enable is not None and not enabled(group.name):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            enable(group.name)
    return symm_mem.rendezvous(tensor, group.name)


def _establish(group: Group, device: torch.device) -> Workspace:
    """Collective: every rank of ``group`` calls this at the same op call."""
    reason = _local_reason(group, device)
    return _set_up(device, "setting up the symmetric workspace", _establish_facts, group, device, reason)


def _establish_facts(group: Group, device: torch.device, reason: str) -> Workspace:
    # Grid cap: resident blocks.  TPFUSE_PUSH_BLOCKS_PER_SM (default 2) must be
    # set alike on every rank; the minimum over ranks is used.
    per_sm = settings.get("TPFUSE_PUSH_BLOCKS_PER_SM")
    sms = torch.cuda.get_device_properties(device).multi_processor_count * per_sm if not reason else 0
    name = torch.cuda.get_device_name(device) if not reason else ""
    name_id = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") >> 2
    table = _all_gather_ints([0 if reason else 1, _host_id(), sms, name_id], group, device)
    if not bool(table[:, 0].all()):
        bad = [r for r in range(group.world_size) if not table[r, 0]]
        why = reason or "peer cannot use symmetric memory"
        return Workspace(group, device, GroupFacts(False, f"rank(s) {bad}: {why}"))
    if not bool((table[:, 1] == table[0, 1]).all()):
        return Workspace(group, device, GroupFacts(False, "the group spans more than one host"))
    max_blocks = int(table[:, 2].min())
    same_model = bool((table[:, 3] == table[0, 3]).all())
    ws = Workspace(group, device, GroupFacts(True, "", max_blocks, name if same_model else ""),
                   timeout_ns=barrier_timeout_ns())
    ok = True
    try:
        _make_signal_pads(ws)
    except Exception as err:  # agree below, so that every rank falls back together
        ws.facts = GroupFacts(False, f"symmetric memory setup failed: {err}")
        ok = False
    if not _agree(ok, group, device) and ok:
        ws.facts = GroupFacts(False, "symmetric memory setup failed on a peer")
    return ws


def _make_signal_pads(ws: Workspace) -> None:
    import torch.distributed._symmetric_memory as symm_mem

    W = ws.group.world_size
    need = signal_pad_bytes(ws.facts.max_blocks, W)
    if symm_mem.get_signal_pad_size() < need:
        # Effective only before the process's first symmetric allocation.
        symm_mem.set_signal_pad_size(need)
    # Whatever size the pads really have bounds the grid, identically on every
    # rank (the size is a process-wide setting; we agreed on the max below).
    ws.facts.max_blocks = blocks_that_fit(ws.facts.max_blocks, W, symm_mem.get_signal_pad_size())
    with torch.cuda.device(ws.device):
        anchor = symm_mem.empty(64, dtype=torch.uint8, device=ws.device)
        handle = _rendezvous(anchor, ws.group)
        if any(p == 0 for p in handle.signal_pad_ptrs):
            raise RuntimeError("a peer's signal pad is not mapped")
        ws.signal_handle = (anchor, handle)
        ws.signal_pad_ptrs = tuple(int(p) for p in handle.signal_pad_ptrs)
        ws.status, ws.status_view, ws.status_ptr = new_status()
    # The grid cap must be identical everywhere.
    cap = torch.tensor([ws.facts.max_blocks], dtype=torch.int32, device=ws.device)
    dist.all_reduce(cap, op=dist.ReduceOp.MIN, group=ws.group.pg)
    ws.facts.max_blocks = int(cap.item())


def new_status():
    """A zeroed status word in host-mapped pinned memory: (tensor, numpy view, address)."""
    status = torch.zeros(STATUS_WORDS, dtype=torch.int32, pin_memory=True)
    return status, status.numpy(), status.data_ptr()


def workspace(group: Group, device_index: int, establish: bool = True) -> Workspace | None:
    """The workspace of (group, device); the first call establishes it collectively.

    A workspace dies with its process group: when the group of that name is another
    ProcessGroup now (the old one was destroyed and a new one took its name), the old
    workspace is retired, never used again, and the new group gets its own.  Retired
    workspaces stay referenced, so that no kernel still queued on them loses its memory.
    """
    ws = _workspaces.get((group.name, device_index))
    if ws is not None and ws.group.pg is not group.pg:
        _retired_workspaces.append(_workspaces.pop((group.name, device_index)))
        ws = None
    if ws is None and establish:
        ws = _workspaces[(group.name, device_index)] = _establish(group, torch.device("cuda", device_index))
        if ws.status is not None:
            failures.watch(ws)
    return ws


def slot_bytes_for(nbytes: int) -> int:
    """The slot size a request of ``nbytes`` grows to (a pure function of the size)."""
    size = MIN_SLOT_BYTES
    while size < nbytes:
        size *= 2
    return size


def ensure_capacity(ws: Workspace, nbytes: int) -> None:
    """Grow both slots to hold ``nbytes``. Collective: every rank grows at the same call."""
    if nbytes <= ws.slot_bytes:
        return
    _set_up(ws.device, f"growing the symmetric slots to {slot_bytes_for(nbytes)} bytes", _grow, ws, nbytes)


def _grow(ws: Workspace, nbytes: int) -> None:
    import torch.distributed._symmetric_memory as symm_mem

    slot_bytes = slot_bytes_for(nbytes)
    with torch.cuda.device(ws.device):
        buffer = symm_mem.empty(2 * slot_bytes, dtype=torch.uint8, device=ws.device)
        handle = _rendezvous(buffer, ws.group)
    ok = all(p != 0 for p in handle.buffer_ptrs)
    if not _agree(ok, ws.group, ws.device):
        raise RuntimeError(
            f"tpfuse: symmetric buffer of {2 * slot_bytes} bytes for group "
            f"{ws.group.name!r} is not mapped on every rank"
        )
    # Multicast: only when every rank has an address (never on our shared
    # hosts, where TORCH_SYMM_MEM_DISABLE_MULTICAST=1 makes it 0).
    multicast = int(getattr(handle, "multicast_ptr", 0) or 0)
    multicast_everywhere = _agree(multicast != 0, ws.group, ws.device)
    if ws.buffer is not None:
        ws.retired.append((ws.buffer, ws.buffer_handle))  # queued kernels may still use it
    ws.buffer, ws.buffer_handle, ws.slot_bytes = buffer, handle, slot_bytes
    pad = (0,) * (MAX_PUSH_WORLD_SIZE - ws.group.world_size)
    ws.pointer_args = tuple(int(p) for p in handle.buffer_ptrs) + pad + ws.signal_pad_ptrs + pad
    ws.multicast_ptr = multicast if multicast_everywhere else 0


def take_slot(ws: Workspace, slot: int) -> int:
    """The slot this call uses: ``slot`` if given, else alternate (same sequence on every rank)."""
    if slot >= 0:
        return slot
    chosen = ws.next_slot
    ws.next_slot = next_slot(chosen)
    return chosen


def ensure_flag_buffers(ws: Workspace, max_slab_bytes: int) -> FlagBuffers:
    """The flag buffers of ``ws``, made at the first call. Collective: every rank makes them at the same call."""
    if ws.flags is None:
        _set_up(ws.device, "setting up the flag-protocol buffers", _make_flag_buffers, ws, max_slab_bytes)
    return ws.flags


def _make_flag_buffers(ws: Workspace, max_slab_bytes: int) -> None:
    import torch.distributed._symmetric_memory as symm_mem

    from ..kernels import flag as flag_protocol

    W = ws.group.world_size
    with torch.cuda.device(ws.device):
        buffer = symm_mem.empty(flag_protocol.buffer_bytes(W, max_slab_bytes), dtype=torch.uint8, device=ws.device)
        buffer.zero_()  # flag 0 is "never written"
        epochs = torch.zeros(flag_protocol.EPOCH_SLOTS, dtype=torch.int32, device=ws.device)
        handle = _rendezvous(buffer, ws.group)
        torch.cuda.synchronize(ws.device)
    ok = all(p != 0 for p in handle.buffer_ptrs)
    if not _agree(ok, ws.group, ws.device):
        raise RuntimeError(f"tpfuse: the flag buffers of group {ws.group.name!r} are not mapped on every rank")
    # Every rank's zeroing is done before any peer's first store lands.
    _agree(True, ws.group, ws.device)
    pad = (0,) * (MAX_PUSH_WORLD_SIZE - W)
    ws.flags = FlagBuffers(max_slab_bytes, flag_protocol.region_units(max_slab_bytes), buffer, handle,
                           tuple(int(p) for p in handle.buffer_ptrs) + pad, epochs)
