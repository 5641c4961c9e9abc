"""Graph tests of the fused linear + gather rewrite (``tpfuse.enable(fuse_linear=True)``).

Post-grad graphs on the CPU with a ``backend="fake"`` group, before and after,
as inline expected text (``EXPECTTEST_ACCEPT=1`` rewrites them).  The cost
rule (compile_ops/linear_cost.py) is calibrated on 4xH200; these tests pin
which rule fires for a shape, not that the rule is right (the benchmark is
where that is measured).  There is no GPU here, so the pass is told to decide
for the measured card (``linear_cost.compile_time_device_name``), except where a
test names another.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import pytest
from expecttest import TestCase

from pass_helpers import FakeWorld, capture
from tpfuse.compile_ops import linear_cost

H200 = "NVIDIA H200"


@pytest.fixture(autouse=True)
def _measured_card(monkeypatch):
    """Decide as on the card the rule was measured on (tests that need another patch again)."""
    monkeypatch.setattr(linear_cost, "compile_time_device_name", lambda: H200)


def linear_gather(x, w):
    return funcol.all_gather_tensor(x @ w.t(), gather_dim=-1, group=dist.group.WORLD)


def linear_gather_t1(x, w):
    # dim written positively: funcol mis-shapes the T=1 view form for -1 (see bench_e2e_decode)
    return funcol.all_gather_tensor(x @ w.t(), gather_dim=1, group=dist.group.WORLD)


def linear_bias_gather_3d(x, w, b):
    return funcol.all_gather_tensor(torch.nn.functional.linear(x, w, b), gather_dim=2, group=dist.group.WORLD)


def linear_gather_dim0_rearrange(x, w):
    # the vocab gather as vLLM (and benchmarks/bench_e2e_decode.py) write it
    y = x @ w.t()
    tokens, shard = y.shape
    stacked = funcol.all_gather_tensor(y, gather_dim=0, group=dist.group.WORLD)
    return stacked.view(-1, tokens, shard).permute(1, 0, 2).reshape(tokens, -1)


def linear_used_twice(x, w):
    y = x @ w.t()
    return funcol.all_gather_tensor(y, gather_dim=-1, group=dist.group.WORLD), y.sum()


def two_layers(x, w1, w2):
    h = linear_gather(x, w1)  # [T, W*8]
    return linear_gather(torch.relu(h[:, : w2.shape[1]]), w2)


#: a shape the calibrated cost rule fuses at W=2: T=32, K=512, N_r=32768 (predicted 1.21x)
WIDE_T, WIDE_K, WIDE_N = 32, 512, 32768


def _wide():
    """x [WIDE_T, WIDE_K] (random) and an uninitialised weight [WIDE_N, WIDE_K]: only shapes matter here."""
    return torch.randn(WIDE_T, WIDE_K, dtype=torch.bfloat16), torch.empty(WIDE_N, WIDE_K, dtype=torch.bfloat16)


def _decisions(rep):
    return "\n".join(m.linear_fusion or "None" for m in rep.matches)


def _near(rep):
    return "\n".join(f"{n.pattern}: {n.reason}" for n in rep.near_misses)


class TestLinearFusionW2(FakeWorld, TestCase):
    maxDiff = None

    def test_off_by_default(self):
        x, w = torch.randn(4, 16, dtype=torch.bfloat16), torch.randn(8, 16, dtype=torch.bfloat16)
        text, rep = capture(linear_gather, x, w)
        self.assertIsNone(rep.matches[0].linear_fusion)
        self.assertIn("tpfuse.all_gather_hidden(mm, [8, 8], '0')", text)
        self.assertNotIn("linear_all_gather_hidden", text)

    def test_wide_linear_is_fused(self):
        x, w = _wide()
        text, rep = capture(linear_gather, x, w, fuse_linear=True)
        self.assertExpectedInline(text, """\
