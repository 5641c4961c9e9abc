"""The fused LM head + local reduction on the CPU (kernels/lm_head_reduce.py, compile_ops/lm_head_kernels.py).

In Triton's interpreter (tests/interpret_lm_head_reduce.py: W ranks emulated, the existing merges
reading the fused partials) against the composition it replaces, ``F.linear`` then the local
reduction: argmax partials bit for bit, softmax partials exactly for ``m`` and the target's logit and
within fp32 rounding for the sums, on data whose dot products are exact in any summation order (why:
that script's docstring), with adversarial rows and negative controls.  Then the plan, the partial
formats the merges expect, and the wrapper's validation.  Compiled for sm_90: tests/test_lm_head_aot.py;
on a GPU: tests/gpu/test_lm_head_reduce_gpu.py.
"""

import importlib.util
import os

import pytest
import torch

import interpreter_support
from tpfuse.compile_ops import lm_head_kernels as lmk
from tpfuse.kernels import lm_head_reduce as lm
from tpfuse.kernels import vocab_reduce as vr
from tpfuse.kernels import vocab_softmax as vs

_spec = importlib.util.spec_from_file_location(
    "bench_lm_head_fusion", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                                         "bench_lm_head_fusion.py"))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

#: fp32 rounding of a sum of exp taken by tiles instead of by rows (about 1e-7 measured): the benchmark's bound
SUM_TOLERANCE = bench.SUM_TOLERANCE


def _interpret(*flags):
    return interpreter_support.interpret("interpret_lm_head_reduce.py", *flags)


@pytest.fixture(scope="module")
def interpreted():
    pytest.importorskip("triton")
    return _interpret()["cases"]


def test_argmax_partials_are_the_compositions_bits(interpreted):
    """Each rank's partial equals linear + reduce_hidden's local step; merged, torch.max of the gathered
    logits and linear + vocab_reduce's local kernel + the same merge."""
    wrong = [c for c in interpreted if not (c["composition_exact"] and c["partials_as_composition"]
                                            and c["merged_as_torch"] and c["merged_as_local_kernel"])]
    assert not wrong, wrong


def test_softmax_partials_match_the_composition(interpreted):
    wrong = [c for c in interpreted if not (c["m_exact"] and c["target_exact"] and c["shift_exact"]
                                            and c["s_rel_error"] <= SUM_TOLERANCE
                                            and c["log_sum_error"] <= SUM_TOLERANCE
                                            and c["target_logit_exact"])]
    assert not wrong, wrong


def test_prefill_plan_case_has_sums_near_one_that_a_log_sum_relative_check_rejects(interpreted):
    """The first H200 run stopped at softmax T=128 w=64128 (plan 64x128x64x8x3): its check asked log_sum
    within 1e-6 of itself, row by row.  Where a row's maximum leads by a few units, S = sum exp is near 1
    and log_sum near 0, and one fp32 ulp of S (1.2e-7, from adding the exps in another order) is many
    times 1e-6 of log_sum: a correct result failed.  Here the same plan (T = 128, the last column tile
    partial) gives such rows: that check rejects them, ``log_sum_error`` (relative to S) accepts them."""
    prefill = [c for c in interpreted if c["T"] == 128]
    assert prefill and not prefill[0]["swap_ab"] and prefill[0]["m_tiles"] == 2 and prefill[0]["n_tiles"] == 2
    assert prefill[0]["log_sum_rows_off_relative"] > 0, prefill[0]
    assert 0 < prefill[0]["log_sum_error"] <= SUM_TOLERANCE, prefill[0]


def test_interpreter_cases_cover_the_kernel(interpreted):
    """Both dtypes, both MMA orientations, masked and unmasked K tails, several M tiles, several column
    tiles, a combine of several steps, and data where bf16 rounding decides the argmax and rounds to
    even (not down)."""
    assert {c["dtype"] for c in interpreted} == {"torch.bfloat16", "torch.float16"}
    assert {c["swap_ab"] for c in interpreted} == {True, False}
    assert {c["even_k"] for c in interpreted} == {True, False}
    assert max(c["m_tiles"] for c in interpreted) > 1
    assert any(c["combine_block"] and c["n_tiles"] > c["combine_block"] for c in interpreted)
    assert any(c["rounding_decides"] for c in interpreted) and any(c["rounds_to_even"] for c in interpreted)
    assert any(c["T"] == 1 for c in interpreted) and any(len(c["widths"]) == 4 for c in interpreted)


