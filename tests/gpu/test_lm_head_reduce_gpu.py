"""The fused LM head + local reduction on one GPU (kernels/lm_head_reduce.py, compile_ops/lm_head_kernels.py).

Against the composition it replaces: cuBLAS's linear (``F.linear``, logits in x's dtype), then
tpfuse's local kernel (reduce_kernels.local_partials; softmax_kernels.local_launch), both merged by
the existing merges, W ranks simulated by slabs of one weight (an LM head of vocab 128256, hidden
4096, over W = 4; and one unaligned, uneven case).

- **Integer data, bit for bit.**  x and W hold integers of magnitude <= 2 (the adversarial rows use
  reserved hidden dimensions), so every dot product is an integer below 2**24, exact in fp32 in any
  order of summation: cuBLAS's sums and the fused kernel's are the same numbers, rounded alike.
  cuBLAS may otherwise add split-K partials in bf16/fp16, which is not exact:
  ``allow_{bf16,fp16}_reduced_precision_reduction`` are off for these tests.  Argmax: value bits and
  global index equal (where both are NaN, NaN-ness and index: the payload is the multiply-add's);
  softmax: shift and target's logit equal, log_sum within fp32 rounding of the sum of exps S, row by
  row (benchmarks/bench_lm_head_fusion.py's ``log_sum_error``: |difference| / (1 + |log_sum|) <= 1e-6,
  the relative error of S; not relative to log_sum, which is near 0 where S is near 1).
- **Random normal data, within what the accumulation order allows.**  cuBLAS and the fused GEMM add
  in different orders, so a logit may round to the neighbouring bf16 value: each fused logit is within
  one ulp of cuBLAS's.  Argmax: the fused value within one ulp of the composition's maximum, and the
  same index wherever the composition's maximum leads the runner-up by more than two ulps; softmax:
  log_sum within one ulp of the largest logit (logsumexp moves by at most the largest change of an input).
- The wrapper under CUDA-graph capture equals the eager call, and an eager call does not synchronise
  (``torch.cuda.set_sync_debug_mode("error")``, with a control that it catches a host read).

    PYTHONPATH=. python -m pytest -q tests/gpu/test_lm_head_reduce_gpu.py
"""

import importlib.util
import math
import os

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.gpu

_spec = importlib.util.spec_from_file_location(
    "bench_lm_head_fusion", os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                         "benchmarks", "bench_lm_head_fusion.py"))
bench = importlib.util.module_from_spec(_spec)  # its log_sum_error and SUM_TOLERANCE: the bench's own rule
_spec.loader.exec_module(bench)

NAN, INF = float("nan"), float("inf")
INT_OF = {2: torch.int16, 4: torch.int32}
HIDDEN = 4096
RESERVED = 6  # hidden dimensions 0..5 carry the adversarial rows


@pytest.fixture(autouse=True)
def exact_cublas_sums():
    matmul = torch.backends.cuda.matmul
    saved = matmul.allow_bf16_reduced_precision_reduction, matmul.allow_fp16_reduced_precision_reduction
    matmul.allow_bf16_reduced_precision_reduction = matmul.allow_fp16_reduced_precision_reduction = False
    yield
    matmul.allow_bf16_reduced_precision_reduction, matmul.allow_fp16_reduced_precision_reduction = saved


def _bits(t):
    return t.contiguous().view(INT_OF[t.element_size()])


