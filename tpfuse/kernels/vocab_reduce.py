"""Kernels of the exact reductions over a vocab split across ranks: argmax/argmin/max/min and top-k.

Each rank holds the slab ``[T, width]`` of ``cat_r(x_r, -1)`` whose global columns start at
``offset``.  Two kernels per op, with the exchange of their partials between them
(compile_ops/reduce_kernels.py runs them, docs/op.md "Reductions without the gather"):

- ``local_best`` / ``local_topk``, grid ``(T, S)``: block ``(t, s)`` reduces columns
  ``[s * CHUNK, (s + 1) * CHUNK)`` of row ``t`` (CHUNK = tiles_per_chunk * BLOCK, clipped to
  ``width``) to its first best candidate, or its first k.  A candidate is one 64-bit word:
  the value's own bits in the low half (16-bit floats sign-extended, as reduce_hidden's
  ``_value_bits``) and the GLOBAL index in the high half, i.e. the two int32 words
  ``[bits, index]`` of the op's partials.  A chunk without a valid column (a narrow rank, a
  padded-vocab slice) writes the neutral candidate: -inf (+inf for the smallest) with index
  ``NEVER``, which loses every tie.
- ``merge_best`` / ``merge_topk``, grid ``(T,)``: one block per row reads every rank's
  candidates, rank-major, and writes the winner's value (x's dtype, its own bits) and int64
  index, or the first k.

The order is torch's: by value, NaN above every number for max/min (the FIRST NaN wins, also
for argmin, as ``torch.argmax``/``torch.argmin``) and for top-k the largest value (last with
``largest=False``, as ``torch.topk`` and the CPU's ``torch.sort``), then the lowest global index.
``-0.0`` and ``0.0`` tie.  The kernels compare integers only: each value's bits map to an
int32 "order" (``_order``; no float instruction, so no flush of subnormals can merge two
values), and order plus position make one int64 key, distinct per element, so a max over keys
is the winner and ties need no second rule.  Within a row the merge may key by the candidate's
position instead of its index: real candidates sit in increasing global index order (ranks in
order, chunks in order, a chunk's k in key order, equal values by index).

The plan (S, tiles per chunk) is a pure function of T, the widest rank's valid width, the
element size and k (``chunk_plan``), never of the device, so every rank sends the same number
of words.  Loops that carry tensors are ``for`` loops (Triton 3.6 refuses only ``while``
loops that carry them; docs/design.md, "Toolchain note").

No torch import here: CI compiles these kernels ahead of time with more than one Triton
version, in processes that may not have torch.
"""

import triton
import triton.language as tl

from .compiler import ast_source

#: the index of a neutral candidate (int32 max, as reduce_hidden's ``_NEVER``): loses every tie
NEVER = 2**31 - 1
#: multiprocessors assumed by the plan (H100/H200 SXM): a constant, not a device query, so that
#: every rank plans the same partials
SMS_GUESS = 132
#: bytes of one row a block reads per tile: 2048 16-bit or 1024 32-bit elements
TILE_BYTES = 4096
#: top-k with k up to this runs here; a larger k stays with the torch composition
MAX_TOPK = 64
#: at most this many candidates per row per rank in top-k (S * k), so the merge stays small
MAX_TOPK_CANDIDATES = 256
#: candidates one merge block reads per tile (max/min, top-k)
MERGE_BLOCK_BEST = 256
MERGE_BLOCK_TOPK = 1024
NUM_WARPS = 4
#: local_best keys a lane's elements by tile in 16 bits (kernels' ``_lane_key``)
MAX_TILES_PER_CHUNK = 1 << 16

#: per accepted float dtype: (element bytes, bits of +inf); a value is NaN when its magnitude bits exceed +inf's
FLOAT_FACTS = {"float32": (4, 0x7F800000), "bfloat16": (2, 0x7F80), "float16": (2, 0x7C00)}
INT_OF_SIZE = {2: "i16", 4: "i32"}

