"""Fused column linear + hidden-axis push: ``y_r = x @ W_r^T (+ b_r)`` whose epilogue stores into every peer.

Every rank holds the same ``x [T, K]`` and its own weight band ``W_r [w_r, K]``
(``nn.Linear`` layout).  The result is ``[T, total]`` with rank r's
``y_r`` in columns ``[band_offsets[r], band_offsets[r+1])``, as
``tpfuse::all_gather_hidden(linear(x, W_r, b_r))`` would return it, but with
no intermediate ``y_r`` and no second launch: each output tile goes from the
accumulator straight into our column band of every peer's symmetric slot
(and of our own result), then the blocks meet their peers in the exit
barrier and copy the peers' bands out.  Zero-copy (``COPY_OUT`` off, granted
by the barrier-elision pass): our own result is our slot, so there is nothing
to copy.

Work split.  Output tiles are ``[BLOCK_M, BLOCK_N]``.  Round robin (default):
tile ``t`` is (m = t // N_TILES, n = t % N_TILES), block ``b`` computes tiles
``b, b + nblocks, ...`` of its band, so consecutive blocks stream consecutive
weight rows.  BALANCED: block ``b`` takes a contiguous, even share of the band's
columns (``_column_range``, 8-column units) in masked BLOCK_N tiles, so no block
streams more than 8 columns' weight more than another.  Either way block ``b``
of every other rank copies out exactly what block ``b`` here pushed, after the
exit exchange it shares with block ``b`` here (one barrier slot per (block,
peer), as in barrier/push_gather.py).  Each block runs exactly one entry (unless
skipped) and one exit exchange per call, whether or not it has tiles, so the
slots balance on every rank.  The grid comes from T, K, the widths and W
(``launch_config``) and the group's agreed grid cap: the same on every rank,
and every block resident (blocks wait for peers, never for blocks of their own
grid).

Decode is weight-bandwidth bound (T <= 128): the weight is read exactly once
(each tile's K loop streams ``[BLOCK_N, K]`` of it), ``x`` is re-read from
L2 once per N tile (``T / BLOCK_N`` times the weight traffic), so
``launch_config`` takes 64- or 128-column tiles where the band is wide enough
to fill the SMs with 128-column ones (there, below 64 tokens, with the weight
tile on the MMA's M side: SWAP_AB, wgmma) and narrower tiles otherwise (measured, see
there).  No split-K: a K-split tile needs either a reduction across blocks of
our own grid (a wait for blocks of our own grid) or a pusher chosen at run time
(which breaks the block pairing of the exit exchange).  See
benchmarks/NOTES.md ("fused linear+push") for where that is predicted to
cost (few, long tiles: the EAGLE3 projection at W=4).

Entry barrier.  Split in two: each block signals its peers first thing, and
waits for theirs after its first tile's K loop, right before its first remote
store, so the round trip hides behind that tile's weight loads.  (Signal and
wait together after the K loop, as before, stalled every block for a round
trip with no loads in flight.)  A block without tiles signals and waits at
once.

No torch import here (CI compiles these kernels with more than one Triton).
"""

import triton
import triton.language as tl

from .barrier.device import barrier, exchange, peer_lanes, signal_peers, wait_peers
from .barrier.push_gather import RUNTIME_ARGS, barrier_constexprs, multimem_store_v4
from .failure import ENTRY_TIMEOUT, EXIT_TIMEOUT, NAN_BITS_OF_SIZE, poison_result
from .peer_args import per_lane, pick

#: output tiles the config aims for: about one per multiprocessor of an H100 (132)
TARGET_TILES = 128
#: 32-row tiles up to this T take the 16-row tiles' 128 columns (fifth sweep; 64 columns above it)
MID_TOKENS = 24
#: operand bytes of one block's pipeline buffers (stages - 1 of them); measured configs stay within
#: it, and the compiled kernel (120 KiB of shared memory for 32 x 128 x 128 tiles, 4 stages) fits an SM once
PIPELINE_BYTES = 120 << 10


