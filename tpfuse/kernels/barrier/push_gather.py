"""Push kernels for the hidden-axis all-gather: P2P (peer pointers) and multimem (NVLink multicast).

Every rank holds a ``[T, w_rank]`` slab.  The result is ``[T, total]`` with
rank r's slab in columns ``[band_offsets[r], band_offsets[r+1])``.  Every rank
pushes its slab into the same column band of every peer's symmetric buffer,
meets the peers in an exit barrier, and then copies the peers' bands out of
its own buffer into the caller-owned result (COPY_OUT); its own band goes
straight from the input to the result.  With COPY_OUT off the kernel also
pushes into its own buffer and the buffer slot is the result (zero-copy).

Work split.  The slab is cut into vectors of VEC elements (VEC elements fill
16 bytes when the widths and offsets allow, else fewer) and tiles of BLOCK_V
vectors; block ``b`` of the grid moves tiles ``b, b + nblocks, ...``.  Block b
of rank q pushes band q's tiles b, b+nblocks, ... and block b of every other
rank copies out exactly those tiles after the exchange it shares with rank
q's block b (one barrier slot per (block, peer)); the P2P kernel does this
per chunk of CHUNK tiles, so that large messages overlap pushes and
copy-out.  The grid is the same on every
rank (the host derives it from T, the widths and W only), so the blocks pair
up.  Blocks never wait for other blocks of their own grid, and the host keeps
the grid within the number of multiprocessors, so every block is resident.

Elements are moved as same-sized integers (the host passes *i8/*i16/*i32
pointers): a gather does no arithmetic, and integer moves are bit-exact for
every dtype, NaN payloads included.

No torch import here: CI compiles these kernels ahead of time with more than
one Triton version, in processes that may not have torch.
"""

import triton
import triton.language as tl
from triton.language.extra.cuda import globaltimer

from ..compiler import INT_OF_SIZE
from ..failure import ENTRY_TIMEOUT, EXIT_TIMEOUT, NAN_BITS_OF_SIZE, poison_result
from ..peer_args import MAX_RANKS, per_lane, pick
from .device import barrier, exchange, peer_lanes


@triton.jit
def _band_tile(tile, tokens, BAND_OFFSET: tl.constexpr, WIDTH: tl.constexpr, TOTAL: tl.constexpr,
               VEC: tl.constexpr, BLOCK_V: tl.constexpr):
    """Element indices of tile ``tile`` of one band.

    Returns (index in the band's contiguous [T, WIDTH] slab, index in the
    gathered [T, TOTAL] layout, live mask), each [BLOCK_V, VEC] with the VEC
    lanes of a vector contiguous and VEC-aligned, so that loads and stores can
    be one 16-byte access per vector.  The widths are compile-time constants,
    so the row/column split is a multiply, not a division.
    """
    WIDTH_VEC: tl.constexpr = WIDTH // VEC
    v = tile * BLOCK_V + tl.arange(0, BLOCK_V)
    live = v < tokens * WIDTH_VEC
    row = v // WIDTH_VEC
    col = v - row * WIDTH_VEC
    lanes = tl.arange(0, VEC)
    slab = tl.multiple_of(v * VEC, VEC)
    gathered = tl.multiple_of(row * TOTAL + BAND_OFFSET + col * VEC, VEC)
    return slab[:, None] + lanes[None, :], gathered[:, None] + lanes[None, :], live[:, None]