inputs: arg0_1, arg1_1
permute = permute(arg0_1, [1, 0])
mm = mm(arg1_1, permute)
all_gather_into_tensor = _c10d_functional.all_gather_into_tensor(mm, 2, '0')
wait_tensor = _c10d_functional.wait_tensor(all_gather_into_tensor)
split = split.Tensor(wait_tensor, 32)
getitem = getitem(split, 0)
getitem_1 = getitem(split, 1)
cat = cat([getitem, getitem_1], -1)
return [cat]
---- after tpfuse ----
inputs: arg0_1, arg1_1
linear_all_gather_hidden_default = tpfuse.linear_all_gather_hidden(arg1_1, arg0_1, None, [32768, 32768], '0')
return [linear_all_gather_hidden_default]""")
        self.assertExpectedInline(_decisions(rep), """fused [predicted_faster]: T=32 K=512 N_r=32768 W=2: predicted fused 20.2 us vs linear+gather 26.8 us (1.33x, threshold 1.22x; measured-v5 (4xH200, 2026-11-27))""")
        self.assertEqual(rep.near_misses, [])

    def test_dim0_gather_then_rearrange_is_fused(self):
        x, w = _wide()
        text, rep = capture(linear_gather_dim0_rearrange, x, w, fuse_linear=True)
        self.assertIn("tpfuse.linear_all_gather_hidden(arg1_1, arg0_1, None, [32768, 32768], '0')", text.split("after tpfuse")[1])
        self.assertExpectedInline(_decisions(rep), """fused [predicted_faster]: T=32 K=512 N_r=32768 W=2: predicted fused 20.2 us vs linear+gather 26.8 us (1.33x, threshold 1.22x; measured-v5 (4xH200, 2026-11-27))""")

    def test_3d_with_bias_fused_and_reshaped(self):
        x = torch.randn(2, 16, WIDE_K, dtype=torch.bfloat16)
        w, b = _wide()[1], torch.randn(WIDE_N, dtype=torch.bfloat16)
        text, rep = capture(linear_bias_gather_3d, x, w, b, fuse_linear=True)
        self.assertExpectedInline(text.split("---- after tpfuse ----\n")[1], """\
