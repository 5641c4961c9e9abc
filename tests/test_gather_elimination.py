"""Gather elimination (docs/passes.md, "Gather elimination"): graphs on a fake process group,
and compiled numerics on real gloo ranks.

The graph tests compile small LM heads with Inductor's real post-grad graph, run the tpfuse
passes and compare the graph after them with an inline expected text
(``EXPECTTEST_ACCEPT=1 pytest tests/test_gather_elimination.py`` rewrites them); each
eliminated case shows that no gather of the full hidden width is left.  The controls keep
the gather: logits also returned, a reduction over another axis, another consumer.

Row selections before the reduction (``logits[:, -1, :]``, ``logits[:, rows]``, a flattening
view) move to each rank's slab; a view or index op that touches the gathered axis on the way
to a reduction is a near-miss naming it; a gather whose partials would not save half a row's
bytes stays (the cost rule).

The numerics run spawned gloo ranks that compile a tiny LM head with several samplers
(argmax with a temperature, a soft-capped max, a biased top-k after an upcast, a padded-vocab
amin, an argmin; and samplers of selected rows, at W=2 and W=4) with Inductor on the CPU,
with and without tpfuse, at a static T, at T=1 and with a dynamic T, and compare the outputs
bit for bit.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from expecttest import TestCase

import tpfuse
from multiproc import run_ranks
from pass_helpers import FakeWorld, capture, fake_world
from tpfuse.passes.computed_from import RANDOM_REACH

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))

#: columns per rank: wide enough that the partials of every case save at least half a row's bytes
VOCAB_PER_RANK = 64
VOCAB = 101  # real vocabulary: 2 ranks x 64 padded columns, rank 1 keeps 37 of its 64 (at W=4 ranks 2, 3 none)


def logits_of(h, w):
    """The LM head as TP code writes it: a column linear, then the gather on the last axis."""
    return funcol.all_gather_tensor(h @ w.t(), gather_dim=h.dim() - 1, group=dist.group.WORLD)


def greedy_with_temperature(h, w):
    return (logits_of(h, w) / 0.7).argmax(-1)


def soft_capped_max(h, w):
    logits = logits_of(h, w)
    best = (torch.tanh(logits / 30.0) * 30.0).max(-1)
    return best.values, best.indices


def biased_topk_after_upcast(h, w, bias):
    top = (logits_of(h, w).float() + bias).topk(3, -1)
    return top.values, top.indices


def padded_vocab_amin(h, w):
    return logits_of(h, w)[..., :VOCAB].amin(-1, keepdim=True)


def padded_vocab_leaving_rank_1_empty(h, w):
    return logits_of(h, w)[..., :6].argmax(-1)


def two_samplers(h, w):
    logits = logits_of(h, w)
    return logits.argmin(-1), logits.topk(2, -1).indices


def argmax_and_logits(h, w):
    logits = logits_of(h, w)
    return logits.argmax(-1), logits


def argmax_over_tokens(h, w):
    return logits_of(h, w).argmax(0)


def argmax_in_float64(h, w):
    return logits_of(h, w).double().argmax(-1)


def argmax_and_projection(h, w, p):
    logits = logits_of(h, w)
    return logits.argmax(-1), logits @ p


# --- row selections before the reduction (HF's generate and serving code: the last token's row)


def last_token_argmax(h, w):
    return logits_of(h, w)[:, -1, :].argmax(-1)


def last_tokens_topk(h, w):
    top = logits_of(h, w)[:, -2:, :].topk(3, -1)
    return top.values, top.indices


def rows_by_index_amax(h, w, rows):
    return logits_of(h, w)[:, rows].amax(-1)


def flattened_last_row_argmin(h, w):
    logits = logits_of(h, w)
    return logits.view(-1, logits.shape[-1])[-1].argmin(-1)


def rows_by_gather_argmax(h, w, positions):
    """Each sequence's row at its own position, by ``gather`` along the token axis (a full-width index)."""
    logits = logits_of(h, w)
    index = positions.view(-1, 1, 1).expand(-1, 1, logits.shape[-1])
    return logits.gather(1, index).squeeze(1).argmax(-1)


def argmax_then_last_token(h, w):
    return logits_of(h, w).argmax(-1)[:, -1]


def last_token_of_transposed_batch(h, w):
    return logits_of(h, w).transpose(0, 1)[-1].argmax(-1)


# --- ops that touch the gathered axis on the way to a reduction (near-misses)


def one_column_then_argmax_over_tokens(h, w):
    return logits_of(h, w)[..., 3].argmax(-1)


def transposed_argmax(h, w):
    return logits_of(h, w).transpose(-1, -2).argmax(-2)


def split_gathered_axis_amax(h, w):
    logits = logits_of(h, w)
    return logits.view(*logits.shape[:-1], 2, -1).amax(-1)


def columns_by_index_argmax(h, w, columns):
    return logits_of(h, w)[..., columns].argmax(-1)


def cumulative_argmax(h, w):
    return logits_of(h, w).cumsum(-1).argmax(-1)


