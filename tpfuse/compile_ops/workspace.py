"""The symmetric workspace the push protocols share, one per (group, device).

What lives here is the group's, not a protocol's:
- **Group facts**, established collectively once per group (one all-gather):
  whether every rank can use symmetric memory, whether all ranks share one
  host, the smallest multiprocessor count (the grid cap) and the GPU model.
  The backends' refusals read only these agreed facts, so every rank takes
  the same path (docs/contract.md §2).  With them, the tuned config every
  rank agreed on (tuned/, docs/tuning.md): its crossovers and
  linear constants, or the default.
- **Signal pads**: a small symmetric allocation, never freed or regrown, whose
  pads hold the barrier protocol's counters.  They are made here, with the
  group, because torch fixes the pad size at the process's first symmetric
  allocation (either protocol's), and the grid cap depends on it.
- **Status word**: host-mapped pinned memory that every push kernel writes when a
  wait times out (the codes: kernels/failure.py), readable by the host without
  synchronising; the watchdog (failures.py) reads it even while CUDA graphs replay.
- **Program order** (program_order.py): the lock and the last stream that keep
  the group's calls in host issue order on the GPU.
- **Compiled plans** (``plans``), under each protocol's own keys, and **each
  protocol's own state** (``protocols``): the barrier protocol's slots
  (barrier/slots.py), the flag protocol's buffers and epochs (flag/buffers.py).
  A protocol makes its state at its first call, collectively, through
  ``set_up`` and ``symmetric_buffer`` here.

Set-up and growth are collective and allocate small device tensors that NCCL
keeps alive after the call.  They run on a worker thread (``set_up``):
CUDA-graph trees (``mode="reduce-overhead"``) route the calling thread's
allocations to the graph's memory pool during warm-up and refuse any that
outlive the call untracked.  Neither may happen during stream capture: the
first call of a group, or one that needs bigger buffers, must run once eagerly
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
from ..kernels.barrier import blocks_that_fit, signal_pad_bytes
from ..kernels.failure import STATUS_WORDS
from . import agreement, failures, tuned
from .groups import Group, GroupFacts, all_gather_single
from .program_order import ProgramOrder

#: the most ranks the push kernels handle (one barrier lane per peer, 8 peer addresses)
MAX_PUSH_WORLD_SIZE = 8
#: the push paths' name for themselves in errors
OP = "tpfuse::all_gather_hidden"


@dataclass
class Workspace:
    group: Group
    device: torch.device
    facts: GroupFacts
    signal_handle: object = None
    signal_pad_args: tuple = ()  # 8 signal-pad addresses (rank r's at index r), zero past W
    status: torch.Tensor | None = None  # pinned int32[STATUS_WORDS], host-mapped (kernels/failure.py)
    status_view: object = None  # numpy view of it: a host read costs ~100 ns, no sync
    status_ptr: int = 0
    timeout_ns: int = 0
    plans: dict = field(default_factory=dict)  # compiled kernel variants, under each protocol's own keys
    protocols: dict = field(default_factory=dict)  # each protocol's state, by its name, made at its first call
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
    try:
        disabled = settings.get("TPFUSE_DISABLE_PUSH")
    except ValueError:  # refused on every rank in the set-up's exchange (_bad_setting), not here alone
        disabled = False
    if disabled:
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


def set_up(device: torch.device, what: str, fn, *args):
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
    all_gather_single(everyone, mine, group=group.pg)
    return everyone.view(group.world_size, len(values)).cpu()


def agree(ok: bool, group: Group, device: torch.device) -> bool:
    """Collective: whether ``ok`` holds on every rank."""
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
    return set_up(device, "setting up the symmetric workspace", _establish_facts, group, device, reason)


def _establish_facts(group: Group, device: torch.device, reason: str) -> Workspace:
    # Every setting the set-up reads, read before its first exchange: a bad value on one rank must not
    # raise there while its peers wait in the exchange; it travels in the table and every rank raises.
    bad_setting = _bad_setting()
    # Grid cap: resident blocks.  TPFUSE_PUSH_BLOCKS_PER_SM (default 2) must be
    # set alike on every rank; the minimum over ranks is used.
    per_sm = 0 if bad_setting else settings.get("TPFUSE_PUSH_BLOCKS_PER_SM")
    sms = torch.cuda.get_device_properties(device).multi_processor_count * per_sm if not reason else 0
    name = torch.cuda.get_device_name(device) if not reason else ""
    name_id = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") >> 2
    table = _all_gather_ints([0 if reason else 1, _host_id(), sms, name_id, agreement.settings_digest(),
                              1 if bad_setting else 0], group, device)
    _refuse_bad_settings(table[:, 5], bad_setting, group)
    _refuse_settings_apart(table[:, 4], group)
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
    if not agree(ok, group, device) and ok:
        ws.facts = GroupFacts(False, "symmetric memory setup failed on a peer")
    if ws.facts.push_ok:  # the same on every rank here: every rank agrees on the tuned config, or none does
        ws.facts.selection = tuned.group_selection(group, ws.facts.device_name)
    return ws


#: the variables the set-up reads (besides the dispatch settings, which it compares)
_SET_UP_VARIABLES = ("TPFUSE_DISABLE_PUSH", "TPFUSE_PUSH_BLOCKS_PER_SM", "TPFUSE_BARRIER_TIMEOUT_S", "TPFUSE_WATCHDOG",
                     "TPFUSE_WATCHDOG_INTERVAL_S")


def _bad_setting() -> str:
    """The error of the first variable the set-up reads that does not parse here ("" when all do)."""
    for name in _SET_UP_VARIABLES:
        try:
            settings.get(name)
        except ValueError as err:
            return str(err)
    return ""


def _refuse_bad_settings(bad: torch.Tensor, mine: str, group: Group) -> None:
    """Every rank raises where some rank's set-up variables do not parse, naming the ranks and their errors."""
    if not bool(bad.any()):
        return
    every_rank = [None] * group.world_size
    dist.all_gather_object(every_rank, mine, group=group.pg)
    named = "; ".join(f"rank {r}: {error}" for r, error in enumerate(every_rank) if error)
    raise ValueError(f"tpfuse: a setting of group {group.name!r}'s workspace does not parse ({named}); the "
                     "workspace is not set up on any rank")


