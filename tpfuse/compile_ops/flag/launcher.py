"""The flag protocol's one launcher: the op's backend (backend.py) and the tests call it alike.

``launcher`` does once, per call shape, everything that does not change between
calls (the buffers, the compiled variant, the grid); the ``launch`` it returns
checks the status word (host-mapped, no sync), takes its place in the group's host
issue order (program_order.py) and launches.  No barrier, no slot: always a fresh,
caller-owned result.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ... import config as settings
from ...kernels import compiler, failure
from ...kernels import flag as protocol
from ...kernels.flag import gather
from ..compiled import Compiled, compile_for
from ..failures import raise_if_failed
from .buffers import capacity_refusal, ensure_buffers


@dataclass
class Plan:
    compiled: Compiled
    max_width: int  # the widest band: the grid follows the widest rank
    tile: int  # units per tile: the grid's divisor


def build_plan(rank: int, device: torch.device, dtype: torch.dtype, hidden_widths, **options) -> Plan:
    """Compile the flag kernel of one (rank, dtype, widths) variant for ``device``.

    ``options`` select the kernel's test variants (negative controls, clear period;
    kernels/flag/gather.py); the op passes none.
    """
    block_u, warps = settings.get("TPFUSE_FLAG_BLOCK_U"), settings.get("TPFUSE_FLAG_NUM_WARPS")
    offsets = compiler.band_offsets(hidden_widths)
    poison = failure.poison_bits(str(dtype).removeprefix("torch."), dtype.itemsize)
    source = gather.flag_source(dtype.itemsize, rank, offsets, block_u, poison, **options)
    compiled = compile_for(device, source, lambda src: compiler.compile_source(src, num_warps=warps))
    return Plan(compiled, max(hidden_widths), block_u)


def launcher(ws, x, hidden_widths, **options):
    """The launcher ``launch(x, out=None) -> result`` of every call shaped like ``x`` on workspace ``ws``.

    Makes the group's flag buffers at the first call (collective, every rank alike).  ``out``
    (tests only) is the caller-owned result to fill; ``options``: the kernel's test variants
    (negative controls), the op passes none.
    """
    shape = tuple(x.shape[:-1]) + (sum(hidden_widths),)
    tokens = x.numel() // x.shape[-1] if x.shape[-1] else 0
    buffers = ensure_buffers(ws)
    if tokens == 0:  # identical on every rank: every rank skips
        return lambda x, out=None: x.new_empty(shape) if out is None else out
    too_big = capacity_refusal(tokens * max(hidden_widths) * x.element_size(), buffers.max_slab_bytes)
    if too_big:  # the backend refuses these; a direct caller may not have asked it
        raise ValueError(f"tpfuse: {too_big} (T={tokens}, widest band {max(hidden_widths)}); the flag protocol "
                         f"holds slabs of up to {buffers.max_slab_bytes} bytes")
    key = ("flag", x.dtype, tuple(hidden_widths), tuple(sorted(options.items())))
    plan = ws.plans.get(key)
    if plan is None:
        plan = ws.plans[key] = build_plan(ws.group.rank, ws.device, x.dtype, hidden_widths, **options)
    # Grid: the widest band's unit tiles (rank-invariant), within the epoch slots and the agreed SM count.
    units = protocol.units_for(tokens * plan.max_width, x.element_size())
    nblocks = min(protocol.EPOCH_SLOTS, ws.facts.max_blocks, max(1, -(-units // plan.tile)))
    compiled, device_index, order = plan.compiled, x.device.index, ws.order
    run, head = compiled.run, (nblocks, 1, 1)
    middle = (compiled.function, compiled.packed_metadata, None, None, None)
    dtype = x.dtype
    epochs, tail = buffers.epochs.data_ptr(), (buffers.region_units, *buffers.buffer_args, *compiled.constexprs)

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
