"""Softmax statistics of a vocab slab in one pass: the device kernels of the sum family.

``tpfuse::softmax_stats_hidden`` (compile_ops/vocab_parallel_loss.py) reduces each rank's
``[T, w]`` slab of the logits to a few float32 partials per row, exchanges them, merges
them, and in backward writes the slab's gradient.  On CUDA these three steps are one
kernel each (the CPU keeps the torch composition as the reference):

- ``local_stats_kernel``: one pass over a row (an online softmax): ``m`` (max), ``s = sum
  exp(x - shift(m))``, and where asked the target's logit (0 where this slab does not hold
  it), ``sum (x - shift(m))`` and ``sum exp(x - shift(m)) (x - shift(m))``.  For few rows a
  row is split into ``splits`` column ranges, each its own program and its own partials:
  the merge takes them as ``W * splits`` virtual ranks, so the number of words per rank is
  ``splits * K``, a pure function of T and the widest band (``split_plan``), the same on
  every rank.
- ``merge_kernel``: the ``[T, W * splits * K]`` exchanged partials to ``shift``,
  ``log_sum``, ``target_logit``, ``logit_sum``, ``entropy`` (the composition's
  ``merge_partials``), the same arithmetic in the same order on every rank.
- ``local_grad_kernel``: ``d log_sum/dx = softmax``, ``d target_logit/dx = onehot``,
  ``d logit_sum/dx = 1``, ``d entropy/dx = p (-log p - H)``, scaled by the statistics'
  upstream gradients and summed, written in x's dtype in one pass (zeros on the padding
  columns past the valid width).

Rows of -inf and empty slabs give the neutral partial (``m = -inf``, ``s = 0``); a NaN
anywhere in a row makes its ``m`` and ``s`` NaN, as ``amax`` and ``sum`` do in torch (the max
itself is taken with NaN read as -inf, so that the GPU's max, which drops NaN, and the
interpreter's, which keeps it, agree).  The loops carry scalars only (Triton 3.6 crashes on
loops carrying tensors through ``while``; a scalar per tile also keeps registers low).

No torch import here: CI compiles these kernels ahead of time for sm_90 in processes that
may not have torch (tests/aot_kernels_report.py).
"""

import triton
import triton.language as tl

from .compiler import ast_source

#: programs the local pass aims for when rows are few (about two per multiprocessor of an
#: H100/H200); a constant, not the device's count, so that every rank splits alike
TARGET_PROGRAMS = 264
#: a row is cut into pieces of at most about this many columns (one tile of loads in flight per
#: program), none shorter than half of it
SPLIT_COLUMNS = 2048
#: at most this many splits per row: the merge's lanes are ``next_pow2(W) * MAX_SPLITS``
MAX_SPLITS = 16
#: a split's column range starts at a multiple of this (16-byte aligned loads for 1- to 2-byte
#: dtypes, and for 4-byte ones)
SPLIT_ALIGN = 16
_SPLIT_ALIGN = tl.constexpr(SPLIT_ALIGN)
#: the local pass's widest tile, in elements
MAX_LOCAL_BLOCK = 4096
#: the gradient's tile, in elements
MAX_GRAD_BLOCK = 2048
#: the merge's tile, in partials (rows x lanes)
MERGE_TILE = 1024


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def split_plan(tokens: int, widest: int) -> tuple[int, int]:
    """``(splits, chunk)``: each row's columns go to ``splits`` programs of ``chunk`` columns.

    A function of T and the widest band only (the same on every rank, docs/contract.md §2).
    Enough programs for a few rows (``TARGET_PROGRAMS``), none much narrower than
    ``SPLIT_COLUMNS``; ``chunk`` is a multiple of ``SPLIT_ALIGN`` and every split of the
    widest band holds columns.  A narrower rank's later splits may be empty: neutral partials.
    """
    splits = max(1, min(cdiv(TARGET_PROGRAMS, max(tokens, 1)), cdiv(widest, SPLIT_COLUMNS), MAX_SPLITS))
    chunk = cdiv(cdiv(max(widest, 1), splits), SPLIT_ALIGN) * SPLIT_ALIGN
    return cdiv(max(widest, 1), chunk), chunk


def partial_words(has_target: bool, with_logit_sum: bool, with_entropy: bool) -> int:
    """K: float32 words per (row, split): m, s, then the target's logit, the logit sum, the entropy term."""
    return 2 + int(has_target) + int(with_logit_sum) + int(with_entropy)


