"""Patterns anchored on a framework's own opaque gather op (examples/framework_gather_op.py,
docs/patterns.md): the graphs, the near-misses, registration errors, and the example end
to end on 2 gloo ranks, including 2 ranks sharing one Inductor cache directory."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
from expecttest import TestCase

import tpfuse
from tpfuse.passes import AnchorArgs, FusionPattern, PatternError

from multiproc import run_ranks
from pass_helpers import FakeWorld, capture

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
import framework_gather_op as fw  # noqa: E402


class TestFrameworkGatherGraphs(FakeWorld, TestCase):
    maxDiff = None

    def setUp(self):
        super().setUp()
        fw.FRAMEWORK_GROUPS[fw.GROUP] = dist.group.WORLD
        self.addCleanup(fw.FRAMEWORK_GROUPS.clear)

    def _head(self):
        return fw.VocabParallelHead(0, 2), torch.randn(5, fw.HIDDEN)

    def test_without_a_pattern_the_opaque_gather_is_a_near_miss(self):
        _, rep = capture(*self._head())
        self.assertEqual(rep.matches, [])
        self.assertExpectedInline(
            "\n".join(f"{n.pattern} {n.nodes}: {n.reason} [{n.doc}]" for n in rep.near_misses),
            """no_anchor ('all_gather',): opaque collective `myserve::all_gather`: no registered pattern anchors on it [docs/patterns.md#anchoring-on-your-frameworks-own-gather-op]""",
        )
        self.assertIn("1 near-miss(es)", str(tpfuse.passes.Report([rep])))

    def test_the_pattern_rewrites_the_opaque_op(self):
        with tpfuse.pattern_scope(fw.MYSERVE_GATHER):
            text, rep = capture(*self._head())
        self.assertEqual([(m.pattern, m.gather, m.wait, m.group_name, m.hidden_widths) for m in rep.matches],
                         [("myserve_all_gather", "all_gather", None, "0", (48, 48))])
        self.assertEqual(rep.near_misses, [])
        self.assertExpectedInline(text, """\
inputs: arg0_1, arg1_1
permute = permute(arg0_1, [1, 0])
mm = mm(arg1_1, permute)
all_gather = myserve.all_gather(mm, -1, 2, 'tp:0')
return [all_gather]
---- after tpfuse ----
inputs: arg0_1, arg1_1
permute = permute(arg0_1, [1, 0])
mm = mm(arg1_1, permute)
all_gather_hidden = tpfuse.all_gather_hidden(mm, [48, 48], '0')
return [all_gather_hidden]""")

    def test_a_gather_along_dim_0_is_rejected_with_the_reason(self):
        def rows(h, w):
            return torch.ops.myserve.all_gather(h @ w.t(), 0, 2, fw.GROUP)

        with tpfuse.pattern_scope(fw.MYSERVE_GATHER):
            _, rep = capture(rows, torch.randn(5, 8), torch.randn(6, 8))
        self.assertEqual(rep.matches, [])
        self.assertExpectedInline(
            "\n".join(f"{n.pattern}: {n.reason}" for n in rep.near_misses),
            """myserve_all_gather: all_gather gathers along dim 0 of a 2-D tensor, not along the last (hidden) axis""",
        )

    def test_an_unknown_framework_group_is_a_near_miss(self):
        def other_group(h, w):
            return torch.ops.myserve.all_gather(h @ w.t(), -1, 2, "pp:0")

        with tpfuse.pattern_scope(fw.MYSERVE_GATHER):
            _, rep = capture(other_group, torch.randn(5, 8), torch.randn(6, 8))
        self.assertEqual(rep.matches, [])
        self.assertExpectedInline(
            "\n".join(f"{n.pattern}: {n.reason}" for n in rep.near_misses),
            """gather_site: group argument 'pp:0' of myserve::all_gather cannot be mapped to a process group by pattern 'myserve_all_gather''s group_resolver: KeyError: 'pp:0'""",
        )

    def test_world_size_from_the_group_and_positional_anchor_args(self):
        # world_size=None: the world size is the resolved group's; arguments by position
        by_group = replace(fw.MYSERVE_GATHER, name="by_group", anchor_args=AnchorArgs(0, None, 3))
        with tpfuse.pattern_scope(by_group):
            _, rep = capture(*self._head())
        self.assertEqual([(m.pattern, m.world_size, m.group_name) for m in rep.matches],
                         [("by_group", 2, "0")])

    def test_a_resolver_returning_something_else_is_a_near_miss(self):
        odd = replace(fw.MYSERVE_GATHER, name="odd", group_resolver=lambda name: 3)
        with tpfuse.pattern_scope(odd):
            _, rep = capture(*self._head())
        self.assertExpectedInline(
            "\n".join(f"{n.pattern}: {n.reason}" for n in rep.near_misses),
            """gather_site: group argument 'tp:0' of myserve::all_gather cannot be mapped to a process group by pattern 'odd''s group_resolver: TypeError: the group resolver returned int; accepted are a ProcessGroup or a c10d group name (str)""",
        )

    def test_a_pattern_that_declines_every_call_is_reported(self):
        declining = replace(fw.MYSERVE_GATHER, name="declines", match=lambda site: None)
        with tpfuse.pattern_scope(declining):
            _, rep = capture(*self._head())
        self.assertExpectedInline(
            "\n".join(f"{n.pattern}: {n.reason}" for n in rep.near_misses),
            """no_pattern: the pattern(s) anchored on myserve::all_gather (declines) do not recognise call all_gather: each returned None""",
        )

    def test_a_functional_gather_no_selected_pattern_anchors_on_is_a_near_miss(self):
        import torch.distributed._functional_collectives as funcol

        def gather(h, w):
            return funcol.all_gather_tensor(h @ w.t(), gather_dim=1, group=dist.group.WORLD)

        _, rep = capture(gather, torch.randn(5, 8), torch.randn(6, 8), patterns=())
        self.assertExpectedInline(
            "\n".join(f"{n.pattern}: {n.reason}" for n in rep.near_misses),
            """no_anchor: collective `_c10d_functional::all_gather_into_tensor`: none of the selected patterns anchors on it (tpfuse.enable(patterns=...) left them out)""",
        )

    def test_other_collectives_are_listed_apart(self):
        import torch.distributed._functional_collectives as funcol

        def reduce_then_gather(h, w):
            y = funcol.all_reduce(h @ w.t(), "sum", dist.group.WORLD)
            return torch.ops.myserve.all_gather(y, -1, 2, fw.GROUP)

        _, rep = capture(reduce_then_gather, torch.randn(5, 8), torch.randn(6, 8))
        self.assertEqual([n.pattern for n in rep.near_misses], ["no_anchor"])
        self.assertEqual([(n.pattern, n.nodes) for n in rep.other_collectives],
                         [("not_a_gather", ("all_reduce",))])
        text = str(tpfuse.passes.Report([rep]))
        self.assertIn("1 near-miss(es), 1 other collective(s)", text)
        self.assertIn("other collectives, not gathers, left as they are: all_reduce", text)