def noisy_argmax(h, w):
    logits = logits_of(h, w)
    return (logits + torch.rand_like(logits)).argmax(-1)


def _long_chain(x, n):
    """``x`` behind ``n`` elementwise ops: a source ``n`` nodes back from the operand that reads it."""
    for _ in range(n):
        x = x.abs() if x.dtype == torch.int64 else torch.sin(x)
    return x


def gumbel_token_behind(n):
    """The Gumbel trick, its uniform draw ``n`` ops back: each rank would reduce its band at its own token."""
    def fn(h, w):
        u = _long_chain(torch.rand(h.shape[0], 2 * VOCAB_PER_RANK), n)
        return (logits_of(h, w) - torch.log(-torch.log(u))).argmax(-1)
    return fn


def bias_behind(n):
    def fn(h, w, bias):
        return (logits_of(h, w) + _long_chain(bias, n)).argmax(-1)
    return fn


def rows_behind(n):
    def fn(h, w, rows):
        return logits_of(h, w)[:, _long_chain(rows, n)].amax(-1)
    return fn


def class_index_behind(n):
    def fn(h, w, target):
        return logits_of(h, w).log_softmax(-1).gather(-1, _long_chain(target, n).unsqueeze(-1))
    return fn


def squeezed_argmax(widths, dim):
    """``squeeze()`` (dim None) or ``squeeze(dim)`` of the gathered logits of ``widths``, then argmax."""
    def fn(h, w):
        logits = tpfuse.all_gather_hidden(h @ w.t(), dist.group.WORLD, widths)
        return (logits.squeeze() if dim is None else logits.squeeze(dim)).argmax(-1)
    return fn


def last_row_projection(h, w, p):
    return logits_of(h, w)[:, -1, :] @ p


def _h(T=4, dtype=torch.float32):
    return torch.randn(T, 16, dtype=dtype)


def _h3(B=2, T=3, dtype=torch.float32):
    return torch.randn(B, T, 16, dtype=dtype)


def _w(dtype=torch.float32, rows=VOCAB_PER_RANK):
    return torch.randn(rows, 16, dtype=dtype)


def after(text: str) -> str:
    return text.split("---- after tpfuse ----\n")[1]


def no_full_width_gather(text: str) -> bool:
    return "all_gather" not in after(text)