def test_interpreter_negative_controls():
    """The combine fed the tiles in reverse order (equal maxima go to a later tile) or one tile short
    (its maximum, sum and target go missing): the same checks must fail."""
    pytest.importorskip("triton")
    control = _interpret("--control")["control"]
    reversed_tiles, dropped = control["reversed_tiles"], control["dropped_tile"]
    assert not reversed_tiles["partials_as_composition"] and not reversed_tiles["merged_as_torch"], reversed_tiles
    assert not dropped["m_exact"] and dropped["s_rel_error"] > SUM_TOLERANCE, dropped
    assert dropped["log_sum_error"] > SUM_TOLERANCE, dropped


def test_host_path_shapes_in_the_interpreter():
    """Leading dimensions, T = 0, a rank with an empty slab (neutral partials), rows of x strided."""
    pytest.importorskip("triton")
    host = _interpret("--host")["host"]
    assert host and all(h["shapes"] and h["argmax_as_composition"] and h["softmax_close"] for h in host), host
    assert {tuple(h["lead"]) for h in host} >= {(2, 3), (), (0,), (2, 0)}
    assert any(0 in h["widths"] for h in host)


# --------------------------------------------------------------------------- the plan and the formats


@pytest.mark.parametrize("tokens", [1, 8, 16, 17, 32, 33, 128, 129, 1024, 4096])
@pytest.mark.parametrize("width", [32064, 38016, 64128, 76032])
def test_tile_plan_is_a_valid_plan(tokens, width):
    plan = lm.tile_plan(tokens, width)
    lm.check_plan(plan)
    assert plan["SWAP_AB"] == (tokens <= lm.DECODE_TOKENS)
    assert plan["BLOCK_M"] >= min(tokens, 16)  # decode: one M tile holds every row
    if tokens <= lm.DECODE_TOKENS:
        assert plan["BLOCK_M"] >= tokens


def test_tile_plan_narrows_decode_tiles_only_for_a_short_last_wave():
    """w = 38016 (vocab 152064 over 4): 297 tiles of 128 fill 75 % of three waves, 594 of 64 fill 90 %."""
    assert lm.tile_plan(1, 32064)["BLOCK_N"] == 128  # 251 tiles: 95 %
    assert lm.tile_plan(1, 38016)["BLOCK_N"] == 64
    assert lm.tile_plan(1, 76032)["BLOCK_N"] == 128  # 594 tiles: 90 %
    assert lm.tile_plan(1, 0)["BLOCK_N"] == 128  # an empty slab: no tiles, no division by zero