def local_block(chunk: int) -> int:
    return max(128, min(MAX_LOCAL_BLOCK, next_pow2(chunk)))


def grad_block(width: int) -> int:
    return max(128, min(MAX_GRAD_BLOCK, next_pow2(width)))


def merge_lanes(world_size: int) -> int:
    return next_pow2(world_size) * MAX_SPLITS


def warps_for(block: int) -> int:
    return 8 if block >= 4096 else 4


@triton.jit
def _shift(m):
    """torch.logsumexp's shift: the max, or 0 where it is infinite (NaN stays NaN)."""
    return tl.where(tl.abs(m) == float("inf"), 0.0, m)


@triton.jit
def local_stats_kernel(
    x_ptr,  # [rows, >= width] logits, rows row_stride apart, columns contiguous
    target_ptr,  # [rows] global class indices (read only with HAS_TARGET)
    partials_ptr,  # [rows, splits, K] float32
    width,  # this rank's columns (its valid width)
    row_stride,
    offset,  # the global index of this slab's column 0
    chunk,  # columns per split
    HAS_TARGET: tl.constexpr,
    WITH_LOGIT_SUM: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    K: tl.constexpr,
    BLOCK: tl.constexpr,
):
    TARGET_WORD: tl.constexpr = 2
    LOGIT_SUM_WORD: tl.constexpr = 2 + HAS_TARGET
    ENTROPY_WORD: tl.constexpr = 2 + HAS_TARGET + WITH_LOGIT_SUM
    row = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    start = split * chunk
    stop = tl.minimum(start + chunk, width)
    base = x_ptr + row.to(tl.int64) * row_stride
    m = tl.full((), float("-inf"), tl.float32)  # the running max ...
    s = tl.full((), 0.0, tl.float32)  # ... and every sum, relative to shift(m)
    logit_sum = tl.full((), 0.0, tl.float32)
    weighted = tl.full((), 0.0, tl.float32)
    for first in range(start, stop, BLOCK):
        # every split starts at a multiple of SPLIT_ALIGN (split_plan), and so does every tile
        cols = tl.multiple_of(first, _SPLIT_ALIGN) + tl.arange(0, BLOCK)
        live = cols < stop
        x = tl.load(base + cols, mask=live, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(tl.where(x != x, float("-inf"), x), axis=0))
        old, new = _shift(m), _shift(m_new)
        moved = old - new
        d = x - new  # -inf on masked columns; NaN where x is NaN, which then reaches s
        e = tl.exp(d)
        if WITH_LOGIT_SUM:
            # sum (x - new) = sum (x - old) + seen * (old - new), over the columns seen so far
            logit_sum = logit_sum + (first - start).to(tl.float32) * moved + tl.sum(tl.where(live, d, 0.0), axis=0)
        if WITH_ENTROPY:
            # sum e' (x - new) with e' = e exp(moved): exp(moved) (sum e (x - old) + moved sum e)
            kept = tl.where(s == 0, 0.0, tl.exp(moved) * (weighted + moved * s))
            weighted = kept + tl.sum(tl.where(e == 0, 0.0, e * d), axis=0)
        # a sum of nothing stays exactly 0 even where exp(moved) overflows
        s = tl.where(s == 0, 0.0, s * tl.exp(moved)) + tl.sum(e, axis=0)
        m = m_new
    m = tl.where(s != s, float("nan"), m)  # a NaN in the row: NaN max, as torch.amax
    out = partials_ptr + (row.to(tl.int64) * splits + split) * K
    tl.store(out, m)
    tl.store(out + 1, s)
    if HAS_TARGET:
        local = tl.load(target_ptr + row).to(tl.int64) - offset
        owned = (local >= start) & (local < stop)
        picked = tl.load(base + tl.where(owned, local, 0), mask=owned, other=0.0).to(tl.float32)
        tl.store(out + TARGET_WORD, tl.where(owned, picked, 0.0))
    if WITH_LOGIT_SUM:
        tl.store(out + LOGIT_SUM_WORD, logit_sum)
    if WITH_ENTROPY:
        tl.store(out + ENTROPY_WORD, weighted)