class EliminationGraphs(FakeWorld, TestCase):
    maxDiff = None

    def test_argmax_with_temperature(self):
        text, rep = capture(greedy_with_temperature, _h(), _w())
        self.assertTrue(no_full_width_gather(text))
        self.assertEqual([e.consumers for e in rep.eliminations], [("argmax",)])
        self.assertEqual(rep.eliminations[0].steps, ("div",))
        self.assertEqual((rep.eliminations[0].gathered_bytes, rep.eliminations[0].partial_bytes), ("2048", "64"))
        self.assertEqual([m.eliminated for m in rep.matches], ["argmax"])
        self.assertExpectedInline(after(text), """\
inputs: arg0_1, arg1_1
permute = permute(arg0_1, [1, 0])
mm = mm(arg1_1, permute)
div_1 = div.Tensor(mm, 0.7)
max_hidden = tpfuse.max_hidden(div_1, [64, 64], '0')
getitem_3 = getitem(max_hidden, 1)
return [getitem_3]""")

    def test_soft_capped_max_values_and_indices(self):
        text, rep = capture(soft_capped_max, _h(), _w())
        self.assertTrue(no_full_width_gather(text))
        self.assertEqual(rep.eliminations[0].steps, ("div", "tanh", "mul"))
        self.assertExpectedInline(after(text), """\
inputs: arg0_1, arg1_1
permute = permute(arg0_1, [1, 0])
mm = mm(arg1_1, permute)
div_1 = div.Tensor(mm, 30.0)
tanh_1 = tanh(div_1)
mul_1 = mul.Tensor(tanh_1, 30.0)
max_hidden = tpfuse.max_hidden(mul_1, [64, 64], '0')
getitem_4 = getitem(max_hidden, 0)
getitem_5 = getitem(max_hidden, 1)
return [getitem_4, getitem_5]""")

    def test_full_width_bias_is_cut_to_the_band(self):
        text, rep = capture(biased_topk_after_upcast, _h(dtype=torch.bfloat16), _w(torch.bfloat16),
                            torch.randn(2 * VOCAB_PER_RANK))
        self.assertTrue(no_full_width_gather(text))
        self.assertEqual(rep.eliminations[0].consumers, ("topk",))
        self.assertEqual(rep.eliminations[0].partials, "[4, 6] int32")
        self.assertExpectedInline(after(text), """\
inputs: arg0_1, arg1_1, arg2_1
permute = permute(arg0_1, [1, 0])
mm = mm(arg1_1, permute)
convert_element_type_3 = prims.convert_element_type(mm, float32)
hidden_band = tpfuse.hidden_band(arg2_1, [64, 64], 64, '0')
add_1 = add.Tensor(convert_element_type_3, hidden_band)
topk_hidden = tpfuse.topk_hidden(add_1, 3, [64, 64], '0')
getitem_4 = getitem(topk_hidden, 0)
getitem_5 = getitem(topk_hidden, 1)
return [getitem_4, getitem_5]""")

    def test_padded_vocab_slice_becomes_valid_columns(self):
        text, rep = capture(padded_vocab_amin, _h(), _w())
        self.assertTrue(no_full_width_gather(text))
        self.assertEqual(rep.eliminations[0].valid_columns, VOCAB)
        self.assertExpectedInline(after(text), """\
inputs: arg0_1, arg1_1
permute = permute(arg0_1, [1, 0])
mm = mm(arg1_1, permute)
max_hidden = tpfuse.max_hidden(mm, [64, 64], '0', False, 101)
getitem_2 = getitem(max_hidden, 0)
unsqueeze = unsqueeze(getitem_2, -1)
return [unsqueeze]""")
        text, rep = capture(padded_vocab_leaving_rank_1_empty, _h(), _w())
        self.assertTrue(no_full_width_gather(text))
        self.assertIn("tpfuse.max_hidden(mm, [64, 64], '0', True, 6)", after(text))

    def test_two_samplers_share_no_gather(self):
        text, rep = capture(two_samplers, _h(), _w())
        self.assertTrue(no_full_width_gather(text))
        self.assertEqual(sorted(rep.eliminations[0].consumers), ["argmin", "topk"])
        self.assertEqual(rep.near_misses, [])

    def test_dynamic_tokens(self):
        h = _h(5)
        torch._dynamo.mark_dynamic(h, 0)  # T only: the widths stay static, as the gather needs
        text, rep = capture(greedy_with_temperature, h, _w())
        self.assertTrue(no_full_width_gather(text))
        self.assertRegex(rep.eliminations[0].gathered_bytes, r"^512\*s\d+$")  # T rows of 128 float32 columns
        self.assertRegex(rep.eliminations[0].partial_bytes, r"^16\*s\d+$")  # T rows of 2 ranks x 2 int32 words
        self.assertIn("tpfuse.max_hidden(div_", after(text))

    def test_control_logits_also_returned_keep_the_gather(self):
        text, rep = capture(argmax_and_logits, _h(), _w())
        self.assertEqual(rep.eliminations, [])
        self.assertEqual([(n.pattern, n.reason) for n in rep.near_misses], [
            ("gather_elimination", "gather kept: the gathered logits are also used by the graph output")])
        self.assertExpectedInline(after(text), """\
inputs: arg0_1, arg1_1
permute = permute(arg0_1, [1, 0])
mm = mm(arg1_1, permute)
all_gather_hidden_default = tpfuse.all_gather_hidden(mm, [64, 64], '0')
argmax = argmax(all_gather_hidden_default, -1)
return [argmax, all_gather_hidden_default]""")

    def test_near_miss_reduction_over_another_axis(self):
        text, rep = capture(argmax_over_tokens, _h(), _w())
        self.assertIn("tpfuse.all_gather_hidden(mm, [64, 64], '0')", after(text))
        self.assertEqual([(n.pattern, n.reason) for n in rep.near_misses], [
            ("argmax", "gather kept: argmax reduces over dim 0, not the gathered (last) axis 1")])

    def test_near_miss_unsupported_dtype(self):
        text, rep = capture(argmax_in_float64, _h(), _w())
        self.assertIn("tpfuse.all_gather_hidden(mm, [64, 64], '0')", after(text))
        self.assertEqual([n.reason for n in rep.near_misses], [
            "gather kept: argmax (argmax) reduces torch.float64 values; the exact reductions take float32, "
            "bfloat16, float16"])

    def test_near_miss_another_consumer(self):
        text, rep = capture(argmax_and_projection, _h(), _w(), torch.randn(2 * VOCAB_PER_RANK, 3))
        self.assertIn("tpfuse.all_gather_hidden(mm, [64, 64], '0')", after(text))
        self.assertEqual(len(rep.near_misses), 1)
        self.assertRegex(rep.near_misses[0].reason, r"^gather kept: the gathered logits are also used by mm_1 \(mm\)")

    def test_option_off_keeps_every_gather_silently(self):
        text, rep = capture(greedy_with_temperature, _h(), _w(), eliminate_gathers=False)
        self.assertIn("tpfuse.all_gather_hidden(mm, [64, 64], '0')", after(text))
        self.assertEqual((rep.eliminations, rep.near_misses), ([], []))

    # ---------------------------------------------------------------- row selections

    def test_last_token_row_is_selected_on_each_slab(self):
        text, rep = capture(last_token_argmax, _h3(), _w())
        self.assertTrue(no_full_width_gather(text))
        self.assertEqual(rep.eliminations[0].steps, ("select",))
        # the gather moved B x T rows; the partials are B rows, 2 ranks x 2 int32 words each
        self.assertEqual((rep.eliminations[0].gathered_bytes, rep.eliminations[0].partial_bytes), ("3072", "32"))
        self.assertEqual(rep.eliminations[0].partials, "[2, 2] int32")
        self.assertExpectedInline(after(text), """\
inputs: arg0_1, arg1_1
view = reshape(arg0_1, [6, 16])
permute = permute(arg1_1, [1, 0])
mm = mm(view, permute)
view_1 = reshape(mm, [2, 3, 64])
select_1 = select.int(view_1, 1, -1)
max_hidden = tpfuse.max_hidden(select_1, [64, 64], '0')
getitem_3 = getitem(max_hidden, 1)
return [getitem_3]""")

    def test_rows_by_slice_index_view_and_transpose(self):
        for fn, args, step, op in (
            (last_tokens_topk, (), "slice", "tpfuse.topk_hidden(slice_"),
            (rows_by_index_amax, (torch.tensor([0, 2]),), "index", "tpfuse.max_hidden(index_"),
            (flattened_last_row_argmin, (), "select", "tpfuse.max_hidden(select_"),
            (last_token_of_transposed_batch, (), "select", "tpfuse.max_hidden(select_"),
            (rows_by_gather_argmax, (torch.tensor([2, 0]),), "gather", "tpfuse.max_hidden(squeeze"),
        ):
            with self.subTest(fn.__name__):
                text, rep = capture(fn, _h3(), _w(), *args)
                self.assertTrue(no_full_width_gather(text), text)
                self.assertIn(step, rep.eliminations[0].steps)
                self.assertIn(op, after(text))
                self.assertEqual(rep.near_misses, [])
        text, rep = capture(flattened_last_row_argmin, _h3(), _w())
        self.assertEqual(rep.eliminations[0].steps, ("reshape", "select"))
        self.assertIn("view(view_1, [6, 64])", after(text))  # the view replayed on the slab's width

    def test_argmax_then_last_token_stays_eliminated(self):
        text, rep = capture(argmax_then_last_token, _h3(), _w())
        self.assertTrue(no_full_width_gather(text))
        self.assertEqual([e.consumers for e in rep.eliminations], [("argmax",)])

    def test_last_token_at_dynamic_T(self):
        h = _h3(T=5)
        torch._dynamo.mark_dynamic(h, 1)
        text, rep = capture(last_token_argmax, h, _w())
        self.assertTrue(no_full_width_gather(text))
        self.assertRegex(rep.eliminations[0].gathered_bytes, r"^1024\*s\d+$")  # 2 x T rows gathered
        self.assertEqual(rep.eliminations[0].partial_bytes, "32")  # 2 rows of partials, whatever T
        self.assertIn("select.int(view_1, 1, -1)", after(text))

    def test_near_miss_names_the_op_that_touches_the_gathered_axis(self):
        for fn, args, reason in (
            (one_column_then_argmax_over_tokens, (), r"select_?\d* \(select\) \(select_?\d* selects one column of "
             r"the gathered \(last\) axis\), on the way to argmax \(argmax\)"),
            (transposed_argmax, (), r"permute_\d+ \(permute\) \(permute_\d+ moves the gathered axis to dim 1\), "
             r"on the way to argmax \(argmax\)"),
            (split_gathered_axis_amax, (), r"view_\d+ \(reshape\) \(view_\d+ reshapes the gathered \(last\) axis of "
             r"128 columns to 64\), on the way to amax \(amax\)"),
            (columns_by_index_argmax, (torch.tensor([1, 5]),), r"index \(index\) \(index indexes the gathered "
             r"\(last\) axis with a tensor\), on the way to argmax \(argmax\)"),
            (noisy_argmax, (), r"add \(add\) \(operand inductor_random_default is drawn at random "
             r"\(inductor_seeds_default\): a rank's band of its own draw is not a band of the other ranks' "
             r"draws\), on the way to argmax \(argmax\)"),
            (cumulative_argmax, (), r"cumsum \(cumsum\) \(an op the pass does not move to the ranks: only "
             r"elementwise ops, prefix slices, row selections and views of the leading dims are\), on the way to "
             r"argmax \(argmax\)"),
        ):
            with self.subTest(fn.__name__):
                text, rep = capture(fn, _h3(), _w(), *args)
                self.assertIn("tpfuse.all_gather_hidden(", after(text))
                self.assertEqual(rep.eliminations, [])
                self.assertEqual(len(rep.near_misses), 1, rep.near_misses)
                self.assertRegex(rep.near_misses[0].reason,
                                 "^gather kept: the gathered logits are also used by " + reason)

    def test_control_row_selection_feeding_a_matmul_is_no_near_miss(self):
        text, rep = capture(last_row_projection, _h3(), _w(), torch.randn(2 * VOCAB_PER_RANK, 3))
        self.assertIn("tpfuse.all_gather_hidden(", after(text))
        self.assertEqual((rep.eliminations, rep.near_misses), ([], []))

    def test_random_search_that_gives_up_keeps_the_gather(self):
        """A source more than RANDOM_REACH nodes back may be a random draw: every reader of the search
        (an elementwise operand, a row index, an elimination's input) keeps the gather, also when the
        source is no draw (conservative); the controls, the same chains short, are decided."""
        far, near = RANDOM_REACH, 3
        cases = (
            (gumbel_token_behind, (), _h(), "sub (sub) (cannot tell within 256 nodes whether log_1 depends on a "
             "random draw; kept), on the way to argmax (argmax)", "is drawn at random"),
            (bias_behind, (torch.rand(4, 2 * VOCAB_PER_RANK),), _h(), "add (add) (cannot tell within 256 nodes "
             f"whether sin_{far - 1} depends on a random draw; kept), on the way to argmax (argmax)", None),
            (rows_behind, (torch.tensor([0, 2]),), _h3(), f"index (index) (cannot tell within 256 nodes whether "
             f"abs_{far} depends on a random draw; kept), on the way to amax (amax)", None),
            (class_index_behind, (torch.tensor([0, 2, 1, 3]),), _h(), None, None),
        )
        for make, args, h, reason, near_reason in cases:
            with self.subTest(make.__name__):
                text, rep = capture(make(far), h, _w(), *args)
                self.assertTrue("tpfuse.all_gather_hidden(" in after(text), rep.eliminations)  # not the long text
                self.assertEqual(rep.eliminations, [])
                self.assertEqual(len(rep.near_misses), 1, rep.near_misses)
                self.assertEqual(rep.near_misses[0].reason, "gather kept: " + (
                    "the gathered logits are also used by " + reason if reason else
                    "log_softmax gather: cannot tell within 256 nodes whether unsqueeze depends on a random "
                    "draw; kept"))
                text, rep = capture(make(near), h, _w(), *args)
                if near_reason:  # the draw is found: refused for that, not for the search's reach
                    self.assertIn(near_reason, rep.near_misses[0].reason)
                else:
                    self.assertTrue(no_full_width_gather(text), text)
                    self.assertEqual(rep.near_misses, [])

    # ---------------------------------------------------------------- the cost rule

    def test_cost_rule_keeps_a_gather_whose_partials_save_too_little(self):
        """8 columns per rank, float32: a row is 64 B; top-3 partials are 2 ranks x 6 int32 words = 48 B."""
        text, rep = capture(biased_topk_after_upcast, _h(), _w(rows=8), torch.randn(16))
        self.assertIn("tpfuse.all_gather_hidden(mm, [8, 8], '0')", after(text))
        self.assertEqual(rep.eliminations, [])
        self.assertEqual([(n.pattern, n.reason) for n in rep.near_misses], [
            ("gather_elimination", "gather kept: eliminating topk would move 48 B of partials per row against the "
             "64 B of a gathered row; the rule takes at most 1/2 of it")])

    def test_cost_rule_control_argmax_of_the_same_narrow_row_is_eliminated(self):
        text, rep = capture(greedy_with_temperature, _h(), _w(rows=8))  # 16 B of partials per 64 B row
        self.assertTrue(no_full_width_gather(text))
        self.assertEqual([e.consumers for e in rep.eliminations], [("argmax",)])

    def test_report_lists_the_elimination(self):
        from tpfuse.passes.records import Report

        _, rep = capture(greedy_with_temperature, _h(), _w())
        lines = str(Report([rep])).splitlines()
        self.assertRegex(lines[0], r"1 match\(es\), 1 rewritten, 1 eliminated, 0 near-miss\(es\)")
        self.assertIn("cat (eliminated: argmax)", lines[3])
        self.assertEqual(lines[4].split("|")[:4], ["  eliminated gather         ", " consumer ",
                                                   " steps on the band ", " slice "])