def integer_problem(T, V, H, dtype, seed):
    """``(x [T, H], weight [V, H], target [T])`` of integers, the first rows adversarial: equal maxima in
    several tiles and ranks; 256 and 257, one bf16 value; every logit -inf; +inf, -inf and NaN (inf * 0);
    NaN in x; all equal; large logits that bf16 rounds to even."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.zeros(T, H, device="cuda")
    x[:, RESERVED:] = torch.randint(-2, 3, (T, H - RESERVED), generator=g, device="cuda").float()
    w = torch.zeros(V, H, device="cuda")
    w[:, RESERVED:] = torch.randint(-2, 3, (V, H - RESERVED), generator=g, device="cuda").float()
    w[:, 0] = torch.randint(-5, 5, (V,), generator=g, device="cuda").float()
    w[[3, V // 2, V - 1], 0] = 5.0
    w[:, 1] = torch.randint(-100, 101, (V,), generator=g, device="cuda").float()
    w[[2, V - 2], 1] = 256.0
    w[V - 2, 2] = 1.0
    w[:, 3] = 1.0
    w[:, 4] = torch.tensor([1.0, -1.0, 1.0], device="cuda")[torch.arange(V, device="cuda") % 3]
    w[[V // 3, V - 3], 4] = 0.0
    rows = [{0: 1.0}, {1: 1.0, 2: 1.0}, {3: -INF}, {4: INF}, None, {3: 1.0}]  # the rest of these rows is 0
    for row, entries in enumerate(rows[:T]):
        if entries is not None:
            x[row] = 0.0
            for dim, value in entries.items():
                x[row, dim] = value
    if T > 4:
        x[4, 5] = NAN  # NaN in x: every logit NaN
    if T > 6:
        x[6, 1] = 3.0  # large logits: 3 * w[:, 1] + the random part, up to ~400
    target = torch.randint(0, V, (T,), generator=g, device="cuda")
    for i, t in enumerate([V // 2, V - 2, 0, V // 3, 5, V - 1, -100][:T]):
        target[i] = t
    return x.to(dtype), w.to(dtype), target


def normal_problem(T, V, H, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(T, H, generator=g, device="cuda").to(dtype)
    w = (torch.randn(V, H, generator=g, device="cuda") * H**-0.5 * 4).to(dtype)
    target = torch.randint(0, V, (T,), generator=g, device="cuda")
    return x, w, target


def _offsets(widths):
    return [sum(widths[:r]) for r in range(len(widths))]


def _nan_bits(bits, dtype):
    return (bits & 0x7FFF) > (0x7F80 if dtype == torch.bfloat16 else 0x7C00)


def _same_best(a, b, dtype):
    """(values, indices) pairs: same indices; same bits, or both NaN."""
    (va, ia), (vb, ib) = a, b
    ba, bb = _bits(va), _bits(vb)
    na, nb = _nan_bits(ba, dtype), _nan_bits(bb, dtype)
    return (torch.equal(ia, ib) and torch.equal(na, nb)
            and torch.equal(torch.where(na, 0, ba), torch.where(nb, 0, bb)))


def _argmax_both(x, weight, widths):
    """(fused, composition): each merged by reduce_kernels.merge over the simulated ranks' partials."""
    from tpfuse.compile_ops import lm_head_kernels as lmk
    from tpfuse.compile_ops import reduce_kernels as rk

    fused, composed = [], []
    for offset, width in zip(_offsets(widths), widths):
        slab = weight[offset:offset + width]
        fused.append(lmk.argmax_partials(x, slab, offset))
        composed.append(rk.local_partials(F.linear(x, slab), offset, max(widths), True))
    return rk.merge(torch.cat(fused, -1), x.dtype, True), rk.merge(torch.cat(composed, -1), x.dtype, True)


def _softmax_both(x, weight, widths, target):
    """(fused, composition) statistics (shift, log_sum, target_logit) through softmax_kernels' merge."""
    from tpfuse.compile_ops import lm_head_kernels as lmk
    from tpfuse.compile_ops import softmax_kernels as sk
    from tpfuse.kernels import vocab_softmax

    T = math.prod(x.shape[:-1])
    splits, chunk = vocab_softmax.split_plan(T, max(widths))
    fused, composed = [], []
    for offset, width in zip(_offsets(widths), widths):
        slab = weight[offset:offset + width]
        fused.append(lmk.softmax_partials(x, slab, offset, target))
        launch, partials = sk.local_launch(F.linear(x, slab), target, offset, False, False, splits, chunk)
        sk.run(launch, x.device)
        composed.append(partials)
    out = []
    for parts, n_splits, n_chunk in ((fused, 1, max(widths)), (composed, splits, chunk)):
        launch, stats = sk.merge_launch(torch.cat(parts, -1), widths, n_splits, n_chunk, True, False, False)
        sk.run(launch, x.device)
        out.append(stats[:3])
    return out


def _same_values(a, b):
    return (torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf())
            and torch.equal(torch.nan_to_num(a, 0.0, 0.0, 0.0), torch.nan_to_num(b, 0.0, 0.0, 0.0))
            and torch.equal(torch.where(a.isinf(), a, 0.0), torch.where(b.isinf(), b, 0.0)))


#: (widths, hidden, dtype, T, x unaligned): the LM head at W = 4 over every plan tile_plan picks (T = 1, 17,
#: 32: swapped tiles; 33, 128: 64-row tiles; 1000: 128-row tiles, the last M tile partial; w = 32064 ends
#: in a 64-column tile of 128), fp16, and an uneven, unaligned slab with a hidden size that is not a
#: multiple of BLOCK_K; at W = 2, the shape that stopped the first benchmark (T = 128, w = 64128, every
#: tile whole) and the prefill plan with both tails (T = 100: the second M tile 36 rows; w = 64127: the
#: last column tile 127 wide)
CASES = [([32064] * 4, HIDDEN, torch.bfloat16, T, False) for T in (1, 5, 17, 32, 33, 128, 1000)]
CASES += [([32064] * 4, HIDDEN, torch.float16, 8, False), ([1001, 3003, 999], 4000, torch.bfloat16, 9, True),
          ([38016] * 4, HIDDEN, torch.bfloat16, 1, False),  # vocab 152064 at W = 4: decode's 64-column tiles
          ([64128] * 2, HIDDEN, torch.bfloat16, 128, False), ([64128, 64127], HIDDEN, torch.bfloat16, 100, False)]


