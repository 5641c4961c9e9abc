"""Registering fusion patterns -- registry, priority, cache key, registration-time
errors, and the worked example of docs/patterns.md end to end on gloo."""

from __future__ import annotations

import os
import sys
from dataclasses import replace

import pytest
import torch
from expecttest import TestCase

import tpfuse
from tpfuse.passes import (
    BUILTIN_PATTERNS,
    REGISTRY,
    Example,
    FusionPattern,
    PatternError,
    TpfusePass,
)
from tpfuse.passes.builtin_patterns import gather_hidden_replacement, match_split_cat
from tpfuse.passes.manager import PassConfig

from multiproc import run_ranks
from pass_helpers import FakeWorld, capture, fake_world

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
import padded_vocab_head as pv  # noqa: E402


def _search_full(rows, *, hidden_widths, group_name):
    return torch.cat(rows.chunk(len(hidden_widths)), dim=-1)


def _replace_full(x, *, hidden_widths, group_name):
    return torch.ops.tpfuse.all_gather_hidden(x, list(hidden_widths), group_name)


def _simple(name="user_gather", priority=0, **fields):
    fields.setdefault("search", _search_full)
    fields.setdefault("example", Example(local_shape=(4, 8)))
    return FusionPattern(name=name, match=match_split_cat, replacement=_replace_full,
                         priority=priority, **fields)


# ---- registry ------------------------------------------------------------------------


def test_builtins_are_registrations_through_the_same_api():
    names = [p.name for p in tpfuse.registered_patterns()]
    assert names[:4] == ["split_cat", "narrow_cat", "rearrange", "view"]
    assert all(isinstance(p, FusionPattern) and p.builtin for p in BUILTIN_PATTERNS)


def test_register_unregister_and_scope():
    pattern = tpfuse.register_pattern(_simple())
    try:
        assert "user_gather" in REGISTRY.names()
        with pytest.raises(ValueError, match="already registered"):
            tpfuse.register_pattern(_simple())
        tpfuse.register_pattern(_simple(priority=3), replace=True)
        assert REGISTRY.get("user_gather").priority == 3
    finally:
        assert tpfuse.unregister_pattern("user_gather").name == pattern.name
    assert "user_gather" not in REGISTRY.names()
    with pytest.raises(KeyError, match="no pattern named 'user_gather'"):
        tpfuse.unregister_pattern("user_gather")
    with tpfuse.pattern_scope(_simple("scoped_a"), _simple("scoped_b")):
        assert {"scoped_a", "scoped_b"} <= set(REGISTRY.names())
    assert not {"scoped_a", "scoped_b"} & set(REGISTRY.names())
    # keyword form
    tpfuse.register_pattern(name="kw_form", match=match_split_cat, replacement=_replace_full,
                            search=_search_full, example=Example(local_shape=(2, 4)))
    tpfuse.unregister_pattern("kw_form")


# ---- registration-time errors ----------------------------------------------------------


def test_replacement_with_other_shape_fails_at_registration():
    def too_wide(x, *, hidden_widths, group_name):
        return torch.cat([_replace_full(x, hidden_widths=hidden_widths, group_name=group_name)] * 2, -1)

    with pytest.raises(PatternError, match=r"replacement returns \[4, 32\] torch.float32 but the "
                                           r"search returns \[4, 16\] torch.float32"):
        tpfuse.register_pattern(name="too_wide", match=match_split_cat, replacement=too_wide,
                                search=_search_full, example=Example(local_shape=(4, 8)))
    assert "too_wide" not in REGISTRY.names()


def test_replacement_with_other_dtype_fails_at_registration():
    def upcast(x, *, hidden_widths, group_name):
        return _replace_full(x, hidden_widths=hidden_widths, group_name=group_name).double()

    with pytest.raises(PatternError, match="torch.float64 but the search returns .* torch.float32"):
        tpfuse.register_pattern(name="upcast", match=match_split_cat, replacement=upcast,
                                search=_search_full, example=Example(local_shape=(4, 8)))