class SqueezeOfUnevenBands(TestCase):
    """A squeeze that names the gathered (last) axis is a no-op on the full logits, but replayed on the
    slab of a rank whose own width is 1 it would drop that rank's hidden axis (docs/passes.md, "What is
    rewritten"): refused when any width is 1, replayed when none is."""

    def test_squeeze_of_the_last_axis_keeps_the_gather_when_a_rank_is_one_wide(self):
        with fake_world(4):
            for dim in (None, -1):
                with self.subTest(dim=dim):
                    text, rep = capture(squeezed_argmax([64, 64, 64, 1], dim), torch.randn(1, 16), _w())
                    self.assertIn("tpfuse.all_gather_hidden(mm, [64, 64, 64, 1], '0')", after(text))
                    self.assertEqual([n.reason for n in rep.near_misses], [
                        "gather kept: the gathered logits are also used by squeeze (squeeze) (squeeze squeezes the "
                        "gathered (last) axis, and a rank of hidden widths [64, 64, 64, 1] is 1 wide: it would "
                        "squeeze its band's axis; only a squeeze of leading dims is replayed there), on the way "
                        "to argmax (argmax)"])

    def test_control_the_same_squeezes_of_even_bands_are_replayed(self):
        with fake_world(4):
            for dim in (None, -1, 0):
                with self.subTest(dim=dim):
                    text, rep = capture(squeezed_argmax([64, 64, 64, 64], dim), torch.randn(1, 16), _w())
                    self.assertTrue(no_full_width_gather(text), text)
                    self.assertEqual(rep.eliminations[0].steps, ("squeeze",))

    def test_squeeze_of_leading_dims_only_is_replayed_with_a_one_wide_rank(self):
        with fake_world(4):
            text, rep = capture(squeezed_argmax([64, 64, 64, 1], 0), torch.randn(1, 16), _w())
            self.assertTrue(no_full_width_gather(text), text)
            self.assertEqual(rep.eliminations[0].steps, ("squeeze",))


