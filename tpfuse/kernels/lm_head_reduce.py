"""LM head + local row reduction: ``logits = x @ W_r^T`` reduced per row in the GEMM's epilogue, never stored.

Gather elimination (docs/passes.md, "Gather elimination") leaves each rank two steps at an LM head:
the linear writes its ``[T, w]`` logits slab (cuBLAS), then a local kernel reads it back and reduces
each row to a few words (kernels/vocab_reduce.py, kernels/vocab_softmax.py).  Here one GEMM computes
each ``[BLOCK_M, BLOCK_N]`` tile of logits in registers and reduces it at once; only the reduction
of each tile leaves the chip.  Two kernels per call:

- ``lm_head_tiles_kernel``, one program per output tile: the tile's logits are the fp32
  accumulator rounded to x's dtype (the composition's logits are that dtype too, and an argmax of
  the unrounded sums would differ where rounding makes two logits equal), and per row the tile's
  partial: ARGMAX, the first maximal element as vocab_reduce's candidate word (value bits, global
  index; ``value_order``, so NaN above every number and ties to the lowest index as there);
  SOFTMAX, vocab_softmax's words ``m`` (max, NaN read as -inf, NaN if the tile holds one),
  ``s = sum exp(x - shift(m))`` and, with a target, the target's logit where this tile holds it
  (0 elsewhere).
- ``combine_best_kernel`` / ``combine_stats_kernel``, one program per row: the row's tile partials
  to ONE partial per rank, in the format the existing merges read (``merge_best_kernel`` with one
  candidate per rank; ``merge_kernel`` with ``splits = 1``).  So the exchange and the merges are
  reused unchanged, and every rank sends 2 int32 (argmax) or K float32 (softmax) words per row
  whatever tiles it ran: the tile plan may differ between ranks and devices.

Tiles (``tile_plan``): decode (T <= 32) is a GEMV in effect, bound by the weight's bandwidth: the
vocab axis is cut into ``w / BLOCK_N`` programs (251 at w = 32064), each streaming
``[BLOCK_N, H]`` of W_r once, the weight tile on the MMA's M side (SWAP_AB: the 16- or 32-row x
tile would otherwise take ``mma.sync``), as kernels/linear_push.py measured best for this band.
Prefill and scoring (T > 32): a tiled GEMM, programs ordered with the M tiles innermost so that
the programs running together share their weight tiles through L2 (x, <= 33 MB at T = 4096, stays
there).  No split-K: the vocab axis alone gives hundreds of programs.

**The floor** (one H200: HBM 4.8 TB/s datasheet, ~4.0 TB/s the best a weight stream reached here,
benchmarks/NOTES.md "Fourth sweep"; bf16 989 TFLOP/s dense), hidden H = 4096, bf16, w = vocab / W:

| vocab, W | w | W_r bytes | W_r read at 4.8 / 4.0 TB/s | logits write + read saved, T = 1 / 32 / 128 / 1024 / 4096 |
|---|---:|---:|---:|---|
| 128256, 4 | 32064 | 262.7 MB | 54.7 / 65.7 µs | 0.03 / 0.9 / 3.4 / 27 / 109 µs (525 MB at 4096) |
| 128256, 2 | 64128 | 525.3 MB | 109.4 / 131.3 µs | 0.05 / 1.7 / 6.8 / 55 / 219 µs |
| 152064, 4 | 38016 | 311.4 MB | 64.9 / 77.9 µs | 0.03 / 1.0 / 4.1 / 32 / 130 µs |
| 152064, 2 | 76032 | 622.9 MB | 129.8 / 155.7 µs | 0.06 / 2.0 / 8.1 / 65 / 260 µs |

Up to T ~ 200 (989 / 4.8 FLOP per byte) the GEMM is bound by W_r's bytes, and the logits saved
are a small part of it: at decode what fusion saves is the local kernel's launch and its DRAM round
trip (~2-4 µs under graph replay, benchmarks/bench_vocab_reduce.py), against a weight stream of
55-130 µs; a fused GEMM a few percent slower than cuBLAS loses all of it.  From T ~ 1024 the GEMM
is compute bound (2·T·w·H: 1.08 TFLOP, ≥ 1.09 ms at T = 4096, w = 32064) and the saved logits
traffic is ≤ 10 % of it; the fused kernel wins only where its GEMM is within that of cuBLAS.

**When to fuse: T <= 8** (measured; no pass uses it yet).  One H200, vocab 128256 over W = 2
(w = 64128), bf16, H = 4096, CUDA-graph replay, composition (cuBLAS + the local kernel) / fused,
argmax / softmax (benchmarks/results/bench_lm_head_fusion_h200_2026-12-04_first.log):

| T | plan | argmax | softmax |
|---:|---|---:|---:|
| 1 | 16x128x128x8x4xswap | 1.032x | 1.022x |
| 8 | 16x128x128x8x4xswap | 1.039x | 1.014x |
| 32 | 32x64x128x4x6xswap | 0.995x | 0.958x |
| 128 | 64x128x64x8x3 | 0.748x | (not timed) |

At T <= 8 the fused GEMM streams W_r at 4.2-4.3 TB/s, as cuBLAS does, and saves the local kernel
(1.7-4.8 µs of 122-128); at T = 32 its GEMM is already 4-8 % slower than cuBLAS's and from T = 128
(202 µs against cuBLAS's 138 µs) the saving cannot pay for the tiled GEMM.  So the rule this
supports: fuse where the number of rows T is static and at most 8, keep the composition otherwise
(a symbolic T included).  The bound rests on one (vocab, W); the benchmark's default grid measures
the other three and T = 1024, and the bound moves only with such measurements.

No torch import here: tests compile these kernels ahead of time for sm_90 with more than one
Triton, in processes that may not have torch.
"""

