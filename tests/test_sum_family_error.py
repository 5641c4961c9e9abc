"""The sum family's published error bound (docs/passes.md, "Gather elimination: the sum family's error").

``benchmarks/sum_family_error.py`` runs the ops' own per-slab and merge arithmetic on W
simulated ranks (one process) at vocab 128256; here a few rows of it, at W = 2, 4, 8, must
stay within the bound the docs publish, and so must the committed table it wrote.
"""

import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("sum_family_error", os.path.join(ROOT, "benchmarks", "sum_family_error.py"))
sum_family_error = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sum_family_error)

#: the published bound: max |ours - ref| / max |ref| against the gathered float32 computation ...
BOUND_VS_FP32 = {"logsumexp": 1e-6, "logprobs": 1e-5, "loss (mean)": 1e-5, "loss (none)": 1e-5,
                 "loss (mean, smoothing 0.1)": 1e-5, "entropy": 1e-4, "grad of loss (mean)": 1e-5,
                 "grad of entropy": 5e-4}
#: ... and against float64
BOUND_VS_FP64 = 2e-6
#: the loss's gradient, cast to bf16 as returned, against the gathered float32 gradient cast alike
BOUND_BF16_ULPS = 1


def _check(rows):
    for r in rows:
        assert r["vs_fp32"][1] <= BOUND_VS_FP32[r["quantity"]], r
        assert r["vs_fp64"][1] <= BOUND_VS_FP64, r
        assert r.get("bf16_ulps", 0) <= BOUND_BF16_ULPS, r


def test_simulated_ranks_stay_within_the_published_bound():
    _check(sum_family_error.worst(sum_family_error.measure(rows=4)))


def test_the_committed_table_is_within_the_published_bound():
    with open(os.path.join(ROOT, "benchmarks", "results", "sum_family_error.json")) as f:
        table = json.load(f)
    assert table["vocab"] == 128256 and {r["W"] for r in table["worst"]} == {2, 4, 8}
    assert {r["quantity"] for r in table["worst"]} == set(BOUND_VS_FP32)
    _check(table["worst"])


def test_the_check_fails_on_a_wrong_merge(monkeypatch):
    """Negative control: a merge that forgets to rescale rank r's sum by exp(m_r - max) is caught."""
    import torch

    from tpfuse.compile_ops import vocab_parallel_loss as vpl

    def forgetful_merge(gathered, hidden_widths, *flags):
        shift, log_sum, *rest = vpl.merge_partials(gathered, hidden_widths, *flags)
        parts = gathered.unflatten(-1, (len(hidden_widths), -1))
        wrong = torch.log(parts[..., 1].sum(-1))  # sums of differently shifted exponentials, added as they are
        return (shift, wrong, *rest)

    monkeypatch.setattr(sum_family_error, "merge_partials", forgetful_merge)
    with pytest.raises(AssertionError):
        _check(sum_family_error.worst(sum_family_error.measure(rows=2)))
