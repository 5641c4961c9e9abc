"""Graph tests of the pattern pass: every form in docs/passes.md, before and after.

Each test compiles a small function on the CPU with a ``backend="fake"``
process group, takes Inductor's real post-grad graph, runs the tpfuse passes
on it and compares the graph before and after with an inline expected text
(``EXPECTTEST_ACCEPT=1 pytest tests/test_pass_graphs.py`` rewrites them).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn as nn
from expecttest import TestCase

from pass_helpers import FakeWorld, capture, normalise_placeholders, torch_cannot_trace_unbacked_gather


def _world():
    return dist.get_world_size()


def funcol_gather(x, w, dim=-1):
    return funcol.all_gather_tensor(x @ w.t(), gather_dim=dim, group=dist.group.WORLD)


def _capture_unbacked(test, fn, *args):
    """``capture``, skipping the test where torch's own funcol cannot trace the gather of an unbacked T
    (torch 2.11; ``torch_cannot_trace_unbacked_gather`` says which error that is, any other one is raised)."""
    try:
        return capture(fn, *args)
    except Exception as err:  # noqa: BLE001 - only the one refusal is turned into a skip
        reason = torch_cannot_trace_unbacked_gather(err)
        if reason is None:
            raise
        test.skipTest(reason)


def funcol_gather_relu(x, w):
    gathered = funcol_gather(x, w)
    return torch.relu(gathered) @ torch.ones(gathered.shape[-1], 4)


def funcol_gather_dim1(x, w):
    return funcol_gather(x, w, dim=1)


def funcol_gather_dim0(x, w):
    return funcol_gather(x, w, dim=0)


def inplace_permute(x, w):
    y = x @ w.t()
    W, T = _world(), y.shape[0]
    out = torch.empty(W * T, y.shape[1], dtype=y.dtype)
    dist.all_gather_into_tensor(out, y)
    return out.view(W, T, -1).permute(1, 0, 2).contiguous().view(T, -1)


def inplace_movedim(x, w):
    y = x @ w.t()
    W, T = _world(), y.shape[0]
    out = torch.empty(W * T, y.shape[1], dtype=y.dtype)
    dist.all_gather_into_tensor(out, y)
    return out.view(W, T, -1).movedim(0, 1).reshape(T, -1)


def inplace_transpose(x, w):
    y = x @ w.t()
    W, T = _world(), y.shape[0]
    out = torch.empty(W * T, y.shape[1], dtype=y.dtype)
    dist.all_gather_into_tensor(out, y)
    return out.view(W, T, -1).transpose(0, 1).reshape(T, -1)


def inplace_chunk_cat(x, w):
    y = x @ w.t()
    out = torch.empty(_world() * y.shape[0], y.shape[1], dtype=y.dtype)
    dist.all_gather_into_tensor(out, y)
    return torch.cat(out.chunk(_world(), 0), dim=-1)


def list_gather_cat(x, w):
    y = x @ w.t()
    outs = [torch.empty_like(y) for _ in range(_world())]
    dist.all_gather(outs, y)
    return torch.cat(outs, -1)


def inplace_wrong_rearrange(x, w):
    # [W*T, w] viewed as [T, W, w]: rows are not split by rank, so no hidden concat
    y = x @ w.t()
    W, T = _world(), y.shape[0]
    out = torch.empty(W * T, y.shape[1], dtype=y.dtype)
    dist.all_gather_into_tensor(out, y)
    return out.view(T, W, -1).transpose(0, 1).reshape(T, -1)


def inplace_raw_and_rearranged(x, w):
    y = x @ w.t()
    W, T = _world(), y.shape[0]
    out = torch.empty(W * T, y.shape[1], dtype=y.dtype)
    dist.all_gather_into_tensor(out, y)
    return out.view(W, T, -1).permute(1, 0, 2).reshape(T, -1), out.sum()


def coalesced_gathers(x, w):
    y1, y2 = x @ w.t(), (x * 2) @ w.t()
    a, b = funcol.all_gather_into_tensor_coalesced([y1, y2], group=dist.group.WORLD)
    return torch.cat(a.chunk(_world()), -1), b


def _colwise_linear(bias=True):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    torch.manual_seed(0)
    lin = nn.Linear(16, 8 * _world(), bias=bias)
    mesh = init_device_mesh("cpu", (_world(),))
    return parallelize_module(lin, mesh, ColwiseParallel(output_layouts=Replicate()))


def _w():
    return torch.randn(8, 16)


class PassGraphTestBase(TestCase):
    maxDiff = None


class TestFormsW2(FakeWorld, PassGraphTestBase):
    def test_funcol_split_cat_negative_dim(self):
        text, rep = capture(funcol_gather, torch.randn(4, 16), _w())
        self.assertEqual([m.pattern for m in rep.matches], ["split_cat"])
        self.assertEqual(rep.matches[0].producer.kind, "column_linear")
        self.assertExpectedInline(text, """\
inputs: arg0_1, arg1_1
permute = permute(arg0_1, [1, 0])
mm = mm(arg1_1, permute)
all_gather_into_tensor = _c10d_functional.all_gather_into_tensor(mm, 2, '0')
wait_tensor = _c10d_functional.wait_tensor(all_gather_into_tensor)
split = split.Tensor(wait_tensor, 4)
getitem = getitem(split, 0)
getitem_1 = getitem(split, 1)
cat = cat([getitem, getitem_1], -1)
return [cat]
---- after tpfuse ----
inputs: arg0_1, arg1_1
permute = permute(arg0_1, [1, 0])
mm = mm(arg1_1, permute)
all_gather_hidden_default = tpfuse.all_gather_hidden(mm, [8, 8], '0')
return [all_gather_hidden_default]""")

    def test_funcol_view_when_leading_dims_are_1(self):
        text, rep = capture(funcol_gather_dim1, torch.randn(1, 16), _w())
        self.assertEqual([m.pattern for m in rep.matches], ["view"])
        self.assertExpectedInline(text, """\
