"""The barrier protocol's one launcher (the p2p and multimem backends): the op's backends (backends.py) and the tests call it alike.

Per call it does as little as it can, because an eager call must cost about one
torch elementwise op (docs/benchmarks.md, "Against the targets"): ``launcher``
does once, per call shape, everything that does not change between calls
(the slots' room, the compiled variant, the grid, the fixed arguments), and the
``launch`` it returns checks the status word (host-mapped, no sync), takes its
place in the group's host issue order with its slot (program_order.py), and
launches through Triton's compiled launcher.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ... import config as settings
from ...kernels import compiler, failure
from ...kernels.barrier import push_gather
from ..compiled import Compiled, compile_for
from ..failures import raise_if_failed
from .slots import ensure_capacity, take_slot

# The launch configuration (tile sizes, warps, chunking) is read from tpfuse.config when a plan is
# built, and kept in the plan: the grid of every launch must match the kernel it was compiled with.


@dataclass
class Plan:
    """One compiled variant and what its launch needs besides the per-call pointers."""

    compiled: Compiled
    unit: int  # bytes moved per kernel "element" (the element size; 4 for multimem words)
    max_width_vec: int  # vectors in the widest band's row: the grid follows the widest rank
    tile: int  # vectors per tile: the grid's divisor


def build_plan(ws, dtype, hidden_widths, skip_entry_sync, copy_out, multimem, exit_sync=True,
               copy_delay_ns=0) -> Plan:
    rank, elem_size, dtype_name = ws.group.rank, dtype.itemsize, str(dtype).removeprefix("torch.")
    block_v, chunk = settings.get("TPFUSE_PUSH_BLOCK_V"), settings.get("TPFUSE_PUSH_CHUNK_TILES")
    warps = settings.get("TPFUSE_PUSH_NUM_WARPS")
    if multimem:
        # Every width is a multiple of 16 bytes (the multimem backend refuses others): move 32-bit words.
        offsets = tuple(o // 4 for o in compiler.band_offsets(hidden_widths, elem_size))
        poison, unit, vec = failure.poison_word(dtype_name, elem_size), 4, 4
        source = push_gather.multimem_source(rank, offsets, block_v, skip_entry_sync, copy_out, poison)
    else:
        offsets, poison = compiler.band_offsets(hidden_widths), failure.poison_bits(dtype_name, elem_size)
        unit, vec = elem_size, push_gather.vector_elements(elem_size, offsets)
        source = push_gather.p2p_source(elem_size, rank, offsets, vec, block_v, skip_entry_sync, copy_out,
                                        chunk, exit_sync, poison, copy_delay_ns)
    compiled = compile_for(ws.device, source, lambda src: compiler.compile_source(src, num_warps=warps))
    widest = max(offsets[i + 1] - offsets[i] for i in range(len(offsets) - 1))
    return Plan(compiled, unit, widest // vec, block_v)


def launcher(ws, x, hidden_widths, multimem=False, slot=-1, skip_entry_sync=False, copy_out=True, exit_sync=True,
             copy_delay_ns=0):
    """The launcher ``launch(x, out=None) -> result`` of every call shaped like ``x`` on workspace ``ws``.

    ``slot``, ``skip_entry_sync`` and ``copy_out=False`` (zero-copy: the result is a view of the
    slot) are the pass's permissions (docs/op.md).  ``out`` (tests only) is the caller-owned result
    to fill.  ``exit_sync=False`` (the benchmark's floor diagnostics only: racy) and
    ``copy_delay_ns`` (tests only: a slow reader) select kernel variants the op never uses.
    """
    total, shape = sum(hidden_widths), tuple(x.shape[:-1]) + (sum(hidden_widths),)
    tokens = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if tokens == 0:  # identical on every rank: every rank skips
        return lambda x, out=None: x.new_empty(shape) if out is None else out
    key = ("barrier", x.dtype, tuple(hidden_widths), bool(skip_entry_sync), copy_out, multimem, exit_sync,
           copy_delay_ns)
    plan = ws.plans.get(key)
    if plan is None:
        plan = ws.plans[key] = build_plan(ws, x.dtype, hidden_widths, skip_entry_sync, copy_out, multimem,
                                          exit_sync, copy_delay_ns)
    slots = ensure_capacity(ws, tokens * total * x.element_size())
    # Grid: a pure function of T, the widths and W (rank-invariant, docs/contract.md §2).
    nblocks = min(ws.facts.max_blocks, max(1, -(-tokens * plan.max_width_vec // plan.tile)))
    compiled, device_index, order = plan.compiled, x.device.index, ws.order
    run, head = compiled.run, (nblocks, 1, 1)
    middle = (compiled.function, compiled.packed_metadata, None, None, None)
    dtype, elem_size, unit = x.dtype, x.element_size(), plan.unit

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
            chosen_slot = take_slot(slots, slot)
            if not copy_out:
                elems = slots.slot_bytes // elem_size
                out = slots.buffer.view(dtype)[chosen_slot * elems: chosen_slot * elems + tokens * total].view(shape)
            elif out is None:
                out = torch.empty(shape, dtype=dtype, device=x.device)
            # A later, larger call may have grown the slots since this launcher was made: the
            # buffers, their addresses and the slot size are read now, never kept.
            slot_offset = chosen_slot * (slots.slot_bytes // unit)
            extra = (slots.multicast_ptr,) if multimem else ()
            run(*head, stream, *middle, x.data_ptr(), out.data_ptr() if copy_out else 0, slot_offset,
                ws.status_ptr, tokens, ws.timeout_ns, call, *extra, *slots.pointer_args, *compiled.constexprs)
        return out

    return launch