# ---- registration errors --------------------------------------------------------------


def _pattern(**fields):
    base = dict(name="p", match=fw.match_last_dim_gather, replacement=fw.gather_hidden,
                search=fw.reference, example=fw.Example(local_shape=(4, 8)))
    return FusionPattern(**{**base, **fields})


def test_anchors_accept_overloads_packets_and_names():
    op = torch.ops.myserve.all_gather
    for anchors in (op.default, op, "myserve::all_gather", "myserve::all_gather.default"):
        assert _pattern(anchors=anchors).anchor_ops == frozenset({op.default}), anchors
    assert _pattern().reads_functional_gather  # no anchors: the functional gather, as before


def test_bad_anchors_fail_at_registration():
    with pytest.raises(PatternError, match="'myserve::no_such_op' is not a registered op"):
        _pattern(anchors="myserve::no_such_op")
    with pytest.raises(PatternError, match="anchor 42 is not an op; accepted are an OpOverload"):
        _pattern(anchors=(42,))
    with pytest.raises(PatternError, match=r"anchor_args.group='group' is not an argument of "
                                           r"myserve::all_gather, whose arguments are \['tensor', 'dim', "
                                           r"'world_size', 'group_name'\]"):
        _pattern(anchors="myserve::all_gather", anchor_args=AnchorArgs("tensor", "world_size", "group"))
    with pytest.raises(PatternError, match="group_resolver must be callable"):
        _pattern(anchors="myserve::all_gather", group_resolver="tp:0")


