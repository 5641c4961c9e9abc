"""The fused-linear cost rule is what its committed measurements say (no GPU).

``benchmarks/fit_linear_cost.py`` fits the model's constants to the saved 4xH200 results;
these tests keep ``linear_cost.py``'s constants equal to that fit, and check the decisions
against the measurements themselves: every row the rule fuses measured faster than cuBLAS +
the tpfuse gather, and the model's speedups stay within half the rule's margin of the
measured ones.
"""

import importlib.util
import os

import pytest

from tpfuse.compile_ops import linear_cost

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("fit_linear_cost",
                                               os.path.join(HERE, "..", "benchmarks", "fit_linear_cost.py"))
fit_linear_cost = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fit_linear_cost)


@pytest.fixture(scope="module")
def rows():
    rows = fit_linear_cost.load_rows(fit_linear_cost.DEFAULT_FILES)
    assert len(rows) >= 20, len(rows)  # both LM heads, W=2 and 4, T=1..32
    return rows


def test_constants_are_the_fit_of_the_committed_results(rows):
    fitted = fit_linear_cost.fit(rows)
    tolerance = {"CUBLAS_EFFICIENCY": 0.01, "FUSED_EFFICIENCY": 0.01, "CUBLAS_FIXED_US": 0.1, "FUSED_FIXED_US": 0.1,
                 "GATHER_BYTES_PER_S": 1e9, "FUSED_TAIL_BYTES_PER_S": 1e9}
    for name, tol in tolerance.items():
        assert abs(getattr(linear_cost, name) - fitted[name]) <= tol, (name, getattr(linear_cost, name), fitted[name])
    for w, latency in fitted["GATHER_LATENCY_US"].items():
        assert abs(linear_cost.GATHER_LATENCY_US[w] - latency) <= 0.1, (w, latency)


def test_model_error_is_within_half_the_margin(rows):
    worst = max(abs(measured - predicted) for *_, measured, predicted in fit_linear_cost.speedups(rows))
    assert worst <= (linear_cost.MIN_SPEEDUP - 1) / 2 + 0.005, worst


def test_every_fused_row_measured_faster(rows):
    fused = [(W, r["shape"], r["T"], measured) for W, r, measured, _ in fit_linear_cost.speedups(rows)
             if linear_cost.decide(r["T"], r["K"], [r["N_r"]] * W, "bfloat16").fuse]
    assert fused, "the rule fuses none of the measured rows"
    assert all(measured > 1.0 for *_, measured in fused), fused