@triton.jit
def merge_kernel(
    gathered_ptr,  # [rows, W * splits * K] float32, rank-major: virtual rank v = r * splits + split
    shift_ptr,  # five [rows] float32 results
    log_sum_ptr,
    target_logit_ptr,
    logit_sum_ptr,
    entropy_ptr,
    rows,
    splits,
    chunk,
    W: tl.constexpr,
    WIDTHS: tl.constexpr,  # every rank's valid width (read only WITH_LOGIT_SUM)
    HAS_TARGET: tl.constexpr,
    WITH_LOGIT_SUM: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    K: tl.constexpr,
    LANES: tl.constexpr,  # >= W * splits, a power of two
    BLOCK_T: tl.constexpr,
):
    TARGET_WORD: tl.constexpr = 2
    LOGIT_SUM_WORD: tl.constexpr = 2 + HAS_TARGET
    ENTROPY_WORD: tl.constexpr = 2 + HAS_TARGET + WITH_LOGIT_SUM
    r = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_live = r < rows
    v = tl.arange(0, LANES)
    parts = W * splits
    live = row_live[:, None] & (v < parts)[None, :]
    at = gathered_ptr + r.to(tl.int64)[:, None] * (parts * K) + (v * K)[None, :]
    m = tl.load(at, mask=live, other=float("-inf"))
    s = tl.load(at + 1, mask=live, other=0.0)
    nan = m != m
    top = tl.max(tl.where(nan, float("-inf"), m), axis=1)
    shift = _shift(tl.where(tl.max(nan.to(tl.int32), axis=1) > 0, float("nan"), top))  # NaN propagates
    rank_shift = _shift(m)  # what each part shifted its columns by
    moved = rank_shift - shift[:, None]
    scale = tl.exp(moved)
    # a part with nothing (s = 0) adds exactly 0 even where its factor overflows
    total = tl.sum(tl.where(s == 0, 0.0, s * scale), axis=1)
    log_sum = tl.log(total)
    target_logit = tl.zeros([BLOCK_T], tl.float32)
    logit_sum = tl.zeros([BLOCK_T], tl.float32)
    entropy = tl.zeros([BLOCK_T], tl.float32)
    if HAS_TARGET:
        # one part holds the target, the others add 0: exact
        target_logit = tl.sum(tl.load(at + TARGET_WORD, mask=live, other=0.0), axis=1) - shift
    if WITH_LOGIT_SUM:
        rank = v // splits
        width = tl.zeros([LANES], tl.int32)
        for i in tl.static_range(W):
            width = tl.where(rank == i, WIDTHS[i], width)
        width = tl.minimum(tl.maximum(width - (v - rank * splits) * chunk, 0), chunk)
        width = tl.where(v < parts, width, 0)
        part_sum = tl.load(at + LOGIT_SUM_WORD, mask=live, other=0.0)
        logit_sum = tl.sum(tl.where(width[None, :] > 0, part_sum + width.to(tl.float32)[None, :] * moved, 0.0),
                           axis=1)
    if WITH_ENTROPY:
        weighted = scale * (tl.load(at + ENTROPY_WORD, mask=live, other=0.0) + moved * s)
        entropy = log_sum - tl.sum(tl.where(s == 0, 0.0, weighted), axis=1) / total
    tl.store(shift_ptr + r, shift, mask=row_live)
    tl.store(log_sum_ptr + r, log_sum, mask=row_live)
    tl.store(target_logit_ptr + r, target_logit, mask=row_live)
    tl.store(logit_sum_ptr + r, logit_sum, mask=row_live)
    tl.store(entropy_ptr + r, entropy, mask=row_live)


