"""Run the fused LM head + local reduction (kernels/lm_head_reduce.py) in Triton's interpreter, W ranks emulated.

Each rank holds a band of rows of one full weight ``[V, H]`` and the same ``x [T, H]``; its two
launches (compile_ops/lm_head_kernels.py's ``launches``: the same grids, strides, tiles and
constexprs as on a GPU) write its partials, the exchange is their concatenation in rank order, and
the existing merges (vocab_reduce's ``merge_best_kernel``, vocab_softmax's ``merge_kernel``) read them.

The reference is the composition the fused kernel replaces: ``F.linear`` (the logits in x's dtype),
then the local reduction (reduce_hidden's ``_local_best`` and vocab_parallel_loss's
``local_partials``, the ops' CPU paths; and vocab_reduce's local kernel, interpreted, then its merge).

**Exact data, so that the comparison can be bit for bit.**  x and W hold small integers: every
product and every partial sum is an integer below 2**24, exact in fp32 in any order of summation,
so the fused kernel's fp32 accumulator (its K tiles, the interpreter's matmul) and torch's hold
the same sums, and rounding them to x's dtype gives the same logits.  With real data the two
accumulation orders differ in the last fp32 bits, and a logit near a rounding boundary may round to
the neighbouring bf16 value: there the GPU tests compare values within one ulp and indices where the
maximum is distinct (tests/gpu/test_lm_head_reduce_gpu.py).  Compared exactly: argmax words (value
bits and global index; where both are NaN, NaN-ness and index, because a NaN's payload is made by the
multiply-add, not by the reduction), softmax ``m`` and the target's logit (by value: the sign of a
zero sum is the accumulator's, +0.0 in the kernel); ``s`` within fp32 rounding (relative 1e-6 per
row), since the kernel sums ``exp`` by tiles where the reference sums the row, and the merged
``log_sum = log S`` to the same relative error of S: an absolute 1e-6 (+ log's rounding), the
benchmark's ``log_sum_error`` (not relative to log_sum, which is near 0 where S is near 1).

Adversarial rows (hidden dimensions 0-5 are reserved for them; the random rows use the others):
equal maxima in different tiles and ranks; two logits that differ in fp32 (256 and 257) and tie
once rounded to bf16, so the first one must win (the unrounded argmax would pick the second: a
control checks that it does); a row of -inf logits; +inf, -inf and NaN (inf * 0) in one row; NaN in
x (every logit NaN); all equal; large logits; targets on rank boundaries, at a NaN, at -inf, and
outside the vocabulary.  Integer rows tie often, so the first-index rule is exercised everywhere.

Two limits of the interpreter are bridged here, not in the kernels: Triton 3.9's interpreter
multiplies bf16 operands' raw bits in ``tl.dot`` (numpy has no bf16), so they are widened to fp32
first (what the GPU's MMA does: exact products, fp32 sums); and it truncates fp32 -> bf16 where the
GPU rounds to nearest even (``cvt.rn.bf16.f32``), so that cast goes through torch's rounding.

Prints one JSON line (tests/test_lm_head_reduce.py runs it in a subprocess: the interpreter is chosen
when Triton is imported).  ``--control``: the negative controls only (each check must fail).
``--host``: the host path's shapes (leading dimensions, T = 0, an empty slab, strided x).
"""

import importlib.util
import math
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

from interpreter_support import print_report  # noqa: E402
from tpfuse.compile_ops import lm_head_kernels as lmk  # noqa: E402
from tpfuse.compile_ops import reduce_hidden as rh  # noqa: E402
from tpfuse.compile_ops import softmax_kernels as sk  # noqa: E402
from tpfuse.compile_ops import vocab_parallel_loss as vpl  # noqa: E402
from tpfuse.kernels import lm_head_reduce as kernels  # noqa: E402
from tpfuse.kernels import vocab_reduce as vr  # noqa: E402

_spec = importlib.util.spec_from_file_location(
    "bench_lm_head_fusion", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                                         "bench_lm_head_fusion.py"))
bench = importlib.util.module_from_spec(_spec)  # its log_sum_error: one agreement rule for the tests and the bench
_spec.loader.exec_module(bench)

