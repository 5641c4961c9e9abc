"""The flag-protocol push gather: small hidden-axis gathers with no barrier at all.

Every rank packs its ``[T, w_rank]`` slab into units (``device.py``) and
stores them into its region of every peer's flag buffer, then polls its own
buffer until every unit of every peer's region carries this call's epoch and
unpacks the peers' bands into the caller-owned ``[T, total]`` result.  Its
own band goes straight from the input to the result.  Nothing waits on a
signal or a fence, so the latency is one link traversal plus the local poll
and copy-out (docs/flag_protocol.md).

Work split.  Block ``b`` takes unit tiles ``b, b + nblocks, ...`` of every band:
it pushes its own band's tiles, then waits for the same tiles of every peer at
once and copies them out.  Blocks never wait for each other, and a block's
waits depend only on the peers' pushes, which depend on nothing: any grid on
any rank completes.

Elements move as same-sized integers (the host passes *i8/*i16/*i32
pointers), so the gather is bit-exact for every dtype, NaN payloads included.
"""

import triton
import triton.language as tl
from triton.language.extra.cuda import globaltimer

from ..compiler import INT_OF_SIZE
from ..failure import FLAG_TIMEOUT, NAN_BITS_OF_SIZE, poison_result, record_timeout
from ..peer_args import MAX_RANKS, pick
from . import CLEAR_PERIOD, DATA_BYTES
from .device import (
    accepted,
    clear_due,
    flags_of,
    get_element,
    put_element,
    region_offset,
    store_unit_pairs,
    take_epoch,
    unit_of,
)

_DATA_BYTES = tl.constexpr(DATA_BYTES)

#: phases of one call: the GPU runs both in one launch; the interpreter, which
#: cannot run W kernels at once, runs every rank's SEND before any RECEIVE
SEND = 1
RECEIVE = 2
BOTH = 3


@triton.jit
def _now(start, iteration, INTERPRET: tl.constexpr):
    """Time spent waiting: %globaltimer ns on the GPU, poll iterations in the interpreter (no inline PTX)."""
    if INTERPRET:
        return iteration
    else:
        return globaltimer() - start