_INT32_MAX = tl.constexpr(2**31 - 1)
_NONE = tl.constexpr(-(2**31))  # the order of no element (masked, or a neutral candidate): below every value
_NAN_FIRST = tl.constexpr(2**31 - 1)  # the order of NaN above every value
_NAN_LAST = tl.constexpr(-(2**31) + 1)  # ... below every value, still above no element
_NONE16 = tl.constexpr(-(2**15))  # the same two for orders that fit 16 bits (16-bit floats)
_NAN_FIRST16 = tl.constexpr(2**15 - 1)
_MIN_KEY = tl.constexpr(-(2**63))  # the key of no element: below every element's key
_MAX_KEY = tl.constexpr(2**63 - 1)
_NEVER = tl.constexpr(NEVER)


# --------------------------------------------------------------------------- the order


@triton.jit
def _order(bits, MAG_MASK: tl.constexpr, INF_BITS: tl.constexpr, LARGEST: tl.constexpr, NAN_ORDER: tl.constexpr):
    """An int32 that orders values as the reduction wants them (larger is better) from their bits.

    ``bits`` are sign-extended to int32.  Numbers get +-magnitude (so -0.0 and 0.0 tie), negated
    for the smallest; NaN (magnitude above +inf's) gets NAN_ORDER whatever its sign and payload."""
    magnitude = bits & MAG_MASK
    order = tl.where(bits < 0, -magnitude, magnitude)
    if not LARGEST:
        order = -order
    return tl.where(magnitude > INF_BITS, NAN_ORDER, order)


@triton.jit
def _key(order, position):
    """An int64 key: by order, then the lower position (0 <= position < NEVER); distinct per position.

    The low half is NEVER - position, written as an xor (the same for 0 <= position <= NEVER)."""
    return (order.to(tl.int64) << 32) | (position ^ _INT32_MAX).to(tl.int64)


@triton.jit
def _position(key):
    """The position a key was made with."""
    return key.to(tl.int32) ^ _INT32_MAX


@triton.jit
def _word(index, bits):
    """A candidate as one int64: bits in the low half, the global index in the high half."""
    return (index.to(tl.int64) << 32) | bits.to(tl.uint32, bitcast=True).to(tl.int64)


@triton.jit
def _bits_of(word):
    return word.to(tl.int32)


@triton.jit
def _index_of(word):
    return (word >> 32).to(tl.int32)


# --------------------------------------------------------------------------- top-k bookkeeping


@triton.jit
def _merge_sorted(top, found, slots, K: tl.constexpr):
    """The first K keys of two descending [KP] lists (distinct keys; _MIN_KEY marks no key), descending.

    Each key's place in the merged list is its place in its own list plus the keys of the
    other list above it; every place then takes the one key that went there."""
    top_place = slots + tl.sum((found[None, :] > top[:, None]).to(tl.int32), axis=1)
    found_place = slots + tl.sum((top[:, None] > found[None, :]).to(tl.int32), axis=0)
    from_top = tl.where((top_place[None, :] == slots[:, None]) & (top[None, :] > _MIN_KEY), top[None, :], _MIN_KEY)
    from_found = tl.where((found_place[None, :] == slots[:, None]) & (found[None, :] > _MIN_KEY), found[None, :],
                          _MIN_KEY)
    merged = tl.maximum(tl.max(from_top, axis=1), tl.max(from_found, axis=1))
    return tl.where(slots < K, merged, _MIN_KEY)