inputs: arg0_1, arg1_1
permute = permute(arg0_1, [1, 0])
mm = mm(arg1_1, permute)
all_gather_into_tensor = _c10d_functional.all_gather_into_tensor(mm, 2, '0')
wait_tensor = _c10d_functional.wait_tensor(all_gather_into_tensor)
view = reshape(wait_tensor, [1, 16])
return [view]
---- after tpfuse ----
inputs: arg0_1, arg1_1
permute = permute(arg0_1, [1, 0])
mm = mm(arg1_1, permute)
all_gather_hidden_default = tpfuse.all_gather_hidden(mm, [8, 8], '0')
return [all_gather_hidden_default]""")

    def test_funcol_narrow_cat_unbacked(self):
        x = torch.randn(4, 16)
        torch._dynamo.decorators.mark_unbacked(x, 0)
        text, rep = _capture_unbacked(self, funcol_gather_dim1, x, _w())
        self.assertEqual([m.pattern for m in rep.matches], ["narrow_cat"])
        self.assertExpectedInline(text, """\
inputs: arg0_1, arg1_1, arg2_1
ge = ge(arg0_1, 0)
_assert_scalar = _assert_scalar(ge, "Runtime assertion failed for expression u0 >= 0 on node 'ge'")
permute = permute(arg1_1, [1, 0])
mm = mm(arg2_1, permute)
all_gather_into_tensor = _c10d_functional.all_gather_into_tensor(mm, 2, '0')
wait_tensor = _c10d_functional.wait_tensor(all_gather_into_tensor)
slice_1 = slice.Tensor(wait_tensor, 0, 0, arg0_1)
add_13 = add(arg0_1, arg0_1)
slice_2 = slice.Tensor(wait_tensor, 0, arg0_1, add_13)
cat = cat([slice_1, slice_2], 1)
return [cat]
---- after tpfuse ----
inputs: arg0_1, arg1_1, arg2_1
ge = ge(arg0_1, 0)
_assert_scalar = _assert_scalar(ge, "Runtime assertion failed for expression u0 >= 0 on node 'ge'")
permute = permute(arg1_1, [1, 0])
mm = mm(arg2_1, permute)
all_gather_hidden_default = tpfuse.all_gather_hidden(mm, [8, 8], '0')
return [all_gather_hidden_default]""")

    def test_inplace_reshape_permute_clone_reshape(self):
        text, rep = capture(inplace_permute, torch.randn(4, 16), _w())
        self.assertEqual([m.pattern for m in rep.matches], ["rearrange"])
        self.assertExpectedInline(text, """\
inputs: arg0_1, arg1_1
empty = empty.memory_format([8, 8], dtype=float32)
permute = permute(arg0_1, [1, 0])
mm = mm(arg1_1, permute)
all_gather_into_tensor = _c10d_functional.all_gather_into_tensor(mm, 2, '0')
wait_tensor = _c10d_functional.wait_tensor(all_gather_into_tensor)
view_2 = reshape(wait_tensor, [2, 4, -1])
permute_2 = permute(view_2, [1, 0, 2])
clone = clone(permute_2, memory_format=torch.contiguous_format)
view_3 = reshape(clone, [4, -1])
return [view_3]
---- after tpfuse ----
inputs: arg0_1, arg1_1
empty = empty.memory_format([8, 8], dtype=float32)
permute = permute(arg0_1, [1, 0])
mm = mm(arg1_1, permute)
all_gather_hidden_default = tpfuse.all_gather_hidden(mm, [8, 8], '0')
return [all_gather_hidden_default]""")

    def test_inplace_movedim(self):
        text, rep = capture(inplace_movedim, torch.randn(4, 16), _w())
        self.assertEqual([m.pattern for m in rep.matches], ["rearrange"])
        self.assertExpectedInline(text, """\
inputs: arg0_1, arg1_1
empty = empty.memory_format([8, 8], dtype=float32)
permute = permute(arg0_1, [1, 0])
mm = mm(arg1_1, permute)
all_gather_into_tensor = _c10d_functional.all_gather_into_tensor(mm, 2, '0')
wait_tensor = _c10d_functional.wait_tensor(all_gather_into_tensor)
view_2 = reshape(wait_tensor, [2, 4, -1])
permute_2 = permute(view_2, [1, 0, 2])
clone = clone(permute_2, memory_format=torch.contiguous_format)
view_3 = reshape(clone, [4, 16])
return [view_3]
---- after tpfuse ----
inputs: arg0_1, arg1_1
empty = empty.memory_format([8, 8], dtype=float32)
permute = permute(arg0_1, [1, 0])
mm = mm(arg1_1, permute)
all_gather_hidden_default = tpfuse.all_gather_hidden(mm, [8, 8], '0')
return [all_gather_hidden_default]""")

    def test_inplace_transpose(self):
        text, rep = capture(inplace_transpose, torch.randn(4, 16), _w())
        self.assertEqual([m.pattern for m in rep.matches], ["rearrange"])
        self.assertExpectedInline(text, """\