@triton.jit
def _send(x_ptr, out_ptr, e, tokens, pid, nblocks, region, buf0, buf1, buf2, buf3, buf4, buf5, buf6, buf7,
          RANK: tl.constexpr, W: tl.constexpr, OFF: tl.constexpr, WIDTH: tl.constexpr, TOTAL: tl.constexpr,
          ELEM: tl.constexpr, BLOCK_U: tl.constexpr, PLAIN_STORES: tl.constexpr):
    """Our band: straight to our result, and as units into region (parity, RANK) of every peer."""
    PER: tl.constexpr = _DATA_BYTES // ELEM
    n = tokens * WIDTH
    pad = tl.cdiv(n, 2 * PER) * 2  # units, whole pairs
    for tile in range(pid, tl.cdiv(pad, BLOCK_U), nblocks):
        pair = tile * (BLOCK_U // 2) + tl.arange(0, BLOCK_U // 2)
        # Every tensor is 1-D over pairs, one element position at a time: no
        # layout conversion through shared memory.
        w0 = tl.zeros([BLOCK_U // 2], tl.int64)
        w1 = tl.zeros([BLOCK_U // 2], tl.int64)
        for c in tl.static_range(PER):
            k0 = 2 * pair * PER + c
            k1 = k0 + PER
            e0 = tl.load(x_ptr + k0, mask=k0 < n, other=0)
            e1 = tl.load(x_ptr + k1, mask=k1 < n, other=0)
            row0 = k0 // WIDTH
            row1 = k1 // WIDTH
            tl.store(out_ptr + row0 * TOTAL + OFF + (k0 - row0 * WIDTH), e0, mask=k0 < n)
            tl.store(out_ptr + row1 * TOTAL + OFF + (k1 - row1 * WIDTH), e1, mask=k1 < n)
            w0 = put_element(w0, e0, c, ELEM)
            w1 = put_element(w1, e1, c, ELEM)
        u0 = unit_of(w0, e)
        u1 = unit_of(w1, e)
        pair_live = 2 * pair < pad
        # Peers in the order rank+1, rank+2, ...: ranks start on different links.
        for s in tl.static_range(1, W):
            peer = pick((RANK + s) % W, buf0, buf1, buf2, buf3, buf4, buf5, buf6, buf7)
            store_unit_pairs(peer + region * 8, pair, u0, u1, pair_live, PLAIN_STORES)


@triton.jit
def _receive(mine, out_ptr, e, parity, tokens, pid, nblocks, status, timeout_ns, region_units, RANK: tl.constexpr,
             W: tl.constexpr, PEERS: tl.constexpr, BAND_OFFSETS: tl.constexpr, TOTAL: tl.constexpr,
             ELEM: tl.constexpr, BLOCK_U: tl.constexpr, ACCEPT_STALE: tl.constexpr, INTERPRET: tl.constexpr):
    """Poll our regions of every peer at once until this call's units are all there, then copy them out.

    Lane ``i`` of the [PEERS, BLOCK_U] tiles stands for peer ``rank - 1 - i``:
    one wait covers every peer's tile, so the peers' latencies overlap.  The
    loop carries scalars only (Triton 3.6 cannot carry a tensor through a
    while loop), so the copy-out sits inside it.  Returns the timeout left:
    0 once a wait gave up (recorded in ``status``), so that the later waits of
    a failed call do not each spin a full timeout.
    """
    PER: tl.constexpr = _DATA_BYTES // ELEM
    lane = tl.arange(0, PEERS)
    lane_live = lane < W - 1
    peer = (RANK + W - 1 - lane) % W
    width = tl.zeros([PEERS], tl.int32)
    offset = tl.zeros([PEERS], tl.int32)
    for i in tl.static_range(W):
        width = tl.where(peer == i, BAND_OFFSETS[i + 1] - BAND_OFFSETS[i], width)
        offset = tl.where(peer == i, BAND_OFFSETS[i], offset)
    n = tl.where(lane_live, tokens * width, 0)  # lanes past the peers (PEERS > W - 1) move nothing
    width = tl.where(lane_live, width, 1)  # and divide by 1, not 0, in the row/column split
    pad = tl.cdiv(n, 2 * PER) * 2
    region = mine + region_offset(parity, peer, W, region_units)
    for tile in range(pid, tl.cdiv(tl.max(pad, axis=0), BLOCK_U), nblocks):
        u = tile * BLOCK_U + tl.arange(0, BLOCK_U)
        u_live = u[None, :] < pad[:, None]
        src = region[:, None] + u[None, :]
        pending = 1
        missing = W
        start = 0 if INTERPRET else globaltimer()
        spent = start - start
        while (pending > 0) & (spent < timeout_ns):
            units = tl.load(src, mask=u_live, other=0, volatile=True)
            waiting = (accepted(flags_of(units), e, ACCEPT_STALE) == 0) & u_live
            per_peer = tl.sum(waiting.to(tl.int32), axis=1)
            pending = tl.sum(per_peer, axis=0)
            missing = tl.min(tl.where(per_peer > 0, peer, W), axis=0)
            if pending == 0:
                for c in tl.static_range(PER):
                    k = u[None, :] * PER + c
                    row = k // width[:, None]
                    dst = out_ptr + row * TOTAL + offset[:, None] + (k - row * width[:, None])
                    tl.store(dst, get_element(units, c, ELEM).to(out_ptr.dtype.element_ty), mask=k < n[:, None])
            spent = _now(start, spent + 1, INTERPRET)
        if pending > 0:
            timeout_ns = timeout_ns * 0
            record_timeout(status, FLAG_TIMEOUT, pid, missing)
    return timeout_ns


@triton.jit
def flag_gather_kernel(
    x_ptr,  # this rank's [T, w_rank] slab, contiguous
    out_ptr,  # the caller-owned [T, total] result
    epochs,  # *i32: EPOCH_SLOTS local slots, equal between calls
    status,  # *i32[2]: 0, or the code of a wait that gave up and the failed call's number (kernels/failure.py)
    tokens,
    timeout_ns,  # ns on the GPU; poll iterations in the interpreter; > 0
    call,  # the call's host-issued number on the group, recorded if it fails
    region_units,  # units per (parity, source) region of a flag buffer
    buf0, buf1, buf2, buf3, buf4, buf5, buf6, buf7,  # rank r's flag buffer address (0 past W)
    RANK: tl.constexpr,
    W: tl.constexpr,
    PEERS: tl.constexpr,  # next power of two >= W - 1: one receive lane per peer
    BAND_OFFSETS: tl.constexpr,  # W + 1 column offsets, prefix sums of hidden_widths
    ELEM: tl.constexpr,  # bytes per element: 1, 2 or 4
    BLOCK_U: tl.constexpr,  # units per tile (even)
    POISON: tl.constexpr,  # the dtype's poison bits: a timed-out call's whole result (kernels/failure.py)
    CLEAR_PERIOD: tl.constexpr = CLEAR_PERIOD,  # zero the buffers every 2 * CLEAR_PERIOD calls (docs/flag_protocol.md)
    PHASES: tl.constexpr = 3,  # SEND | RECEIVE; the interpreter runs them as two launches
    PARITY: tl.constexpr = True,  # False: one buffer for every call (negative control only)
    ACCEPT_STALE: tl.constexpr = False,  # True: any written unit counts as arrived (negative control only)
    PLAIN_STORES: tl.constexpr = False,  # True for the interpreter (no inline PTX)
    INTERPRET: tl.constexpr = False,  # True for the interpreter: waits bounded by iterations, not %globaltimer
):
    pid = tl.program_id(0)
    nblocks = tl.num_programs(0)
    OFF: tl.constexpr = BAND_OFFSETS[RANK]
    WIDTH: tl.constexpr = BAND_OFFSETS[RANK + 1] - BAND_OFFSETS[RANK]
    TOTAL: tl.constexpr = BAND_OFFSETS[W]
    e = take_epoch(epochs, pid, nblocks, (PHASES & 1) != 0)
    parity = e & 1
    if not PARITY:
        parity = parity * 0
    if (PHASES & 1) != 0:
        region = region_offset(parity, RANK, W, region_units)
        _send(x_ptr, out_ptr, e, tokens, pid, nblocks, region, buf0, buf1, buf2, buf3, buf4, buf5, buf6, buf7,
              RANK, W, OFF, WIDTH, TOTAL, ELEM, BLOCK_U, PLAIN_STORES)
    if (PHASES & 2) != 0:
        mine = pick(RANK, buf0, buf1, buf2, buf3, buf4, buf5, buf6, buf7).to(tl.pointer_type(tl.int64))
        timeout_ns = _receive(mine, out_ptr, e, parity, tokens, pid, nblocks, status, timeout_ns, region_units,
                              RANK, W, PEERS, BAND_OFFSETS, TOTAL, ELEM, BLOCK_U, ACCEPT_STALE, INTERPRET)
        if timeout_ns == 0:
            # A wait gave up: a peer's band never (fully) arrived, so the result must not be read.
            poison_result(out_ptr, status, call, tokens * TOTAL, POISON)
        if clear_due(e, CLEAR_PERIOD):
            # Zero our regions of this parity.  Each block zeroes the tiles it
            # read itself (the receive's tiling: tiles pid, pid + nblocks, ...
            # of every region), after reading them (the barrier orders every
            # thread's poll loads before every thread's zeroing); tiles past
            # this call's units are read by nobody.  No peer writes this parity
            # again before we start our next call.
            tl.debug_barrier()
            for s in tl.static_range(1, W):
                ours = mine + region_offset(parity, (RANK + W - s) % W, W, region_units)
                for tile in range(pid, tl.cdiv(region_units, BLOCK_U), nblocks):
                    u = tile * BLOCK_U + tl.arange(0, BLOCK_U)
                    tl.store(ours + u, tl.zeros([BLOCK_U], tl.int64), mask=u < region_units)


# ---------------------------------------------------------------------------
# Compilation: one explicit signature per variant, shared by the host launcher
# (target = the current GPU) and the ahead-of-time CI tests (target = sm_90).

RUNTIME_ARGS = {
    "epochs": "*i32",
    "status": "*i32",
    "tokens": "i32",
    "timeout_ns": "i64",
    "call": "i32",
    "region_units": "i64",
    **{f"buf{i}": "i64" for i in range(MAX_RANKS)},
}


#: the keyword constexprs and their production values
DEFAULT_OPTIONS = {"CLEAR_PERIOD": CLEAR_PERIOD, "PHASES": BOTH, "PARITY": True, "ACCEPT_STALE": False,
                   "PLAIN_STORES": False, "INTERPRET": False}


def flag_constexprs(elem_size, rank, band_offsets, block_u, poison=None, **options):
    """Every constexpr of one variant; ``options`` override DEFAULT_OPTIONS (tests, negative controls).

    ``poison``: the dtype's bits (``failure.poison_bits``); by default the NaN of that element size."""
    if elem_size not in INT_OF_SIZE:
        raise ValueError(f"the flag gather moves 1-, 2- or 4-byte elements, not {elem_size}-byte ones")
    if block_u < 2 or block_u & (block_u - 1):
        raise ValueError(f"BLOCK_U={block_u} must be a power of two >= 2 (units go in 16-byte pairs)")
    unknown = set(options) - set(DEFAULT_OPTIONS)
    if unknown:
        raise ValueError(f"unknown flag-gather options {sorted(unknown)}; accepted are {sorted(DEFAULT_OPTIONS)}")
    world_size = len(band_offsets) - 1
    return {"RANK": rank, "W": world_size, "PEERS": triton.next_power_of_2(max(world_size - 1, 1)),
            "BAND_OFFSETS": tuple(int(o) for o in band_offsets),
            "ELEM": elem_size, "BLOCK_U": block_u,
            "POISON": NAN_BITS_OF_SIZE[elem_size] if poison is None else poison, **DEFAULT_OPTIONS, **options}


def flag_source(elem_size, rank, band_offsets, block_u, poison=None, **options):
    """The ``triton.compiler.ASTSource`` of one flag-gather variant."""
    from triton.compiler import ASTSource

    constexprs = flag_constexprs(elem_size, rank, band_offsets, block_u, poison, **options)
    elem = "*" + INT_OF_SIZE[elem_size]
    types = {"x_ptr": elem, "out_ptr": elem, **RUNTIME_ARGS}
    fn = flag_gather_kernel
    signature = {n: ("constexpr" if n in constexprs else types[n]) for n in fn.arg_names}
    return ASTSource(fn, signature, constexprs)
