"""The sum family's CUDA kernels on the CPU: the split plan's facts, the kernels in Triton's interpreter
against the torch composition (compile_ops/vocab_parallel_loss.py) within the published bound, with a
negative control, and the host side of the CUDA path reading no value on the host.

The kernels themselves: kernels/vocab_softmax.py; their launches: compile_ops/softmax_kernels.py; their
ahead-of-time compile for sm_90: tests/test_kernels_aot.py; on a GPU: tests/gpu/test_vocab_softmax_gpu.py.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tpfuse.compile_ops import softmax_kernels
from tpfuse.kernels import vocab_softmax

import interpreter_support

#: docs/passes.md, "Gather elimination: the sum family's error" (benchmarks/results/sum_family_error.md):
#: max |ours - ref| / max |ref| against the gathered float32 computation.  The max and the target's logit
#: are exact (comparisons and one nonzero part per row), log_sum carries logsumexp's bound, logit_sum the
#: smoothed loss's, entropy its own.
BOUND = {"shift": 0.0, "log_sum": 1e-6, "target_logit": 0.0, "logit_sum": 1e-5, "entropy": 1e-4}
GRAD_BOUND = 1e-5
LOW_PRECISION_ULPS = 1


# --------------------------------------------------------------------------- the split plan


@pytest.mark.parametrize("widest", [1, 15, 16, 100, 2048, 2049, 8000, 16032, 32064, 38016, 152064])
@pytest.mark.parametrize("tokens", [0, 1, 2, 7, 16, 17, 100, 263, 264, 4096])
def test_split_plan_covers_the_widest_band_with_aligned_non_empty_splits(tokens, widest):
    splits, chunk = vocab_softmax.split_plan(tokens, widest)
    assert 1 <= splits <= vocab_softmax.MAX_SPLITS
    assert chunk % vocab_softmax.SPLIT_ALIGN == 0
    assert (splits - 1) * chunk < widest <= splits * chunk  # every split of the widest band holds columns
    assert splits == 1 or 2 * chunk > vocab_softmax.SPLIT_COLUMNS  # no split much narrower than a tile
    if tokens >= vocab_softmax.TARGET_PROGRAMS:
        assert splits == 1  # enough rows: a row per program


def test_split_plan_spreads_few_rows_of_a_wide_band():
    # one row of an LM head's quarter of 128256 columns: 16 programs of ~2000 columns, not one of 32064
    assert vocab_softmax.split_plan(1, 32064) == (16, 2016)
    assert vocab_softmax.split_plan(8, 32064)[0] == 16
    assert vocab_softmax.split_plan(128, 32064)[0] == 3
    assert vocab_softmax.split_plan(4096, 32064) == (1, 32064)


def test_words_per_rank_depend_on_T_and_the_widest_band_only():
    """Every rank sends (and merges) the same number of words, whatever its own width, 0 included."""
    splits, chunk = vocab_softmax.split_plan(7, 32064)
    target = torch.zeros(7, dtype=torch.int64)
    words = {softmax_kernels.local_launch(torch.randn(7, w), target, 0, True, False, splits, chunk)[1].shape[-1]
             for w in (32064, 31990, 0)}
    assert words == {splits * vocab_softmax.partial_words(True, True, False)}

# --------------------------------------------------------------------------- the interpreter


@pytest.fixture(scope="module")
def interpreted():
    pytest.importorskip("triton")
    return interpreter_support.interpret("interpret_vocab_softmax.py")


def test_kernels_agree_with_the_composition_within_the_published_bound(interpreted):
    for case in interpreted["cases"]:
        for stat, (error, specials) in case["stats"].items():
            assert specials, (case["name"], stat, "NaN or infinities where the composition has none, or the reverse")
            assert error <= BOUND[stat], (case["name"], stat, error)
        assert case["grad_specials"], case["name"]
        assert case["grad_ulps"] <= LOW_PRECISION_ULPS, case["name"]
        if "fp32" in case["name"]:
            assert case["grad_error"] <= GRAD_BOUND, case["name"]


def test_the_cases_reach_split_rows_and_both_alignments(interpreted):
    cases = interpreted["cases"]
    assert any(c["splits"] > 1 for c in cases) and any(c["splits"] == 1 for c in cases)
    assert {a for c in cases for a in c["aligned"]} == {False, True}


def test_negative_control_a_merge_that_misses_a_split_is_caught(interpreted):
    """The merge told one split fewer than the ranks sent reads the wrong words: far outside the bound."""
    controls = [c["control_log_sum_error"] for c in interpreted["cases"] if "control_log_sum_error" in c]
    assert controls and all(e > 100 * BOUND["log_sum"] for e in controls), controls


def test_leading_dims_are_flattened_and_given_back(interpreted):
    result = interpreted["three_dimensional"]
    assert result["shapes"] == [[2, 3]] * 5
    assert all(e <= 1e-6 for e in result["errors"]), result


def test_the_finish_is_the_compositions_in_one_launch(interpreted):
    """The loss (none, sum, mean; label smoothing) and log-probabilities from the statistics: the per-row
    values exactly, the sums within float32 reordering, NaN and ignored rows where the composition has them."""
    finishes = interpreted["finishes"]
    assert {r["mode"] for r in finishes} == {"none", "sum", "mean", "logprobs"}
    for r in finishes:
        error, specials = r["error"]
        assert r["shape"] and specials, r
        assert error <= (0.0 if r["mode"] in ("none", "logprobs") else 1e-6), r


def test_the_eager_cross_entropy_backward_kernel_matches_autograd_through_the_composition(interpreted):
    """One kernel computes the loss's per-row weights and the slab's gradient: as autograd through
    finish_cross_entropy and local_grad, for none/sum/mean, label smoothing, ignored rows, an index outside
    the vocabulary and a mean over no row; the mean's gradient taken as the sum's is caught (control)."""
    grads = interpreted["cross_entropy_grads"]
    assert {(r["reduction"], r["smoothing"]) for r in grads} == {(m, e) for m in ("none", "sum", "mean")
                                                                 for e in (0.0, 0.1)}
    for r in grads:
        assert r["specials"] and r["ulps"] <= LOW_PRECISION_ULPS, r
        if "float32" in r["dtype"]:
            assert r["error"] <= GRAD_BOUND, r
    controls = [r["control_error"] for r in grads if "control_error" in r]
    assert controls and all(e > 100 * GRAD_BOUND for e in controls), controls


def test_the_stats_through_a_real_exchange(interpreted):
    """softmax_stats whole on a one-rank gloo group: split partials gathered and merged."""
    results = interpreted["through_the_exchange"]
    assert {r["splits"] > 1 for r in results} == {True, False}
    for r in results:
        assert all(e <= b for e, b in zip(r["errors"], BOUND.values())), r


# --------------------------------------------------------------------------- no value read on the host


#: aten ops that read a tensor's values on the host: on CUDA each waits for the GPU (and breaks capture)
_READS_VALUES = {"_local_scalar_dense", "nonzero", "is_nonzero", "equal", "item", "masked_select", "unique"}


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func._schema.name.removeprefix("aten::"))
        return func(*args, **(kwargs or {}))


def _host_ops(fn):
    with _Ops() as ops:
        fn()
    return ops.names


def test_the_cuda_paths_host_work_reads_no_value_and_is_a_few_allocations():
    """The launches' host side (shapes, strides, outputs) on CPU stand-ins: allocations and views only."""
    x = torch.randn(6, 4000)
    target = torch.randint(0, 4000, (6,))
    splits, chunk = vocab_softmax.split_plan(6, 4000)
    local = _host_ops(lambda: softmax_kernels.local_launch(x, target, 0, True, True, splits, chunk))
    gathered = torch.randn(6, 2 * splits * 5)
    merge = _host_ops(lambda: softmax_kernels.merge_launch(gathered, [4000, 4000], splits, chunk, True, True, True))
    stats = [torch.randn(6) for _ in range(3)]
    upstream = torch.randn(()).expand(6)  # the gradient of a mean: a stride-0 expand, copied once
    target_upstream = torch.randn(6)
    grad = _host_ops(lambda: softmax_kernels.grad_launch(upstream, target_upstream, None, None, x, target, *stats,
                                                        4000, 0))
    for ops in (local, merge, grad):
        assert not set(ops) & _READS_VALUES, ops
    assert local.count("empty") == 1 and merge.count("empty") == 5 and grad.count("empty") == 1
    assert grad.count("clone") == 1  # the expanded gradient made contiguous, nothing else copied
    assert len(local) + len(merge) + len(grad) <= 20, (local, merge, grad)