def _inputs(problem, widths, hidden, dtype, T, unaligned, seed):
    x, weight, target = problem(T, sum(widths), hidden, dtype, seed)
    if unaligned:  # x's rows 2 bytes off 16-byte alignment, and strided
        wide = torch.zeros(T, hidden + 9, device="cuda", dtype=dtype)
        wide[:, 1:hidden + 1] = x
        x = wide[:, 1:hidden + 1]
    return x, weight, target


@pytest.mark.parametrize("widths, hidden, dtype, T, unaligned", CASES)
def test_argmax_bit_for_bit_on_integer_data(widths, hidden, dtype, T, unaligned):
    x, weight, _ = _inputs(integer_problem, widths, hidden, dtype, T, unaligned, seed=T)
    fused, composed = _argmax_both(x, weight, widths)
    assert _same_best(fused, composed, dtype), (fused[1] != composed[1]).nonzero()[:8]
    logits = F.linear(x, weight)
    assert _same_best(fused, torch.max(logits, -1), dtype)
    if T > 1 and dtype == torch.bfloat16:  # rounding decides row 1: the unrounded argmax is the later 257
        assert (x.float() @ weight.float().T)[1].argmax() != fused[1][1]


@pytest.mark.parametrize("widths, hidden, dtype, T, unaligned", CASES)
def test_softmax_statistics_on_integer_data(widths, hidden, dtype, T, unaligned):
    x, weight, target = _inputs(integer_problem, widths, hidden, dtype, T, unaligned, seed=T + 1)
    (shift, log_sum, target_logit), (want_shift, want_log_sum, want_target) = _softmax_both(x, weight, widths, target)
    assert _same_values(shift, want_shift)
    assert _same_values(target_logit, want_target)
    assert bench.log_sum_error(log_sum, want_log_sum) <= bench.SUM_TOLERANCE


def test_per_rank_partial_is_one_candidate_of_the_composition():
    """One rank: the fused word is [bits, index] of the composition's winner (its merge of one candidate)."""
    from tpfuse.compile_ops import lm_head_kernels as lmk
    from tpfuse.compile_ops import reduce_kernels as rk

    x, weight, _ = integer_problem(8, 32064, HIDDEN, torch.bfloat16, seed=2)
    word = lmk.argmax_partials(x, weight, 96192)
    assert word.shape == (8, 2) and word.dtype == torch.int32
    values, indices = rk.merge(rk.local_partials(F.linear(x, weight), 96192, 32064, True), x.dtype, True)
    nan = _nan_bits(_bits(values).int(), x.dtype)
    assert torch.equal(word[:, 1].long(), indices)
    assert torch.equal(torch.where(nan, 0, word[:, 0]), torch.where(nan, 0, _bits(values).int()))


@pytest.mark.parametrize("T", [1, 32, 128, 1024])
def test_random_data_within_one_ulp_of_cublas(T):
    widths = [32064] * 4
    x, weight, target = normal_problem(T, sum(widths), HIDDEN, torch.bfloat16, seed=T)
    (values, indices), (want_values, want_indices) = _argmax_both(x, weight, widths)
    logits = F.linear(x, weight).float()
    ulp = torch.finfo(torch.bfloat16).eps * want_values.float().abs().clamp_min(1e-30)  # >= the spacing at the max
    assert ((values.float() - want_values.float()).abs() <= ulp).all()
    assert (logits.gather(-1, indices[:, None])[:, 0] >= want_values.float() - ulp).all()
    top2 = logits.topk(2, -1).values
    distinct = (top2[:, 0] - top2[:, 1]) > 2 * ulp
    assert torch.equal(indices[distinct], want_indices[distinct])
    (shift, log_sum, target_logit), (want_shift, want_log_sum, want_target) = _softmax_both(
        x, weight, widths, target)
    bound = torch.finfo(torch.bfloat16).eps * logits.abs().amax(-1) + 1e-5 * want_log_sum.abs()
    assert (((shift + log_sum) - (want_shift + want_log_sum)).abs() <= bound).all()
    print(f"T={T}: indices equal on {int((indices == want_indices).sum())}/{T} rows, "
          f"{int(distinct.sum())} with a distinct maximum")


def test_graph_replay_and_no_synchronisation():
    from tpfuse.compile_ops import lm_head_kernels as lmk

    x, weight, target = integer_problem(8, 32064, HIDDEN, torch.bfloat16, seed=3)

    def step():
        return lmk.argmax_partials(x, weight, 0), lmk.softmax_partials(x, weight, 0, target)

    eager = step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        with pytest.raises(RuntimeError):  # control: the mode does catch a host read
            x.float().sum().item()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured[0], eager[0])
    assert torch.equal(captured[1].nan_to_num(), eager[1].nan_to_num())
    x.copy_(integer_problem(8, 32064, HIDDEN, torch.bfloat16, seed=4)[0])  # the replay reads x anew
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured[0], step()[0]) and not torch.equal(captured[0], eager[0])