def _refuse_settings_apart(digests: torch.Tensor, group: Group) -> None:
    """Every rank raises, naming each rank's values, where the ranks' dispatch settings differ: the op agrees
    on them before it dispatches (agreement.agree_on_settings); this holds for every other caller that sets
    a workspace up (the tune, the benchmarks), whose kernels would pair wrongly (docs/contract.md §2)."""
    if bool((digests == digests[0]).all()):
        return
    every_rank = [None] * group.world_size
    dist.all_gather_object(every_rank, agreement.dispatch_settings(), group=group.pg)
    raise RuntimeError(agreement.settings_apart_message(group.name, every_rank) + " The group's tpfuse workspace "
                       "is not set up: every call that would set it up raises this until the settings agree.")


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
        ws.signal_pad_args = padded(handle.signal_pad_ptrs)
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


def set_up_for_call(group: Group) -> tuple[Workspace | None, str]:
    """The group's workspace on the current device, set up now if it is not (collective), and why the push
    paths cannot run on it ("" when they can).  Under CUDA-graph capture a group not yet set up is refused:
    every rank captures the same calls, so every rank falls back alike."""
    device_index = torch.cuda.current_device()
    ws = workspace(group, device_index, establish=False)
    if ws is None:
        if torch.cuda.is_current_stream_capturing():
            return None, "the group's workspace must be set up by an eager call before graph capture"
        ws = workspace(group, device_index)
    return ws, ("" if ws.facts.push_ok else ws.facts.reason)


def usable_workspace(group: Group, device_index: int, op: str = OP) -> Workspace:
    """The group's workspace on this device, set up; an error if the push paths cannot run on it or it failed."""
    ws = workspace(group, device_index)
    if not ws.facts.push_ok:
        raise RuntimeError(f"{op}: the push path is unavailable on group {group.name!r}: {ws.facts.reason}")
    failures.raise_if_failed(ws, op)
    return ws


def padded(addresses) -> tuple:
    """Rank r's address at index r, zero past W: the kernels' 8 scalar peer arguments (kernels/peer_args.py)."""
    addresses = tuple(int(a) for a in addresses)
    return addresses + (0,) * (MAX_PUSH_WORLD_SIZE - len(addresses))


def symmetric_buffer(ws: Workspace, nbytes: int, what: str, zeroed: bool = False):
    """Collective: a symmetric ``uint8[nbytes]`` buffer on every rank of ``ws``'s group, and its handle.

    Call it inside ``set_up``.  ``zeroed``: every rank's buffer is zero before any peer's first
    store can land in it.  Raises, on every rank alike, where a peer's buffer is not mapped."""
    import torch.distributed._symmetric_memory as symm_mem

    with torch.cuda.device(ws.device):
        buffer = symm_mem.empty(nbytes, dtype=torch.uint8, device=ws.device)
        if zeroed:
            buffer.zero_()
        handle = _rendezvous(buffer, ws.group)
        torch.cuda.synchronize(ws.device)
    if not agree(all(p != 0 for p in handle.buffer_ptrs), ws.group, ws.device):
        raise RuntimeError(f"tpfuse: {what} ({nbytes} bytes) of group {ws.group.name!r} is not mapped on every rank")
    if zeroed:
        agree(True, ws.group, ws.device)  # every rank's zeroing is done before any peer's first store lands
    return buffer, handle