@triton.jit
def _topk_fold(top, threshold, order, positions, slots, K: tl.constexpr, KP: tl.constexpr):
    """Fold a tile into ``top`` (the best K keys so far, descending; ``threshold``: its K-th, or _MIN_KEY).

    Every position of the tile is above every position already seen, so an element beats the
    threshold exactly when its order is above the threshold's: one count of int32 compares
    per tile.  When some do, the tile's best min(count, K) keys (one max each, in order) are
    merged in."""
    bar = (threshold >> 32).to(tl.int32)
    beats = tl.sum((order > bar).to(tl.int32), axis=0)
    passes = tl.minimum(beats, K)
    if passes > 0:
        keys = tl.where(order > bar, _key(order, positions), _MIN_KEY)
        found = tl.full([KP], _MIN_KEY, tl.int64)
        last = threshold * 0 + _MAX_KEY
        for j in range(0, passes):
            best = tl.max(tl.where(keys < last, keys, _MIN_KEY), axis=0)
            found = tl.where(slots == j, best, found)
            last = best
        top = _merge_sorted(top, found, slots, K)
        threshold = tl.max(tl.where(slots == K - 1, top, _MIN_KEY), axis=0)
    return top, threshold


# --------------------------------------------------------------------------- local kernels


@triton.jit
def _chunk(width, tiles_per_chunk, BLOCK: tl.constexpr):
    """This block's columns [start, stop) of its row, and how many whole tiles they hold."""
    start = tl.program_id(1) * tiles_per_chunk * BLOCK
    stop = tl.minimum(start + tiles_per_chunk * BLOCK, width)
    return start, stop, tl.maximum(stop - start, 0) // BLOCK


@triton.jit
def _lane_key(order, tile, NARROW: tl.constexpr):
    """Per lane, order and then the lower tile of the chunk in one integer, so that one max per
    element keeps each lane's first best.  16-bit floats: orders fit 16 bits, tiles too
    (chunk_plan keeps tiles per chunk <= 2**16), so the key is an int32."""
    if NARROW:
        return (order << 16) | (tile ^ 0xFFFF)
    else:
        return (order.to(tl.int64) << 32) | (tile ^ 0x7FFFFFFF)  # non-negative: widens as it is


@triton.jit
def local_best_kernel(
    x_ptr,  # *i16 / *i32: the bits of this rank's [T, >= width] slab, rows row_stride apart
    part_ptr,  # *i64: [T, S] candidates
    row_stride,  # elements between rows (0 when T == 1)
    width,  # this rank's valid columns (0 to its width)
    offset,  # the global index of its column 0
    tiles_per_chunk,
    MAG_MASK: tl.constexpr,
    INF_BITS: tl.constexpr,
    LARGEST: tl.constexpr,
    NEUTRAL_BITS: tl.constexpr,  # -inf (largest) or +inf in x's dtype, sign-extended
    BLOCK: tl.constexpr,
):
    """Block (t, s): the first maximal (minimal; the first NaN before either) element of its chunk."""
    NARROW: tl.constexpr = MAG_MASK < 0x10000
    NONE: tl.constexpr = _NONE16 if NARROW else _NONE
    NAN_ORDER: tl.constexpr = _NAN_FIRST16 if NARROW else _NAN_FIRST
    t = tl.program_id(0)
    row = x_ptr + t.to(tl.int64) * row_stride
    start, stop, tiles = _chunk(width, tiles_per_chunk, BLOCK)
    lanes = tl.arange(0, BLOCK)
    if NARROW:  # no element yet: the lane key of order NONE
        best = tl.full([BLOCK], _NONE16 << 16, tl.int32)
    else:
        best = tl.full([BLOCK], _MIN_KEY, tl.int64)
    for i in range(0, tiles):  # whole tiles: no mask, so 16-byte loads where the row allows
        bits = tl.load(row + start + i * BLOCK + lanes).to(tl.int32)
        best = tl.maximum(best, _lane_key(_order(bits, MAG_MASK, INF_BITS, LARGEST, NAN_ORDER), i, NARROW))
    if start + tiles * BLOCK < stop:
        cols = start + tiles * BLOCK + lanes
        live = cols < stop
        bits = tl.load(row + cols, mask=live, other=0).to(tl.int32)
        order = tl.where(live, _order(bits, MAG_MASK, INF_BITS, LARGEST, NAN_ORDER), NONE)
        best = tl.maximum(best, _lane_key(order, tiles, NARROW))
    # Each lane's best, then the block's: by order, then the lowest column.
    if NARROW:
        order = best >> 16
        tile = (best & 0xFFFF) ^ 0xFFFF
    else:
        order = (best >> 32).to(tl.int32)
        tile = best.to(tl.int32) ^ _INT32_MAX
    keys = tl.where(order > NONE, _key(order, start + tile * BLOCK + lanes), _MIN_KEY)
    win = tl.max(keys, axis=0)
    found = win > _MIN_KEY
    col = tl.where(found, _position(win), 0)
    # the winner's own bits (sign of zero, NaN payload), read again: the keys do not keep them
    bits = tl.where(found, tl.load(row + col, mask=found, other=0).to(tl.int32), NEUTRAL_BITS)
    index = tl.where(found, offset + col, _NEVER)
    tl.store(part_ptr + t.to(tl.int64) * tl.num_programs(1) + tl.program_id(1), _word(index, bits))


