"""Host launcher of the push backends (flag protocol, barrier push, multimem).

Per call it does as little as it can, because an eager call must cost about
one torch elementwise op (docs/benchmarks.md, "Against the targets"):
- ``prepare`` does once, per call shape, everything that does not change
  between calls (workspace, plan, grid, the kernel's fixed arguments) and
  returns a launcher; the op keeps launchers for the shapes it has seen;
- the kernel of each (dtype, widths, flags) variant is compiled once and
  launched through Triton's compiled launcher directly (no JIT binder, no
  argument specialisation per call);
- every address the kernel needs (peer buffers, signal pads, status word)
  is a scalar kernel argument that the workspace computed once (the kernel
  reads them from constant memory); nothing is built per call;
- a timeout is reported through a host-mapped status word that the host
  reads without synchronising, before each launch (and the watchdog reads
  it in between); the timed-out call's result is poisoned by the kernel;
- every launch takes its place in the group's host issue order
  (program_order.py) under the group's lock: free when the stream is the
  previous call's, one event record and wait when it changed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import config as settings
from ..kernels import failure  # plain Python facts; this module is imported only for the GPU paths
from ..kernels import flag as flag_protocol
from . import workspace as workspaces
from .backend import Backend
from .failures import raise_if_failed
from .groups import Group
from .program_order import raw_stream  # noqa: F401  (re-exported for the host-cost profile)

# The launch configuration (tile sizes, warps, chunking) is read from tpfuse.config when
# a plan is built, and kept in the plan: the grid of every launch must match the
# kernel it was compiled with, whatever the variables say later.


def vector_elements(elem_size: int, band_offsets: tuple[int, ...]) -> int:
    """Elements per vector: up to 16 bytes, dividing every band offset (so every width) -- same on every rank."""
    vec = 16 // elem_size
    while vec > 1 and any(o % vec for o in band_offsets):
        vec //= 2
    return vec


@dataclass
class Plan:
    """One compiled variant and what its launch needs besides the per-call pointers."""

    run: object
    function: object
    packed_metadata: object
    constexpr_values: tuple
    elem_size: int
    unit: int  # bytes moved per kernel "element" (the element size; 4 for multimem words)
    vec: int
    max_width_vec: int  # vectors in the widest band's row: the grid follows the widest rank
    multimem: bool
    tile: int = 0  # vectors (barrier push) or units (flag protocol) per tile: the grid's divisor


def _band_offsets(hidden_widths, scale=1):
    offsets = [0]
    for w in hidden_widths:
        offsets.append(offsets[-1] + w * scale)
    return tuple(offsets)


def _build_plan(ws, dtype, hidden_widths, skip_entry_sync, copy_out, multimem, exit_sync=True,
                copy_delay_ns=0) -> Plan:
    from ..kernels import compiler
    from ..kernels.barrier import push_gather

    rank = ws.group.rank
    elem_size = dtype.itemsize
    block_v, chunk = settings.get("TPFUSE_PUSH_BLOCK_V"), settings.get("TPFUSE_PUSH_CHUNK_TILES")
    if multimem:
        # Every width is a multiple of 16 bytes (checked by dispatch): move 32-bit words.
        offsets = _band_offsets(hidden_widths, elem_size)
        offsets = tuple(o // 4 for o in offsets)
        source = push_gather.multimem_source(rank, offsets, block_v, skip_entry_sync, copy_out,
                                             failure.poison_word(str(dtype).removeprefix("torch."), elem_size))
        unit, vec = 4, 4
    else:
        offsets = _band_offsets(hidden_widths)
        vec = vector_elements(elem_size, offsets)
        source = push_gather.p2p_source(elem_size, rank, offsets, vec, block_v, skip_entry_sync, copy_out,
                                        chunk, exit_sync, _poison(dtype), copy_delay_ns)
        unit = elem_size
    with torch.cuda.device(ws.device):
        kernel = compiler.compile_source(source, num_warps=settings.get("TPFUSE_PUSH_NUM_WARPS"))
        run = kernel.run  # loads the module on this device
    names = source.fn.arg_names
    constexprs = tuple(source.constants[(names.index(n),)] for n in names if source.signature[n] == "constexpr")
    widths = [offsets[i + 1] - offsets[i] for i in range(len(offsets) - 1)]
    return Plan(run, kernel.function, kernel.packed_metadata, constexprs, elem_size, unit, vec,
                max(widths) // vec, multimem, block_v)


def gather_hidden(
    x: torch.Tensor,
    hidden_widths: list[int],
    group: Group,
    backend: Backend,
    slot: int = -1,
    skip_entry_sync: bool = False,
    zero_copy: bool = False,
) -> torch.Tensor:
    """``cat([x_0, ..., x_{W-1}], dim=-1)`` through symmetric memory.

    Returns a fresh tensor the caller owns (docs/contract.md §1), or, with ``zero_copy``
    (a permission only the barrier-elision pass grants, having proven every reader
    done before the slot is written again), a view of the symmetric slot.
    """
    return prepare(x, hidden_widths, group, backend, slot, skip_entry_sync, zero_copy)(x)


def prepare(x, hidden_widths, group, backend, slot=-1, skip_entry_sync=False, zero_copy=False):
    """The launcher of every call shaped like ``x`` (shape, dtype, device): ``launch(x) -> result``.

    Everything that does not change from call to call is done here once: the
    workspace (set up or grown collectively, at the same call on every rank),
    the compiled plan, the grid and the kernel's fixed arguments.  Per call the
    launcher checks the status word, allocates the result, takes the next slot
    (barrier push) and launches.
    """
    if backend == Backend.FLAG:
        return _prepare_flag(x, hidden_widths, group)
    return _prepare_push(x, hidden_widths, group, backend, slot, skip_entry_sync, copy_out=not zero_copy)


def gather_into_slot(x, hidden_widths, group, slot, skip_entry_sync=False, _exit_sync=True):
    """The zero-copy form: the result is a view of symmetric slot ``slot``.

    The next call that writes this slot overwrites it.  Only for callers that
    have proven every reader is done first (and for the tests' negative
    control).  ``_exit_sync=False`` drops the exit barrier too, so the result
    is racy: only the benchmark's floor diagnostics use it.
    """
    return _prepare_push(x, hidden_widths, group, Backend.P2P, slot, skip_entry_sync, copy_out=False,
                         exit_sync=_exit_sync)(x)


def _usable_workspace(group, device_index):
    """The group's workspace on this device, set up; an error if the push path cannot run on it."""
    ws = workspaces.workspace(group, device_index)
    if not ws.facts.push_ok:
        raise RuntimeError(f"tpfuse: the push path is unavailable on group {group.name!r}: {ws.facts.reason}")
    raise_if_failed(ws)
    return ws