# --------------------------------------------------------------------------- barrier elision


def lm_head_then_next_gather(h, w, emb, w2):
    """Greedy token -> embedding -> the next column linear's gather, in one graph (a draft loop)."""
    first = funcol.all_gather_tensor(h @ w2.t(), gather_dim=1, group=dist.group.WORLD)  # a fence
    token = logits_of(first[:, :16], w).argmax(-1)
    return funcol.all_gather_tensor(emb[token] @ w2.t(), gather_dim=1, group=dist.group.WORLD)


class BarrierElisionSeesTheInnerGather(FakeWorld, TestCase):
    """The reductions exchange through ``tpfuse::all_gather_hidden`` inside the op, on a slot
    chosen when it runs; a gather they may run just before must keep its entry barrier."""

    def _last_decision(self):
        _, rep = capture(lm_head_then_next_gather, _h(), _w(), torch.randn(2 * VOCAB_PER_RANK, 16),
                         torch.randn(8, 16))
        return rep.barriers[-1]

    def test_gather_after_a_reduction_keeps_its_entry_barrier(self):
        decision = self._last_decision()
        self.assertFalse(decision.skip_entry_sync)
        self.assertRegex(decision.reason, r"max_hidden may run before it with no fence between, and "
                                          r"gather\(s\) inside the op")

    def test_negative_control_without_the_rule_the_barrier_would_be_skipped(self):
        from unittest import mock

        from tpfuse.passes import barrier_elision

        with mock.patch.object(barrier_elision, "_exchanges_inside", lambda node: False):
            decision = self._last_decision()
        self.assertTrue(decision.skip_entry_sync, decision.reason)