inputs: arg0_1, arg1_1, arg2_1
view = reshape(arg0_1, [32, 512])
linear_all_gather_hidden_default = tpfuse.linear_all_gather_hidden(view, arg1_1, arg2_1, [32768, 32768], '0')
reshape_default = reshape(linear_all_gather_hidden_default, [2, 16, 65536])
return [reshape_default]""")
        self.assertTrue(rep.matches[0].linear_fusion.startswith("fused [predicted_faster]"))

    def test_float32_is_a_near_miss(self):
        text, rep = capture(linear_gather, torch.randn(4, 16), torch.randn(8, 16), fuse_linear=True)
        self.assertIn("tpfuse.all_gather_hidden(mm, [8, 8], '0')", text)
        self.assertExpectedInline(_near(rep), """fused_linear: not fused [unsupported]: dtype float32 (the fused kernel takes bfloat16 / float16)""")

    def test_linear_used_twice_is_a_near_miss(self):
        x, w = torch.randn(4, 16, dtype=torch.bfloat16), torch.randn(8, 16, dtype=torch.bfloat16)
        text, rep = capture(linear_used_twice, x, w, fuse_linear=True)
        self.assertNotIn("linear_all_gather_hidden", text)
        self.assertExpectedInline(_near(rep), """fused_linear: not fused [shape]: mm is also used by all_gather_hidden_default, sum_1; fusing would compute the linear twice""")

    def test_narrow_band_not_modelled(self):
        # The Llama-8B MLP projection at W=2 and T=1: 32-column tiles, which the model does not describe.
        x, w = torch.randn(1, 4096, dtype=torch.bfloat16), torch.empty(7168, 4096, dtype=torch.bfloat16)
        text, rep = capture(linear_gather_t1, x, w, fuse_linear=True)
        self.assertNotIn("linear_all_gather_hidden", text)
        self.assertExpectedInline(_decisions(rep), """not fused [not_modelled]: N_r=7168 at T=1: too narrow for 128-column tiles to fill the SMs; the model is fitted to wide bands only, and these 32-column tiles measured 0.46-1.24x of linear + gather (EAGLE3 projection 0.46-0.68x, Llama-8B MLP 0.98-1.24x)""")

    def test_wide_band_at_t1_predicted_slower(self):
        # A wide band at T=1: the weight stream dominates, and the model predicts too little gain.
        x, w = torch.randn(1, 4096, dtype=torch.bfloat16), torch.empty(32768, 4096, dtype=torch.bfloat16)
        text, rep = capture(linear_gather_t1, x, w, fuse_linear=True)
        self.assertNotIn("linear_all_gather_hidden", text)
        self.assertExpectedInline(_decisions(rep), """not fused [predicted_slower]: T=1 K=4096 N_r=32768 W=2: predicted fused 69.4 us vs linear+gather 76.3 us (1.10x, threshold 1.22x; measured-v5 (4xH200, 2026-11-27))""")

    def test_dry_run_records_without_rewriting(self):
        x, w = _wide()
        text, rep = capture(linear_gather, x, w, fuse_linear=True, dry_run=True)
        self.assertNotIn("linear_all_gather_hidden", text)
        self.assertTrue(rep.matches[0].linear_fusion.startswith("fused [predicted_faster]"))

    def test_second_fused_layer_skips_its_entry_barrier(self):
        """The fused op joins barrier elision: the first layer's exit barrier fences the second."""
        x, w1 = _wide()
        w2 = torch.empty(WIDE_N, WIDE_K, dtype=torch.bfloat16)
        text, rep = capture(two_layers, x, w1, w2, fuse_linear=True)
        self.assertExpectedInline(text.split("---- after tpfuse ----\n")[1], """\
inputs: arg0_1, arg1_1, arg2_1
linear_all_gather_hidden_default = tpfuse.linear_all_gather_hidden(arg1_1, arg0_1, None, [32768, 32768], '0', slot=0, skip_entry_sync=False, zero_copy=False)
slice_1 = slice.Tensor(linear_all_gather_hidden_default, 1, 0, 512)
relu = relu(slice_1)
linear_all_gather_hidden_default_1 = tpfuse.linear_all_gather_hidden(relu, arg2_1, None, [32768, 32768], '0', slot=1, skip_entry_sync=True, zero_copy=False)
return [linear_all_gather_hidden_default_1]""")
        self.assertExpectedInline("\n".join(f"{d.gather} slot {d.slot} skip={d.skip_entry_sync}: {d.reason}"
                                             for d in rep.barriers), """\
linear_all_gather_hidden_default slot 0 skip=False: entry barrier kept: no fence on group '0' precedes it in the graph, so a peer may still be reading the slot for a call before this graph
linear_all_gather_hidden_default_1 slot 1 skip=True: after (a) exit barrier of linear_all_gather_hidden_default; linear_all_gather_hidden_default may run just before it on slot 0""")

    def test_fused_result_may_be_a_view_of_the_slot(self):
        """With zero_copy=True the fused op gets the gather's zero-copy rule: the first layer's
        readers finish before anything rewrites its slot; the second's result leaves the graph."""
        x, w1 = _wide()
        w2 = torch.empty(WIDE_N, WIDE_K, dtype=torch.bfloat16)
        text, rep = capture(two_layers, x, w1, w2, fuse_linear=True, zero_copy=True)
        after = text.split("---- after tpfuse ----\n")[1]
        self.assertIn("slot=0, skip_entry_sync=False, zero_copy=True)", after)
        self.assertIn("slot=1, skip_entry_sync=True, zero_copy=False)", after)
        self.assertExpectedInline("\n".join(f"{d.gather}: {d.zero_copy_reason}" for d in rep.barriers), """\
linear_all_gather_hidden_default: readers proven done before the slot is rewritten: the result is a view of the slot
linear_all_gather_hidden_default_1: the result (or a view of it) is a graph output""")

    def test_direct_fused_call_is_seen_by_barrier_elision(self):
        """A fused op the user called directly shares the gathers' slots: elision must see it,
        or a gather that may run right after it could skip its entry barrier on the same slot."""
        name = dist.group.WORLD.group_name

        def fn(x, w):
            first = torch.ops.tpfuse.all_gather_hidden(x @ w.t(), [8, 8], name)  # a fence for both below
            h = torch.relu(first)
            fused = torch.ops.tpfuse.linear_all_gather_hidden(h, w, None, [8, 8], name)
            gathered = torch.ops.tpfuse.all_gather_hidden(h @ w.t(), [8, 8], name)  # independent of `fused`
            return fused, gathered

        x, w = torch.randn(4, 16, dtype=torch.bfloat16), torch.randn(8, 16, dtype=torch.bfloat16)
        _, rep = capture(fn, x, w)
        decided = {d.gather: (d.slot, d.skip_entry_sync) for d in rep.barriers}
        self.assertIn("linear_all_gather_hidden", decided)
        # fused and gathered may run in either order with no fence between: different slots.
        self.assertNotEqual(decided["linear_all_gather_hidden"][0], decided["all_gather_hidden_1"][0])
        self.assertExpectedInline(repr(decided), """{'all_gather_hidden': (0, False), 'linear_all_gather_hidden': (1, True), 'all_gather_hidden_1': (0, False)}""")

    def test_report_names_the_rule(self):
        from tpfuse.passes.records import Report

        x, w = _wide()
        _, rep = capture(linear_gather, x, w, fuse_linear=True)
        self.assertIn("fused linear", str(Report([rep])))
        self.assertIn("[predicted_faster]", str(Report([rep])))