@triton.jit
def local_grad_kernel(
    x_ptr,  # [rows, >= width] logits, rows row_stride apart
    target_ptr,  # [rows] global class indices
    shift_ptr,  # [rows] float32 statistics of the forward
    log_sum_ptr,
    entropy_ptr,
    grad_log_sum_ptr,  # [rows] float32 upstream gradients (read only where WITH_* says so)
    grad_target_logit_ptr,
    grad_logit_sum_ptr,
    grad_entropy_ptr,
    grad_ptr,  # [rows, full_width] in x's dtype, contiguous
    width,  # the valid columns; columns [width, full_width) get 0
    full_width,
    row_stride,
    offset,
    WITH_LOG_SUM: tl.constexpr,
    WITH_TARGET_LOGIT: tl.constexpr,
    WITH_LOGIT_SUM: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    live = cols < width
    x = tl.load(x_ptr + row.to(tl.int64) * row_stride + cols, mask=live, other=0.0).to(tl.float32)
    grad = tl.zeros([BLOCK], tl.float32)
    # the composition's order of terms (local_grad): log_sum, logit_sum, entropy, target
    if WITH_LOG_SUM or WITH_ENTROPY:
        logp = (x - tl.load(shift_ptr + row)) - tl.load(log_sum_ptr + row)  # this slab's share of log_softmax
        p = tl.exp(logp)
        if WITH_LOG_SUM:
            grad = grad + tl.load(grad_log_sum_ptr + row) * p
    if WITH_LOGIT_SUM:
        grad = grad + tl.load(grad_logit_sum_ptr + row)
    if WITH_ENTROPY:
        step = tl.where(p == 0, 0.0, p * (-logp - tl.load(entropy_ptr + row)))  # 0 where x = -inf
        grad = grad + tl.load(grad_entropy_ptr + row) * step
    if WITH_TARGET_LOGIT:
        local = tl.load(target_ptr + row).to(tl.int64) - offset
        grad = grad + tl.where(cols == local, tl.load(grad_target_logit_ptr + row), 0.0)
    grad = tl.where(live, grad, 0.0)
    tl.store(grad_ptr + row.to(tl.int64) * full_width + cols, grad.to(grad_ptr.dtype.element_ty),
             mask=cols < full_width)


#: what ``finish_kernel`` computes from the statistics: a loss per row, their sum or mean, or log-probabilities
NONE, SUM, MEAN, LOGPROBS = 0, 1, 2, 3
REDUCTIONS = {"none": NONE, "sum": SUM, "mean": MEAN}
#: rows per tile of the finish
FINISH_BLOCK = 1024


@triton.jit
def finish_kernel(
    log_sum_ptr,  # [rows] float32 statistics (compile_ops/vocab_parallel_loss.py's merge)
    target_logit_ptr,
    logit_sum_ptr,  # read only with SMOOTH
    target_ptr,  # [rows] class indices
    out_ptr,  # [rows] float32 (NONE, LOGPROBS) or [] (SUM, MEAN)
    count_ptr,  # [] float32: MEAN writes the rows not ignored here (its backward divides by them)
    rows,
    vocab,
    ignore_index,
    kept,  # 1 - label_smoothing
    smoothing,
    MODE: tl.constexpr,
    SMOOTH: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``finish_logprobs`` / ``finish_cross_entropy`` of vocab_parallel_loss.py in one launch: per row
    ``-(log-probability of the target)`` (0 where ignored, NaN for an index outside the vocabulary), with
    label smoothing ``(1 - eps) nll + eps (log_sum - logit_sum / vocab)``.  SUM and MEAN run as one
    program that adds the rows' tiles in order (the same bits at every call); the mean divides by the
    rows not ignored (0 / 0 = NaN, as torch)."""
    total = tl.full((), 0.0, tl.float32)
    counted = tl.full((), 0.0, tl.float32)
    if MODE == 1 or MODE == 2:
        first_tile = 0
        tiles = tl.cdiv(rows, BLOCK)
    else:
        first_tile = tl.program_id(0)
        tiles = first_tile + 1
    for tile in range(first_tile, tiles):
        r = tile * BLOCK + tl.arange(0, BLOCK)
        live = r < rows
        target = tl.load(target_ptr + r, mask=live, other=0).to(tl.int64)
        log_sum = tl.load(log_sum_ptr + r, mask=live, other=0.0)
        logprob = tl.load(target_logit_ptr + r, mask=live, other=0.0) - log_sum
        # NaN for an index outside the vocabulary, and for a row that holds +inf (log_sum = +inf), as torch
        logprob = tl.where((target >= 0) & (target < vocab) & (log_sum != float("inf")), logprob, float("nan"))
        ignored = target == ignore_index
        logprob = tl.where(ignored, 0.0, logprob)
        if MODE == 3:
            tl.store(out_ptr + r, logprob, mask=live)
        else:
            loss = -logprob
            if SMOOTH:
                mean_logit = tl.load(logit_sum_ptr + r, mask=live, other=0.0) / vocab
                loss = kept * loss + smoothing * tl.where(ignored, 0.0, log_sum - mean_logit)
            if MODE == 0:
                tl.store(out_ptr + r, loss, mask=live)
            else:
                total = total + tl.sum(tl.where(live, loss, 0.0), axis=0)
                counted = counted + tl.sum((live & (ignored == 0)).to(tl.float32), axis=0)
    if MODE == 1:
        tl.store(out_ptr, total)
    if MODE == 2:
        tl.store(out_ptr, total / counted)
        tl.store(count_ptr, counted)


@triton.jit
def cross_entropy_grad_kernel(
    x_ptr,  # [rows, width] logits, rows row_stride apart
    target_ptr,  # [rows] global class indices
    shift_ptr,  # [rows] float32 statistics of the forward
    log_sum_ptr,
    grad_loss_ptr,  # the loss's gradient: [rows] (NONE) or [] (SUM, MEAN)
    count_ptr,  # [] float32 rows not ignored (MEAN)
    grad_ptr,  # [rows, width] in x's dtype, contiguous
    width,
    row_stride,
    offset,
    vocab,
    ignore_index,
    kept,  # 1 - label_smoothing
    smoothing,
    MODE: tl.constexpr,  # NONE, SUM or MEAN
    SMOOTH: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The gradient of ``finish_kernel``'s loss with respect to the slab, in one pass: the per-row
    weights that autograd would carry through the composition's pointwise steps (``where`` passes
    nothing to the rows it masks: ignored ones, and indices outside the vocabulary) are computed here,
    then ``local_grad_kernel``'s sum of terms (log_sum, logit_sum, target)."""
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    live = cols < width
    target = tl.load(target_ptr + row).to(tl.int64)
    ignored = target == ignore_index
    counted = (target >= 0) & (target < vocab) & (ignored == 0)
    if MODE == 0:
        weight = tl.load(grad_loss_ptr + row)
    else:
        weight = tl.load(grad_loss_ptr)
    if MODE == 2:
        weight = weight / tl.load(count_ptr)
    if SMOOTH:
        nll = kept * weight
        grad_log_sum = tl.where(counted, nll, 0.0) + tl.where(ignored, 0.0, smoothing * weight)
        grad_target_logit = tl.where(counted, -nll, 0.0)
        grad_logit_sum = tl.where(ignored, 0.0, -(smoothing * weight) / vocab)
    else:
        grad_log_sum = tl.where(counted, weight, 0.0)
        grad_target_logit = tl.where(counted, -weight, 0.0)
    x = tl.load(x_ptr + row.to(tl.int64) * row_stride + cols, mask=live, other=0.0).to(tl.float32)
    p = tl.exp((x - tl.load(shift_ptr + row)) - tl.load(log_sum_ptr + row))
    grad = grad_log_sum * p
    if SMOOTH:
        grad = grad + grad_logit_sum
    grad = grad + tl.where(cols == target - offset, grad_target_logit, 0.0)
    grad = tl.where(live, grad, 0.0)
    tl.store(grad_ptr + row.to(tl.int64) * width + cols, grad.to(grad_ptr.dtype.element_ty), mask=live)


# ---------------------------------------------------------------------------
# Compilation: one explicit signature per variant, shared by the host launcher
# (compile_ops/softmax_kernels.py, target = the current GPU) and the ahead-of-time
# CI tests (target = sm_90).

#: Triton's names of the logits' and the target's dtypes
LOGIT_TYPES = ("bf16", "fp16", "fp32")
TARGET_TYPES = ("i64", "i32")


def _check_types(logits: str, target: str) -> None:
    if logits not in LOGIT_TYPES:
        raise ValueError(f"the softmax kernels read logits of {', '.join(LOGIT_TYPES)}, not {logits!r}")
    if target not in TARGET_TYPES:
        raise ValueError(f"the softmax kernels read targets of {', '.join(TARGET_TYPES)}, not {target!r}")


def local_stats_constexprs(has_target, with_logit_sum, with_entropy, block):
    return {"HAS_TARGET": bool(has_target), "WITH_LOGIT_SUM": bool(with_logit_sum),
            "WITH_ENTROPY": bool(with_entropy), "K": partial_words(has_target, with_logit_sum, with_entropy),
            "BLOCK": int(block)}


def local_stats_source(logits, target, has_target, with_logit_sum, with_entropy, block, aligned):
    """The ``ASTSource`` of one local-pass variant (``logits``/``target``: Triton type names)."""
    _check_types(logits, target)
    types = {"x_ptr": "*" + logits, "target_ptr": "*" + target, "partials_ptr": "*fp32", "width": "i32",
             "row_stride": "i64", "offset": "i64", "chunk": "i32"}
    constexprs = local_stats_constexprs(has_target, with_logit_sum, with_entropy, block)
    return ast_source(local_stats_kernel, types, constexprs,
                   ("x_ptr", "width", "row_stride", "chunk") if aligned else ("chunk",))


def merge_constexprs(widths, has_target, with_logit_sum, with_entropy):
    world_size = len(widths)
    lanes = merge_lanes(world_size)
    return {"W": world_size,
            # the widths select code only for the logit sum: one variant for every band otherwise
            "WIDTHS": tuple(int(w) for w in widths) if with_logit_sum else (0,) * world_size,
            "HAS_TARGET": bool(has_target), "WITH_LOGIT_SUM": bool(with_logit_sum),
            "WITH_ENTROPY": bool(with_entropy), "K": partial_words(has_target, with_logit_sum, with_entropy),
            "LANES": lanes, "BLOCK_T": max(1, MERGE_TILE // lanes)}


def merge_source(widths, has_target, with_logit_sum, with_entropy):
    types = {**{n: "*fp32" for n in ("gathered_ptr", "shift_ptr", "log_sum_ptr", "target_logit_ptr",
                                     "logit_sum_ptr", "entropy_ptr")},
             "rows": "i32", "splits": "i32", "chunk": "i32"}
    return ast_source(merge_kernel, types, merge_constexprs(widths, has_target, with_logit_sum, with_entropy), ())


def finish_constexprs(mode, smooth):
    return {"MODE": int(mode), "SMOOTH": bool(smooth), "BLOCK": FINISH_BLOCK}


def finish_source(target, mode, smooth):
    """The ``ASTSource`` of one finish variant (``mode``: NONE, SUM, MEAN or LOGPROBS)."""
    _check_types("fp32", target)
    types = {**{n: "*fp32" for n in ("log_sum_ptr", "target_logit_ptr", "logit_sum_ptr", "out_ptr", "count_ptr")},
             "target_ptr": "*" + target, "rows": "i32", "vocab": "i64", "ignore_index": "i64", "kept": "fp32",
             "smoothing": "fp32"}
    return ast_source(finish_kernel, types, finish_constexprs(mode, smooth), ())


def cross_entropy_grad_constexprs(mode, smooth, block):
    return {"MODE": int(mode), "SMOOTH": bool(smooth), "BLOCK": int(block)}


def cross_entropy_grad_source(logits, target, mode, smooth, block, aligned):
    """The ``ASTSource`` of one variant of the loss's gradient (``mode``: NONE, SUM or MEAN)."""
    _check_types(logits, target)
    types = {"x_ptr": "*" + logits, "target_ptr": "*" + target, "grad_ptr": "*" + logits,
             **{n: "*fp32" for n in ("shift_ptr", "log_sum_ptr", "grad_loss_ptr", "count_ptr")},
             "width": "i32", "row_stride": "i64", "offset": "i64", "vocab": "i64", "ignore_index": "i64",
             "kept": "fp32", "smoothing": "fp32"}
    return ast_source(cross_entropy_grad_kernel, types, cross_entropy_grad_constexprs(mode, smooth, block),
                   ("x_ptr", "grad_ptr", "width", "row_stride") if aligned else ())


def local_grad_constexprs(with_log_sum, with_target_logit, with_logit_sum, with_entropy, block):
    return {"WITH_LOG_SUM": bool(with_log_sum), "WITH_TARGET_LOGIT": bool(with_target_logit),
            "WITH_LOGIT_SUM": bool(with_logit_sum), "WITH_ENTROPY": bool(with_entropy), "BLOCK": int(block)}


def local_grad_source(logits, target, with_log_sum, with_target_logit, with_logit_sum, with_entropy, block, aligned):
    """The ``ASTSource`` of one gradient variant: the gradient is written in the logits' type."""
    _check_types(logits, target)
    types = {"x_ptr": "*" + logits, "target_ptr": "*" + target, "grad_ptr": "*" + logits,
             **{n: "*fp32" for n in ("shift_ptr", "log_sum_ptr", "entropy_ptr", "grad_log_sum_ptr",
                                     "grad_target_logit_ptr", "grad_logit_sum_ptr", "grad_entropy_ptr")},
             "width": "i32", "full_width": "i64", "row_stride": "i64", "offset": "i64"}
    constexprs = local_grad_constexprs(with_log_sum, with_target_logit, with_logit_sum, with_entropy, block)
    return ast_source(local_grad_kernel, types, constexprs,
                   ("x_ptr", "grad_ptr", "width", "full_width", "row_stride") if aligned else ())


# kernels/lm_head_reduce.py computes these partials in a GEMM's epilogue with the same shift
logsumexp_shift = _shift