inputs: arg0_1, arg1_1
empty = empty.memory_format([8, 8], dtype=float32)
permute = permute(arg0_1, [1, 0])
mm = mm(arg1_1, permute)
all_gather_into_tensor = _c10d_functional.all_gather_into_tensor(mm, 2, '0')
wait_tensor = _c10d_functional.wait_tensor(all_gather_into_tensor)
view_2 = reshape(wait_tensor, [2, 4, -1])
permute_2 = permute(view_2, [1, 0, 2])
clone = clone(permute_2, memory_format=torch.contiguous_format)
view_3 = reshape(clone, [4, 16])
return [view_3]
---- after tpfuse ----
inputs: arg0_1, arg1_1
empty = empty.memory_format([8, 8], dtype=float32)
permute = permute(arg0_1, [1, 0])
mm = mm(arg1_1, permute)
all_gather_hidden_default = tpfuse.all_gather_hidden(mm, [8, 8], '0')
return [all_gather_hidden_default]""")

    def test_inplace_chunk_cat(self):
        text, rep = capture(inplace_chunk_cat, torch.randn(4, 16), _w())
        self.assertEqual([m.pattern for m in rep.matches], ["split_cat"])
        self.assertExpectedInline(text, """\
inputs: arg0_1, arg1_1
empty = empty.memory_format([8, 8], dtype=float32)
permute = permute(arg0_1, [1, 0])
mm = mm(arg1_1, permute)
all_gather_into_tensor = _c10d_functional.all_gather_into_tensor(mm, 2, '0')
wait_tensor = _c10d_functional.wait_tensor(all_gather_into_tensor)
split_1 = split.Tensor(wait_tensor, 4)
getitem_2 = getitem(split_1, 0)
split_2 = split.Tensor(wait_tensor, 4)
getitem_5 = getitem(split_2, 1)
cat = cat([getitem_2, getitem_5], -1)
return [cat]
---- after tpfuse ----
inputs: arg0_1, arg1_1
empty = empty.memory_format([8, 8], dtype=float32)
permute = permute(arg0_1, [1, 0])
mm = mm(arg1_1, permute)
all_gather_hidden_default = tpfuse.all_gather_hidden(mm, [8, 8], '0')
return [all_gather_hidden_default]""")

    def test_list_all_gather_cat(self):
        text, rep = capture(list_gather_cat, torch.randn(4, 16), _w())
        self.assertEqual([m.pattern for m in rep.matches], ["narrow_cat"])
        self.assertExpectedInline(text, """\
inputs: arg0_1, arg1_1
empty = empty.memory_format([4, 8], dtype=float32)
empty_1 = empty.memory_format([4, 8], dtype=float32)
permute = permute(arg0_1, [1, 0])
mm = mm(arg1_1, permute)
all_gather_into_tensor = _c10d_functional.all_gather_into_tensor(mm, 2, '0')
wait_tensor = _c10d_functional.wait_tensor(all_gather_into_tensor)
slice_1 = slice.Tensor(wait_tensor, 0, 0, 4)
slice_2 = slice.Tensor(wait_tensor, 0, 4, 8)
cat = cat([slice_1, slice_2], -1)
return [cat]
---- after tpfuse ----
inputs: arg0_1, arg1_1
empty = empty.memory_format([4, 8], dtype=float32)
empty_1 = empty.memory_format([4, 8], dtype=float32)
permute = permute(arg0_1, [1, 0])
mm = mm(arg1_1, permute)
all_gather_hidden_default = tpfuse.all_gather_hidden(mm, [8, 8], '0')
return [all_gather_hidden_default]""")

    def test_dtensor_colwise_2d(self):
        text, rep = capture(_colwise_linear(), torch.randn(4, 16))
        self.assertEqual([m.pattern for m in rep.matches], ["split_cat"])
        self.assertEqual(rep.matches[0].producer.op, "addmm")
        self.assertExpectedInline(text, """\
inputs: arg0_1, arg1_1, arg2_1
permute = permute(arg0_1, [1, 0])
addmm = addmm(arg1_1, arg2_1, permute)
all_gather_into_tensor = _c10d_functional.all_gather_into_tensor(addmm, 2, '0')
wait_tensor = _c10d_functional.wait_tensor(all_gather_into_tensor)
split = split.Tensor(wait_tensor, 4)
getitem = getitem(split, 0)
getitem_1 = getitem(split, 1)
cat = cat([getitem, getitem_1], 1)
return [cat]
---- after tpfuse ----
inputs: arg0_1, arg1_1, arg2_1
permute = permute(arg0_1, [1, 0])
addmm = addmm(arg1_1, arg2_1, permute)
all_gather_hidden_default = tpfuse.all_gather_hidden(addmm, [8, 8], '0')
return [all_gather_hidden_default]""")

    def test_dtensor_colwise_3d_positive_dim(self):
        text, rep = capture(_colwise_linear(bias=False), torch.randn(2, 3, 16))
        self.assertEqual([m.pattern for m in rep.matches], ["split_cat"])
        self.assertEqual(rep.matches[0].producer.reshapes, ("view_2",))
        self.assertExpectedInline(text, """\