import triton
import triton.language as tl

from .compiler import ast_source
from .vocab_reduce import FLOAT_FACTS, NEVER, candidate_word, first_best, neutral_bits, value_order
from .vocab_softmax import logsumexp_shift

#: what the epilogue reduces each row of a tile to
ARGMAX, SOFTMAX = 0, 1
MODES = {"argmax": ARGMAX, "softmax": SOFTMAX}
#: multiprocessors the plan assumes (H100/H200 SXM); the partials do not depend on it (one per rank)
SMS_GUESS = 132
#: decode: T up to this takes the swapped (weight-on-M) tiles
DECODE_TOKENS = 32
#: a decode tile width keeps at least this share of the last wave's programs busy, or narrows
MIN_WAVE_FILL = 0.85
#: tile partials one combine program reads per step
COMBINE_BLOCK = 256
#: Triton's names of the dtypes x and W may have
DOT_TYPES = {"bfloat16": "bf16", "float16": "fp16"}
TARGET_TYPES = ("i64", "i32")

_NAN_FIRST16 = tl.constexpr(2**15 - 1)  # 16-bit orders (vocab_reduce's): NaN above every value
_NONE16 = tl.constexpr(-(2**15))  # ... and the order of no element, below every value
_NEVER = tl.constexpr(NEVER)
_INT32_MIN = tl.constexpr(-(2**31))
_TILE_COLUMN = tl.constexpr(0xFFFF)  # a tile's column in the low 16 bits of an in-tile key (BLOCK_N <= 2**16)


# --------------------------------------------------------------------------- the tile of logits