@triton.jit
def local_topk_kernel(
    x_ptr,
    part_ptr,  # *i64: [T, S, K] candidates
    row_stride,
    width,
    offset,
    tiles_per_chunk,
    MAG_MASK: tl.constexpr,
    INF_BITS: tl.constexpr,
    LARGEST: tl.constexpr,
    NEUTRAL_BITS: tl.constexpr,
    K: tl.constexpr,
    KP: tl.constexpr,  # next power of two >= K (>= 2)
    BLOCK: tl.constexpr,
):
    """Block (t, s): the first K elements of its chunk in the merge order, best first, neutral-padded."""
    NAN_ORDER: tl.constexpr = _NAN_FIRST if LARGEST else _NAN_LAST  # torch.topk: NaN is the largest value
    t = tl.program_id(0)
    row = x_ptr + t.to(tl.int64) * row_stride
    start, stop, tiles = _chunk(width, tiles_per_chunk, BLOCK)
    lanes = tl.arange(0, BLOCK)
    slots = tl.arange(0, KP)
    top = tl.full([KP], _MIN_KEY, tl.int64)
    threshold = tl.min(top, axis=0)
    for i in range(0, tiles):
        cols = start + i * BLOCK + lanes
        order = _order(tl.load(row + cols).to(tl.int32), MAG_MASK, INF_BITS, LARGEST, NAN_ORDER)
        top, threshold = _topk_fold(top, threshold, order, cols, slots, K, KP)
    if start + tiles * BLOCK < stop:
        cols = start + tiles * BLOCK + lanes
        live = cols < stop
        bits = tl.load(row + cols, mask=live, other=0).to(tl.int32)
        order = tl.where(live, _order(bits, MAG_MASK, INF_BITS, LARGEST, NAN_ORDER), _NONE)
        top, threshold = _topk_fold(top, threshold, order, cols, slots, K, KP)
    found = top > _MIN_KEY
    cols = tl.where(found, _position(top), 0)
    bits = tl.where(found, tl.load(row + cols, mask=found, other=0).to(tl.int32), NEUTRAL_BITS)
    index = tl.where(found, offset + cols, _NEVER)
    base = (t.to(tl.int64) * tl.num_programs(1) + tl.program_id(1)) * K
    tl.store(part_ptr + base + slots, _word(index, bits), mask=slots < K)


# --------------------------------------------------------------------------- merge kernels


@triton.jit
def _first_best(row, candidates, MAG_MASK: tl.constexpr, INF_BITS: tl.constexpr, LARGEST: tl.constexpr,
                BLOCK: tl.constexpr):
    """The first best of the ``candidates`` words at ``row`` (by order, NaN first, then the lower position;
    neutral candidates skipped): ``(found, word)``, the winner's word copied whole."""
    lanes = tl.arange(0, BLOCK)
    best = tl.full([BLOCK], _MIN_KEY, tl.int64)
    for i in range(0, tl.cdiv(candidates, BLOCK)):
        pos = i * BLOCK + lanes
        live = pos < candidates
        words = tl.load(row + pos, mask=live, other=0)
        real = live & (_index_of(words) != _NEVER)
        order = _order(_bits_of(words), MAG_MASK, INF_BITS, LARGEST, _NAN_FIRST)
        best = tl.maximum(best, tl.where(real, _key(order, pos), _MIN_KEY))
    win = tl.max(best, axis=0)
    found = win > _MIN_KEY
    word = tl.load(row + tl.where(found, _position(win), 0), mask=found, other=0)
    return found, word