inputs: arg0_1, arg1_1
view_1 = reshape(arg0_1, [6, 16])
permute = permute(arg1_1, [1, 0])
mm = mm(view_1, permute)
view_2 = reshape(mm, [2, 3, 8])
all_gather_into_tensor = _c10d_functional.all_gather_into_tensor(view_2, 2, '0')
wait_tensor = _c10d_functional.wait_tensor(all_gather_into_tensor)
split = split.Tensor(wait_tensor, 2)
getitem = getitem(split, 0)
getitem_1 = getitem(split, 1)
cat = cat([getitem, getitem_1], 2)
return [cat]
---- after tpfuse ----
inputs: arg0_1, arg1_1
view_1 = reshape(arg0_1, [6, 16])
permute = permute(arg1_1, [1, 0])
mm = mm(view_1, permute)
view_2 = reshape(mm, [2, 3, 8])
all_gather_hidden_default = tpfuse.all_gather_hidden(view_2, [8, 8], '0')
return [all_gather_hidden_default]""")

    def test_dtensor_colwise_3d_decode_view_other_producer(self):
        # B = S = 1: funcol emits the view form, and Inductor decomposes the tiny addmm
        text, rep = capture(_colwise_linear(), torch.randn(1, 1, 16))
        self.assertEqual([m.pattern for m in rep.matches], ["view"])
        self.assertEqual(rep.matches[0].producer.kind, "other")
        self.assertExpectedInline(text, """\
inputs: arg0_1, arg1_1, arg2_1
view_1 = reshape(arg0_1, [1, 16])
permute_1 = permute(view_1, [1, 0])
permute = permute(arg1_1, [1, 0])
mul = mul.Tensor(permute_1, permute)
sum_1 = sum.dim_IntList(mul, [0], True)
mul_1 = mul.Tensor(sum_1, 1)
mul_2 = mul.Tensor(arg2_1, 1)
add = add.Tensor(mul_1, mul_2)
view_2 = reshape(add, [1, 1, 8])
all_gather_into_tensor = _c10d_functional.all_gather_into_tensor(view_2, 2, '0')
wait_tensor = _c10d_functional.wait_tensor(all_gather_into_tensor)
view_3 = reshape(wait_tensor, [1, 1, 16])
return [view_3]
---- after tpfuse ----
inputs: arg0_1, arg1_1, arg2_1
view_1 = reshape(arg0_1, [1, 16])
permute_1 = permute(view_1, [1, 0])
permute = permute(arg1_1, [1, 0])
mul = mul.Tensor(permute_1, permute)
sum_1 = sum.dim_IntList(mul, [0], True)
mul_1 = mul.Tensor(sum_1, 1)
mul_2 = mul.Tensor(arg2_1, 1)
add = add.Tensor(mul_1, mul_2)
view_2 = reshape(add, [1, 1, 8])
all_gather_hidden_default = tpfuse.all_gather_hidden(view_2, [8, 8], '0')
return [all_gather_hidden_default]""")

    def test_elementwise_pushed_through_cat_becomes_epilogue(self):
        # Inductor rewrites relu(cat(bands)) as cat(relu(band) for band): the gather
        # is still a hidden concat, with relu applied to the gathered result.
        text, rep = capture(funcol_gather_relu, torch.randn(4, 16), _w())
        self.assertEqual([m.pattern for m in rep.matches], ["split_cat"])
        self.assertExpectedInline(text, """\