def test_untraceable_search_fails_at_registration():
    def data_dependent(rows, *, hidden_widths, group_name):
        if rows.sum() > 0:  # Python control flow on tensor data
            return rows
        return _search_full(rows, hidden_widths=hidden_widths, group_name=group_name)

    with pytest.raises(PatternError, match="its search cannot be traced on fake tensors"):
        tpfuse.register_pattern(name="untraceable", match=match_split_cat, replacement=_replace_full,
                                search=data_dependent, example=Example(local_shape=(4, 8)))


def test_malformed_patterns_fail_at_registration():
    with pytest.raises(PatternError, match="needs search="):
        tpfuse.register_pattern(name="no_search", match=match_split_cat, replacement=_replace_full)
    with pytest.raises(PatternError, match="match must be callable"):
        FusionPattern(name="bad_match", match=None, replacement=_replace_full)
    with pytest.raises(PatternError, match="must be an identifier-like string"):
        FusionPattern(name="has space", match=match_split_cat, replacement=_replace_full)
    with pytest.raises(PatternError, match="Precondition"):
        FusionPattern(name="bad_pre", match=match_split_cat, replacement=_replace_full,
                      preconditions=(lambda s, c: None,))


# ---- cache key -------------------------------------------------------------------------


def test_uuid_changes_when_a_pattern_is_added_removed_or_edited():
    def uuid():
        return TpfusePass(PassConfig()).uuid()

    base = uuid()
    with tpfuse.pattern_scope(_simple()):
        added = uuid()
        assert added != base
    assert uuid() == base  # removed again
    with tpfuse.pattern_scope(_simple(priority=7)):  # edited: priority
        assert uuid() not in (base, added)

    def other_search(rows, *, hidden_widths, group_name):  # edited: another function body
        return torch.cat(list(rows.chunk(len(hidden_widths))), dim=-1)

    with tpfuse.pattern_scope(_simple(search=other_search)):
        assert uuid() not in (base, added)


def test_rank_dependent_pattern_puts_the_rank_in_the_key():
    with fake_world(2):
        with tpfuse.pattern_scope(pv.REAL_COLUMNS):
            key_rank0 = TpfusePass(PassConfig()).uuid()
        plain = TpfusePass(PassConfig(patterns=("split_cat",))).uuid()
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=1, world_size=2)
    try:
        with tpfuse.pattern_scope(pv.REAL_COLUMNS):
            assert TpfusePass(PassConfig()).uuid() != key_rank0
        assert TpfusePass(PassConfig(patterns=("split_cat",))).uuid() == plain
    finally:
        dist.destroy_process_group()


# ---- priority and the worked example as graphs ------------------------------------------