# --------------------------------------------------------------------------- a user's own reduction


def test_user_registered_reduction_eliminates_the_gather():
    """The worked example of docs/patterns.md, "Eliminating a gather before your own reduction"."""
    import tpfuse
    from greedy_sampler_op import GREEDY_SAMPLER, sample

    with fake_world(2):
        text, rep = capture(sample, _h(), _w())
        assert "all_gather_hidden" in after(text) and rep.eliminations == []
        with tpfuse.elimination_scope(GREEDY_SAMPLER):
            text, rep = capture(sample, _h(), _w())
    assert no_full_width_gather(text), text
    assert [(e.consumers, e.matchers) for e in rep.eliminations] == [(("myserve.greedy",), ("myserve_greedy",))]


def test_patterns_doc_shows_the_tested_code():
    """Every code block of docs/patterns.md marked as taken from the example is in it verbatim."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    doc = open(os.path.join(root, "docs", "patterns.md")).read()
    example = open(os.path.join(root, "examples", "greedy_sampler_op.py")).read()
    blocks = [b.split("```", 1)[0] for b in doc.split("```python\n")[1:]]
    quoted = [b for b in blocks if b.startswith("# from examples/greedy_sampler_op.py\n")]
    assert len(quoted) >= 5
    for block in quoted:
        assert block.split("\n", 1)[1].strip() in example, block


# --------------------------------------------------------------------------- numerics on gloo ranks


def _samplers(h, w, bias):
    """The LM head's logits (padded: 2 x 64 columns, 101 real) under five samplers at once."""
    return _sample(logits_of(h, w), bias)


def _sample(logits, bias):
    greedy = (logits / 0.7).argmax(-1)
    capped = (torch.tanh(logits.float() / 3.0) * 3.0).max(-1)
    top = (logits.float() + bias).topk(3, -1)
    lowest = logits[..., :VOCAB].amin(-1)
    least = logits.argmin(-1, keepdim=True)
    return greedy, capped.values, capped.indices, top.values, top.indices, lowest, least


def _samplers_and_logits(h, w, bias):
    logits = logits_of(h, w)
    return (*_sample(logits, bias), logits)


def _tokens(T, seed, device="cpu"):
    h = torch.randn(T, 16, generator=torch.Generator().manual_seed(seed)).bfloat16().to(device)
    if T >= 3:
        h[0] = 0.0  # all-equal logits: ties across the ranks, lowest index wins
        h[1] = float("nan")  # NaN logits: the first NaN wins
    return h


def _compiled_outputs(fn, args_per_call, tpfuse_on, dynamic):
    import tpfuse

    torch._dynamo.reset()
    # dynamic: T alone is marked (below); dynamic=True would make the widths symbolic too
    compiled = torch.compile(fn, fullgraph=True, dynamic=None if dynamic else False)
    outs = []
    with (tpfuse.enabled() if tpfuse_on else torch.no_grad()), torch.no_grad():
        for args in args_per_call:
            if dynamic:
                torch._dynamo.mark_dynamic(args[0], 0)
            outs.append(compiled(*args))
        rep = tpfuse.report() if tpfuse_on else None
    return outs, rep


def _bits(t):
    return bytes(t.contiguous().reshape(-1).view(torch.uint8).cpu().numpy())