inputs: arg0_1, arg1_1
permute = permute(arg0_1, [1, 0])
mm = mm(arg1_1, permute)
all_gather_into_tensor = _c10d_functional.all_gather_into_tensor(mm, 2, '0')
wait_tensor = _c10d_functional.wait_tensor(all_gather_into_tensor)
split = split.Tensor(wait_tensor, 4)
getitem = getitem(split, 0)
getitem_1 = getitem(split, 1)
relu = relu(getitem)
relu_1 = relu(getitem_1)
cat = cat([relu, relu_1], -1)
full_default = full([16, 4], 1, dtype=float32)
mm_1 = mm(cat, full_default)
return [mm_1]
---- after tpfuse ----
inputs: arg0_1, arg1_1
permute = permute(arg0_1, [1, 0])
mm = mm(arg1_1, permute)
all_gather_hidden_default = tpfuse.all_gather_hidden(mm, [8, 8], '0')
relu_default = relu(all_gather_hidden_default)
full_default = full([16, 4], 1, dtype=float32)
mm_1 = mm(relu_default, full_default)
return [mm_1]""")

    # ---- near-misses: never silent --------------------------------------------------

    def test_near_miss_gather_on_dim0(self):
        text, rep = capture(funcol_gather_dim0, torch.randn(4, 16), _w())
        self.assertEqual(rep.matches, [])
        self.assertExpectedInline(
            "\n".join(f"{n.pattern}: {n.reason}" for n in rep.near_misses), """no_pattern: no pattern recognises how the gathered [W*T, ...] rows are used (by the graph output); a gather along dim 0 stays as it is"""
        )

    def test_near_miss_gather_on_middle_dim(self):
        text, rep = capture(funcol_gather_dim1, torch.randn(2, 3, 16), _w())
        self.assertEqual(rep.matches, [])
        self.assertExpectedInline(
            "\n".join(f"{n.pattern}: {n.reason}" for n in rep.near_misses), """split_cat: cat concatenates the rank bands on dim 1: a gather along dim 1 of 3, not along the last (hidden) axis"""
        )

    def test_near_miss_rearrangement_not_a_hidden_concat(self):
        text, rep = capture(inplace_wrong_rearrange, torch.randn(4, 16), _w())
        self.assertEqual(rep.matches, [])
        self.assertExpectedInline(
            "\n".join(f"{n.pattern}: {n.reason}" for n in rep.near_misses), """rearrange: view_2 reshapes the gathered rows to [4, 2, 8], not to [W=2, ..., w=8]"""
        )

    def test_near_miss_wait_also_used_raw(self):
        text, rep = capture(inplace_raw_and_rearranged, torch.randn(4, 16), _w())
        self.assertEqual(rep.matches, [])
        self.assertExpectedInline(
            "\n".join(f"{n.pattern}: {n.reason}" for n in rep.near_misses), """rearrange: wait_tensor result is also used raw (as [W*T, ...] rows) by sum_1 (sum)"""
        )

    def test_near_miss_unresolvable_group(self):
        def rename_group(graph):
            for n in graph.nodes:
                if "all_gather_into_tensor" in str(n.target):
                    n.args = (n.args[0], n.args[1], "no_such_group")

        text, rep = capture(funcol_gather, torch.randn(4, 16), _w(), mutate=rename_group)
        self.assertEqual(rep.matches, [])
        self.assertEqual(len(rep.near_misses), 1)
        self.assertIn("group 'no_such_group' cannot be resolved", rep.near_misses[0].reason)

    def test_near_miss_unsupported_dtype(self):
        text, rep = capture(funcol_gather, torch.randn(4, 16, dtype=torch.float64),
                            torch.randn(8, 16, dtype=torch.float64))
        self.assertEqual(rep.matches, [])
        self.assertExpectedInline(
            "\n".join(f"{n.pattern}: {n.reason}" for n in rep.near_misses), """split_cat: dtype torch.float64 is not moved by tpfuse::all_gather_hidden"""
        )

    def test_near_miss_coalesced_gather(self):
        text, rep = capture(coalesced_gathers, torch.randn(4, 16), _w())
        self.assertEqual(rep.matches, [])
        self.assertExpectedInline(
            "\n".join(f"{n.pattern}: {n.reason}" for n in rep.near_misses), """gather_site: a coalesced all_gather moves 2 tensors in one collective; tpfuse rewrites single-tensor gathers (gather each tensor on its own)"""
        )

    def test_dry_run_finds_but_does_not_rewrite(self):
        text, rep = capture(funcol_gather, torch.randn(4, 16), _w(), dry_run=True)
        self.assertEqual(len(rep.matches), 1)
        self.assertEqual(rep.rewritten, 0)
        self.assertNotIn("all_gather_hidden", text)

    def test_only_after_linear(self):
        text, rep = capture(_colwise_linear(), torch.randn(1, 1, 16), only_after_linear=True)
        self.assertEqual(rep.matches, [])
        self.assertIn("only_after_linear=True", rep.near_misses[0].reason)


class TestFormsW4(FakeWorld, PassGraphTestBase):
    WORLD_SIZE = 4

    def test_funcol_split_cat(self):
        text, rep = capture(funcol_gather, torch.randn(4, 16), _w())
        self.assertEqual([m.hidden_widths for m in rep.matches], [(8, 8, 8, 8)])
        self.assertExpectedInline(text, """\
inputs: arg0_1, arg1_1
permute = permute(arg0_1, [1, 0])
mm = mm(arg1_1, permute)
all_gather_into_tensor = _c10d_functional.all_gather_into_tensor(mm, 4, '0')
wait_tensor = _c10d_functional.wait_tensor(all_gather_into_tensor)
split = split.Tensor(wait_tensor, 4)
getitem = getitem(split, 0)
getitem_1 = getitem(split, 1)
getitem_2 = getitem(split, 2)
getitem_3 = getitem(split, 3)
cat = cat([getitem, getitem_1, getitem_2, getitem_3], -1)
return [cat]
---- after tpfuse ----
inputs: arg0_1, arg1_1
permute = permute(arg0_1, [1, 0])
mm = mm(arg1_1, permute)
all_gather_hidden_default = tpfuse.all_gather_hidden(mm, [8, 8, 8, 8], '0')
return [all_gather_hidden_default]""")

    def test_funcol_view(self):
        text, _ = capture(funcol_gather_dim1, torch.randn(1, 16), _w())
        self.assertExpectedInline(text, """\
inputs: arg0_1, arg1_1
permute = permute(arg0_1, [1, 0])
mm = mm(arg1_1, permute)
all_gather_into_tensor = _c10d_functional.all_gather_into_tensor(mm, 4, '0')
wait_tensor = _c10d_functional.wait_tensor(all_gather_into_tensor)
view = reshape(wait_tensor, [1, 32])
return [view]
---- after tpfuse ----
inputs: arg0_1, arg1_1
permute = permute(arg0_1, [1, 0])
mm = mm(arg1_1, permute)
all_gather_hidden_default = tpfuse.all_gather_hidden(mm, [8, 8, 8, 8], '0')
return [all_gather_hidden_default]""")

    def test_funcol_narrow_cat_unbacked(self):
        x = torch.randn(4, 16)
        torch._dynamo.decorators.mark_unbacked(x, 0)
        text, _ = _capture_unbacked(self, funcol_gather_dim1, x, _w())
        self.assertExpectedInline(text, """\