def _empty_result(lead, total):
    return lambda x: x.new_empty(*lead, total)


def _prepare_push(x, hidden_widths, group, backend, slot, skip_entry_sync, copy_out, exit_sync=True):
    ws = _usable_workspace(group, x.device.index)
    tokens = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if tokens == 0:  # identical on every rank: every rank skips
        return _empty_result(tuple(x.shape[:-1]), sum(hidden_widths))
    workspaces.ensure_capacity(ws, tokens * sum(hidden_widths) * x.element_size())
    return push_launcher(ws, x, hidden_widths, backend, slot, skip_entry_sync, copy_out, exit_sync)


def push_launcher(ws, x, hidden_widths, backend, slot=-1, skip_entry_sync=False, copy_out=True, exit_sync=True,
                  copy_delay_ns=0):
    """The barrier push's launcher of every call shaped like ``x`` on workspace ``ws`` (set up, slots grown).

    ``launch(x, out=None)``: ``out`` (tests only) is the caller-owned result to fill.
    ``copy_delay_ns`` (tests only) makes this rank a slow reader (kernels/push_gather.py).
    """
    device_index = x.device.index
    total = sum(hidden_widths)
    lead = tuple(x.shape[:-1])
    tokens = x.numel() // x.shape[-1]
    # multimem.st moves 16 bytes at a time: bands that are not whole 16-byte
    # vectors go through P2P (the widths are the same on every rank).
    multimem = backend == Backend.MULTIMEM and all(w * x.element_size() % 16 == 0 for w in hidden_widths)
    key = (x.dtype, tuple(hidden_widths), bool(skip_entry_sync), copy_out, multimem, exit_sync, copy_delay_ns)
    plan = ws.plans.get(key)
    if plan is None:
        plan = ws.plans[key] = _build_plan(ws, x.dtype, hidden_widths, skip_entry_sync, copy_out, multimem,
                                           exit_sync, copy_delay_ns)
    # Grid: a pure function of T, the widths and W (rank-invariant, docs/contract.md §2).
    nblocks = min(ws.facts.max_blocks, max(1, -(-tokens * plan.max_width_vec // plan.tile)))
    run, head = plan.run, (nblocks, 1, 1)
    middle = (plan.function, plan.packed_metadata, None, None, None)
    constexprs, multimem, order = tuple(plan.constexpr_values), plan.multimem, ws.order
    dtype, shape, elem_size, unit = x.dtype, lead + (total,), plan.elem_size, plan.unit

    def launch(x, out=None):
        if ws.status_view[0]:
            raise_if_failed(ws)
        # The kernel reads 16-byte vectors: a strided or misaligned input is
        # copied first (a local fact; the grid and vector width do not change).
        if not x.is_contiguous():
            x = x.contiguous()
        if x.data_ptr() % 16:
            x = x.clone()
        with order.lock:  # this call's place in the group's host order, its slot and its launch are one step
            stream, call = order.next_call(device_index)
            chosen_slot = workspaces.take_slot(ws, slot)
            if not copy_out:
                elems = ws.slot_bytes // elem_size
                out = ws.buffer.view(dtype)[chosen_slot * elems : chosen_slot * elems + tokens * total].view(shape)
            elif out is None:
                out = torch.empty(shape, dtype=dtype, device=x.device)
            # A later, larger call may have grown the slots since this launcher was made: the
            # buffers, their addresses and the slot size are read now, never kept.
            slot_offset = chosen_slot * (ws.slot_bytes // unit)
            extra = (ws.multicast_ptr,) if multimem else ()
            run(*head, stream, *middle, x.data_ptr(), out.data_ptr() if copy_out else 0, slot_offset,
                ws.status_ptr, tokens, ws.timeout_ns, call, *extra, *ws.pointer_args, *constexprs)
        return out

    return launch


def flag_plan(rank: int, device: torch.device, dtype: torch.dtype, hidden_widths, **options) -> Plan:
    """Compile the flag kernel of one (rank, dtype, widths) variant for ``device``.

    ``options`` select the kernel's test variants (negative controls, clear
    period; kernels/flag_gather.py); the op passes none.
    """
    from ..kernels import compiler
    from ..kernels.flag import gather as flag_gather

    block_u = settings.get("TPFUSE_FLAG_BLOCK_U")
    source = flag_gather.flag_source(dtype.itemsize, rank, _band_offsets(hidden_widths), block_u,
                                     _poison(dtype), **options)
    with torch.cuda.device(device):
        kernel = compiler.compile_source(source, num_warps=settings.get("TPFUSE_FLAG_NUM_WARPS"))
        run = kernel.run
    names = source.fn.arg_names
    constexprs = tuple(source.constants[(names.index(n),)] for n in names if source.signature[n] == "constexpr")
    return Plan(run, kernel.function, kernel.packed_metadata, constexprs, dtype.itemsize, dtype.itemsize, 1,
                max(hidden_widths), False, block_u)


def flag_grid(plan: Plan, tokens: int, max_blocks: int) -> int:
    """Blocks of a flag call: the widest band's unit tiles (rank-invariant), within the epoch slots and the SMs."""
    units = flag_protocol.units_for(tokens * plan.max_width_vec, plan.elem_size)
    return min(flag_protocol.EPOCH_SLOTS, max_blocks, max(1, -(-units // plan.tile)))


def _prepare_flag(x, hidden_widths, group):
    """The flag protocol: no barrier, no slot; always a fresh, caller-owned result."""
    ws = _usable_workspace(group, x.device.index)
    # Dispatch makes the buffers at the first flag call; a direct caller (tests, benchmarks)
    # may come first, on every rank alike: making them is collective.
    flags = ws.flags or workspaces.ensure_flag_buffers(ws, workspaces.FLAG_MAX_SLAB_BYTES)
    tokens = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if tokens == 0:  # identical on every rank: every rank skips
        return _empty_result(tuple(x.shape[:-1]), sum(hidden_widths))
    slab_bytes = tokens * max(hidden_widths) * x.element_size()
    if slab_bytes > flags.max_slab_bytes:  # dispatch never sends these here; direct callers might
        raise ValueError(f"tpfuse: the flag protocol holds slabs of up to {flags.max_slab_bytes} bytes, "
                         f"not {slab_bytes} (T={tokens}, widest band {max(hidden_widths)})")
    return flag_launcher(ws, x, hidden_widths)


def flag_launcher(ws, x, hidden_widths, **options):
    """The flag protocol's launcher of every call shaped like ``x`` on workspace ``ws`` (its buffers made).

    ``launch(x, out=None)``: ``out`` (tests only) is the caller-owned result to fill.
    ``options``: the kernel's test variants (negative controls); the op passes none.
    """
    flags, device_index = ws.flags, x.device.index
    total = sum(hidden_widths)
    tokens = x.numel() // x.shape[-1]
    key = ("flag", x.dtype, tuple(hidden_widths), tuple(sorted(options.items())))
    plan = ws.plans.get(key)
    if plan is None:
        plan = ws.plans[key] = flag_plan(ws.group.rank, ws.device, x.dtype, hidden_widths, **options)
    dtype, shape, order = x.dtype, tuple(x.shape[:-1]) + (total,), ws.order
    run, head = plan.run, (flag_grid(plan, tokens, ws.facts.max_blocks), 1, 1)
    middle = (plan.function, plan.packed_metadata, None, None, None)
    epochs, tail = flags.epochs.data_ptr(), (flags.region_units, *flags.buffer_args, *plan.constexpr_values)

    def launch(x, out=None):
        if ws.status_view[0]:
            raise_if_failed(ws)
        if not x.is_contiguous():
            x = x.contiguous()
        if out is None:
            out = torch.empty(shape, dtype=dtype, device=x.device)
        with order.lock:  # this call's place in the group's host order and its launch are one step
            stream, call = order.next_call(device_index)
            run(*head, stream, *middle, x.data_ptr(), out.data_ptr(), epochs, ws.status_ptr, tokens, ws.timeout_ns,
                call, *tail)
        return out

    return launch


def _poison(dtype: torch.dtype) -> int:
    """The poison bits a timed-out call leaves in a result of ``dtype`` (kernels/failure.py)."""
    return failure.poison_bits(str(dtype).removeprefix("torch."), dtype.itemsize)