class TestPatternGraphs(FakeWorld, TestCase):
    maxDiff = None

    def test_priority_decides_between_conflicting_patterns(self):
        def gather(x, w):
            import torch.distributed as dist
            import torch.distributed._functional_collectives as funcol

            return funcol.all_gather_tensor(x @ w.t(), gather_dim=-1, group=dist.group.WORLD)

        args = (torch.randn(4, 16), torch.randn(8, 16))
        high = FusionPattern(name="mine_first", match=match_split_cat,
                             replacement=gather_hidden_replacement, priority=100)
        low = replace(high, name="mine_last", priority=-100)
        with tpfuse.pattern_scope(high, low):
            _, rep = capture(gather, *args)
        self.assertEqual([m.pattern for m in rep.matches], ["mine_first"])
        with tpfuse.pattern_scope(low):
            _, rep = capture(gather, *args)
        self.assertEqual([m.pattern for m in rep.matches], ["split_cat"])

    def test_a_user_matcher_that_raises_is_a_near_miss_not_a_crash(self):
        def buggy(site):
            raise IndexError("my bug")

        def gather(x, w):
            import torch.distributed as dist
            import torch.distributed._functional_collectives as funcol

            return funcol.all_gather_tensor(x @ w.t(), gather_dim=-1, group=dist.group.WORLD)

        bad = FusionPattern(name="buggy", match=buggy, replacement=gather_hidden_replacement,
                            priority=100)
        with tpfuse.pattern_scope(bad):
            _, rep = capture(gather, torch.randn(4, 16), torch.randn(8, 16))
        self.assertEqual([m.pattern for m in rep.matches], ["split_cat"])  # the built-in still wins
        self.assertEqual([(n.pattern, n.reason) for n in rep.near_misses],
                         [("buggy", "the matcher raised IndexError: my bug")])

    def test_worked_example_near_miss_then_match(self):
        model = pv.PaddedVocabHead(0, 2)
        _, rep = capture(model, torch.randn(4, pv.HIDDEN))
        self.assertEqual(rep.matches, [])
        self.assertExpectedInline(
            "\n".join(f"{n.pattern}: {n.reason}" for n in rep.near_misses),
            """narrow_cat: rank bands are consumed by cat (cat), slice_4 (slice), not by a single cat""",
        )
        with tpfuse.pattern_scope(pv.REAL_COLUMNS):
            text, rep = capture(model, torch.randn(4, pv.HIDDEN))
        self.assertEqual([(m.pattern, m.hidden_widths) for m in rep.matches],
                         [("real_columns", (512, 488))])
        self.assertEqual(rep.near_misses, [])
        self.assertExpectedInline(text, """\
inputs: arg0_1, arg1_1
empty = empty.memory_format([4, 512], dtype=float32)
empty_1 = empty.memory_format([4, 512], dtype=float32)
permute = permute(arg0_1, [1, 0])
mm = mm(arg1_1, permute)
all_gather_into_tensor = _c10d_functional.all_gather_into_tensor(mm, 2, '0')
wait_tensor = _c10d_functional.wait_tensor(all_gather_into_tensor)
slice_1 = slice.Tensor(wait_tensor, 0, 0, 4)
slice_2 = slice.Tensor(wait_tensor, 0, 4, 8)
slice_4 = slice.Tensor(slice_2, 1, 0, 488)
cat = cat([slice_1, slice_4], -1)
return [cat]
---- after tpfuse ----
inputs: arg0_1, arg1_1
empty = empty.memory_format([4, 512], dtype=float32)
empty_1 = empty.memory_format([4, 512], dtype=float32)
permute = permute(arg0_1, [1, 0])
mm = mm(arg1_1, permute)
alias_2 = alias(mm)
all_gather_hidden = tpfuse.all_gather_hidden(alias_2, [512, 488], '0')
return [all_gather_hidden]""")


# ---- the worked example end to end on gloo -------------------------------------------------


def test_worked_example_on_gloo(tmp_path):
    # the same function that `python examples/padded_vocab_head.py` (docs/patterns.md) runs
    per_rank = run_ranks(2, pv.walkthrough, str(tmp_path), timeout=600)
    for rank, results in enumerate(per_rank):
        before, after = results["builtins only"], results["with REAL_COLUMNS"]
        assert before["equal"] and after["equal"], (rank, results)
        assert before["shape"] == after["shape"] == (5, pv.VOCAB)
        assert before["matches"] == [] and len(before["near_misses"]) == 1, (rank, before)
        assert after["matches"] == [("real_columns", (512, 488))], (rank, after)
        assert after["near_misses"] == []


def test_patterns_doc_shows_the_tested_code():
    """Every code block of docs/patterns.md marked as taken from the example is in it verbatim."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    doc = open(os.path.join(root, "docs", "patterns.md")).read()
    example = open(os.path.join(root, "examples", "padded_vocab_head.py")).read()
    blocks = [b.split("```", 1)[0] for b in doc.split("```python\n")[1:]]
    quoted = [b for b in blocks if b.startswith("# from examples/padded_vocab_head.py\n")]
    assert len(quoted) >= 3
    for block in quoted:
        body = block.split("\n", 1)[1]
        assert body.strip() in example, body
