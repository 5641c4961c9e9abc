"""End to end on real gloo ranks: unmodified TP models compiled with Inductor and tpfuse.

One spawned run per world size does every check (Inductor compiles on the CPU
are slow); the assertions run in the test process on what the ranks returned.
"""

from __future__ import annotations

import pytest
import torch

from multiproc import run_ranks

STATIC_T = (5, 1)  # T == 1 is decode: the view / [1, W*w] forms
DYNAMIC_T = (3, 6)


def _check(model, x, compiled, expected_rewrites, name, results):
    import tpfuse

    with torch.no_grad():
        ref = model(x)
        out = compiled(x)
    rep = tpfuse.report()
    results[name] = {
        "equal": bool(torch.equal(ref, out)),
        "max_abs_diff": float((ref - out).abs().max()),
        "rewritten": rep.rewritten,
        "expected": expected_rewrites,
        "patterns": sorted(m.pattern for m in rep.matches),
        "producers": sorted(m.producer.kind for m in rep.matches),
        "near_misses": [f"{n.pattern}: {n.reason}" for n in rep.near_misses],
    }


def _numerics(rank, world_size):
    import torch._dynamo
    import torch._functorch.config
    import torch._inductor.config
    import tpfuse
    import tp_models

    torch._dynamo.config.cache_size_limit = 64
    # the FX graph cache stays on: a graph it serves is reported from its stored records
    results = {}
    builders = {
        "funcol": lambda: tp_models.FuncolMLP(rank, world_size),
        "c10d": lambda: tp_models.C10dMLP(rank, world_size),
        "dtensor": lambda: tp_models.dtensor_mlp(rank, world_size),
    }
    for style, build in builders.items():
        three_d = style == "dtensor"
        model = build()
        # static T: one compile per T, through tpfuse.enable()
        with tpfuse.enabled():
            for T in STATIC_T:
                torch._dynamo.reset()
                compiled = torch.compile(model, fullgraph=True, dynamic=False)
                x = tp_models.tokens(T, three_d=three_d)
                _check(model, x, compiled, model.rewrites, f"{style}/static/T={T}", results)
        # dynamic T: one compile for every T, through tpfuse.backend()
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, dynamic=True, backend=tpfuse.backend())
        for i, T in enumerate(DYNAMIC_T):
            x = tp_models.tokens(T, three_d=three_d)
            # the second T reuses the first graph: nothing is compiled, so report() (the graphs
            # compiled since the last report) has nothing new
            expected = model.rewrites if i == 0 else 0
            _check(model, x, compiled, expected, f"{style}/dynamic/T={T}", results)
    # the AOT graph (views, transposes not yet normalised by Inductor) through aot_eager
    torch._dynamo.reset()
    model = tp_models.C10dMLP(rank, world_size)
    compiled = torch.compile(model, fullgraph=True, backend=tpfuse.backend("aot_eager"))
    _check(model, tp_models.tokens(4), compiled, model.rewrites, "c10d/aot_eager/T=4", results)
    # negative control: a careless pattern (no shape check) rewrites a rearrangement that
    # is not a hidden concat; the equality check used above must catch it
    from tpfuse.passes import FusionPattern
    from tpfuse.passes.builtin_patterns import gather_hidden_replacement

    def careless(site):
        (reshape,) = site.wait.users
        permute = next(iter(reshape.users))
        (flatten,) = permute.users
        return Candidate(output=flatten, region=(reshape, permute, flatten), inputs=(site.local,))

    from tpfuse.passes import Candidate

    wrong = FusionPattern(name="careless", match=careless, replacement=gather_hidden_replacement,
                          priority=100)
    model = tp_models.MisrearrangedC10d(rank, world_size)
    for label, scope in (("misrearranged/builtins", ()), ("misrearranged/careless", (wrong,))):
        torch._dynamo.reset()
        with tpfuse.enabled(), tpfuse.pattern_scope(*scope):
            compiled = torch.compile(model, fullgraph=True)
            _check(model, tp_models.tokens(4), compiled, len(scope), label, results)
    return results


@pytest.fixture(scope="module")
def gloo_w2():
    return run_ranks(2, _numerics, timeout=600)


def _real_models(results):
    return {k: v for k, v in results.items() if not k.startswith("misrearranged/")}


def test_outputs_equal_uncompiled_model(gloo_w2):
    for rank, results in enumerate(gloo_w2):
        for name, r in _real_models(results).items():
            assert r["equal"], f"rank {rank} {name}: max |diff| {r['max_abs_diff']}"


def test_exact_rewrite_counts_and_no_near_misses(gloo_w2):
    for results in gloo_w2:
        for name, r in _real_models(results).items():
            assert r["rewritten"] == r["expected"], (name, r)
            assert r["near_misses"] == [], (name, r["near_misses"])


def test_negative_control_wrong_rewrite_is_caught(gloo_w2):
    for results in gloo_w2:
        safe, careless = results["misrearranged/builtins"], results["misrearranged/careless"]
        # the built-in rearrange pattern refuses the form, with its reason ...
        assert safe["rewritten"] == 0 and safe["equal"], safe
        assert any("not to [W=2, ..., w=16]" in n for n in safe["near_misses"]), safe
        # ... and a pattern that rewrites it anyway changes the output: the check above can fail
        assert careless["rewritten"] == 1 and not careless["equal"], careless


def test_every_style_hits_the_expected_forms(gloo_w2):
    r = gloo_w2[0]
    assert r["funcol/static/T=5"]["patterns"] == ["split_cat", "split_cat"]
    assert r["funcol/static/T=1"]["patterns"] == ["view", "view"]
    assert r["c10d/static/T=5"]["patterns"] == ["narrow_cat", "rearrange"]
    assert r["c10d/aot_eager/T=4"]["patterns"] == ["narrow_cat", "rearrange"]
    assert r["dtensor/static/T=5"]["patterns"] == ["split_cat", "split_cat"]
    assert r["dtensor/static/T=1"]["patterns"] == ["view", "view"]
    assert r["dtensor/static/T=5"]["producers"] == ["column_linear", "column_linear"]
    for style in ("funcol", "c10d", "dtensor"):
        assert r[f"{style}/dynamic/T=3"]["rewritten"] == 2