def test_the_host_check_would_see_a_value_read():
    """Negative control: the op recorder sees a host read (``.item()``) for what it is."""
    assert set(_host_ops(lambda: torch.randn(3).sum().item())) & _READS_VALUES


def test_the_ahead_of_time_variants_are_the_ones_the_host_launches():
    """tests/test_kernels_aot.py compiles for sm_90 the variants the cross-entropy on an LM head's quarter
    (bf16, 32064 columns) launches at T=1 and T=4096, with the host's warps."""
    import aot_kernels_report as aot

    compiled = {(kind, variant, warps) for _, kind, variant, warps in aot.SOFTMAX_CONFIGS}
    target = torch.zeros(4096, dtype=torch.int64)
    for T in (1, 4096):
        x = torch.empty(T, 32064, dtype=torch.bfloat16)
        local, _ = softmax_kernels.local_launch(x, target[:T], 0, False, False, *vocab_softmax.split_plan(T, 32064))
        stats = [torch.zeros(T) for _ in range(3)]
        grad, _ = softmax_kernels.grad_launch(stats[0], stats[0], None, None, x, target[:T], *stats, 32064, 0)
        for launch in (local, grad):
            assert (launch.kind, launch.variant, launch.num_warps) in compiled, (T, launch.variant)


def test_the_eager_cross_entropy_launches_are_compiled_ahead_of_time():
    """The bench's cross-entropy forward + backward (mean, bf16 band of 32064 or fp32 after .float())."""
    import aot_kernels_report as aot

    compiled = {(kind, variant, warps) for _, kind, variant, warps in aot.SOFTMAX_CONFIGS}
    target = torch.zeros(8, dtype=torch.int64)
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.empty(8, 32064, dtype=dtype)
        stats = [torch.zeros(8) for _ in range(2)]
        launch, _ = softmax_kernels.cross_entropy_grad_launch(torch.ones(()), x, target, *stats, torch.ones(()), 0,
                                                              32064, -100, "mean", 0.0)
        assert (launch.kind, launch.variant, launch.num_warps) in compiled, launch.variant