inputs: arg0_1, arg1_1, arg2_1
ge = ge(arg0_1, 0)
_assert_scalar = _assert_scalar(ge, "Runtime assertion failed for expression u0 >= 0 on node 'ge'")
permute = permute(arg1_1, [1, 0])
mm = mm(arg2_1, permute)
all_gather_into_tensor = _c10d_functional.all_gather_into_tensor(mm, 4, '0')
wait_tensor = _c10d_functional.wait_tensor(all_gather_into_tensor)
slice_1 = slice.Tensor(wait_tensor, 0, 0, arg0_1)
add_13 = add(arg0_1, arg0_1)
slice_2 = slice.Tensor(wait_tensor, 0, arg0_1, add_13)
add_17 = add(add_13, arg0_1)
slice_3 = slice.Tensor(wait_tensor, 0, add_13, add_17)
add_21 = add(add_17, arg0_1)
slice_4 = slice.Tensor(wait_tensor, 0, add_17, add_21)
cat = cat([slice_1, slice_2, slice_3, slice_4], 1)
return [cat]
---- after tpfuse ----
inputs: arg0_1, arg1_1, arg2_1
ge = ge(arg0_1, 0)
_assert_scalar = _assert_scalar(ge, "Runtime assertion failed for expression u0 >= 0 on node 'ge'")
permute = permute(arg1_1, [1, 0])
mm = mm(arg2_1, permute)
all_gather_hidden_default = tpfuse.all_gather_hidden(mm, [8, 8, 8, 8], '0')
return [all_gather_hidden_default]""")

    def test_inplace_permute(self):
        text, _ = capture(inplace_permute, torch.randn(4, 16), _w())
        self.assertExpectedInline(text, """\
inputs: arg0_1, arg1_1
empty = empty.memory_format([16, 8], dtype=float32)
permute = permute(arg0_1, [1, 0])
mm = mm(arg1_1, permute)
all_gather_into_tensor = _c10d_functional.all_gather_into_tensor(mm, 4, '0')
wait_tensor = _c10d_functional.wait_tensor(all_gather_into_tensor)
view_2 = reshape(wait_tensor, [4, 4, -1])
permute_2 = permute(view_2, [1, 0, 2])
clone = clone(permute_2, memory_format=torch.contiguous_format)
view_3 = reshape(clone, [4, -1])
return [view_3]
---- after tpfuse ----
inputs: arg0_1, arg1_1
empty = empty.memory_format([16, 8], dtype=float32)
permute = permute(arg0_1, [1, 0])
mm = mm(arg1_1, permute)
all_gather_hidden_default = tpfuse.all_gather_hidden(mm, [8, 8, 8, 8], '0')
return [all_gather_hidden_default]""")

    def test_inplace_movedim(self):
        text, _ = capture(inplace_movedim, torch.randn(4, 16), _w())
        self.assertExpectedInline(text, """\
inputs: arg0_1, arg1_1
empty = empty.memory_format([16, 8], dtype=float32)
permute = permute(arg0_1, [1, 0])
mm = mm(arg1_1, permute)
all_gather_into_tensor = _c10d_functional.all_gather_into_tensor(mm, 4, '0')
wait_tensor = _c10d_functional.wait_tensor(all_gather_into_tensor)
view_2 = reshape(wait_tensor, [4, 4, -1])
permute_2 = permute(view_2, [1, 0, 2])
clone = clone(permute_2, memory_format=torch.contiguous_format)
view_3 = reshape(clone, [4, 32])
return [view_3]
---- after tpfuse ----
inputs: arg0_1, arg1_1
empty = empty.memory_format([16, 8], dtype=float32)
permute = permute(arg0_1, [1, 0])
mm = mm(arg1_1, permute)
all_gather_hidden_default = tpfuse.all_gather_hidden(mm, [8, 8, 8, 8], '0')
return [all_gather_hidden_default]""")

    def test_inplace_transpose(self):
        text, _ = capture(inplace_transpose, torch.randn(4, 16), _w())
        self.assertExpectedInline(text, """\
inputs: arg0_1, arg1_1
empty = empty.memory_format([16, 8], dtype=float32)
permute = permute(arg0_1, [1, 0])
mm = mm(arg1_1, permute)
all_gather_into_tensor = _c10d_functional.all_gather_into_tensor(mm, 4, '0')
wait_tensor = _c10d_functional.wait_tensor(all_gather_into_tensor)
view_2 = reshape(wait_tensor, [4, 4, -1])
permute_2 = permute(view_2, [1, 0, 2])
clone = clone(permute_2, memory_format=torch.contiguous_format)
view_3 = reshape(clone, [4, 32])
return [view_3]
---- after tpfuse ----
inputs: arg0_1, arg1_1
empty = empty.memory_format([16, 8], dtype=float32)
permute = permute(arg0_1, [1, 0])
mm = mm(arg1_1, permute)
all_gather_hidden_default = tpfuse.all_gather_hidden(mm, [8, 8, 8, 8], '0')
return [all_gather_hidden_default]""")

    def test_inplace_chunk_cat(self):
        text, _ = capture(inplace_chunk_cat, torch.randn(4, 16), _w())
        self.assertExpectedInline(text, """\