class TestLinearFusionW4(FakeWorld, TestCase):
    maxDiff = None

    WORLD_SIZE = 4

    def test_mlp_projection_w4_decode_not_fused(self):
        # Llama-8B MLP-sized column projection at W=4, T=1: a narrow band (32-column tiles), measured
        # 0.98-1.24x at T <= 32 in one run on 4xH200, not modelled: not fused whatever the model says.
        x, w = torch.randn(1, 4096, dtype=torch.bfloat16), torch.empty(3584, 4096, dtype=torch.bfloat16)
        text, rep = capture(linear_gather_t1, x, w, fuse_linear=True)
        self.assertNotIn("linear_all_gather_hidden", text)
        self.assertExpectedInline(_decisions(rep), """not fused [not_modelled]: N_r=3584 at T=1: too narrow for 128-column tiles to fill the SMs; the model is fitted to wide bands only, and these 32-column tiles measured 0.46-1.24x of linear + gather (EAGLE3 projection 0.46-0.68x, Llama-8B MLP 0.98-1.24x)""")

    def test_lm_head_w4_t32_fused(self):
        # An LM head band (vocab 128256 / 4) at T=32: measured 1.25-1.27x in four runs on 4xH200
        # (docs/benchmarks.md).
        x, w = torch.randn(32, 4096, dtype=torch.bfloat16), torch.empty(32064, 4096, dtype=torch.bfloat16)
        text, rep = capture(linear_gather, x, w, fuse_linear=True)
        self.assertIn("tpfuse.linear_all_gather_hidden(arg1_1, arg0_1, None, [32064, 32064, 32064, 32064], '0')", text)
        self.assertExpectedInline(_decisions(rep), """fused [predicted_faster]: T=32 K=4096 N_r=32064 W=4: predicted fused 78.8 us vs linear+gather 100.7 us (1.28x, threshold 1.22x; measured-v5 (4xH200, 2026-11-27))""")

    def test_unmeasured_card_is_not_fused(self):
        # The LM head that fuses on the H200 at T=32 (above), compiled for a card with no measurement.
        linear_cost.compile_time_device_name = lambda: "NVIDIA H100 80GB HBM3"  # the fixture restores it
        x, w = torch.randn(32, 4096, dtype=torch.bfloat16), torch.empty(32064, 4096, dtype=torch.bfloat16)
        text, rep = capture(linear_gather, x, w, fuse_linear=True)
        self.assertNotIn("linear_all_gather_hidden", text)
        self.assertExpectedInline(_near(rep), """fused_linear: not fused [not_measured]: not measured on NVIDIA H100 80GB HBM3 at W=4""")

    def test_symbolic_tokens_fused_when_some_t_in_range_fuses(self):
        # The LM head: fused at T = 21..32 on the H200; T is dynamic (2..inf), so the op decides per call.
        x, w = torch.randn(32, 4096, dtype=torch.bfloat16), torch.empty(32064, 4096, dtype=torch.bfloat16)
        torch._dynamo.mark_dynamic(x, 0)
        text, rep = capture(linear_gather, x, w, fuse_linear=True)
        self.assertIn("tpfuse.linear_all_gather_hidden(arg", text.split("after tpfuse")[1])
        self.assertExpectedInline(_decisions(rep), """fused [per_call]: T symbolic (range 2..inf): fused op, decided per call; fuses at T in [21..32] on NVIDIA H200 W=4""")
        self.assertEqual(rep.near_misses, [])

    def test_symbolic_tokens_not_fused_when_no_t_in_range_fuses(self):
        # The same LM head with T bounded to 2..16, where every T predicts < 1.22x.
        x, w = torch.randn(8, 4096, dtype=torch.bfloat16), torch.empty(32064, 4096, dtype=torch.bfloat16)
        torch._dynamo.mark_dynamic(x, 0, min=2, max=16)
        text, rep = capture(linear_gather, x, w, fuse_linear=True)
        self.assertNotIn("linear_all_gather_hidden", text)
        self.assertTrue(_decisions(rep).startswith(
            "not fused [predicted_slower]: T symbolic (range 2..16): no T in 2..16 fuses; at T=16: T=16 K=4096"),
            _decisions(rep))

    def test_symbolic_tokens_narrow_band_not_fused(self):
        # The Llama-8B MLP band at W=4: too narrow at every T, whatever the range.
        x, w = torch.randn(8, 4096, dtype=torch.bfloat16), torch.empty(3584, 4096, dtype=torch.bfloat16)
        torch._dynamo.mark_dynamic(x, 0)
        text, rep = capture(linear_gather, x, w, fuse_linear=True)
        self.assertNotIn("linear_all_gather_hidden", text)
        self.assertTrue(_decisions(rep).startswith(
            "not fused [not_modelled]: T symbolic (range 2..inf): no T in 2..32 fuses; at T=32: N_r=3584"),
            _decisions(rep))