@triton.jit
def _tile_gemm(x_ptr, w_ptr, w_desc, bias_ptr, row0, col0, col_end, tokens, K: tl.constexpr,
               HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               TMA_WEIGHT: tl.constexpr, SWAP_AB: tl.constexpr):
    """The ``[BLOCK_M, BLOCK_N]`` output tile at (row0, col0) of ``x @ W^T (+ b)``, columns below
    ``col_end`` live, fp32 accumulate; returns (acc, rows, cols).

    With TMA_WEIGHT the weight tiles come through ``w_desc`` (a TMA descriptor of
    the band ``[WIDTH, K]``, which fills rows and columns past the band with zeros);
    otherwise ``w_desc`` is unused and the tiles are masked 16-byte loads.

    SWAP_AB computes the transposed tile ``W_tile @ x_tile^T`` (``[BLOCK_N, BLOCK_M]``)
    and transposes the accumulator: the weight tile becomes the MMA's M side
    (64 or 128 rows), so Hopper's warpgroup MMA (``wgmma``, operands straight
    from shared memory, asynchronous) replaces ``mma.sync``, which Triton picks
    for 16- and 32-row tiles.  Same products, same fp32 sums per K step."""
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = col0 + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < tokens
    col_ok = cols < col_end
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * K
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * K
    if SWAP_AB:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        k_ok = (k + ks) < K
        a = tl.load(x_rows + (k + ks)[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if TMA_WEIGHT:
            b = w_desc.load([col0, k])
        else:
            # The weight is streamed once: don't let it evict x (re-read by every N tile) from L2.
            b = tl.load(w_rows + (k + ks)[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0,
                        eviction_policy="evict_first")
        if SWAP_AB:
            acc = tl.dot(b, tl.trans(a), acc)
        else:
            acc = tl.dot(a, tl.trans(b), acc)
    if SWAP_AB:
        acc = tl.trans(acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return acc, rows, cols


@triton.jit
def _gathered(rows, cols, tokens, OFF: tl.constexpr, col_end, TOTAL: tl.constexpr):
    """Indices of a tile in the gathered ``[T, TOTAL]`` layout, and its live mask (columns below col_end)."""
    index = rows[:, None] * TOTAL + OFF + cols[None, :]
    return index, (rows < tokens)[:, None] & (cols < col_end)[None, :]


@triton.jit
def _column_range(pid, nblocks, WIDTH: tl.constexpr):
    """Block ``pid``'s share of a band: contiguous columns ``[c0, c1)`` in 8-column (16-byte) units,
    the units spread as evenly as they divide (shares differ by at most one unit)."""
    UNITS: tl.constexpr = (WIDTH + 7) // 8
    base = UNITS // nblocks
    extra = UNITS - base * nblocks
    first = pid * base + tl.minimum(pid, extra)
    count = base + (pid < extra).to(tl.int32)
    return tl.minimum(first * 8, WIDTH), tl.minimum((first + count) * 8, WIDTH)


@triton.jit
def _tile_out(x_ptr, w_ptr, w_desc, bias_ptr, out_ptr, row0, col0, col_end, tokens, first, timeout_ns,
              peer_pads, own_pad, pid, status, slot_offset, buf0, buf1, buf2, buf3, buf4, buf5, buf6, buf7,
              RANK: tl.constexpr, W: tl.constexpr, OFF: tl.constexpr, TOTAL: tl.constexpr, K: tl.constexpr,
              HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              TMA_WEIGHT: tl.constexpr, SWAP_AB: tl.constexpr, ENTRY_SYNC: tl.constexpr, PUSH: tl.constexpr):
    """Compute one output tile, store it into our result and push it into every peer's slot.

    ``first`` (the block's first tile): the entry barrier's wait goes between its K loop and
    its first remote store; the block signalled at its start, so the round trip has the
    whole K loop to complete in.  Returns ``timeout_ns`` (0 once a barrier gave up: later
    ones give up at once)."""
    acc, rows, cols = _tile_gemm(x_ptr, w_ptr, w_desc, bias_ptr, row0, col0, col_end, tokens, K, HAS_BIAS,
                                 BLOCK_M, BLOCK_N, BLOCK_K, TMA_WEIGHT, SWAP_AB)
    vals = acc.to(out_ptr.dtype.element_ty)
    if ENTRY_SYNC:
        if first:
            # Entry, its wait (relaxed): no peer may still be reading the slot we are about to
            # write.  Its reads ended in kernels that finished before its signal (stream order).
            # Skipped only when the caller proved every peer is done with the slot (docs/contract.md §3).
            _, live = peer_lanes(RANK, W, peer_pads.shape[0])
            if wait_peers(own_pad, pid, live, status, timeout_ns, ENTRY_TIMEOUT, W, False):
                timeout_ns = timeout_ns * 0
            # Every thread's stores below happen after the waiting lanes saw the signals.
            tl.debug_barrier()
    index, ok = _gathered(rows, cols, tokens, OFF, col_end, TOTAL)
    tl.store(out_ptr + index, vals, mask=ok)
    if PUSH:
        # Peers in the order rank+1, rank+2, ...: ranks start on different links.
        for s in tl.static_range(1, W):
            base = pick((RANK + s) % W, buf0, buf1, buf2, buf3, buf4, buf5, buf6, buf7).to(out_ptr.dtype)
            tl.store(tl.multiple_of(base, 16) + slot_offset + index, vals, mask=ok)
    return timeout_ns


@triton.jit
def _copy_tiles(out_ptr, own, tokens, row0, col0, col_end, band, live, OFF: tl.constexpr, TOTAL: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_BANDS: tl.constexpr):
    """Copy the tile position (row0, col0) of the peers' bands from our slot to the result: with even
    bands every peer's at once (``band``: per lane, a peer's column offset), else the band at OFF."""
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = col0 + tl.arange(0, BLOCK_N)
    index, ok = _gathered(rows, cols, tokens, OFF, col_end, TOTAL)
    if EVEN_BANDS:
        index = band[:, None, None] + index[None, :, :]
        ok = live[:, None, None] & ok[None, :, :]
    tl.store(out_ptr + index, tl.load(own + index, mask=ok), mask=ok)


@triton.jit
def _copy_out_peers(out_ptr, own, tokens, pid, nblocks, RANK: tl.constexpr, W: tl.constexpr, WP: tl.constexpr,
                    BAND_OFFSETS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    EVEN_BANDS: tl.constexpr, BALANCED: tl.constexpr):
    """Copy the tiles that block ``pid`` of every peer pushed into our slot out to the result.

    Latency-bound (one tile is a few KiB per block): with even bands, one
    ``[WP, BLOCK_M, BLOCK_N]`` load takes a tile position of every peer at
    once (W - 1 tiles in flight instead of one; measured: the one-tile loop
    cost ~12 us for 6 MB at T=32, W=4).  Uneven bands differ in tile counts:
    one peer at a time.  Block ``pid`` of a peer covered the same tiles
    (BALANCED: the same column share of its band) as block ``pid`` here."""
    TOTAL: tl.constexpr = BAND_OFFSETS[W]
    m_tiles = tl.cdiv(tokens, BLOCK_M)
    peers, live = peer_lanes(RANK, W, WP)
    if EVEN_BANDS:
        WIDTH: tl.constexpr = BAND_OFFSETS[1]
        band = peers * WIDTH
        if BALANCED:
            c0, c1 = _column_range(pid, nblocks, WIDTH)
            for col0 in range(c0, c1, BLOCK_N):
                for tm in range(0, m_tiles):
                    _copy_tiles(out_ptr, own, tokens, tm * BLOCK_M, col0, c1, band, live, 0, TOTAL, BLOCK_M,
                                BLOCK_N, True)
        else:
            N_TILES: tl.constexpr = (WIDTH + BLOCK_N - 1) // BLOCK_N
            for tile in range(pid, m_tiles * N_TILES, nblocks):
                tm = tile // N_TILES
                _copy_tiles(out_ptr, own, tokens, tm * BLOCK_M, (tile - tm * N_TILES) * BLOCK_N, WIDTH, band, live,
                            0, TOTAL, BLOCK_M, BLOCK_N, True)
    else:
        for s in tl.static_range(1, W):
            q_off = BAND_OFFSETS[(RANK + s) % W]  # compile-time values (static_range)
            q_width = BAND_OFFSETS[(RANK + s) % W + 1] - q_off
            if BALANCED:
                c0, c1 = _column_range(pid, nblocks, q_width)
                for col0 in range(c0, c1, BLOCK_N):
                    for tm in range(0, m_tiles):
                        _copy_tiles(out_ptr, own, tokens, tm * BLOCK_M, col0, c1, peers, live, q_off, TOTAL,
                                    BLOCK_M, BLOCK_N, False)
            else:
                q_n_tiles = (q_width + BLOCK_N - 1) // BLOCK_N
                for tile in range(pid, m_tiles * q_n_tiles, nblocks):
                    tm = tile // q_n_tiles
                    _copy_tiles(out_ptr, own, tokens, tm * BLOCK_M, (tile - tm * q_n_tiles) * BLOCK_N, q_width,
                                peers, live, q_off, TOTAL, BLOCK_M, BLOCK_N, False)


@triton.jit
def p2p_linear_push_kernel(
    x_ptr,  # [T, K] activations, contiguous, 16-byte aligned (identical on every rank)
    w_ptr,  # [w_rank, K] this rank's weight band, contiguous, 16-byte aligned
    bias_ptr,  # [w_rank] bias band (unused without HAS_BIAS)
    out_ptr,  # the caller-owned [T, total] result
    slot_offset,  # elements from a buffer's base to the slot this call uses
    status,  # *i32[2]: 0, or the timeout code of a barrier that gave up, and the failed call (failure.py)
    tokens,
    timeout_ns,  # > 0; becomes 0 once a wait of this block gave up
    call,  # the call's host-issued number on the group, recorded if it fails
    buf0, buf1, buf2, buf3, buf4, buf5, buf6, buf7,  # rank r's symmetric buffer address (0 past W)
    pad0, pad1, pad2, pad3, pad4, pad5, pad6, pad7,  # rank r's signal pad address
    RANK: tl.constexpr,
    W: tl.constexpr,
    WP: tl.constexpr,
    BAND_OFFSETS: tl.constexpr,  # W + 1 column offsets, prefix sums of hidden_widths
    K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SKIP_ENTRY_SYNC: tl.constexpr,
    EVEN_BANDS: tl.constexpr,  # every rank's width the same (the copy-out takes all peers at once)
    EXIT_SYNC: tl.constexpr = True,  # False only for negative controls / floor diagnostics: racy
    PUSH: tl.constexpr = True,  # False only for floor diagnostics: the peers' bands are never written
    COPY_OUT: tl.constexpr = True,  # False: zero-copy (out_ptr is our slot, which the peers fill), or diagnostics
    TMA_WEIGHT: tl.constexpr = False,  # weight tiles through a TMA descriptor (needs global scratch; experimental)
    SWAP_AB: tl.constexpr = False,  # the weight tile on the MMA's M side (wgmma for few tokens; see _tile_gemm)
    BALANCED: tl.constexpr = False,  # each block a contiguous, even share of the columns (see below)
    POISON: tl.constexpr = 0x7FC0,  # a timed-out call's whole result: a NaN in bf16 and fp16 (failure.py)
):
    """Without BALANCED, block ``b`` takes tiles ``b, b + nblocks, ...`` (round robin).  With
    it, block ``b`` takes the columns ``_column_range`` gives it (every block within 8
    columns of the others: 251 tiles of 128 over 132 blocks leave some blocks 2 tiles and
    some 1, shares leave them 240 or 248 columns), in BLOCK_N tiles, the last one masked."""
    pid = tl.program_id(0)
    nblocks = tl.num_programs(0)
    OFF: tl.constexpr = BAND_OFFSETS[RANK]
    WIDTH: tl.constexpr = BAND_OFFSETS[RANK + 1] - BAND_OFFSETS[RANK]
    TOTAL: tl.constexpr = BAND_OFFSETS[W]
    N_TILES: tl.constexpr = (WIDTH + BLOCK_N - 1) // BLOCK_N
    ENTRY_SYNC: tl.constexpr = not SKIP_ENTRY_SYNC
    if TMA_WEIGHT:
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[WIDTH, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
    else:
        w_desc = w_ptr
    peers, live = peer_lanes(RANK, W, WP)
    peer_pads = per_lane(peers, pad0, pad1, pad2, pad3, pad4, pad5, pad6, pad7)
    own_pad = pick(RANK, pad0, pad1, pad2, pad3, pad4, pad5, pad6, pad7)
    own = tl.multiple_of(pick(RANK, buf0, buf1, buf2, buf3, buf4, buf5, buf6, buf7).to(out_ptr.dtype), 16)
    own = own + slot_offset
    m_tiles = tl.cdiv(tokens, BLOCK_M)

    if BALANCED:
        c0, c1 = _column_range(pid, nblocks, WIDTH)
        busy = c1 > c0
    else:
        my_tiles = tl.cdiv(tl.maximum(m_tiles * N_TILES - pid, 0), nblocks)
        busy = my_tiles > 0
    if ENTRY_SYNC:
        # Entry, its signal (relaxed): this call has started here, so every kernel before it on our
        # stream, and with it every read of the slot it will write, has finished.  Sent first thing;
        # the wait comes before the first remote store (_tile_out).
        signal_peers(peer_pads, RANK, pid, live, W, False)
        if not busy:
            # Nothing to compute: still meet the peers (the slots must balance).
            if wait_peers(own_pad, pid, live, status, timeout_ns, ENTRY_TIMEOUT, W, False):
                timeout_ns = timeout_ns * 0
    if BALANCED:
        for j in range(0, tl.cdiv(c1 - c0, BLOCK_N)):
            for tm in range(0, m_tiles):
                timeout_ns = _tile_out(
                    x_ptr, w_ptr, w_desc, bias_ptr, out_ptr, tm * BLOCK_M, c0 + j * BLOCK_N, c1, tokens,
                    (j == 0) & (tm == 0), timeout_ns, peer_pads, own_pad, pid, status, slot_offset,
                    buf0, buf1, buf2, buf3, buf4, buf5, buf6, buf7, RANK, W, OFF, TOTAL, K, HAS_BIAS,
                    BLOCK_M, BLOCK_N, BLOCK_K, TMA_WEIGHT, SWAP_AB, ENTRY_SYNC, PUSH)
    else:
        for i in range(0, my_tiles):
            tile = pid + i * nblocks
            tm = tile // N_TILES
            timeout_ns = _tile_out(
                x_ptr, w_ptr, w_desc, bias_ptr, out_ptr, tm * BLOCK_M, (tile - tm * N_TILES) * BLOCK_N, WIDTH,
                tokens, i == 0, timeout_ns, peer_pads, own_pad, pid, status, slot_offset,
                buf0, buf1, buf2, buf3, buf4, buf5, buf6, buf7, RANK, W, OFF, TOTAL, K, HAS_BIAS,
                BLOCK_M, BLOCK_N, BLOCK_K, TMA_WEIGHT, SWAP_AB, ENTRY_SYNC, PUSH)
    if EXIT_SYNC:
        # Exit (release/acquire, system scope): our pushes are visible to each peer before it
        # reads them, and theirs to us before the copy-out below.
        if exchange(peer_pads, own_pad, RANK, pid, live, live, status, timeout_ns, EXIT_TIMEOUT, W, True):
            timeout_ns = timeout_ns * 0
    if COPY_OUT:
        _copy_out_peers(out_ptr, own, tokens, pid, nblocks, RANK, W, WP, BAND_OFFSETS, BLOCK_M, BLOCK_N,
                        EVEN_BANDS, BALANCED)
    if timeout_ns == 0:
        # A wait gave up: the peers' bands may be another call's, so the result must not be read.
        poison_result(out_ptr, status, call, tokens * TOTAL, POISON)


@triton.jit
def multimem_linear_push_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr,
    slot_offset,  # elements (of the output dtype) from a buffer's base to the slot
    status, tokens, timeout_ns, call,
    multicast_ptr,  # the multicast address of the data buffer (i64)
    buf0, buf1, buf2, buf3, buf4, buf5, buf6, buf7,
    pad0, pad1, pad2, pad3, pad4, pad5, pad6, pad7,
    RANK: tl.constexpr,
    W: tl.constexpr,
    WP: tl.constexpr,
    BAND_OFFSETS: tl.constexpr,  # in elements; every offset a multiple of 8 (16 bytes of 2-byte elements)
    K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SKIP_ENTRY_SYNC: tl.constexpr,
    EVEN_BANDS: tl.constexpr,
    POISON: tl.constexpr = 0x7FC0,
):
    """Like the P2P kernel, but one ``multimem.st`` per 16 bytes of a tile reaches every rank.

    Compile-verified only: NVLink multicast must not run on the shared GPU hosts (docs/safety.md, "Multicast").
    2-byte outputs only (bf16/fp16): a tile row of BLOCK_N elements is BLOCK_N / 8 vectors.
    """
    pid = tl.program_id(0)
    nblocks = tl.num_programs(0)
    OFF: tl.constexpr = BAND_OFFSETS[RANK]
    WIDTH: tl.constexpr = BAND_OFFSETS[RANK + 1] - BAND_OFFSETS[RANK]
    TOTAL: tl.constexpr = BAND_OFFSETS[W]
    N_TILES: tl.constexpr = (WIDTH + BLOCK_N - 1) // BLOCK_N
    VECS: tl.constexpr = BLOCK_M * BLOCK_N // 8
    peers, live = peer_lanes(RANK, W, WP)
    peer_pads = per_lane(peers, pad0, pad1, pad2, pad3, pad4, pad5, pad6, pad7)
    own_pad = pick(RANK, pad0, pad1, pad2, pad3, pad4, pad5, pad6, pad7)
    own = tl.multiple_of(pick(RANK, buf0, buf1, buf2, buf3, buf4, buf5, buf6, buf7).to(out_ptr.dtype), 16)
    own = own + slot_offset

    my_tiles = tl.cdiv(tl.maximum(tl.cdiv(tokens, BLOCK_M) * N_TILES - pid, 0), nblocks)
    if not SKIP_ENTRY_SYNC:
        if barrier(peer_pads, own_pad, RANK, pid, status, timeout_ns, ENTRY_TIMEOUT, W, False):
            timeout_ns = timeout_ns * 0
    for i in range(0, my_tiles):
        tile = pid + i * nblocks
        tm = tile // N_TILES
        acc, rows, cols = _tile_gemm(x_ptr, w_ptr, w_ptr, bias_ptr, tm * BLOCK_M, (tile - tm * N_TILES) * BLOCK_N,
                                     WIDTH, tokens, K, HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, False, False)
        vals = acc.to(out_ptr.dtype.element_ty)
        index, ok = _gathered(rows, cols, tokens, OFF, WIDTH, TOTAL)
        tl.store(out_ptr + index, vals, mask=ok)
        # Pack pairs of 2-byte elements into 32-bit words, four words per 16-byte multimem.st.
        halves = tl.reshape(vals.to(tl.int16, bitcast=True), (BLOCK_M * BLOCK_N // 2, 2))
        lo, hi = tl.split(halves)
        words = (lo.to(tl.int32) & 0xFFFF) | (hi.to(tl.int32) << 16)
        even, odd = tl.split(tl.reshape(words, (VECS, 2, 2)))
        w0, w2 = tl.split(even)
        w1, w3 = tl.split(odd)
        first = tl.reshape(index, (VECS, 8))
        first = tl.min(first, axis=1)  # the vector's first element (its lanes are contiguous)
        vec_ok = tl.max(tl.reshape(ok.to(tl.int32), (VECS, 8)), axis=1)
        address = multicast_ptr + (slot_offset + first.to(tl.int64)) * 2
        multimem_store_v4(address, w0, w1, w2, w3, vec_ok)
    # Exit (release/acquire, system scope): the multicast stores are visible everywhere first.
    if barrier(peer_pads, own_pad, RANK, pid, status, timeout_ns, EXIT_TIMEOUT, W, True):
        timeout_ns = timeout_ns * 0
    _copy_out_peers(out_ptr, own, tokens, pid, nblocks, RANK, W, WP, BAND_OFFSETS, BLOCK_M, BLOCK_N, EVEN_BANDS,
                    False)
    if timeout_ns == 0:
        poison_result(out_ptr, status, call, tokens * TOTAL, POISON)


# ---------------------------------------------------------------------------
# Launch configuration: a pure function of (T, K, widths), the same on every rank.


def next_pow2(n):
    """The smallest power of two >= n (1 for n <= 1): tile sizes and the host's T buckets."""
    return 1 << max(0, int(n) - 1).bit_length()


def wide_band(tokens, widths):
    """Whether the widest band fills the SMs with 128-column tiles (LM heads): the configs tuned for them."""
    block_m = min(max(16, next_pow2(tokens)), 64)
    return -(-max(int(tokens), 1) // block_m) * -(-max(widths) // 128) >= TARGET_TILES


def launch_config(tokens, k, widths, elem_size=2, multimem=False):
    """Tile sizes, warps, stages and weight path for T tokens, reduction K and the ranks' widths.

    ``multimem``: for the multimem kernel, which has neither swap-AB nor column shares
    (compile-verified only; same tiles, round robin, mma.sync below 64 rows).

    Chosen from the launch-config sweeps on 4xH200 (benchmarks/sweep_linear_config.py,
    benchmarks/NOTES.md, "fused linear+push", its results and the sweeps):

    - BLOCK_M: T rounded up to a power of two, 16..64 (``tl.dot`` needs 16;
      beyond 64 rows several M tiles share the weight through L2).
    - Wide bands (at least TARGET_TILES tiles of 128 columns, e.g. LM heads), by BLOCK_M
      (third sweep, LM heads 4096 and 7168):
      - 16 rows (T <= 16): 128 x 128 tiles, 8 warps, 4 stages, swap-AB (the weight
        tile on wgmma's M side) and even column shares per block: 71.5 / 75.5 / 85.1 us
        at T = 1 / 8 / 16 where the round-robin mma.sync config took 74.1 / 78.8 / 85.5;
      - 32 rows: 64-column tiles, 4 warps, 6 stages, swap-AB: 82.5 us at T=32 against
        87.2 (the second sweep's pick), and 128.5 against 135.7 for hidden 7168;
        up to T = MID_TOKENS (24) the 16-row tiles' 128 x 128, 8 warps, 4 stages, swap-AB,
        round robin instead (fifth sweep, 32 calls per graph, each config twice: 73.9 / 74.6
        against 76.0 / 77.6 us at T=17, 76.5 / 76.7 against 77.7 / 78.2 at T=20, 78.4 / 78.2
        against 79.1 / 79.0 at T=24; 1-2 us slower at T = 28 and 32);
      - 64 rows: 128 x 128 (BLOCK_K 64), 8 warps, 3 stages (the config that ran at T=128).
      (One sweep's numbers; same-run repeats move by about 3 us, and in them the new configs
      were faster in 16 of 18 pairs: docs/benchmarks.md, "Fused column linear + push".)
    - Otherwise BLOCK_N = 32 (BLOCK_K 256, 4 stages; the best measured for a
      3584-column band), and 16 where even 32-column tiles would leave more
      than half of the SMs idle (no split-K yet); 64-row tiles take BLOCK_K
      128 and 3 stages (as measured).
    - Measured and never picked: TMA weight loads (no gain); a share's last columns in two
      half-width tiles (5-18 us slower, removed; benchmarks/NOTES.md).
    - Every config this returns has run on GPUs (the sweeps or the benchmark and tests);
      keep it that way when changing it.
    - BLOCK_K shrinks until the pipeline's buffers (stages - 1 of them) hold at
      most PIPELINE_BYTES.  The grid is one block per SM (``grid_cap``): every
      block must be resident, since blocks wait for their peers.

    Returns a dict; ``tiles`` is the widest band's tile count (the grid before the cap).
    """
    block_m = min(max(16, next_pow2(tokens)), 64)
    m_tiles = -(-max(int(tokens), 1) // block_m)
    widest = max(widths)
    swap_ab = balanced = False
    if wide_band(tokens, widths):
        if block_m == 16:
            block_n, block_k, stages, num_warps, swap_ab, balanced = 128, 128, 4, 8, True, True
        elif block_m == 32 and tokens <= MID_TOKENS:
            block_n, block_k, stages, num_warps, swap_ab = 128, 128, 4, 8, True
        elif block_m == 32:
            block_n, block_k, stages, num_warps, swap_ab = 64, 128, 6, 4, True
        else:
            block_n, block_k, stages, num_warps = 128, 64, 3, 8
    else:
        block_n = 32 if m_tiles * -(-widest // 32) >= TARGET_TILES // 2 else 16
        block_k = 128 if block_m == 64 else 256 if block_n == 32 else 512
        stages = 4 if block_m + block_n <= 64 else 3
        num_warps = 4
    while block_k > 64 and (block_m + block_n) * block_k * elem_size * (stages - 1) > PIPELINE_BYTES:
        block_k //= 2
    block_k = min(block_k, max(64, next_pow2(k)))
    return {
        "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k,
        "num_warps": num_warps, "num_stages": stages,
        "tiles": m_tiles * -(-widest // block_n),
        "TMA": False,  # weight tiles through TMA: measured no faster (third sweep), never picked
        "SWAP_AB": swap_ab and not multimem,  # the weight tile on the MMA's M side (wgmma)
        "BALANCED": balanced and not multimem,  # each block an even, contiguous column share (else round robin)
    }


# ---------------------------------------------------------------------------
# The source of one variant (compiled with ``compiler.compile_source`` by the host launcher and the AOT tests).

#: torch dtype name -> Triton pointer type of the operands and the result
FLOAT_PTR = {"bfloat16": "*bf16", "float16": "*fp16"}
_ALIGNED = ("x_ptr", "w_ptr", "out_ptr", "slot_offset")

#: the even-band copy-out holds WP x BLOCK_M x BLOCK_N elements per block in registers: at most this many
#: (W=4 at 32 x 128 tiles, W=8 at 16 x 128; larger take the one-peer-at-a-time loop)
COPY_OUT_ELEMENTS = 4 * 32 * 128


def even_bands(band_offsets, config):
    """Whether the copy-out takes every peer's tile at once: equal widths, within the register budget."""
    widths = {b - a for a, b in zip(band_offsets, band_offsets[1:])}
    wp = triton.next_power_of_2(max(len(band_offsets) - 1, 2))
    return len(widths) == 1 and wp * config["BLOCK_M"] * config["BLOCK_N"] <= COPY_OUT_ELEMENTS


def tma_weight_ok(k, config):
    """Whether the weight tiles fit a TMA box: 16-byte row stride, at most 256 elements per row of a box."""
    return int(k) % 8 == 0 and config["BLOCK_K"] <= 256 and config["BLOCK_N"] <= 256


def _check_variant(k, config, multimem, copy_out):
    """Refuse the option combinations neither kernel has, naming what is accepted."""
    tma = config.get("TMA", False)
    if tma and not tma_weight_ok(k, config):
        raise ValueError(f"tpfuse: TMA weight loads need K % 8 == 0 and BLOCK_K <= 256 (a TMA box), got K={k}, "
                         f"BLOCK_K={config['BLOCK_K']}")
    balanced = bool(config.get("BALANCED", False))
    if balanced and tma:
        raise ValueError("tpfuse: TMA weight loads are not combined with BALANCED (a share's last box would read "
                         "rows of the next share; not measured)")
    if multimem and (not copy_out or tma or config.get("SWAP_AB", False) or balanced):
        raise ValueError("tpfuse: the multimem fused kernel copies out and loads the weight with plain "
                         "loads, in round-robin tiles (zero-copy, TMA, swap-AB and BALANCED are P2P only)")


def _kernel_constexprs(band_offsets, k, config, has_bias, skip_entry_sync, multimem, exit_sync, copy_out,
                       diagnostic):
    """The fused kernel's own constexprs (the barrier protocol's ``RANK``, ``W``, ``WP`` and
    ``BAND_OFFSETS`` come from ``barrier_constexprs``); the P2P-only options are left out for multimem."""
    constexprs = dict(K=int(k), HAS_BIAS=bool(has_bias), BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"],
                      BLOCK_K=config["BLOCK_K"], SKIP_ENTRY_SYNC=bool(skip_entry_sync),
                      EVEN_BANDS=even_bands(band_offsets, config), POISON=NAN_BITS_OF_SIZE[2])
    if not multimem:
        constexprs.update(EXIT_SYNC=bool(exit_sync), PUSH=True, COPY_OUT=bool(copy_out),
                          TMA_WEIGHT=bool(config.get("TMA", False)), SWAP_AB=bool(config.get("SWAP_AB", False)),
                          BALANCED=bool(config.get("BALANCED", False)))
        constexprs.update(diagnostic or {})  # {"PUSH": False} / {"COPY_OUT": False}: floor diagnostics only
    return constexprs


def linear_source(dtype_name, rank, band_offsets, k, config, has_bias, skip_entry_sync, multimem=False,
                  exit_sync=True, copy_out=True, diagnostic=None):
    """The ``ASTSource`` of one fused variant; ``config`` from ``launch_config``.

    ``copy_out=False`` is the zero-copy variant (P2P only): the caller passes its
    slot as ``out_ptr``, so our own tiles land there and the peers' arrive there.

    This module's part (the checks and the kernel's own constexprs) comes first and the one step
    out of it last (the barrier protocol's constexprs, then the explicit signature), so that a
    prepare path reads this file in one piece (docs/design.md, "Reading a protocol's path")."""
    # Imported here, not at the top: a line added above the kernels moves their line numbers, which are part
    # of Triton's cache key (every cached variant would compile again).
    from .compiler import ast_source

    _check_variant(k, config, multimem, copy_out)
    own = _kernel_constexprs(band_offsets, k, config, has_bias, skip_entry_sync, multimem, exit_sync, copy_out,
                             diagnostic)
    fn = multimem_linear_push_kernel if multimem else p2p_linear_push_kernel
    ptr_type = FLOAT_PTR[dtype_name]
    types = {"x_ptr": ptr_type, "w_ptr": ptr_type, "bias_ptr": ptr_type, "out_ptr": ptr_type, **RUNTIME_ARGS}
    return ast_source(fn, types, {**barrier_constexprs(rank, band_offsets), **own}, _ALIGNED)