NAN, INF = float("nan"), float("inf")
INT_OF = {2: torch.int16, 4: torch.int32}
RESERVED = 6  # hidden dimensions 0..5 carry the adversarial rows


# --------------------------------------------------------------------------- the interpreter's two limits


def _bridge_interpreter():
    builder = interpreter.InterpreterBuilder
    handle = interpreter.TensorHandle
    dot, cast = builder.create_dot, builder.cast_impl

    def widen(h):
        if h.dtype.scalar != tl.bfloat16:
            return h
        return handle((np.asarray(h.data).astype(np.uint32) << 16).view(np.float32), tl.float32)

    def create_dot(self, a, b, d, *rest):
        return dot(self, widen(a), widen(b), d, *rest)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            data = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32)).to(torch.bfloat16)
            return handle(data.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)
        return cast(self, src, dst_type)

    builder.create_dot, builder.cast_impl = create_dot, cast_impl


_bridge_interpreter()


# --------------------------------------------------------------------------- data


def problem(T, V, H, dtype, seed):
    """``(x [T, H], weight [V, H], target [T])``: integers, then the adversarial rows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(T, H)
    x[:, RESERVED:] = torch.randint(-2, 3, (T, H - RESERVED), generator=g).float()
    w = torch.zeros(V, H)
    w[:, RESERVED:] = torch.randint(-2, 3, (V, H - RESERVED), generator=g).float()
    w[:, 0] = torch.randint(-5, 5, (V,), generator=g).float()  # tie row: the value 5 only where set below
    w[[3, V // 2, V - 1], 0] = 5.0
    w[:, 1] = torch.randint(-100, 101, (V,), generator=g).float()  # rounding row: 256 (early) and 257 (late)
    w[[2, V - 2], 1] = 256.0
    w[V - 2, 2] = 1.0
    w[:, 3] = 1.0  # for the -inf and all-equal rows
    w[:, 4] = torch.tensor([1.0, -1.0, 1.0])[torch.arange(V) % 3]  # +inf and -inf ...
    w[[V // 3, V - 3], 4] = 0.0  # ... and NaN (inf * 0), first at V // 3
    rows = [
        lambda r: r.zero_().__setitem__(0, 1.0),  # equal maxima in several tiles and ranks
        lambda r: (r.zero_(), r.__setitem__(1, 1.0), r.__setitem__(2, 1.0)),  # 256 and 257 -> one bf16 value
        lambda r: r.zero_().__setitem__(3, -INF),  # every logit -inf
        lambda r: r.zero_().__setitem__(4, INF),  # +inf, -inf, NaN
        lambda r: r.__setitem__(5, NAN),  # NaN in x: every logit NaN
        lambda r: r.zero_().__setitem__(3, 1.0),  # all equal
        # large logits (3 * w[:, 1] + the random part, up to ~400: bf16 rounds them to even, not down)
        lambda r: (r[:RESERVED].zero_(), r.__setitem__(1, 3.0)),
    ]
    for i, make in enumerate(rows[:T]):
        make(x[i])
    target = torch.randint(0, V, (T,), generator=g)
    special = [V // 2, V - 2, 0, V // 3, 5, V - 1, -100]  # boundaries, a NaN, -inf, outside the vocabulary
    for i, t in enumerate(special[:T]):
        target[i] = t
    return x.to(dtype), w.to(dtype), target


def bands(widths):
    return [sum(widths[:r]) for r in range(len(widths))]


def bits_of(t):
    return t.contiguous().view(INT_OF[t.element_size()])


def is_nan_bits(bits, dtype):
    size, inf = vr.FLOAT_FACTS[str(dtype).removeprefix("torch.")]
    return (bits & ((1 << (8 * size - 1)) - 1)) > inf


# --------------------------------------------------------------------------- running the launches


def interpret(launch, combine_block=None, tiles_reversed=False, tiles_dropped=False):
    if launch is None:
        return
    args, consts = list(launch.args), dict(launch.constexprs)
    if launch.kind != "tiles":
        if combine_block:
            consts["BLOCK"] = combine_block
        if tiles_reversed:  # the negative control: the tiles' partials in reverse column order
            args[0] = args[0].flip(1).contiguous()
        if tiles_dropped:  # the negative control: the last tile's partials left out
            args[2] = args[2] - 1
    launch.kernel[launch.grid[:1]](*args, **consts)


def fused(x, weight, offset, mode, target, plan, **control):
    steps, partials = lmk.launches(x, weight, offset, mode, target, plan)
    interpret(steps[0])
    interpret(steps[1], **control)
    return partials


def composition_logits(x, weight):
    logits = F.linear(x, weight)
    exact = (x.float() @ weight.float().T).to(x.dtype)
    return logits, same_values(logits.float(), exact.float())


def merged_best(partials, dtype):
    """vocab_reduce's merge kernel over every rank's partials (rank order): (value bits, indices)."""
    gathered = torch.cat(partials, -1).contiguous()
    T = gathered.shape[0]
    values = torch.full((T,), 0x7A7A, dtype=INT_OF[torch.empty((), dtype=dtype).element_size()])
    indices = torch.full((T,), -7, dtype=torch.int64)
    consts = vr.constexprs(str(dtype).removeprefix("torch."), True, None, 4)
    vr.merge_best_kernel[(T,)](gathered.view(torch.int64), values, indices, gathered.shape[-1] // 2, **consts)
    return values, indices


def local_kernel_partials(logits, offset):
    """vocab_reduce's local kernel on the composition's logits (small tiles: several chunks per row)."""
    name = str(logits.dtype).removeprefix("torch.")
    T, width = logits.shape
    chunks, tiles_per_chunk = vr.chunk_plan(T, width, logits.element_size(), 1, block=8)
    part = torch.full((T, 2 * chunks), 0x7A7A7A7A, dtype=torch.int32)
    vr.local_best_kernel[(T, chunks)](bits_of(logits), part.view(torch.int64), logits.stride(0) if T > 1 else 0,
                                      width, offset, tiles_per_chunk, **vr.constexprs(name, True, None, 8))
    return part


def same_best(bits_a, index_a, bits_b, index_b, dtype):
    """Same index, and the same bits or both NaN."""
    nan_a, nan_b = is_nan_bits(bits_a, dtype), is_nan_bits(bits_b, dtype)
    return bool(torch.equal(index_a, index_b) and torch.equal(nan_a, nan_b)
                and torch.equal(torch.where(nan_a, 0, bits_a), torch.where(nan_b, 0, bits_b)))


def same_values(a, b):
    """Equal values (-0.0 == 0.0), NaN where the other is NaN."""
    return bool(torch.equal(a.isnan(), b.isnan()) and torch.equal(torch.nan_to_num(a, 0.0), torch.nan_to_num(b, 0.0))
                and torch.equal(a.isinf(), b.isinf()))


def relative_error(a, b):
    """The largest ``|a - b| / |b|`` over rows (a sum of exps: 0 only where the row is empty, and then
    ``a`` must be 0 too); inf where the rows' NaN or infinities differ."""
    finite = a.isfinite() & b.isfinite()
    if not torch.equal(a.isfinite(), b.isfinite()) or not same_values(a[~finite], b[~finite]):
        return math.inf
    a, b = a[finite].double(), b[finite].double()
    if not torch.equal(a == 0, b == 0):
        return math.inf
    if not (b != 0).any():
        return 0.0
    return float(((a - b).abs() / b.abs())[b != 0].max())