class TestLinearFusionW8(FakeWorld, TestCase):
    WORLD_SIZE = 8

    def test_unmeasured_world_size_is_not_fused(self):
        # An LM head band at W=8: the rule's gather latency was measured at W=2 and 4 only.
        x, w = torch.randn(32, 4096, dtype=torch.bfloat16), torch.empty(16032, 4096, dtype=torch.bfloat16)
        text, rep = capture(linear_gather, x, w, fuse_linear=True)
        self.assertNotIn("linear_all_gather_hidden", text)
        self.assertExpectedInline(_near(rep), """fused_linear: not fused [not_measured]: not measured on NVIDIA H200 at W=8""")


def test_fuse_linear_enters_the_cache_key():
    from tpfuse.passes.manager import PassConfig, TpfusePass

    assert TpfusePass(PassConfig()).uuid() != TpfusePass(PassConfig(fuse_linear=True)).uuid()


def test_the_compile_time_card_enters_the_cache_key(monkeypatch):
    """A graph rewritten for one card must not be served from the cache on another."""
    from tpfuse.passes import linear_fusion

    h200 = linear_fusion.cache_key()
    monkeypatch.setattr(linear_cost, "compile_time_device_name", lambda: "NVIDIA H100 80GB HBM3")
    assert linear_fusion.cache_key() != h200