#: _samplers' outputs compared other than bit for bit (docs/passes.md, "Gather elimination",
#: exactness): topk's indices among equal values (torch promises no order; tpfuse returns the
#: lowest global indices first), and amin's sign of a zero that ties with -0.0 (a value-only
#: reduction returns whichever of the equal zeros its reduction order meets; tpfuse returns
#: the element at the first index)
TOPK_INDICES, TOPK_VALUES, AMIN = 4, 3, 5


def _same(i, ours, theirs, outputs):
    if i == AMIN:
        return bool(((ours == theirs) | (ours.isnan() & theirs.isnan())).all())
    if i == TOPK_INDICES:
        tied = outputs[TOPK_VALUES].isnan().any(-1)  # the all-NaN row: every value ties
        lowest_first = torch.arange(ours.shape[-1], device=ours.device).expand_as(ours)
        return torch.equal(ours[~tied], theirs[~tied]) and torch.equal(ours[tied], lowest_first[tied])
    return _bits(ours) == _bits(theirs)


def _equal(on, off, fn):
    if fn is _samplers_and_logits:  # the control: both run torch's reductions, so every bit agrees
        return all(_bits(a) == _bits(b) for o1, o2 in zip(on, off) for a, b in zip(o1, o2))
    return all(_same(i, a, b, o1) for o1, o2 in zip(on, off) for i, (a, b) in enumerate(zip(o1, o2)))


def _numerics(rank, world_size):
    results = compiled_samplers(rank, world_size, "cpu")
    import greedy_sampler_op  # docs/patterns.md's walkthrough: the same tokens with and without its matcher

    results["walkthrough"] = greedy_sampler_op.walkthrough(rank, world_size)
    results["rows"] = compiled_row_samplers(rank, world_size)
    return results


def compiled_samplers(rank, world_size, device):
    """Per (T mode, function): the samplers compiled with tpfuse on and off, compared (also on GPUs:
    tests/gpu/test_reduce_hidden_gpu.py)."""
    g = torch.Generator().manual_seed(7 + rank)
    w = (torch.randn(VOCAB_PER_RANK, 16, generator=g) / 4).bfloat16().to(device)
    bias = torch.randn(VOCAB_PER_RANK * world_size, generator=torch.Generator().manual_seed(3))
    bias[5] = float("-inf")
    bias = bias.to(device)
    results = {}
    for label, calls, dynamic in (("static T=5", [5], False), ("T=1", [1], False), ("dynamic T", [3, 6], True)):
        # the control (the gather stays) once: its compiles are the cost, and T changes nothing in it
        for fn in (_samplers, _samplers_and_logits) if label == "static T=5" else (_samplers,):
            args = [(_tokens(T, seed=T, device=device), w, bias) for T in calls]
            on, rep = _compiled_outputs(fn, args, True, dynamic)
            off, _ = _compiled_outputs(fn, args, False, dynamic)
            results[(label, fn.__name__)] = {
                "equal": _equal(on, off, fn),
                "bit_identical": all(_bits(a) == _bits(b) for o1, o2 in zip(on, off) for a, b in zip(o1, o2)),
                "eliminated": [tuple(sorted(e.consumers)) for e in rep.eliminations],
                "near_misses": [n.reason for n in rep.near_misses],
                "outputs": [[_bits(t) for t in o] for o in on],
            }
    return results


# --------------------------------------------------------------------------- selected rows, at W=2 and W=4


def row_samplers(h, w, rows):
    """Samplers of selected rows of ``[B, T, V]`` logits: the last token's (HF's generate), the last
    two tokens', rows by index, the last row of a flattened view, each sequence's row at a position
    (``gather`` along the tokens), and a token chosen after the argmax."""
    logits = logits_of(h, w)
    last = logits[:, -1, :]
    top = last.float().topk(3, -1)
    flat = logits.view(-1, logits.shape[-1])[-1].max(-1)
    at_position = logits.gather(1, rows.view(-1, 1, 1).expand(-1, 1, logits.shape[-1])).squeeze(1)
    return (last.argmax(-1), top.values, top.indices, logits[:, -2:, :].amax(-1), logits[:, rows].argmin(-1),
            flat.values, flat.indices, logits.argmax(-1)[:, -1], at_position.argmax(-1))


ROW_SAMPLERS = ("amax", "argmax", "argmax", "argmax", "argmin", "max.dim", "topk")


def _row_inputs(T, rank, world_size):
    g = torch.Generator().manual_seed(T)
    h = torch.randn(2, T, 16, generator=g).bfloat16()
    h[0, -1] = 0.0  # the last token of sequence 0: equal logits on every rank, the lowest index wins
    h[1, -1] = float("nan")  # the last token of sequence 1: NaN logits, the first NaN wins
    w = (torch.randn(2 * VOCAB_PER_RANK, 16, generator=torch.Generator().manual_seed(40 + rank)) / 4).bfloat16()
    return h, w, torch.tensor([T - 1, 0])