def rows_off_relative(a, b, bound):
    """Rows where ``|a - b| > bound |b|`` (finite rows): the check the benchmark first had for log_sum."""
    finite = a.isfinite() & b.isfinite()
    return int(((a - b).abs() > bound * b.abs())[finite].sum())


# --------------------------------------------------------------------------- one case


def argmax_case(x, weight, widths, plan, combine_block=None, **control):
    offsets = bands(widths)
    parts, words_ok, exact = [], True, True
    comp_parts, kernel_parts = [], []
    for offset, width in zip(offsets, widths):
        slab = weight[offset:offset + width]
        part = fused(x, slab, offset, kernels.ARGMAX, None, plan, combine_block=combine_block, **control)
        logits, is_exact = composition_logits(x, slab)
        exact &= is_exact
        values, indices = rh._local_best(logits, offset, True)
        comp_bits = rh._value_bits(values)[:, 0]
        words_ok &= same_best(part[:, 0], part[:, 1].long(), comp_bits, indices[:, 0], x.dtype)
        parts.append(part)
        comp_parts.append(logits)
        kernel_parts.append(local_kernel_partials(logits, offset) if width else None)
    full = torch.cat(comp_parts, -1)
    bits, indices = merged_best(parts, x.dtype)
    want = torch.max(full, -1)
    as_torch = same_best(bits.to(torch.int32), indices, rh._value_bits(want.values), want.indices, x.dtype)
    # the composition as the benchmark runs it: linear, then tpfuse's local kernel, then the same merge
    comp_bits, comp_indices = merged_best([p for p in kernel_parts if p is not None], x.dtype)
    as_local_kernel = same_best(bits.to(torch.int32), indices, comp_bits.to(torch.int32), comp_indices, x.dtype)
    # the rounding row's unrounded argmax picks the later 257: the rounding matters in this data
    sums = x.float() @ weight.float().T
    unrounded = sums.argmax(-1)
    # and rounding to nearest even is not truncation on some logit (the interpreter's own cast truncates)
    truncated = (sums.view(torch.int32) & -65536).view(torch.float32)
    to_even = x.dtype == torch.bfloat16 and bool((sums.isfinite() & (truncated != sums.to(x.dtype).float())).any())
    return {"partials_as_composition": words_ok, "merged_as_torch": as_torch, "merged_as_local_kernel": as_local_kernel,
            "composition_exact": exact, "rounding_decides": bool(x.shape[0] > 1 and unrounded[1] != indices[1]),
            "rounds_to_even": to_even}