@triton.jit
def _logits_tile(x_ptr, w_ptr, rows, cols, tokens, width, hidden, x_stride, w_stride, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SWAP_AB: tl.constexpr, EVEN_K: tl.constexpr):
    """``x[rows] @ W[cols]^T`` accumulated in fp32, ``[BLOCK_M, BLOCK_N]``; rows past T and columns past the
    slab read zeros.  SWAP_AB computes the transposed tile (the weight tile is the MMA's M side, so
    16- and 32-row tiles run on Hopper's wgmma) and transposes the accumulator: the same products."""
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < tokens
    col_ok = cols < width
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * x_stride
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * w_stride
    if SWAP_AB:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, hidden, BLOCK_K):
        if EVEN_K:
            a = tl.load(x_rows + (k + ks)[None, :], mask=row_ok[:, None], other=0.0)
            # the weight is streamed once: let it not evict x, which every column tile reads again
            b = tl.load(w_rows + (k + ks)[None, :], mask=col_ok[:, None], other=0.0, eviction_policy="evict_first")
        else:
            k_ok = (k + ks) < hidden
            a = tl.load(x_rows + (k + ks)[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_rows + (k + ks)[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0,
                        eviction_policy="evict_first")
        if SWAP_AB:
            acc = tl.dot(b, tl.trans(a), acc)
        else:
            acc = tl.dot(a, tl.trans(b), acc)
    if SWAP_AB:
        acc = tl.trans(acc)
    return acc


# --------------------------------------------------------------------------- the epilogues


@triton.jit
def _best_of_tile(logits, live, first_col, offset, MAG_MASK: tl.constexpr, INF_BITS: tl.constexpr,
                  NEUTRAL_BITS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Per row of the tile, the first maximal element (the first NaN before any number) as a candidate
    word: the value's own bits, the global index; neutral where the row has no live column.

    One int32 key per element, as vocab_reduce's local kernel keys a lane: the order in the high
    half, the tile's column (inverted: the lower wins) in the low half, so one max is the winner."""
    bits = logits.to(tl.int16, bitcast=True).to(tl.int32)  # sign-extended, as the partials carry 16-bit floats
    order = value_order(bits, MAG_MASK, INF_BITS, True, _NAN_FIRST16)
    column = tl.arange(0, BLOCK_N)
    keys = tl.where(live, (order << 16) | (column ^ _TILE_COLUMN)[None, :], _NONE16 << 16)
    win = tl.max(keys, axis=1)
    found = (win >> 16) > _NONE16
    at = (win & _TILE_COLUMN) ^ _TILE_COLUMN
    # the winner's own bits (sign of zero, NaN payload): its order does not keep them
    own = tl.max(tl.where(live & (column[None, :] == at[:, None]), bits, _INT32_MIN), axis=1)
    index = tl.where(found, offset + first_col + at, _NEVER)
    return candidate_word(index, tl.where(found, own, NEUTRAL_BITS))


@triton.jit
def _stats_of_tile(logits, live, targets, first_col, BLOCK_N: tl.constexpr):
    """Per row of the tile, vocab_softmax's local words: ``m`` (NaN read as -inf for the max, then NaN
    where the tile holds a NaN, as torch.amax), ``s = sum exp(x - shift(m))``, and the target's logit
    where this tile holds it (``targets``: the rows' class indices relative to the slab), else 0."""
    x = tl.where(live, logits.to(tl.float32), float("-inf"))
    m = tl.max(tl.where(x != x, float("-inf"), x), axis=1)
    s = tl.sum(tl.exp(x - logsumexp_shift(m)[:, None]), axis=1)  # -inf columns add exactly 0; NaN reaches s
    m = tl.where(s != s, float("nan"), m)
    hit = live & ((first_col + tl.arange(0, BLOCK_N))[None, :] == targets[:, None])
    # picked by its bits: one element matches, so the max is that element exactly (-0.0, NaN kept)
    picked = tl.max(tl.where(hit, x.to(tl.int32, bitcast=True), _INT32_MIN), axis=1)
    owned = tl.max(hit.to(tl.int32), axis=1) > 0
    return m, s, tl.where(owned, picked.to(tl.float32, bitcast=True), 0.0)


@triton.jit
def lm_head_tiles_kernel(
    x_ptr,  # [tokens, hidden] in x's dtype, rows x_stride apart
    w_ptr,  # [width, hidden] this rank's weight slab (nn.Linear's layout), rows w_stride apart
    target_ptr,  # [tokens] global class indices (read by SOFTMAX with HAS_TARGET only)
    tiles_ptr,  # ARGMAX: [tokens, n_tiles] int64 candidate words; SOFTMAX: [tokens, n_tiles, K] float32
    tokens,
    width,  # the slab's rows: this rank's columns of the logits
    hidden,
    x_stride,
    w_stride,
    offset,  # the global index of the slab's column 0
    m_tiles,  # cdiv(tokens, BLOCK_M)
    n_tiles,  # cdiv(width, BLOCK_N)
    MODE: tl.constexpr,
    HAS_TARGET: tl.constexpr,
    K: tl.constexpr,  # SOFTMAX: words per partial (2, + 1 with a target)
    MAG_MASK: tl.constexpr,
    INF_BITS: tl.constexpr,
    NEUTRAL_BITS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SWAP_AB: tl.constexpr,
    EVEN_K: tl.constexpr,  # hidden is a multiple of BLOCK_K: no mask along it
):
    """Program ``p``: the tile (p % m_tiles, p // m_tiles), its partial per row at ``[row, p // m_tiles]``."""
    pid = tl.program_id(0)
    tile_m = pid % m_tiles
    tile_n = pid // m_tiles
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    first_col = tile_n * BLOCK_N
    cols = first_col + tl.arange(0, BLOCK_N)
    acc = _logits_tile(x_ptr, w_ptr, rows, cols, tokens, width, hidden, x_stride, w_stride, BLOCK_M, BLOCK_N,
                       BLOCK_K, SWAP_AB, EVEN_K)
    logits = acc.to(x_ptr.dtype.element_ty)  # rounded to nearest even, as torch's linear writes its output
    row_ok = rows < tokens
    live = row_ok[:, None] & (cols < width)[None, :]
    at = rows.to(tl.int64) * n_tiles + tile_n
    if MODE == 0:
        word = _best_of_tile(logits, live, first_col, offset, MAG_MASK, INF_BITS, NEUTRAL_BITS, BLOCK_N)
        tl.store(tiles_ptr + at, word, mask=row_ok)
    else:
        if HAS_TARGET:
            targets = tl.load(target_ptr + rows, mask=row_ok, other=0).to(tl.int64) - offset
        else:
            targets = tl.full([BLOCK_M], -1, tl.int64)  # no column is -1: nothing picked
        m, s, target_logit = _stats_of_tile(logits, live, targets, first_col, BLOCK_N)
        out = tiles_ptr + at * K
        tl.store(out, m, mask=row_ok)
        tl.store(out + 1, s, mask=row_ok)
        if HAS_TARGET:
            tl.store(out + 2, target_logit, mask=row_ok)


# --------------------------------------------------------------------------- per-row combines


@triton.jit
def combine_best_kernel(
    tiles_ptr,  # *i64: [tokens, n_tiles] candidate words, tiles in column order
    out_ptr,  # *i64: [tokens] one candidate word per row (vocab_reduce's partials with S = 1)
    n_tiles,
    MAG_MASK: tl.constexpr,
    INF_BITS: tl.constexpr,
    NEUTRAL_BITS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Row ``t``: the first best of its tiles' candidates, by vocab_reduce's merge's own ``first_best`` (order,
    then position: the tiles sit in increasing column order), the winner's word copied whole."""
    row = tl.program_id(0)
    found, word = first_best(tiles_ptr + row.to(tl.int64) * n_tiles, n_tiles, MAG_MASK, INF_BITS, True, BLOCK)
    neutral = candidate_word(tl.full((), _NEVER, tl.int32), tl.full((), NEUTRAL_BITS, tl.int32))
    tl.store(out_ptr + row, tl.where(found, word, neutral))


@triton.jit
def combine_stats_kernel(
    tiles_ptr,  # *fp32: [tokens, n_tiles, K] tile partials
    out_ptr,  # *fp32: [tokens, K] one partial per row (vocab_softmax's, splits = 1)
    n_tiles,
    HAS_TARGET: tl.constexpr,
    K: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Row ``t``: its tiles' ``(m, s, target)`` as one: ``c = max m`` (NaN if any is NaN, as the merge),
    ``s = sum s_i exp(shift(m_i) - shift(c))`` (a tile with nothing adds exactly 0 even where its
    factor overflows), the target words summed (one tile holds the target, the others add 0)."""
    row = tl.program_id(0)
    base = tiles_ptr + row.to(tl.int64) * n_tiles * K
    lanes = tl.arange(0, BLOCK)
    top = tl.full((), float("-inf"), tl.float32)
    nans = tl.full((), 0, tl.int32)
    for first in range(0, n_tiles, BLOCK):  # loops carry scalars only (Triton 3.6)
        live = first + lanes < n_tiles
        m = tl.load(base + (first + lanes) * K, mask=live, other=float("-inf"))
        top = tl.maximum(top, tl.max(tl.where(m != m, float("-inf"), m), axis=0))
        nans = nans + tl.sum((m != m).to(tl.int32), axis=0)
    c = tl.where(nans > 0, float("nan"), top)
    shift = logsumexp_shift(c)
    s = tl.full((), 0.0, tl.float32)
    target_logit = tl.full((), 0.0, tl.float32)
    for first in range(0, n_tiles, BLOCK):
        live = first + lanes < n_tiles
        at = base + (first + lanes) * K
        m = tl.load(at, mask=live, other=float("-inf"))
        part = tl.load(at + 1, mask=live, other=0.0)
        s = s + tl.sum(tl.where(part == 0, 0.0, part * tl.exp(logsumexp_shift(m) - shift)), axis=0)
        if HAS_TARGET:
            target_logit = target_logit + tl.sum(tl.load(at + 2, mask=live, other=0.0), axis=0)
    out = out_ptr + row.to(tl.int64) * K
    tl.store(out, c)
    tl.store(out + 1, s)
    if HAS_TARGET:
        tl.store(out + 2, target_logit)


# --------------------------------------------------------------------------- the plan (plain Python)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _wave_fill(tiles: int, sms: int) -> float:
    """The share of program slots busy over the waves that ``tiles`` programs take (1.0: no idle tail)."""
    return tiles / (cdiv(tiles, sms) * sms) if tiles else 1.0


def tile_plan(tokens: int, width: int, sms: int = SMS_GUESS) -> dict:
    """Tile sizes, MMA orientation, warps and stages for T tokens and a slab of ``width`` columns.

    A prediction to be measured (benchmarks/bench_lm_head_fusion.py ``--plans`` times others), taken
    from kernels/linear_push.py's sweeps on the same LM-head band where they apply:
    - T <= 16: 16-row tiles, 128 columns, BLOCK_K 128, swap-AB, 8 warps, 4 stages (linear_push's
      best at T = 1..16); 64 columns (4 warps, 6 stages) where the 128-column tiles would leave
      more than ``1 - MIN_WAVE_FILL`` of the last wave's slots idle (297 tiles at w = 38016: the
      third wave a quarter full) and the narrower ones fill it better;
    - T <= 32: 32 rows, 64 columns, BLOCK_K 128, swap-AB, 4 warps, 6 stages (linear_push's T = 32);
    - T <= 128: 64 x 128 x 64, 8 warps, 3 stages (linear_push's T = 128);
    - above: 128 x 128 x 64, 8 warps, 4 stages (64 accumulator registers a thread, room for the
      epilogue's keys)."""
    if tokens <= 16:
        plan = {"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 128, "SWAP_AB": True, "num_warps": 8, "num_stages": 4}
        wide, narrow = _wave_fill(cdiv(width, 128), sms), _wave_fill(cdiv(width, 64), sms)
        if wide < MIN_WAVE_FILL and narrow > wide:
            plan.update(BLOCK_N=64, num_warps=4, num_stages=6)
        return plan
    if tokens <= DECODE_TOKENS:
        return {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 128, "SWAP_AB": True, "num_warps": 4, "num_stages": 6}
    if tokens <= 128:
        return {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "SWAP_AB": False, "num_warps": 8, "num_stages": 3}
    return {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "SWAP_AB": False, "num_warps": 8, "num_stages": 4}


PLAN_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SWAP_AB", "num_warps", "num_stages")


def check_plan(plan: dict) -> None:
    """A plan the kernels take: every key of ``PLAN_KEYS``; tiles powers of two, ``tl.dot``'s 16 at least
    (BLOCK_N at most 2**16, the in-tile key's column field); warps and stages positive."""
    missing = [k for k in PLAN_KEYS if k not in plan]
    if missing:
        raise ValueError(f"a tile plan needs {', '.join(PLAN_KEYS)}; missing {', '.join(missing)}")
    for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
        size = plan[name]
        if not (isinstance(size, int) and 16 <= size <= 2**16 and size & (size - 1) == 0):
            raise ValueError(f"{name} must be a power of two from 16 to 65536, not {size!r}")
    for name in ("num_warps", "num_stages"):
        if not (isinstance(plan[name], int) and plan[name] >= 1):
            raise ValueError(f"{name} must be a positive integer, not {plan[name]!r}")


def partial_words(mode: int, has_target: bool) -> int:
    """Words per row in the tiles' and the combine's partials: one int64 candidate, or m, s (+ target)."""
    return 1 if mode == ARGMAX else 2 + int(has_target)


def tiles_constexprs(dtype_name: str, mode: int, has_target: bool, plan: dict, even_k: bool) -> dict:
    size, inf = FLOAT_FACTS[dtype_name]
    return {"MODE": int(mode), "HAS_TARGET": bool(has_target) and mode == SOFTMAX,
            "K": partial_words(mode, has_target and mode == SOFTMAX), "MAG_MASK": (1 << (8 * size - 1)) - 1,
            "INF_BITS": inf, "NEUTRAL_BITS": neutral_bits(dtype_name, True), "BLOCK_M": plan["BLOCK_M"],
            "BLOCK_N": plan["BLOCK_N"], "BLOCK_K": plan["BLOCK_K"], "SWAP_AB": bool(plan["SWAP_AB"]),
            "EVEN_K": bool(even_k)}


def combine_best_constexprs(dtype_name: str) -> dict:
    size, inf = FLOAT_FACTS[dtype_name]
    return {"MAG_MASK": (1 << (8 * size - 1)) - 1, "INF_BITS": inf, "NEUTRAL_BITS": neutral_bits(dtype_name, True),
            "BLOCK": COMBINE_BLOCK}


def combine_stats_constexprs(has_target: bool) -> dict:
    return {"HAS_TARGET": bool(has_target), "K": partial_words(SOFTMAX, has_target), "BLOCK": COMBINE_BLOCK}


# --------------------------------------------------------------------------- compilation
# One explicit signature per variant, shared by the host launcher (compile_ops/lm_head_kernels.py, target =
# the current GPU) and the ahead-of-time tests (target = sm_90).


def _check_dtype(dtype_name: str) -> None:
    if dtype_name not in DOT_TYPES:
        raise ValueError(f"the fused LM head reads x and W of {', '.join(DOT_TYPES)}, not {dtype_name!r}")


def tiles_source(dtype_name: str, target_type: str, mode: int, has_target: bool, plan: dict, even_k: bool,
                 aligned: bool):
    """The ``ASTSource`` of one variant of ``lm_head_tiles_kernel``.  ``aligned``: x and W start on 16 bytes
    and their row strides and the hidden size are multiples of 16 elements."""
    _check_dtype(dtype_name)
    if target_type not in TARGET_TYPES:
        raise ValueError(f"the fused LM head reads targets of {', '.join(TARGET_TYPES)}, not {target_type!r}")
    check_plan(plan)
    dot = "*" + DOT_TYPES[dtype_name]
    types = {"x_ptr": dot, "w_ptr": dot, "target_ptr": "*" + target_type,
             "tiles_ptr": "*i64" if mode == ARGMAX else "*fp32", "tokens": "i32", "width": "i32", "hidden": "i32",
             "x_stride": "i64", "w_stride": "i64", "offset": "i64", "m_tiles": "i32", "n_tiles": "i32"}
    constexprs = tiles_constexprs(dtype_name, mode, has_target, plan, even_k)
    return ast_source(lm_head_tiles_kernel, types, constexprs,
                   ("x_ptr", "w_ptr", "hidden", "x_stride", "w_stride") if aligned else ())


def combine_best_source(dtype_name: str):
    _check_dtype(dtype_name)
    types = {"tiles_ptr": "*i64", "out_ptr": "*i64", "n_tiles": "i32"}
    return ast_source(combine_best_kernel, types, combine_best_constexprs(dtype_name), ())


def combine_stats_source(has_target: bool):
    types = {"tiles_ptr": "*fp32", "out_ptr": "*fp32", "n_tiles": "i32"}
    return ast_source(combine_stats_kernel, types, combine_stats_constexprs(has_target), ())


def compile_source(source, target=None, num_warps=4, num_stages=3):
    """Compile an ASTSource for ``target`` (a ``GPUTarget``; None means the current GPU)."""
    return triton.compile(source, target=target, options={"num_warps": num_warps, "num_stages": num_stages})