inputs: arg0_1, arg1_1
empty = empty.memory_format([16, 8], dtype=float32)
permute = permute(arg0_1, [1, 0])
mm = mm(arg1_1, permute)
all_gather_into_tensor = _c10d_functional.all_gather_into_tensor(mm, 4, '0')
wait_tensor = _c10d_functional.wait_tensor(all_gather_into_tensor)
split_1 = split.Tensor(wait_tensor, 4)
getitem_4 = getitem(split_1, 0)
split_2 = split.Tensor(wait_tensor, 4)
getitem_9 = getitem(split_2, 1)
split_3 = split.Tensor(wait_tensor, 4)
getitem_14 = getitem(split_3, 2)
split_4 = split.Tensor(wait_tensor, 4)
getitem_19 = getitem(split_4, 3)
cat = cat([getitem_4, getitem_9, getitem_14, getitem_19], -1)
return [cat]
---- after tpfuse ----
inputs: arg0_1, arg1_1
empty = empty.memory_format([16, 8], dtype=float32)
permute = permute(arg0_1, [1, 0])
mm = mm(arg1_1, permute)
all_gather_hidden_default = tpfuse.all_gather_hidden(mm, [8, 8, 8, 8], '0')
return [all_gather_hidden_default]""")

    def test_list_all_gather_cat(self):
        text, _ = capture(list_gather_cat, torch.randn(4, 16), _w())
        self.assertExpectedInline(text, """\
inputs: arg0_1, arg1_1
empty = empty.memory_format([4, 8], dtype=float32)
empty_1 = empty.memory_format([4, 8], dtype=float32)
empty_2 = empty.memory_format([4, 8], dtype=float32)
empty_3 = empty.memory_format([4, 8], dtype=float32)
permute = permute(arg0_1, [1, 0])
mm = mm(arg1_1, permute)
all_gather_into_tensor = _c10d_functional.all_gather_into_tensor(mm, 4, '0')
wait_tensor = _c10d_functional.wait_tensor(all_gather_into_tensor)
slice_1 = slice.Tensor(wait_tensor, 0, 0, 4)
slice_2 = slice.Tensor(wait_tensor, 0, 4, 8)
slice_3 = slice.Tensor(wait_tensor, 0, 8, 12)
slice_4 = slice.Tensor(wait_tensor, 0, 12, 16)
cat = cat([slice_1, slice_2, slice_3, slice_4], -1)
return [cat]
---- after tpfuse ----
inputs: arg0_1, arg1_1
empty = empty.memory_format([4, 8], dtype=float32)
empty_1 = empty.memory_format([4, 8], dtype=float32)
empty_2 = empty.memory_format([4, 8], dtype=float32)
empty_3 = empty.memory_format([4, 8], dtype=float32)
permute = permute(arg0_1, [1, 0])
mm = mm(arg1_1, permute)
all_gather_hidden_default = tpfuse.all_gather_hidden(mm, [8, 8, 8, 8], '0')
return [all_gather_hidden_default]""")

    def test_dtensor_colwise_2d(self):
        text, _ = capture(_colwise_linear(), torch.randn(4, 16))
        self.assertExpectedInline(text, """\
inputs: arg0_1, arg1_1, arg2_1
permute = permute(arg0_1, [1, 0])
addmm = addmm(arg1_1, arg2_1, permute)
all_gather_into_tensor = _c10d_functional.all_gather_into_tensor(addmm, 4, '0')
wait_tensor = _c10d_functional.wait_tensor(all_gather_into_tensor)
split = split.Tensor(wait_tensor, 4)
getitem = getitem(split, 0)
getitem_1 = getitem(split, 1)
getitem_2 = getitem(split, 2)
getitem_3 = getitem(split, 3)
cat = cat([getitem, getitem_1, getitem_2, getitem_3], 1)
return [cat]
---- after tpfuse ----
inputs: arg0_1, arg1_1, arg2_1
permute = permute(arg0_1, [1, 0])
addmm = addmm(arg1_1, arg2_1, permute)
all_gather_hidden_default = tpfuse.all_gather_hidden(addmm, [8, 8, 8, 8], '0')
return [all_gather_hidden_default]""")

    def test_dtensor_colwise_3d(self):
        text, _ = capture(_colwise_linear(bias=False), torch.randn(2, 3, 16))
        self.assertExpectedInline(text, """\
inputs: arg0_1, arg1_1
view_1 = reshape(arg0_1, [6, 16])
permute = permute(arg1_1, [1, 0])
mm = mm(view_1, permute)
view_2 = reshape(mm, [2, 3, 8])
all_gather_into_tensor = _c10d_functional.all_gather_into_tensor(view_2, 4, '0')
wait_tensor = _c10d_functional.wait_tensor(all_gather_into_tensor)
split = split.Tensor(wait_tensor, 2)
getitem = getitem(split, 0)
getitem_1 = getitem(split, 1)
getitem_2 = getitem(split, 2)
getitem_3 = getitem(split, 3)
cat = cat([getitem, getitem_1, getitem_2, getitem_3], 2)
return [cat]
---- after tpfuse ----
inputs: arg0_1, arg1_1
view_1 = reshape(arg0_1, [6, 16])
permute = permute(arg1_1, [1, 0])
mm = mm(view_1, permute)
view_2 = reshape(mm, [2, 3, 8])
all_gather_hidden_default = tpfuse.all_gather_hidden(view_2, [8, 8, 8, 8], '0')
return [all_gather_hidden_default]""")

    def test_dtensor_colwise_3d_decode(self):
        text, _ = capture(_colwise_linear(), torch.randn(1, 1, 16))
        self.assertExpectedInline(text, """\