def softmax_case(x, weight, widths, target, plan, combine_block=None, **control):
    offsets = bands(widths)
    parts, comp_parts = [], []
    m_ok = t_ok = True
    s_error = 0.0
    for offset, width in zip(offsets, widths):
        slab = weight[offset:offset + width]
        part = fused(x, slab, offset, kernels.SOFTMAX, target, plan, combine_block=combine_block, **control)
        logits, _ = composition_logits(x, slab)
        want = vpl.local_partials(logits, target, offset, False, False)
        m_ok &= same_values(part[:, 0], want[:, 0])
        t_ok &= same_values(part[:, 2], want[:, 2])
        s_error = max(s_error, relative_error(part[:, 1], want[:, 1]))
        parts.append(part)
        comp_parts.append(want)
    launch, stats = sk.merge_launch(torch.cat(parts, -1), widths, 1, max(widths), True, False, False)
    launch.kernel[launch.grid[:1]](*launch.args, **launch.constexprs)
    ref = vpl.merge_partials(torch.cat(comp_parts, -1), widths, True, False, False)
    return {"m_exact": m_ok, "target_exact": t_ok, "s_rel_error": s_error,
            "shift_exact": same_values(stats[0], ref[0]), "log_sum_error": bench.log_sum_error(stats[1], ref[1]),
            "log_sum_rows_off_relative": rows_off_relative(stats[1], ref[1], bench.SUM_TOLERANCE),
            "target_logit_exact": same_values(stats[2], ref[2])}


def small_plan(swap_ab, block_k=16, block_m=16, block_n=16):
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "SWAP_AB": swap_ab, "num_warps": 4,
            "num_stages": 2}


#: (T, widths, H, dtype, plan, combine block): uneven bands, one rank, several tiles per row and per
#: column of tiles, M tiles (T > 16), K tiles with a masked tail (H = 56, BLOCK_K 16 or 32), the
#: production plan, several combine steps per row
CASES = [
    (7, [40, 57, 31, 64], 48, torch.bfloat16, small_plan(True), None),
    (7, [40, 57, 31, 64], 56, torch.bfloat16, small_plan(False, block_k=32), 4),
    (20, [64, 64], 48, torch.bfloat16, small_plan(False), None),
    (20, [50, 78], 48, torch.bfloat16, small_plan(True, block_m=32, block_n=32), 2),
    (1, [96, 100], 48, torch.bfloat16, small_plan(True), 4),
    (7, [37, 91], 56, torch.float16, small_plan(True, block_k=32), None),
    (7, [130], 48, torch.float16, small_plan(False, block_n=32), 2),
    (7, [97, 33], 48, torch.bfloat16, None, None),  # tile_plan's: one 128-column tile, EVEN_K off
    # tile_plan's prefill plan (64 x 128 x 64, two M tiles, the second column tile 72 wide), the one the
    # first H200 run used at T = 128; logits spread over hundreds of units, so that many rows have a
    # sum of exps near 1 (log_sum near 0), where the benchmark's first check (relative to log_sum) failed
    (128, [200], 1024, torch.bfloat16, None, None),
]