@triton.jit
def _block_tiles(width, tokens, pid, nblocks, VEC: tl.constexpr, BLOCK_V: tl.constexpr):
    """How many tiles block ``pid`` moves of a band ``width`` wide (tiles pid, pid + nblocks, ...)."""
    tiles = tl.cdiv(tokens * (width // VEC), BLOCK_V)
    return tl.cdiv(tl.maximum(tiles - pid, 0), nblocks)


@triton.jit
def p2p_push_gather_kernel(
    x_ptr,  # this rank's [T, w_rank] slab, contiguous, 16-byte aligned
    out_ptr,  # the caller-owned [T, total] result (unused without COPY_OUT)
    slot_offset,  # elements from a buffer's base to the slot this call uses
    status,  # *i32: 0, or the timeout code of a barrier that gave up
    tokens,
    timeout_ns,  # > 0; becomes 0 once a wait of this block gave up
    call,  # the call's host-issued number on the group, recorded if it fails
    buf0, buf1, buf2, buf3, buf4, buf5, buf6, buf7,  # rank r's symmetric buffer address (0 past W)
    pad0, pad1, pad2, pad3, pad4, pad5, pad6, pad7,  # rank r's signal pad address
    RANK: tl.constexpr,
    W: tl.constexpr,
    WP: tl.constexpr,  # next power of two >= W: one barrier lane per peer
    BAND_OFFSETS: tl.constexpr,  # W + 1 column offsets, prefix sums of hidden_widths
    VEC: tl.constexpr,
    BLOCK_V: tl.constexpr,
    CHUNK: tl.constexpr,  # tiles per exit exchange (pipelines pushes against copy-out)
    SKIP_ENTRY_SYNC: tl.constexpr,
    COPY_OUT: tl.constexpr,
    POISON: tl.constexpr,  # the dtype's poison bits: a timed-out call's whole result (kernels/failure.py)
    EXIT_SYNC: tl.constexpr = True,  # False only for the benchmark's floor diagnostics: results are then racy
    COPY_DELAY_NS: tl.constexpr = 0,  # > 0 only in tests: a slow reader, waiting this long before each copy-out
):
    """Push this rank's band to every peer, then copy the peers' bands out, chunk by chunk.

    A block moves its tiles in chunks of CHUNK tiles.  After pushing chunk c
    it signals the peers (release) and waits for the peers' chunk c (acquire),
    then copies those tiles out.  Small messages have one chunk: push, exit
    barrier, copy-out.  Large ones alternate NVLink pushes and local copies, so
    that blocks in different phases keep both busy.  Every rank derives every
    peer's chunk count from the (constexpr) widths, T and the grid, so the
    signals and waits match one for one.
    """
    pid = tl.program_id(0)
    nblocks = tl.num_programs(0)
    OFF: tl.constexpr = BAND_OFFSETS[RANK]
    WIDTH: tl.constexpr = BAND_OFFSETS[RANK + 1] - BAND_OFFSETS[RANK]
    TOTAL: tl.constexpr = BAND_OFFSETS[W]
    peers, live = peer_lanes(RANK, W, WP)
    peer_pads = per_lane(peers, pad0, pad1, pad2, pad3, pad4, pad5, pad6, pad7)
    own_pad = pick(RANK, pad0, pad1, pad2, pad3, pad4, pad5, pad6, pad7)
    own = tl.multiple_of(pick(RANK, buf0, buf1, buf2, buf3, buf4, buf5, buf6, buf7).to(x_ptr.dtype), 16)
    own = own + slot_offset

    # Chunks per lane (peer) and our own; the stage count covers the longest.
    lane_width = tl.zeros([WP], dtype=tl.int32)
    for i in tl.static_range(W):
        lane_width = tl.where(peers == i, BAND_OFFSETS[i + 1] - BAND_OFFSETS[i], lane_width)
    lane_chunks = tl.cdiv(_block_tiles(lane_width, tokens, pid, nblocks, VEC, BLOCK_V), CHUNK)
    my_tiles = _block_tiles(WIDTH, tokens, pid, nblocks, VEC, BLOCK_V)
    my_chunks = tl.cdiv(my_tiles, CHUNK)
    # >= 1 for every block: the grid never exceeds the widest band's tiles.
    stages = tl.maximum(tl.max(tl.where(live, lane_chunks, 0), axis=0), my_chunks)

    for c in range(0, stages):
        # Our tiles in this chunk; at least one pass in stage 0, which holds the entry barrier.
        for k in range(0, tl.minimum(CHUNK, tl.maximum(my_tiles - c * CHUNK, (c == 0).to(tl.int32)))):
            tile = pid + (c * CHUNK + k) * nblocks
            slab, gathered, in_band = _band_tile(tile, tokens, OFF, WIDTH, TOTAL, VEC, BLOCK_V)
            vals = tl.load(x_ptr + slab, mask=in_band)
            if not SKIP_ENTRY_SYNC:
                if (c == 0) & (k == 0):
                    # Entry, after the first load so that its latency hides
                    # behind the barrier: no peer may still be reading the slot
                    # we are about to write.  Its reads were in kernels that
                    # finished before its signal (stream order), so relaxed
                    # atomics suffice.  Skipped only when the caller has proven
                    # that every peer is done with this slot (docs/contract.md §3).
                    if barrier(peer_pads, own_pad, RANK, pid, status, timeout_ns, ENTRY_TIMEOUT, W, False):
                        timeout_ns = timeout_ns * 0  # reported: don't spin another full timeout at exit
            if COPY_OUT:
                tl.store(out_ptr + gathered, vals, mask=in_band)
            # Peers in the order rank+1, rank+2, ...: ranks start on different
            # peers, so no link is hit by every rank at once.
            for s in tl.static_range(1 if COPY_OUT else 0, W):
                base = pick((RANK + s) % W, buf0, buf1, buf2, buf3, buf4, buf5, buf6, buf7).to(x_ptr.dtype)
                tl.store(tl.multiple_of(base, 16) + slot_offset + gathered, vals, mask=in_band)
        # Exit for chunk c: release our pushes of it, acquire the peers' (system
        # scope), so those tiles in our buffer are complete before we read them.
        if EXIT_SYNC:
            if exchange(peer_pads, own_pad, RANK, pid, live & (c < my_chunks), live & (c < lane_chunks), status,
                        timeout_ns, EXIT_TIMEOUT, W, True):
                timeout_ns = timeout_ns * 0
        if COPY_DELAY_NS > 0:
            # The tests' slow reader: the window in which a peer that skipped its entry barrier
            # could overwrite the slot before we copy it out (tests/gpu/test_barrier_push_one_gpu.py).
            waited_from = globaltimer()
            while globaltimer() - waited_from < COPY_DELAY_NS:
                pass
        if COPY_OUT:
            for s in tl.static_range(1, W):
                q_off = BAND_OFFSETS[(RANK + s) % W]
                q_width = BAND_OFFSETS[(RANK + s) % W + 1] - q_off
                q_tiles = _block_tiles(q_width, tokens, pid, nblocks, VEC, BLOCK_V)
                for k in range(0, tl.minimum(CHUNK, q_tiles - c * CHUNK)):
                    tile = pid + (c * CHUNK + k) * nblocks
                    _, gathered, in_band = _band_tile(tile, tokens, q_off, q_width, TOTAL, VEC, BLOCK_V)
                    tl.store(out_ptr + gathered, tl.load(own + gathered, mask=in_band), mask=in_band)
    if timeout_ns == 0:
        # A wait gave up: the slot may hold another call's bytes, so the result must not be read.
        if COPY_OUT:
            poison_result(out_ptr, status, call, tokens * TOTAL, POISON)
        else:
            poison_result(own, status, call, tokens * TOTAL, POISON)


@triton.jit
def multimem_store_v4(address, w0, w1, w2, w3, live):
    """One 16-byte ``multimem.st``: the store reaches the same address on every rank of the multicast object."""
    return tl.inline_asm_elementwise(
        """
        {
            .reg .pred p;
            setp.ne.b32 p, $6, 0;
            @p multimem.st.relaxed.sys.global.v4.f32 [$1], {$2, $3, $4, $5};
            mov.u32 $0, 0;
        }
        """,
        "=r,l,r,r,r,r,r",
        [address, w0, w1, w2, w3, live],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


@triton.jit
def multimem_push_gather_kernel(
    x_ptr,  # *i32 words of this rank's [T, w_rank] slab; every width is a multiple of 16 bytes
    out_ptr,  # *i32 words of the caller-owned [T, total] result
    slot_offset,  # words from a buffer's base to the slot this call uses
    status,
    tokens,
    timeout_ns,
    call,
    multicast_ptr,  # the multicast address of the data buffer (i64)
    buf0, buf1, buf2, buf3, buf4, buf5, buf6, buf7,
    pad0, pad1, pad2, pad3, pad4, pad5, pad6, pad7,
    RANK: tl.constexpr,
    W: tl.constexpr,
    WP: tl.constexpr,
    BAND_OFFSETS: tl.constexpr,  # in 32-bit words
    BLOCK_V: tl.constexpr,
    SKIP_ENTRY_SYNC: tl.constexpr,
    COPY_OUT: tl.constexpr,
    POISON: tl.constexpr,  # the dtype's poison as a 32-bit word (a pair or quad of the element's pattern)
):
    """Like the P2P kernel (one exit barrier), but one multicast store per 16 bytes reaches every rank.

    Compile-verified only: NVLink multicast must not run on the shared GPU
    hosts (docs/safety.md, "Multicast"), and the host selects this kernel only when the
    buffer's ``multicast_ptr`` is non-zero on every rank.
    """
    VEC: tl.constexpr = 4  # 4 words = 16 bytes per multimem.st
    pid = tl.program_id(0)
    nblocks = tl.num_programs(0)
    OFF: tl.constexpr = BAND_OFFSETS[RANK]
    WIDTH: tl.constexpr = BAND_OFFSETS[RANK + 1] - BAND_OFFSETS[RANK]
    TOTAL: tl.constexpr = BAND_OFFSETS[W]
    peers, live = peer_lanes(RANK, W, WP)
    peer_pads = per_lane(peers, pad0, pad1, pad2, pad3, pad4, pad5, pad6, pad7)
    own_pad = pick(RANK, pad0, pad1, pad2, pad3, pad4, pad5, pad6, pad7)

    if not SKIP_ENTRY_SYNC:
        # Entry (relaxed): see the P2P kernel.
        if barrier(peer_pads, own_pad, RANK, pid, status, timeout_ns, ENTRY_TIMEOUT, W, False):
            timeout_ns = timeout_ns * 0

    for tile in range(pid, tl.cdiv(tokens * (WIDTH // VEC), BLOCK_V), nblocks):
        slab, gathered, live_v = _band_tile(tile, tokens, OFF, WIDTH, TOTAL, VEC, BLOCK_V)
        words = tl.load(x_ptr + slab, mask=live_v)
        if COPY_OUT:
            tl.store(out_ptr + gathered, words, mask=live_v)
        # Split each 16-byte vector into its four words for the asm operands.
        even, odd = tl.split(tl.reshape(words, (BLOCK_V, 2, 2)))
        w0, w2 = tl.split(even)
        w1, w3 = tl.split(odd)
        v = tile * BLOCK_V + tl.arange(0, BLOCK_V)
        row = v // (WIDTH // VEC)
        first_word = row * TOTAL + OFF + (v - row * (WIDTH // VEC)) * VEC
        address = multicast_ptr + (slot_offset + first_word.to(tl.int64)) * 4
        multimem_store_v4(address, w0, w1, w2, w3, (v < tokens * (WIDTH // VEC)).to(tl.int32))

    # Exit (release/acquire, system scope): the multicast stores are visible
    # on every rank before any rank reads its buffer.
    if barrier(peer_pads, own_pad, RANK, pid, status, timeout_ns, EXIT_TIMEOUT, W, True):
        timeout_ns = timeout_ns * 0

    own = tl.multiple_of(pick(RANK, buf0, buf1, buf2, buf3, buf4, buf5, buf6, buf7).to(x_ptr.dtype), 16)
    own = own + slot_offset
    if COPY_OUT:
        for s in tl.static_range(1, W):
            q_off = BAND_OFFSETS[(RANK + s) % W]
            q_width = BAND_OFFSETS[(RANK + s) % W + 1] - q_off
            for tile in range(pid, tl.cdiv(tokens * (q_width // VEC), BLOCK_V), nblocks):
                _, gathered, live_v = _band_tile(tile, tokens, q_off, q_width, TOTAL, VEC, BLOCK_V)
                tl.store(out_ptr + gathered, tl.load(own + gathered, mask=live_v), mask=live_v)
    if timeout_ns == 0:
        if COPY_OUT:
            poison_result(out_ptr, status, call, tokens * TOTAL, POISON)
        else:
            poison_result(own, status, call, tokens * TOTAL, POISON)


# ---------------------------------------------------------------------------
# Compilation: one explicit signature per variant, shared by the host launcher
# (target = the current GPU) and the ahead-of-time CI tests (target = sm_90).

RUNTIME_ARGS = {
    "slot_offset": "i64",
    "status": "*i32",
    "tokens": "i32",
    "timeout_ns": "i64",
    "call": "i32",
    "multicast_ptr": "i64",
    **{f"buf{i}": "i64" for i in range(MAX_RANKS)},
    **{f"pad{i}": "i64" for i in range(MAX_RANKS)},
}
# Triton's "tt.divisibility" attribute: these pointers are 16-byte aligned
# and these integers multiples of 16 (the host guarantees both).
_ALIGNED = ("x_ptr", "out_ptr", "slot_offset")


def _source(fn, elem, constexprs):
    from triton.compiler import ASTSource

    types = {"x_ptr": elem, "out_ptr": elem, **RUNTIME_ARGS}
    signature = {n: ("constexpr" if n in constexprs else types[n]) for n in fn.arg_names}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in _ALIGNED}
    return ASTSource(fn, signature, constexprs, attrs)


def vector_elements(elem_size: int, band_offsets) -> int:
    """VEC: elements per vector, up to 16 bytes and dividing every band offset (so every width), so that
    every vector of every band is VEC-aligned -- the same on every rank."""
    vec = 16 // elem_size
    while vec > 1 and any(o % vec for o in band_offsets):
        vec //= 2
    return vec


def barrier_constexprs(rank, band_offsets):
    world_size = len(band_offsets) - 1
    return {
        "RANK": rank,
        "W": world_size,
        "WP": triton.next_power_of_2(max(world_size, 2)),
        "BAND_OFFSETS": tuple(int(o) for o in band_offsets),
    }


def p2p_source(elem_size, rank, band_offsets, vec, block_v, skip_entry_sync, copy_out, chunk=4, exit_sync=True,
               poison=None, copy_delay_ns=0):
    """The ``triton.compiler.ASTSource`` of one P2P variant.

    ``band_offsets`` holds W + 1 column offsets in elements; ``vec`` elements
    of ``elem_size`` bytes must divide every offset.  ``poison``: the dtype's
    bits (``failure.poison_bits``); by default the NaN of that element size.
    """
    constexprs = barrier_constexprs(rank, band_offsets)
    constexprs.update(VEC=vec, BLOCK_V=block_v, CHUNK=chunk, SKIP_ENTRY_SYNC=bool(skip_entry_sync),
                      COPY_OUT=bool(copy_out), EXIT_SYNC=bool(exit_sync),
                      POISON=NAN_BITS_OF_SIZE[elem_size] if poison is None else poison,
                      COPY_DELAY_NS=int(copy_delay_ns))
    return _source(p2p_push_gather_kernel, "*" + INT_OF_SIZE[elem_size], constexprs)


def multimem_source(rank, band_offsets_words, block_v, skip_entry_sync, copy_out, poison_word=NAN_BITS_OF_SIZE[4]):
    """The ``ASTSource`` of one multimem variant; every dtype moves as 32-bit words, 4 per store.

    ``poison_word``: the dtype's poison repeated over a 32-bit word (``failure.poison_word``)."""
    constexprs = barrier_constexprs(rank, band_offsets_words)
    constexprs.update(BLOCK_V=block_v, SKIP_ENTRY_SYNC=bool(skip_entry_sync), COPY_OUT=bool(copy_out),
                      POISON=poison_word)
    return _source(multimem_push_gather_kernel, "*i32", constexprs)