@pytest.mark.parametrize("plan, wrong", [
    ({"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 128, "SWAP_AB": True, "num_warps": 8}, "missing num_stages"),
    ({"BLOCK_M": 8, "BLOCK_N": 128, "BLOCK_K": 128, "SWAP_AB": True, "num_warps": 8, "num_stages": 3},
     "BLOCK_M must be a power of two from 16 to 65536, not 8"),
    ({"BLOCK_M": 16, "BLOCK_N": 96, "BLOCK_K": 128, "SWAP_AB": True, "num_warps": 8, "num_stages": 3},
     "BLOCK_N must be a power of two"),
    ({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "SWAP_AB": True, "num_warps": 0, "num_stages": 3},
     "num_warps must be a positive integer, not 0"),
])
def test_check_plan_says_what_is_wrong(plan, wrong):
    with pytest.raises(ValueError, match=wrong):
        lm.check_plan(plan)


def test_partials_are_the_formats_the_merges_read():
    """One int64 candidate per row (vocab_reduce's word, neutral = -inf at NEVER), and vocab_softmax's
    m, s, target with splits = 1 (the merge takes up to MAX_SPLITS per rank)."""
    assert lm.partial_words(lm.ARGMAX, False) == 1
    assert lm.partial_words(lm.SOFTMAX, True) == vs.partial_words(True, False, False) == 3
    assert lm.partial_words(lm.SOFTMAX, False) == vs.partial_words(False, False, False) == 2
    for name in ("bfloat16", "float16"):
        consts = lm.combine_best_constexprs(name)
        assert consts["NEUTRAL_BITS"] == vr.neutral_bits(name, True)
        assert consts["MAG_MASK"] == vr.constexprs(name, True)["MAG_MASK"]
        assert consts["INF_BITS"] == vr.constexprs(name, True)["INF_BITS"]
    assert lm.combine_stats_constexprs(True)["K"] == 3


def test_kernels_share_the_local_kernels_order_functions():
    """The same JIT functions, not copies: the NaN and tie rules cannot drift apart."""
    assert vr.value_order is vr._order and vr.candidate_word is vr._word
    assert lm.value_order is vr.value_order and lm.first_best is vr.first_best is vr._first_best
    assert lm.logsumexp_shift is vs._shift


# --------------------------------------------------------------------------- validation


def _x_w(T=3, H=8, w=5, dtype=torch.bfloat16):
    return torch.zeros(T, H, dtype=dtype), torch.zeros(w, H, dtype=dtype)


@pytest.mark.parametrize("make, error, wrong", [
    (lambda: (torch.zeros(3, 8), torch.zeros(5, 8), 0, None), TypeError,
     "one dtype, torch.bfloat16 or torch.float16; got x torch.float32, weight torch.float32"),
    (lambda: (_x_w()[0], _x_w(dtype=torch.float16)[1], 0, None), TypeError,
     "got x torch.bfloat16, weight torch.float16"),
    (lambda: (_x_w()[0], torch.zeros(5, 8, 1, dtype=torch.bfloat16), 0, None), ValueError,
     r"2-D slab \[vocab columns, hidden\].*got shape \(5, 8, 1\)"),
    (lambda: (_x_w(H=7)[0], _x_w()[1], 0, None), ValueError,
     r"x's last dimension \(hidden\) must equal weight's second, 8; got x of shape \(3, 7\)"),
    (lambda: (_x_w()[0], torch.zeros(8, 5, dtype=torch.bfloat16).T, 0, None), ValueError,
     r"contiguous along hidden .* got strides \(1, 5\)"),
    (lambda: (*_x_w(), 0, None), ValueError, "must be CUDA tensors on one device; got x on cpu"),
])
def test_check_inputs_says_what_is_wrong_and_what_is_accepted(make, error, wrong):
    x, weight, offset, target = make()
    with pytest.raises(error, match=wrong):
        lmk.check_inputs(x, weight, offset, target)


@pytest.mark.parametrize("offset, target, wrong", [
    (-1, None, r"offset .* must be an int >= 0; got -1"),
    (2.0, None, r"must be an int >= 0; got 2.0"),
    (2**31 - 3, None, r"at most 2\*\*31 - 1 .* got offset 2147483645, weight \(5, 8\)"),
    (0, torch.zeros(3, dtype=torch.float32), r"int64 or int32, on cpu; got \(3,\) torch.float32"),
    (0, torch.zeros(4, dtype=torch.int64), r"shape \(3,\), int64 or int32, on cpu; got \(4,\) torch.int64"),
])
def test_check_inputs_offsets_and_targets(offset, target, wrong):
    x, weight = _x_w()
    with pytest.raises(ValueError, match=wrong):
        lmk.check_inputs(x, weight, offset, target, need_cuda=False)


def test_check_inputs_accepts_what_it_documents():
    x, weight = _x_w()
    lmk.check_inputs(x, weight, 7, torch.zeros(3, dtype=torch.int32), lm.tile_plan(3, 5), need_cuda=False)
    lmk.check_inputs(x.reshape(1, 3, 8), weight, 0, torch.zeros(1, 3, dtype=torch.int64), need_cuda=False)
    lmk.check_inputs(torch.zeros(0, 8, dtype=torch.float16), torch.zeros(0, 8, dtype=torch.float16), 0,
                     need_cuda=False)


# --------------------------------------------------------------------------- the benchmark's checks and grid


def _stats(shift, log_sum, target_logit):
    return tuple(torch.tensor(v, dtype=torch.float32) for v in (shift, log_sum, target_logit))


def test_bench_softmax_check_accepts_an_ulp_of_a_sum_near_one():
    """The row that stopped the first H200 run, as the interpreter reproduced it (T = 128, w = 64128,
    H = 4096, plan 64x128x64x8x3): log_sum 6.31807e-06 fused, 6.19886e-06 composition, 6.25673e-06 in
    float64; each one ulp of S from the truth.  The check relative to log_sum rejected it."""
    ours, want = _stats([517.0], [6.31807279e-06], [-12.0]), _stats([517.0], [6.19886396e-06], [-12.0])
    assert (ours[1] - want[1]).abs() > 1e-6 * want[1].abs()  # the first check's verdict: differs
    assert bench.log_sum_error(ours[1], want[1]) <= bench.SUM_TOLERANCE
    assert bench.softmax_agrees(ours, want)


@pytest.mark.parametrize("ours, why", [
    (_stats([517.0], [6.19886e-06 + 2e-6], [-12.0]), "S off by 2e-6 relative: a lost or doubled exp"),
    (_stats([516.0], [6.19886396e-06], [-12.0]), "another maximum"),
    (_stats([517.0], [6.19886396e-06], [-11.0]), "another target logit"),
    (_stats([517.0], [float("nan")], [-12.0]), "NaN where the composition has a number"),
    (_stats([517.0], [float("-inf")], [-12.0]), "an empty row where the composition has columns"),
])
def test_bench_softmax_check_rejects(ours, why):
    want = _stats([517.0], [6.19886396e-06], [-12.0])
    assert not bench.softmax_agrees(ours, want), why


def test_bench_log_sum_error_is_relative_to_the_sum():
    """An absolute difference of log S is S's relative one; + log's rounding where |log_sum| > 1; matching
    infinities (an empty row: -inf) and NaN are no error."""
    want = torch.tensor([0.0, 10.0, float("-inf"), float("nan")])
    assert bench.log_sum_error(want + torch.tensor([5e-7, 5e-6, 0.0, 0.0]), want) <= bench.SUM_TOLERANCE
    assert bench.log_sum_error(want + torch.tensor([2e-6, 0.0, 0.0, 0.0]), want) > bench.SUM_TOLERANCE
    assert bench.log_sum_error(want + torch.tensor([0.0, 2e-5, 0.0, 0.0]), want) > bench.SUM_TOLERANCE


def test_bench_records_a_failed_row_and_goes_on():
    """A cell whose check raises becomes a failed row with the reason; the next cells still run; the
    failures are what decide the exit status."""
    cells = [(128256, 2, 32, "softmax"), (128256, 2, 128, "softmax"), (128256, 2, 128, "argmax")]

    def measure(vocab, world, T, consumer):
        if T == 128 and consumer == "softmax":
            raise AssertionError("softmax T=128 w=64128: the fused result differs")
        return {"vocab": vocab, "W": world, "T": T, "consumer": consumer, "ratio": 1.0}

    emitted = []
    rows = bench.measure_all(cells, measure, lambda r, rows: emitted.append(bench.table_line(r, [])
                                                                          if "failed" in r else r["T"]))
    assert [r["T"] for r in rows] == [32, 128, 128] and "failed" not in rows[2]
    assert bench.failed_rows(rows) == [rows[1]]
    assert rows[1]["failed"] == "AssertionError: softmax T=128 w=64128: the fused result differs"
    assert emitted[1].startswith("| 128256 | 2 | 128 | softmax | FAILED: AssertionError")
    assert bench.failed_rows(rows[:1]) == []


def test_bench_default_grid_is_the_five_minute_grid():
    """T = 1, 8, 32, 128, 1024 (4096 left to --tokens), W = 2 and 4, both vocabularies, both consumers;
    T >= 1024 replays a quarter of the calls and a third of the repeats."""
    args = bench.parse_args([])
    cells = bench.grid(args)
    assert len(cells) == 40 and {c[2] for c in cells} == {1, 8, 32, 128, 1024}
    assert {(c[0], c[1]) for c in cells} == {(128256, 2), (128256, 4), (152064, 2), (152064, 4)}
    assert bench.replays(128, args) == (20, 30) and bench.replays(1024, args) == (5, 10)