def cases():
    results = []
    for seed, (T, widths, H, dtype, plan, combine_block) in enumerate(CASES):
        x, weight, target = problem(T, sum(widths), H, dtype, seed)
        tiles = plan or kernels.tile_plan(T, max(widths))
        info = {"T": T, "widths": widths, "H": H, "dtype": str(dtype), "swap_ab": tiles["SWAP_AB"],
                "n_tiles": kernels.cdiv(max(widths), tiles["BLOCK_N"]), "m_tiles": kernels.cdiv(T, tiles["BLOCK_M"]),
                "even_k": H % tiles["BLOCK_K"] == 0, "combine_block": combine_block}
        results.append({**info, **argmax_case(x, weight, widths, plan, combine_block),
                        **softmax_case(x, weight, widths, target, plan, combine_block)})
    return results


def control():
    """Each check fed a wrong combine must fail: tiles in reverse order (ties go to the later tile),
    a tile left out (its maximum, its sum and its target go missing)."""
    x, weight, target = problem(7, 192, 48, torch.bfloat16, 3)
    plan = small_plan(True)
    reversed_ = argmax_case(x, weight, [96, 96], plan, tiles_reversed=True)
    dropped = softmax_case(x, weight, [96, 96], target, plan, tiles_dropped=True)
    return {"reversed_tiles": reversed_, "dropped_tile": dropped}


def host():
    """The host path: leading dimensions, T = 0, an empty slab (neutral partials), x strided along rows."""
    results = []
    for lead, widths, strided in [((2, 3), [40, 24], False), ((), [33, 31], False), ((0,), [16, 16], False),
                                  ((2, 0), [16, 16], False), ((5,), [0, 48], False), ((4,), [30, 34], True)]:
        T = math.prod(lead)
        x, weight, target = problem(max(T, 1), sum(widths), 48, torch.bfloat16, 9)
        if strided:  # rows 64 elements apart
            x = torch.cat([x, torch.zeros(x.shape[0], 16, dtype=x.dtype)], -1)[:, :48]
        x, target = x[:T].reshape(*lead, 48), target[:T].reshape(lead)
        best, stats = [], []
        for offset, width in zip(bands(widths), widths):
            slab = weight[offset:offset + width]
            best.append(fused(x, slab, offset, kernels.ARGMAX, None, None))
            stats.append(fused(x, slab, offset, kernels.SOFTMAX, target, None))
        logits = F.linear(x, weight)
        want_best = [torch.cat([rh._value_bits(v), i.to(torch.int32)], -1)
                     for v, i in (rh._local_best(logits[..., o:o + w], o, True) for o, w in zip(bands(widths), widths))]
        want_stats = [vpl.local_partials(logits[..., o:o + w], target, o, False, False)
                      for o, w in zip(bands(widths), widths)]
        results.append({
            "lead": list(lead), "widths": widths,
            "shapes": all(p.shape == (*lead, 2) for p in best) and all(p.shape == (*lead, 3) for p in stats),
            "argmax_as_composition": all(same_best(a[..., 0], a[..., 1].long(), b[..., 0], b[..., 1].long(), x.dtype)
                                         for a, b in zip(best, want_best)),
            "softmax_close": all(same_values(a[..., 0], b[..., 0]) and same_values(a[..., 2], b[..., 2])
                                 and relative_error(a[..., 1], b[..., 1]) <= 1e-6 for a, b in zip(stats, want_stats)),
        })
    return results


if __name__ == "__main__":
    print_report(sys.argv, cases=cases, control=control, host=host)
