"""The fused-linear cost rule is what its committed measurements say (no GPU).

``benchmarks/fit_linear_cost.py`` fits the model's constants to the saved 4xH200 results;
these tests keep ``linear_cost.py``'s constants equal to that fit, and check the decisions
against the measurements themselves: every row the rule fuses measured at least the target
speedup over cuBLAS + the tpfuse gather, and the model's error stays within its margin there.
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


#: the card every committed result was measured on (the fit refuses files from more than one)
CARD = "NVIDIA H200"


@pytest.fixture(scope="module")
def rows():
    rows = fit_linear_cost.load_rows(fit_linear_cost.DEFAULT_FILES)
    assert len(rows) >= 60, len(rows)  # both LM heads, W=2 and 4, T=1..32
    return rows


def test_constants_are_the_fit_of_the_committed_results(rows):
    fitted = fit_linear_cost.fit(rows)
    tolerance = {"CUBLAS_EFFICIENCY": 0.01, "FUSED_EFFICIENCY": 0.01, "CUBLAS_FIXED_US": 0.1, "FUSED_FIXED_US": 0.1,
                 "GATHER_BYTES_PER_S": 1e9, "FUSED_TAIL_BYTES_PER_S": 1e9}
    for name, tol in tolerance.items():
        assert abs(getattr(linear_cost, name) - fitted[name]) <= tol, (name, getattr(linear_cost, name), fitted[name])
    for w, latency in fitted["GATHER_LATENCY_US"].items():
        assert abs(linear_cost.GATHER_LATENCY_US[w] - latency) <= 0.1, (w, latency)


def test_model_error(rows):
    """Within 0.06 of every measured speedup; on the rows the rule fuses, it over-predicts by less
    than the margin plus 0.005 (the rounding of the committed constants)."""
    speedups = fit_linear_cost.speedups(rows)
    assert max(abs(measured - predicted) for *_, measured, predicted in speedups) <= 0.06
    fused = [predicted - measured for W, r, measured, predicted in speedups
             if linear_cost.decide(r["T"], r["K"], [r["N_r"]] * W, "bfloat16", device_name=CARD).fuse]
    assert max(fused) <= linear_cost.MODEL_MARGIN + 0.005, max(fused)


def test_every_fused_row_measured_at_least_the_target(rows):
    """The target (docs/benchmarks.md, "Against the targets"): at least TARGET_SPEEDUP over cuBLAS + the tpfuse gather on every
    measurement of every row the rule fuses, W=4, T <= 32: the fitted runs and a host held out."""
    everything = rows + fit_linear_cost.load_rows(fit_linear_cost.HELD_OUT_FILES)
    fused = [(W, r["shape"], r["T"], round(measured, 3)) for W, r, measured, _ in fit_linear_cost.speedups(everything)
             if linear_cost.decide(r["T"], r["K"], [r["N_r"]] * W, "bfloat16", device_name=CARD).fuse]
    assert len({(W, shape, T) for W, shape, T, _ in fused}) >= 4, fused  # T = 21..32 of the LM head 4096
    assert all(measured >= linear_cost.TARGET_SPEEDUP for *_, measured in fused), fused


def test_the_rule_is_keyed_by_where_the_constants_were_measured():
    """linear_cost.MEASURED names exactly the (card, W) of the results the constants are fitted to,
    and the fit says, per constant, which card and W it came from."""
    assert set(fit_linear_cost.measured_on(fit_linear_cost.DEFAULT_FILES)) == set(linear_cost.MEASURED)
    origin = fit_linear_cost.sources(fit_linear_cost.DEFAULT_FILES)
    assert origin["FUSED_FIXED_US"] == f"{CARD} at W=2, 4"
    assert origin["GATHER_LATENCY_US[2]"] == f"{CARD} at W=2" and origin["GATHER_LATENCY_US[4]"] == f"{CARD} at W=4"


def test_the_fit_refuses_results_from_two_cards(tmp_path):
    import json

    paths = []
    for card in ("NVIDIA H200", "NVIDIA H100 80GB HBM3"):
        paths.append(tmp_path / f"{card[-4:]}.json")
        paths[-1].write_text(json.dumps({"meta": {"W": 4, "card": card}, "rows": []}))
    with pytest.raises(ValueError, match="results from 2 cards"):
        fit_linear_cost.sources([str(p) for p in paths])