@triton.jit
def merge_best_kernel(
    part_ptr,  # *i64: [T, candidates], every rank's candidates in rank order
    values_ptr,  # *i16 / *i32: [T] the winners' bits (x's dtype)
    indices_ptr,  # *i64: [T]
    candidates,
    MAG_MASK: tl.constexpr,
    INF_BITS: tl.constexpr,
    LARGEST: tl.constexpr,
    NEUTRAL_BITS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    t = tl.program_id(0)
    found, word = _first_best(part_ptr + t.to(tl.int64) * candidates, candidates, MAG_MASK, INF_BITS, LARGEST,
                              BLOCK)
    tl.store(values_ptr + t, tl.where(found, _bits_of(word), NEUTRAL_BITS).to(values_ptr.dtype.element_ty))
    tl.store(indices_ptr + t, tl.where(found, _index_of(word), _NEVER).to(tl.int64))


@triton.jit
def merge_topk_kernel(
    part_ptr,  # *i64: [T, candidates]
    values_ptr,  # *i16 / *i32: [T, K]
    indices_ptr,  # *i64: [T, K]
    candidates,
    MAG_MASK: tl.constexpr,
    INF_BITS: tl.constexpr,
    LARGEST: tl.constexpr,
    NEUTRAL_BITS: tl.constexpr,
    K: tl.constexpr,
    KP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    NAN_ORDER: tl.constexpr = _NAN_FIRST if LARGEST else _NAN_LAST
    t = tl.program_id(0)
    row = part_ptr + t.to(tl.int64) * candidates
    lanes = tl.arange(0, BLOCK)
    slots = tl.arange(0, KP)
    top = tl.full([KP], _MIN_KEY, tl.int64)
    threshold = tl.min(top, axis=0)
    for i in range(0, tl.cdiv(candidates, BLOCK)):
        pos = i * BLOCK + lanes
        live = pos < candidates
        words = tl.load(row + pos, mask=live, other=0)
        real = live & (_index_of(words) != _NEVER)
        order = tl.where(real, _order(_bits_of(words), MAG_MASK, INF_BITS, LARGEST, NAN_ORDER), _NONE)
        top, threshold = _topk_fold(top, threshold, order, pos, slots, K, KP)
    found = top > _MIN_KEY
    words = tl.load(row + tl.where(found, _position(top), 0), mask=found, other=0)
    out = t.to(tl.int64) * K + slots
    bits = tl.where(found, _bits_of(words), NEUTRAL_BITS)
    tl.store(values_ptr + out, bits.to(values_ptr.dtype.element_ty), mask=slots < K)
    tl.store(indices_ptr + out, tl.where(found, _index_of(words), _NEVER).to(tl.int64), mask=slots < K)


# --------------------------------------------------------------------------- the plan (plain Python)


def block_elements(elem_size: int) -> int:
    """Elements per tile of a local kernel."""
    return TILE_BYTES // elem_size


def chunk_plan(tokens: int, widest: int, elem_size: int, k: int = 1, block: int | None = None,
               sms: int = SMS_GUESS) -> tuple[int, int]:
    """(S, tiles per chunk): how many chunks each row is cut into, from rank-invariant facts only.

    Enough blocks to fill about two waves of ``sms`` multiprocessors at small T (each chunk at
    least one tile of the widest rank's valid band), one chunk per row from T = 2 * sms on; for
    top-k at most ``MAX_TOPK_CANDIDATES`` candidates per row.  ``block`` and ``sms`` are for
    tests (small tiles, several tiles per chunk at small T)."""
    block = block or block_elements(elem_size)
    tiles = max(1, -(-widest // block))
    wanted = -(-2 * sms // max(1, tokens))
    chunks = max(1, min(wanted, tiles, MAX_TOPK_CANDIDATES // k if k > 1 else tiles))
    chunks = max(chunks, -(-tiles // MAX_TILES_PER_CHUNK))
    tiles_per_chunk = -(-tiles // chunks)
    return -(-tiles // tiles_per_chunk), tiles_per_chunk


def padded_k(k: int) -> int:
    return max(2, triton.next_power_of_2(k))


def neutral_bits(dtype_name: str, largest: bool) -> int:
    """-inf (largest) or +inf of the dtype, sign-extended to int32 as the partials carry it."""
    size, inf = FLOAT_FACTS[dtype_name]
    if largest:
        return inf - (1 << (8 * size - 1))  # the sign bit set, read as a negative number
    return inf


def constexprs(dtype_name: str, largest: bool, k: int | None = None, block: int | None = None) -> dict:
    """The constexprs of one variant (k None: max/min); ``block`` defaults to the production tile."""
    size, inf = FLOAT_FACTS[dtype_name]
    values = {"MAG_MASK": (1 << (8 * size - 1)) - 1, "INF_BITS": inf, "LARGEST": bool(largest),
              "NEUTRAL_BITS": neutral_bits(dtype_name, largest), "BLOCK": block or block_elements(size)}
    if k is not None:
        if not 1 <= k <= MAX_TOPK:
            raise ValueError(f"top-k kernels take k from 1 to {MAX_TOPK}, not {k}")
        values.update(K=k, KP=padded_k(k))
    return values


# --------------------------------------------------------------------------- compilation
# One explicit signature per variant, shared by the host launcher (target = the current GPU) and
# the ahead-of-time CI tests (target = sm_90).


def local_source(dtype_name: str, largest: bool, k: int | None = None, aligned: bool = True):
    """The ``ASTSource`` of ``local_best`` (k None) or ``local_topk``.

    ``aligned``: the slab's address is 16-byte aligned and its row stride a multiple of 16
    elements (or T == 1, passed as stride 0), so whole tiles load in 16-byte vectors."""
    size, _ = FLOAT_FACTS[dtype_name]
    types = {"x_ptr": "*" + INT_OF_SIZE[size], "part_ptr": "*i64", "row_stride": "i64", "width": "i32",
             "offset": "i32", "tiles_per_chunk": "i32"}
    fn = local_best_kernel if k is None else local_topk_kernel
    return ast_source(fn, types, constexprs(dtype_name, largest, k), ("x_ptr", "row_stride") if aligned else ())


def merge_source(dtype_name: str, largest: bool, k: int | None = None):
    """The ``ASTSource`` of ``merge_best`` (k None) or ``merge_topk``."""
    size, _ = FLOAT_FACTS[dtype_name]
    types = {"part_ptr": "*i64", "values_ptr": "*" + INT_OF_SIZE[size], "indices_ptr": "*i64", "candidates": "i32"}
    fn = merge_best_kernel if k is None else merge_topk_kernel
    block = MERGE_BLOCK_BEST if k is None else MERGE_BLOCK_TOPK
    return ast_source(fn, types, constexprs(dtype_name, largest, k, block))


def compile_source(source, target=None, num_warps=NUM_WARPS):
    """Compile an ASTSource for ``target`` (a ``GPUTarget``; None means the current GPU)."""
    return triton.compile(source, target=target, options={"num_warps": num_warps})


# --------------------------------------------------------------------------- shared with other producers
# kernels/lm_head_reduce.py writes these same candidates from a GEMM's epilogue.  It orders, keys and
# packs them with these very functions, so that the NaN and tie rules of the two producers cannot drift.
value_order = _order
candidate_word = _word
first_best = _first_best