inputs: arg0_1, arg1_1, arg2_1
view_1 = reshape(arg0_1, [1, 16])
permute_1 = permute(view_1, [1, 0])
permute = permute(arg1_1, [1, 0])
mul = mul.Tensor(permute_1, permute)
sum_1 = sum.dim_IntList(mul, [0], True)
mul_1 = mul.Tensor(sum_1, 1)
mul_2 = mul.Tensor(arg2_1, 1)
add = add.Tensor(mul_1, mul_2)
view_2 = reshape(add, [1, 1, 8])
all_gather_into_tensor = _c10d_functional.all_gather_into_tensor(view_2, 4, '0')
wait_tensor = _c10d_functional.wait_tensor(all_gather_into_tensor)
view_3 = reshape(wait_tensor, [1, 1, 32])
return [view_3]
---- after tpfuse ----
inputs: arg0_1, arg1_1, arg2_1
view_1 = reshape(arg0_1, [1, 16])
permute_1 = permute(view_1, [1, 0])
permute = permute(arg1_1, [1, 0])
mul = mul.Tensor(permute_1, permute)
sum_1 = sum.dim_IntList(mul, [0], True)
mul_1 = mul.Tensor(sum_1, 1)
mul_2 = mul.Tensor(arg2_1, 1)
add = add.Tensor(mul_1, mul_2)
view_2 = reshape(add, [1, 1, 8])
all_gather_hidden_default = tpfuse.all_gather_hidden(view_2, [8, 8, 8, 8], '0')
return [all_gather_hidden_default]""")


class TestPlaceholderNames(TestCase):
    def test_inputs_renamed_in_order_of_first_appearance_one_renaming_for_before_and_after(self):
        # a rewrite that swaps two inputs still shows the swap after the renaming
        text = ("inputs: arg0_1, arg2_1, arg4_1\nmm = mm(arg0_1, arg2_1)\nadd = add(mm, arg4_1)\n"
                "---- after tpfuse ----\ninputs: arg0_1, arg2_1, arg4_1\nmm = mm(arg2_1, arg0_1)")
        self.assertEqual(normalise_placeholders(text), (
            "inputs: arg0_1, arg1_1, arg2_1\nmm = mm(arg0_1, arg1_1)\nadd = add(mm, arg2_1)\n"
            "---- after tpfuse ----\ninputs: arg0_1, arg1_1, arg2_1\nmm = mm(arg1_1, arg0_1)"))

    def test_only_whole_input_names_are_renamed(self):
        self.assertEqual(normalise_placeholders("inputs: arg3_1\nmy_arg3_1 = f(arg3_1, arg3_10)"),
                         "inputs: arg0_1\nmy_arg3_1 = f(arg0_1, arg1_1)")

    def test_inputs_are_numbered_by_first_use_not_by_position(self):
        # the same graph as torch 2.13 and torch 2.11 print it: 2.11 puts x before w
        on_2_13 = "inputs: arg0_1, arg1_1\npermute = permute(arg0_1, [1, 0])\nmm = mm(arg1_1, permute)"
        on_2_11 = "inputs: arg0_1, arg1_1\npermute = permute(arg1_1, [1, 0])\nmm = mm(arg0_1, permute)"
        self.assertEqual(normalise_placeholders(on_2_11), on_2_13)
        self.assertEqual(normalise_placeholders(on_2_13), on_2_13)

    def test_inputs_no_node_reads_come_last_and_the_inputs_line_follows_the_numbering(self):
        text = ("inputs: arg0_1, arg1_1, arg2_1\nmm = mm(arg2_1, arg1_1)\n"
                "---- after tpfuse ----\ninputs: arg0_1, arg1_1, arg2_1")
        self.assertEqual(normalise_placeholders(text), (
            "inputs: arg0_1, arg1_1, arg2_1\nmm = mm(arg0_1, arg1_1)\n---- after tpfuse ----\n"
            "inputs: arg0_1, arg1_1, arg2_1"))


class TestUnbackedGatherSkip(TestCase):
    """Only torch's own refusal to trace funcol's gather of an unbacked T turns into a skip."""

    #: the message torch 2.11 raises for ``TestFormsW2.test_funcol_narrow_cat_unbacked`` (trimmed)
    TORCH_2_11 = ("Consider annotating your code using torch._check*(). Could not guard on data-dependent "
                  "expression Eq(2*u0, 2) (unhinted: Eq(2*u0, 2)).  (Size-like symbols: u0)\n\nCaused by: "
                  "if shape[0] == group_size and numel_between == 1:  # _utils.py:1181 in _maybe_view_chunk_cat")

    def _user_error(self, message):
        from torch._dynamo.exc import UserError, UserErrorType

        return UserError(UserErrorType.ANTI_PATTERN, message)

    def test_torch_2_11_refusal_is_recognised(self):
        reason = torch_cannot_trace_unbacked_gather(self._user_error(self.TORCH_2_11))
        self.assertIn("Eq(2*u0, 2)", reason)
        self.assertIn("_maybe_view_chunk_cat", reason)

    def test_recognised_through_the_exception_chain(self):
        try:
            try:
                raise self._user_error(self.TORCH_2_11)
            except Exception as inner:
                raise RuntimeError("backend failed") from inner
        except RuntimeError as outer:
            self.assertIsNotNone(torch_cannot_trace_unbacked_gather(outer))

    def test_other_errors_are_not_skipped(self):
        elsewhere = self.TORCH_2_11.replace("_maybe_view_chunk_cat", "hidden_gather_split")
        self.assertIsNone(torch_cannot_trace_unbacked_gather(self._user_error(elsewhere)))
        self.assertIsNone(torch_cannot_trace_unbacked_gather(RuntimeError(self.TORCH_2_11)))
        self.assertIsNone(torch_cannot_trace_unbacked_gather(self._user_error("graph break in _maybe_view_chunk_cat")))