def test_anchors_and_resolver_are_in_the_cache_key():
    base = _pattern(anchors="myserve::all_gather", anchor_args=AnchorArgs("tensor", "world_size", "group_name"),
                    group_resolver=fw.framework_group)
    assert base.cache_key() != replace(base, group_resolver=lambda g: g).cache_key()
    assert base.cache_key() != replace(base, anchor_args=AnchorArgs(0, 2, 3)).cache_key()
    assert base.cache_key() != _pattern().cache_key()


# ---- end to end on gloo -----------------------------------------------------------------


def test_example_on_gloo_is_bit_exact_at_T1_T7_and_dynamic_T():
    per_rank = run_ranks(2, fw.walkthrough, timeout=600)
    gathered = [("myserve_all_gather", (fw.VOCAB_PER_RANK,) * 2)]
    for rank, results in enumerate(per_rank):
        for label, r in results.items():
            assert all(r["equal"]), (rank, label, r)
        missed = results["no pattern"]
        assert missed["matches"] == [] and missed["near_misses"] == [
            "no_anchor: opaque collective `myserve::all_gather`: no registered pattern anchors on it"], missed
        for label in ("T=1", "T=7"):
            assert results[label]["matches"] == gathered and results[label]["near_misses"] == [], results[label]
        dynamic = results["dynamic T"]
        assert dynamic["graphs"] == 1 and dynamic["matches"] == gathered, dynamic  # one graph for T = 3, 9, 5
        assert dynamic["shapes"] == [(3, 96), (9, 96), (5, 96)]


def _shared_cache(rank, world_size, cache_dir):
    """Rank 0 compiles first; rank 1 compiles once rank 0's entry is in the shared
    directory (as the second rank of a torchrun job does); then both compile again
    after torch._dynamo.reset()."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    fw.init_framework_groups()
    model, h = fw.VocabParallelHead(rank, world_size), fw.tokens(7)
    results = []
    with inductor_config.patch(fx_graph_cache=True), functorch_config.patch(enable_autograd_cache=True):
        if rank == 1:
            _wait_for_entry(os.path.join(cache_dir, "fxgraph"))
        for _ in range(2):
            results.append(fw.compile_and_compare(model, [h], dynamic=False, scope=(fw.MYSERVE_GATHER,)))
    return results


def _wait_for_entry(directory, timeout=300.0):
    deadline = time.monotonic() + timeout
    while not (os.path.isdir(directory) and any(os.scandir(directory))):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no FX graph cache entry appeared in {directory}")
        time.sleep(0.2)


def test_two_ranks_sharing_a_cache_dir_both_report_the_match(tmp_path):
    per_rank = run_ranks(2, _shared_cache, str(tmp_path), timeout=600)
    gathered = [("myserve_all_gather", (fw.VOCAB_PER_RANK,) * 2)]
    # rank 0 compiled the graph; rank 1 was served rank 0's entry; both were served it again
    assert [[r["from_cache"] for r in results] for results in per_rank] == [
        [[False], [True]], [[True], [True]]], per_rank
    for results in per_rank:
        for r in results:
            assert r["matches"] == gathered and all(r["equal"]), r
    assert "loaded from the FX graph cache" in per_rank[1][0]["report"]


def test_patterns_doc_quotes_the_tested_example():
    """Every code block of docs/patterns.md marked as taken from the example is in it verbatim."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    doc = open(os.path.join(root, "docs", "patterns.md")).read()
    example = open(os.path.join(root, "examples", "framework_gather_op.py")).read()
    blocks = [b.split("```", 1)[0] for b in doc.split("```python\n")[1:]]
    quoted = [b for b in blocks if b.startswith("# from examples/framework_gather_op.py\n")]
    assert len(quoted) >= 4
    for block in quoted:
        body = block.split("\n", 1)[1]
        assert body.strip() in example, body