def _same_values(a, b):
    """Bit for bit, except NaN payloads (the value-only amax: docs/passes.md, exactness)."""
    return bool(((a == b) | (a.isnan() & b.isnan())).all()) and a.shape == b.shape


def _rows_equal(ours, ref, h, w, rows):
    """The exact family on selected rows against eager torch on the gathered logits: every index bit for
    bit, except top-k's among equal values, which must pick values equal to torch's (a valid top-k)."""
    last = logits_of(h, w)[:, -1, :].float()
    top_values, top_indices = ours[1], ours[2]
    valid_topk = _same_values(last.gather(-1, top_indices), top_values) and _same_values(top_values, ref[1])
    bitwise = [i for i in range(len(ref)) if i not in (1, 2, 3)]
    return valid_topk and _same_values(ours[3], ref[3]) and all(_bits(ours[i]) == _bits(ref[i]) for i in bitwise)


def compiled_row_samplers(rank, world_size):
    import tpfuse

    results = {}
    for label, calls, dynamic in (("static T=5", [5], False), ("T=1", [1], False), ("dynamic T", [3, 6], True)):
        torch._dynamo.reset()
        compiled = torch.compile(row_samplers, fullgraph=True, dynamic=None if dynamic else False)
        equal = []
        with tpfuse.enabled(), torch.no_grad():
            for T in calls:
                h, w, rows = _row_inputs(T, rank, world_size)
                if dynamic:
                    torch._dynamo.mark_dynamic(h, 1)
                ours = compiled(h, w, rows)
                equal.append(_rows_equal(ours, row_samplers(h, w, rows), h, w, rows))
            rep = tpfuse.report()
            # the negative control: torch on other rows (the tokens in reverse order) differs
            control = T > 1 and not _rows_equal(ours, row_samplers(h.flip(1), w, rows.flip(0)), h, w, rows)
        results[label] = {"equal": all(equal), "control_differs": control,
                          "eliminated": [tuple(sorted(e.consumers)) for e in rep.eliminations],
                          "steps": [e.steps for e in rep.eliminations],
                          "near_misses": [n.reason for n in rep.near_misses], "outputs": [_bits(t) for t in ours]}
    return results


def _rows_only(rank, world_size):
    return compiled_row_samplers(rank, world_size)


@pytest.fixture(scope="module")
def gloo_w2():
    return run_ranks(2, _numerics, timeout=600)


@pytest.fixture(scope="module")
def gloo_w4_rows():
    return run_ranks(4, _rows_only, timeout=900)


def _check_rows(per_rank):
    for rank, results in enumerate(per_rank):
        for label, r in results.items():
            assert r["equal"], (rank, label)
            assert r["eliminated"] == [ROW_SAMPLERS], (rank, label, r)
            assert r["near_misses"] == [], (rank, label, r)
            assert {"select", "slice", "index", "reshape", "gather"} <= set(r["steps"][0]), (rank, label, r["steps"])
            assert r["control_differs"] or label == "T=1", (rank, label)
    for results in per_rank[1:]:
        assert [r["outputs"] for r in results.values()] == [r["outputs"] for r in per_rank[0].values()]


def test_selected_rows_eliminated_and_bit_exact_w2(gloo_w2):
    _check_rows([r["rows"] for r in gloo_w2])


def test_selected_rows_eliminated_and_bit_exact_w4(gloo_w4_rows):
    _check_rows(gloo_w4_rows)


def test_compiled_samplers_bit_exact_with_tpfuse_off(gloo_w2):
    for rank, results in enumerate(gloo_w2):
        for key, r in _sampler_results(results).items():
            assert r["equal"], (rank, key)


def _sampler_results(results):
    return {k: v for k, v in results.items() if k not in ("walkthrough", "rows")}


def test_user_matcher_walkthrough_on_gloo(gloo_w2):
    assert [r["walkthrough"] for r in gloo_w2] == [True, True]


def test_negative_control_the_comparison_sees_the_tie_rule(gloo_w2):
    """Bit for bit, the topk indices of the all-NaN row differ from torch's: the comparison
    above is not vacuous, and it is the documented tie rule that it allows."""
    assert not gloo_w2[0][("static T=5", "_samplers")]["bit_identical"]
    assert gloo_w2[0][("T=1", "_samplers")]["bit_identical"]  # no tie at T=1: every bit equal


def test_every_sampler_eliminated_and_the_control_keeps_the_gather(gloo_w2):
    samplers = tuple(sorted(("argmax", "max.dim", "topk", "amin", "argmin")))
    for results in gloo_w2:
        for (label, fn), r in _sampler_results(results).items():
            if fn == "_samplers":
                assert r["eliminated"] == [samplers], (label, r)
                assert r["near_misses"] == [], (label, r)
            else:  # the logits are returned too: the gather must stay
                assert r["eliminated"] == [], (label, r)
                assert r["near_misses"] == ["gather kept: the gathered logits are also used by the graph output"]


def test_ranks_agree_bit_for_bit(gloo_w2):
    rank0, rank1 = gloo_w2
    for key in _sampler_results(rank0):
        assert rank0[key]["outputs"] == rank1[key]["outputs"], key
