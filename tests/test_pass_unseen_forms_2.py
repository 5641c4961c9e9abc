"""More tensor-parallel code the pattern pass was not written against, on real gloo ranks.

The second set after tests/test_pass_unseen_forms.py (whose forms are not repeated here): gathers
with copies, casts and bias adds around them, slabs that are transposed, 1-D, 3-D, one token or
none, gathers returned and also used, gathered twice or layer after layer, under ``no_grad`` and
in a hooked module, and groups that are not the world: a subgroup of other ranks, or of fewer.
Each form is compiled with tpfuse off and on, and every rank's outputs must be bit-identical
(docs/troubleshooting.md, "Outputs differ from eager after compiling"): a gather moves bytes.
A form the pass cannot prove stays as it is with one near-miss naming why (docs/passes.md).

One spawned run per world size does every case; a case that raises is recorded with its
traceback, so one crash fails its own test only.  Most cases go through ``aot_eager``: the pass
sees the same post-grad graph, without Inductor's start-up on two cores.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from multiproc import run_ranks
from test_pass_unseen_forms import _fusion_forced

K, WIDTH, TOKENS = 16, 8, 6  # input features, columns per rank, tokens
_GROUPS: dict = {}  # made on every rank before any compile: name -> process group
_MESH = None


def group():
    return _GROUPS.get("current", dist.group.WORLD)


def _world() -> int:
    return dist.get_world_size(group())


def gather_last(y):
    return funcol.all_gather_tensor(y, gather_dim=-1, group=group())


def gather_rows(y):
    return funcol.all_gather_tensor(y, gather_dim=0, group=group())


# --------------------------------------------------------------------------- gathers written as users write them


def dim_from_ndim(x, w):
    y = x @ w.t()
    return funcol.all_gather_tensor(y, gather_dim=y.dim() - 1, group=group())


def dim0_clone_chunks_cat(x, w):  # the classic rearrange, each band copied before the cat
    rows = gather_rows(x @ w.t())
    return torch.cat([c.clone() for c in rows.chunk(_world())], dim=-1)


def dim0_clone_then_chunk_cat(x, w):
    rows = gather_rows(x @ w.t()).clone()
    return torch.cat(rows.chunk(_world()), dim=-1)


def dim0_contiguous_split_cat(x, w):
    rows = gather_rows(x @ w.t()).contiguous()
    return torch.cat(torch.split(rows, x.shape[0]), dim=-1)


def dim0_slices_negative(x, w):  # bands cut by hand: rows[:T], rows[T:2T], ..., the last as rows[-T:]
    t, world = x.shape[0], _world()
    rows = gather_rows(x @ w.t())
    bands = [rows[k * t:(k + 1) * t] for k in range(world - 1)] + [rows[-t:]]
    return torch.cat(bands, dim=-1)


def into_rearrange_contiguous_view(x, w):
    y = x @ w.t()
    out = torch.empty(_world() * y.shape[0], y.shape[1], dtype=y.dtype)
    dist.all_gather_into_tensor(out, y, group=group())
    return out.view(_world(), y.shape[0], -1).permute(1, 0, 2).contiguous().view(y.shape[0], -1)


def into_rearrange_3d(x, w):  # [B, T, w] slabs: "(W B) T w -> B T (W w)"
    y = torch.matmul(x, w.t())
    out = torch.empty(_world() * y.shape[0], *y.shape[1:], dtype=y.dtype)
    dist.all_gather_into_tensor(out, y, group=group())
    return out.view(_world(), *y.shape).permute(1, 2, 0, 3).reshape(*y.shape[:2], _world() * y.shape[-1])


def list_cat_then_float(x, w):  # bf16 slabs, the gathered activations cast up
    y = x @ w.t()
    parts = [torch.empty_like(y) for _ in range(_world())]
    dist.all_gather(parts, y, group=group())
    return torch.cat(parts, -1).float()


def cast_before_gather(x, w):  # fp32 linear, bf16 on the wire
    return gather_last((x @ w.t()).to(torch.bfloat16))


def cast_both_ways(x, w):  # bf16 linear, gathered in fp32, back to bf16
    return gather_last((x @ w.t()).float()).to(torch.bfloat16)


def dtensor_shard_minus_1(x, w):
    from torch.distributed.tensor import DTensor, Replicate, Shard

    y = x @ w.t()
    return DTensor.from_local(y, _MESH, [Shard(-1)], run_check=False).redistribute(_MESH, [Replicate()]).to_local()


def dtensor_full_3d(x, w):
    from torch.distributed.tensor import DTensor, Shard

    return DTensor.from_local(torch.matmul(x, w.t()), _MESH, [Shard(2)], run_check=False).full_tensor()


def under_no_grad(x, w):
    with torch.no_grad():
        return gather_last(x @ w.t())


# --------------------------------------------------------------------------- the ops around the gather


def bias_after_gather(x, w):
    h = gather_last(x @ w.t())
    return h + torch.arange(h.shape[-1], dtype=h.dtype)


def transposed_slab(x, w):  # a [T, w] slab that is the transpose of a [w, T] product
    return gather_last((w @ x.t()).t())


def slab_1d(x, w):  # one token's [w] slab: dim 0 is its last (hidden) axis
    return gather_rows(x[0] @ w.t())


def returned_and_used(x, w):
    h = gather_last(x @ w.t())
    return h, h.sum(-1), h.amax(-1)


def two_gathers_same_slab(x, w):
    y = x @ w.t()
    return gather_last(y), gather_last(y) * 3


def layers_in_a_loop(x, w):  # three column layers, each reading the previous gathered activations
    h = x
    for _ in range(3):
        h = gather_last(h[..., :K] @ w.t())
    return h


def _hooked(rank):
    layer = torch.nn.Linear(K, WIDTH, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(WIDTH, K, generator=torch.Generator().manual_seed(400 + rank)))
    layer.register_forward_pre_hook(lambda mod, args: (args[0] * 0.5,))
    layer.register_forward_hook(lambda mod, args, out: gather_last(out))
    return layer


_HOOKED = {}


def hooked_module(x, w):  # the gather in a forward hook of an nn.Linear
    return _HOOKED["layer"](x) + 0 * w.sum()


def column_slice_slab(x, w):  # the slab is the right half of the linear's columns: offset, strided
    return gather_last((x @ w.t())[:, WIDTH // 2:])


def expanded_slab(x, w):  # a stride-0 slab: one column broadcast across w
    y = x @ w.t()
    return gather_last(y[:, :1].expand(-1, WIDTH))


def index_slab(x, w):  # int64 (argsort) slabs: not a dtype the op moves
    return gather_last((x @ w.t()).argsort(-1))


def local_mutated_after_gather(x, w):
    y = x @ w.t()
    h = gather_last(y)
    y.add_(1)  # the gather must have read y before this
    return h, y


def band_mutated_before_cat(x, w):
    chunks = gather_rows(x @ w.t()).chunk(_world())
    chunks[0].mul_(2)
    return torch.cat(chunks, dim=-1)


def same_epilogue_per_band(x, w):  # neg then a cast on every band, as Inductor pushes them
    chunks = gather_rows(x @ w.t()).chunk(_world())
    return torch.cat([c.neg().to(torch.bfloat16) for c in chunks], dim=-1)


def scale_per_band(x, w):  # band k scaled by k + 1: not one elementwise op of the gathered whole
    chunks = gather_rows(x @ w.t()).chunk(_world())
    return torch.cat([c * (k + 1) for k, c in enumerate(chunks)], dim=-1)


def list_into_views_of_one_buffer(x, w):  # the list is unbind() views of one [W, T, w] buffer
    y = x @ w.t()
    parts = list(torch.empty(_world(), *y.shape, dtype=y.dtype).unbind(0))
    dist.all_gather(parts, y, group=group())
    return torch.cat(parts, -1)


def list_stack_flatten(x, w):  # stack on dim -2 then flatten: the bands side by side
    y = x @ w.t()
    parts = [torch.empty_like(y) for _ in range(_world())]
    dist.all_gather(parts, y, group=group())
    return torch.stack(parts, -2).flatten(-2)


def mesh_as_group(x, w):
    return funcol.all_gather_tensor(x @ w.t(), gather_dim=-1, group=_MESH)


def ranks_list_reversed(x, w):  # a group written as a list of ranks, not in ascending order
    return funcol.all_gather_tensor(x @ w.t(), gather_dim=-1, group=[2, 1])


def empty_width(x, w):  # a [T, 0] slab on every rank
    return gather_last(x @ w[:0].t())


_TRANSPOSED = {}  # a [w, K] weight stored as the transpose of a [K, w] tensor, made on every rank


def weight_given_transposed(x, w):  # a non-contiguous weight, lifted as a graph input
    return gather_last(x @ _TRANSPOSED["weight"].t())


def nn_linear_3d(x, w):
    return gather_last(torch.nn.functional.linear(x, w, torch.arange(w.shape[0], dtype=x.dtype)))


def width_one(x, w):  # one column per rank
    return gather_last(x @ w[:1].t())


def reversed_mesh(x, w):  # a 1-D mesh that lists the ranks last to first
    from torch.distributed.tensor import DTensor, Shard

    return DTensor.from_local(x @ w.t(), _GROUPS["reversed_mesh"], [Shard(-1)], run_check=False).full_tensor()


def layers_3d(x, w):  # [B, T, H] activations through three column layers
    h = x
    for _ in range(3):
        h = gather_last(torch.nn.functional.linear(h[..., :K], w))
    return h


# --------------------------------------------------------------------------- must not be rewritten


def rows_dim_minus_2(x, w):  # gather_dim=-2 of a 2-D slab is dim 0: the rows stay rows
    return funcol.all_gather_tensor(x @ w.t(), gather_dim=-2, group=group()) + 1


def rotated_order(x, w):  # bands 1, 2, ..., 0: a rotation, not the rank order
    chunks = gather_rows(x @ w.t()).chunk(_world())
    return torch.cat([*chunks[1:], chunks[0]], dim=-1)


def cat_with_extra(x, w):  # the W bands and the local slab again: W+1 pieces
    y = x @ w.t()
    return torch.cat([*gather_rows(y).chunk(_world()), y], dim=-1)


def some_bands_only(x, w):  # only the first W-1 bands
    chunks = gather_rows(x @ w.t()).chunk(_world())
    return torch.cat(chunks[:-1], dim=-1)


def strided_bands(x, w):  # every other row: not a rank band
    rows = gather_rows(x @ w.t())
    return torch.cat([rows[0::2], rows[1::2]], dim=-1)


def slab_1d_last(x, w):  # gather_dim=-1 of a 1-D slab: funcol cuts and cats on that same dim 0
    return gather_last(x[0] @ w.t())


def buffer_read_before_gather(x, w):  # the list's buffers are read before the gather overwrites them
    y = x @ w.t()
    parts = [torch.ones_like(y) * (k + 1) for k in range(_world())]
    before = parts[0].sum() + parts[-1].sum()
    dist.all_gather(parts, y, group=group())
    return torch.cat(parts, -1) + before


def one_buffer_twice(x, w):  # the same buffer in every slot: each rank's slab lands in it in turn
    y = x @ w.t()
    buf = torch.empty_like(y)
    parts = [buf] * _world()
    dist.all_gather(parts, y, group=group())
    return torch.cat(parts, -1)


def list_cat_rotated(x, w):  # the gathered list concatenated from its second entry on
    y = x @ w.t()
    parts = [torch.empty_like(y) for _ in range(_world())]
    dist.all_gather(parts, y, group=group())
    return torch.cat([*parts[1:], parts[0]], -1)


def under_autocast(x, w):  # a CPU bf16 autocast region: the linear runs on cast copies
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return gather_last(x @ w.t())


_PERSISTENT = {}  # a preallocated gather buffer, lifted as a mutated graph input


def into_persistent_buffer(x, w):  # the gather lands in a buffer that outlives the call
    y = x @ w.t()
    out = _PERSISTENT["rows"][: _world() * y.shape[0]]
    dist.all_gather_into_tensor(out, y, group=group())
    h = out.view(_world(), y.shape[0], -1).permute(1, 0, 2).reshape(y.shape[0], -1)
    return h, _PERSISTENT["rows"] + 0


def rearranged_layers(x, w):  # three layers, each gathered through all_gather_into_tensor + rearrange
    h = x
    for _ in range(3):
        y = h[..., :K] @ w.t()
        out = torch.empty(_world() * y.shape[0], y.shape[1], dtype=y.dtype)
        dist.all_gather_into_tensor(out, y, group=group())
        h = out.view(_world(), y.shape[0], -1).permute(1, 0, 2).reshape(y.shape[0], -1)
    return h


# --------------------------------------------------------------------------- the cases


@dataclass(frozen=True)
class Case:
    form: Callable
    backend: str = "aot_eager"
    dtype: torch.dtype = torch.float32
    patterns: tuple[str, ...] = ()  # the patterns that rewrite it
    near_miss: str | None = None  # a piece of the one near-miss expected
    three_d: bool = False
    tokens: int = TOKENS
    group: str | None = None  # a subgroup of _GROUPS; only its ranks run the case
    world: int | None = None  # the group's size when not the world's
    fused: bool | tuple[bool, ...] | None = None  # fuse_linear=True, the cost rule forced to fuse: whether
    # every match (or each, in order) fused


SPLIT, NARROW, REARRANGE, VIEW = ("split_cat",), ("narrow_cat",), ("rearrange",), ("view",)
NO_PATTERN = "no_pattern: no pattern recognises how the gathered"

W2_CASES = {
    "dim_from_ndim": Case(dim_from_ndim, patterns=SPLIT),
    "dim0_clone_chunks_cat": Case(dim0_clone_chunks_cat, patterns=SPLIT),
    "dim0_clone_then_chunk_cat_inductor": Case(dim0_clone_then_chunk_cat, backend="inductor", patterns=SPLIT),
    "dim0_contiguous_split_cat": Case(dim0_contiguous_split_cat, patterns=SPLIT),
    # the last band's start written as -T: read as not in rank order, kept (safe, named)
    "dim0_slices_negative": Case(dim0_slices_negative, near_miss="in rank order (got starts ['0', '-6'])"),
    "into_rearrange_contiguous_view": Case(into_rearrange_contiguous_view, patterns=REARRANGE),
    "into_rearrange_3d_bf16": Case(into_rearrange_3d, dtype=torch.bfloat16, three_d=True, patterns=REARRANGE),
    "list_cat_then_float_bf16": Case(list_cat_then_float, dtype=torch.bfloat16, patterns=NARROW),
    "list_cat_then_float_bf16_inductor": Case(list_cat_then_float, backend="inductor", dtype=torch.bfloat16,
                                              patterns=NARROW),
    "cast_before_gather": Case(cast_before_gather, patterns=SPLIT),
    "cast_both_ways_bf16_inductor": Case(cast_both_ways, backend="inductor", dtype=torch.bfloat16, patterns=SPLIT),
    "dtensor_shard_minus_1": Case(dtensor_shard_minus_1, patterns=SPLIT),
    "dtensor_full_3d": Case(dtensor_full_3d, three_d=True, patterns=SPLIT),
    "under_no_grad": Case(under_no_grad, patterns=SPLIT),
    "bias_after_gather_inductor": Case(bias_after_gather, backend="inductor", patterns=SPLIT),
    "transposed_slab": Case(transposed_slab, patterns=SPLIT),
    "transposed_slab_inductor": Case(transposed_slab, backend="inductor", patterns=SPLIT),
    # a 1-D slab gathered on dim 0 is a hidden-axis gather that no pattern reads yet: kept, named as such
    # (before, its near-miss spoke of rows gathered along dim 0)
    "slab_1d": Case(slab_1d, near_miss=NO_PATTERN + " [W*w] columns of a 1-D slab"),
    "slab_3d_one_token": Case(dim_from_ndim, three_d=True, tokens=1, patterns=SPLIT),
    "slab_one_token_inductor": Case(dim_from_ndim, backend="inductor", tokens=1, patterns=VIEW),
    "slab_no_tokens": Case(dim_from_ndim, tokens=0, patterns=SPLIT),
    "slab_3d_no_tokens_rearrange": Case(into_rearrange_3d, three_d=True, tokens=0, patterns=REARRANGE),
    # the gather elimination pass (docs/passes.md) says why it keeps the gather for its sum
    "returned_and_used_inductor": Case(returned_and_used, backend="inductor", patterns=SPLIT,
                                       near_miss="gather kept: the gathered logits are also used by"),
    "two_gathers_same_slab": Case(two_gathers_same_slab, patterns=SPLIT * 2),
    "two_gathers_same_slab_inductor": Case(two_gathers_same_slab, backend="inductor", patterns=SPLIT * 2),
    "layers_in_a_loop": Case(layers_in_a_loop, patterns=SPLIT * 3),
    "hooked_module": Case(hooked_module, patterns=SPLIT),
    "column_slice_slab": Case(column_slice_slab, patterns=SPLIT),
    "expanded_slab_inductor": Case(expanded_slab, backend="inductor", patterns=SPLIT),
    "index_slab": Case(index_slab, near_miss="dtype torch.int64"),
    "local_mutated_after_gather": Case(local_mutated_after_gather, patterns=SPLIT),
    "local_mutated_after_gather_inductor": Case(local_mutated_after_gather, backend="inductor", patterns=SPLIT),
    "band_mutated_before_cat": Case(band_mutated_before_cat,
                                    near_miss="also used raw (as [W*T, ...] rows) by slice_scatter"),
    "same_epilogue_per_band_inductor": Case(same_epilogue_per_band, backend="inductor", patterns=SPLIT),
    "scale_per_band": Case(scale_per_band, near_miss="different elementwise ops"),
    # the copies into the shared buffer stand between the bands and the cat: kept, named
    "list_into_views_of_one_buffer": Case(list_into_views_of_one_buffer, near_miss="not by a single cat"),
    "list_stack_flatten": Case(list_stack_flatten, near_miss="not by a single cat"),
    "mesh_as_group": Case(mesh_as_group, patterns=SPLIT),
    "empty_width": Case(empty_width, near_miss="hidden width 0 is empty"),
    # the fused linear, its cost rule forced to fuse (which shapes fuse is the rule's business,
    # tests/test_pass_linear_fusion.py); what a fused graph computes is the rewrite's
    "fused_dim_from_ndim": Case(dim_from_ndim, patterns=SPLIT, fused=True),
    "fused_weight_given_transposed": Case(weight_given_transposed, patterns=SPLIT, fused=True),
    "fused_cast_before_gather": Case(cast_before_gather, patterns=SPLIT, fused=False),
    "fused_cast_both_ways_bf16": Case(cast_both_ways, dtype=torch.bfloat16, patterns=SPLIT, fused=False),
    "fused_layers_in_a_loop": Case(layers_in_a_loop, patterns=SPLIT * 3, fused=True),
    "fused_layers_in_a_loop_inductor": Case(layers_in_a_loop, backend="inductor", patterns=SPLIT * 3, fused=True),
    "fused_local_mutated_after_gather": Case(local_mutated_after_gather, patterns=SPLIT, fused=False,
                                             near_miss="fusing would compute the linear twice"),
    "fused_two_gathers_same_slab": Case(two_gathers_same_slab, patterns=SPLIT * 2, fused=False,
                                        near_miss="fusing would compute the linear twice"),
    "fused_bias_after_gather": Case(bias_after_gather, patterns=SPLIT, fused=True),
    "fused_transposed_slab": Case(transposed_slab, patterns=SPLIT, fused=False),
    "fused_column_slice_slab": Case(column_slice_slab, patterns=SPLIT, fused=False),
    "fused_no_tokens": Case(dim_from_ndim, tokens=0, patterns=SPLIT, fused=True),
    "fused_3d_no_tokens": Case(nn_linear_3d, three_d=True, tokens=0, patterns=SPLIT, fused=True),
    "fused_3d_one_token_bf16": Case(nn_linear_3d, three_d=True, tokens=1, dtype=torch.bfloat16, patterns=SPLIT,
                                    fused=True),
    "fused_one_token_inductor": Case(dim_from_ndim, backend="inductor", tokens=1, patterns=VIEW, fused=True),
    "fused_dtensor_shard_minus_1": Case(dtensor_shard_minus_1, patterns=SPLIT, fused=True),
    "fused_hooked_module": Case(hooked_module, patterns=SPLIT, fused=True),
    "fused_under_no_grad": Case(under_no_grad, patterns=SPLIT, fused=True),
    "fused_list_cat_then_float_bf16": Case(list_cat_then_float, dtype=torch.bfloat16, patterns=NARROW, fused=True),
    "fused_rearrange_3d_bf16": Case(into_rearrange_3d, dtype=torch.bfloat16, three_d=True, patterns=REARRANGE,
                                    fused=True),
    "width_one": Case(width_one, patterns=SPLIT),
    "fused_layers_3d_inductor": Case(layers_3d, backend="inductor", three_d=True, patterns=SPLIT * 3, fused=True),
    "slab_1d_last": Case(slab_1d_last, patterns=SPLIT),
    "slab_1d_last_inductor": Case(slab_1d_last, backend="inductor", patterns=SPLIT),
    # the copies into buffers read before stay in the AOT graph (kept); Inductor's graph has none
    "buffer_read_before_gather": Case(buffer_read_before_gather, near_miss="not by a single cat"),
    "buffer_read_before_gather_inductor": Case(buffer_read_before_gather, backend="inductor", patterns=NARROW),
    "under_autocast_inductor": Case(under_autocast, backend="inductor", patterns=SPLIT),
    # the autocast linear reads a cast of the weight, not the weight: no column linear to fuse
    "fused_under_autocast": Case(under_autocast, patterns=SPLIT, fused=False),
    "fused_rearranged_layers_inductor": Case(rearranged_layers, backend="inductor", patterns=REARRANGE * 3,
                                             fused=True),
    "fused_rearranged_layers": Case(rearranged_layers, patterns=REARRANGE * 3, fused=True),
    # near-misses: left as they are, with the reason
    "into_persistent_buffer": Case(into_persistent_buffer, near_miss="rows are used (by copy (copy))"),
    "into_persistent_buffer_inductor": Case(into_persistent_buffer, backend="inductor",
                                            near_miss="rows are used (by slice_scatter (slice_scatter))"),
    "one_buffer_twice": Case(one_buffer_twice, near_miss="not by a single cat"),
    "one_buffer_twice_inductor": Case(one_buffer_twice, backend="inductor", near_miss="not by a single cat"),
    "list_cat_rotated_inductor": Case(list_cat_rotated, backend="inductor", near_miss="in rank order"),
    "rows_dim_minus_2": Case(rows_dim_minus_2, near_miss="rank bands on dim 0: a gather along dim 0"),
    "cat_with_extra": Case(cat_with_extra, near_miss="with other tensors, or not all of them"),
    "some_bands_only": Case(some_bands_only, near_miss="rank bands of 6 rows in rank order"),
    "strided_bands": Case(strided_bands, near_miss="wait_tensor result is also used raw"),
}

W3_CASES = {
    **{name: W2_CASES[name] for name in (
        "dim0_clone_chunks_cat", "into_rearrange_contiguous_view", "list_cat_then_float_bf16", "transposed_slab",
        "slab_1d", "slab_no_tokens", "layers_in_a_loop", "cat_with_extra",
    )},
    "rotated_order": Case(rotated_order, near_miss="in rank order"),
    # subgroups: ranks 1 and 2 (group ranks 0 and 1 are not global 0 and 1), ranks 0 and 2, ranks 0 and 1
    "subgroup_tail_funcol": Case(dim_from_ndim, group="tail", world=2, patterns=SPLIT),
    "subgroup_tail_list_cat": Case(list_cat_then_float, group="tail", world=2, dtype=torch.bfloat16,
                                   patterns=NARROW),
    "subgroup_ends_rearrange": Case(into_rearrange_contiguous_view, group="ends", world=2, patterns=REARRANGE),
    "ranks_list_reversed": Case(ranks_list_reversed, group="tail", world=2, patterns=SPLIT),
    "list_into_views_of_one_buffer": W2_CASES["list_into_views_of_one_buffer"],
    "band_mutated_before_cat": W2_CASES["band_mutated_before_cat"],
    "width_one": Case(width_one, patterns=SPLIT),
    "decode_3d_one_token": Case(dim_from_ndim, three_d=True, tokens=1, patterns=SPLIT),
    "reversed_mesh": Case(reversed_mesh, patterns=SPLIT),
    "fused_subgroup_tail": Case(dim_from_ndim, group="tail", world=2, patterns=SPLIT, fused=True),
    "fused_subgroup_ends_rearrange": Case(into_rearrange_contiguous_view, group="ends", world=2,
                                          patterns=REARRANGE, fused=True),
    # h[..., :K] of 24 gathered columns is a strided 3-D input: aten's linear runs it as a bmm, which
    # is no column linear the pass reads (producer "other"); the first layer's mm fuses
    "fused_layers_3d": Case(layers_3d, three_d=True, patterns=SPLIT * 3, fused=(True, False, False)),
    "one_buffer_twice": W2_CASES["one_buffer_twice"],
    "list_cat_rotated": Case(list_cat_rotated,
                             near_miss="rank bands of 6 rows in rank order (got starts ['6', '12', '0'])"),
    "subgroup_head_reversed_chunks": Case(rotated_order, group="head", world=2, near_miss="in rank order"),
}


# --------------------------------------------------------------------------- on every rank


def _inputs(rank: int, case: Case) -> list[torch.Tensor]:
    """The same activations on every rank, this rank's weight band."""
    def draw(*shape, seed):
        return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(case.dtype)

    x = draw(2, case.tokens, K, seed=case.tokens) if case.three_d else draw(case.tokens, K, seed=case.tokens)
    return [x, draw(WIDTH, K, seed=100 + rank)]


def _same(a, b) -> bool:
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a, b))


#: torch 2.11's funcol.all_gather_tensor asserts this of its input; later torch makes the slab contiguous
_FUNCOL_NEEDS_CONTIGUOUS = "Tensor must be contiguous for all_gather_tensor"


def _run_case(rank: int, case: Case) -> dict:
    import tpfuse

    _GROUPS["current"] = _GROUPS[case.group] if case.group else dist.group.WORLD
    outs, on = {}, tpfuse.backend(case.backend, fuse_linear=case.fused is not None)
    with _fusion_forced(case.fused is not None):
        for label, backend in (("off", case.backend), ("on", on)):
            torch._dynamo.reset()
            tpfuse.report()
            try:
                outs[label] = torch.compile(case.form, backend=backend)(*_inputs(rank, case))
            except AssertionError as err:
                if label == "off" and _FUNCOL_NEEDS_CONTIGUOUS in str(err):
                    return {"unsupported": f"torch {torch.__version__}: {err} (the compile without tpfuse "
                                           "raises it; later torch gathers a non-contiguous slab)"}
                raise
    rep = tpfuse.report()
    return {
        "equal": _same(outs["off"], outs["on"]),
        "patterns": [m.pattern for m in rep.matches],
        "fused": [bool(m.linear_fusion and m.linear_fusion.startswith("fused")) for m in rep.matches],
        "worlds": [m.world_size for m in rep.matches],
        "near_misses": [f"{n.pattern}: {n.reason}" for n in rep.near_misses],
    }


def _run_cases(rank: int, world_size: int, cases: dict) -> dict:
    import torch._dynamo
    import torch._functorch.config
    import torch._inductor.config as inductor_config
    from torch.distributed.device_mesh import init_device_mesh

    from tpfuse.passes.dynamo_compat import allow_funcol_gather_tracing

    allow_funcol_gather_tracing()  # as the "on" compiles do: both trace the same graph on every torch
    global _MESH
    _MESH = init_device_mesh("cpu", (world_size,))
    if world_size == 3:  # every rank makes every group, in one order
        for name, ranks in (("tail", [1, 2]), ("ends", [0, 2]), ("head", [0, 1])):
            _GROUPS[name] = dist.new_group(ranks)
        from torch.distributed.device_mesh import DeviceMesh

        _GROUPS["reversed_mesh"] = DeviceMesh("cpu", torch.tensor([2, 1, 0]))
    _HOOKED["layer"] = _hooked(rank)
    _PERSISTENT["rows"] = torch.zeros(world_size * TOKENS + 3, WIDTH)
    _TRANSPOSED["weight"] = torch.randn(K, WIDTH, generator=torch.Generator().manual_seed(500 + rank)).t()
    torch._dynamo.config.cache_size_limit = 256
    inductor_config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    results = {}
    for name, case in cases.items():
        if case.group and rank not in dist.get_process_group_ranks(_GROUPS[case.group]):
            continue
        try:
            results[name] = _run_case(rank, case)
        except Exception:  # noqa: BLE001 - recorded: the case's own test fails with it
            results[name] = {"error": traceback.format_exc()}
    if world_size == 2:
        results["training_layers"] = _training_layers(rank)
    return results


def _training_layers(rank: int) -> dict:
    """Three column layers with autograd gathers, every one fused (Inductor), a loss and its
    gradients: the fused layers chained (each reads the previous fused output) train bit-exactly."""
    import tpfuse

    def step(x, w):
        h = x
        for _ in range(3):
            h = funcol.all_gather_tensor_autograd(h[..., :K] @ w.t(), gather_dim=-1, group=group())
        return (h * torch.arange(h.shape[-1], dtype=h.dtype)).sum()

    _GROUPS["current"] = dist.group.WORLD
    x, weight = _inputs(rank, Case(step))
    out = {}
    with _fusion_forced(True):
        for label, backend in (("off", "inductor"), ("on", tpfuse.backend(fuse_linear=True))):
            torch._dynamo.reset()
            tpfuse.report()
            w, xs = weight.clone().requires_grad_(), x.clone().requires_grad_()
            loss = torch.compile(step, backend=backend)(xs, w)
            loss.backward()
            out[label] = (loss.detach(), w.grad, xs.grad)
    rep = tpfuse.report()
    return {"equal": _same(out["off"], out["on"]), "fused": [m.linear_fusion for m in rep.matches],
            "near_misses": [n.reason for n in rep.near_misses]}


# --------------------------------------------------------------------------- the checks


@pytest.fixture(scope="module")
def w2():
    return run_ranks(2, _run_cases, W2_CASES, timeout=900)


@pytest.fixture(scope="module")
def w3():
    return run_ranks(3, _run_cases, W3_CASES, timeout=900)


def _check_case(name: str, case: Case, per_rank: list[dict], world: int) -> None:
    ran = [(rank, results[name]) for rank, results in enumerate(per_rank) if name in results]
    assert len(ran) == (case.world or world), (name, [rank for rank, _ in ran])
    unsupported = {r["unsupported"] for _, r in ran if "unsupported" in r}
    if unsupported:  # this torch cannot run the form as written, with or without tpfuse
        assert len(unsupported) == 1 and all("unsupported" in r for _, r in ran), ran
        pytest.skip(unsupported.pop())
    for rank, r in ran:
        assert "error" not in r, f"rank {rank}:\n{r.get('error')}"
        assert r["equal"], f"rank {rank}: the output differs from the compile without tpfuse: {r}"
        assert r["patterns"] == list(case.patterns), (rank, r)
        assert set(r["worlds"]) <= {case.world or world}, (rank, r)
        if case.fused is not None:
            want = case.fused if isinstance(case.fused, tuple) else (case.fused,) * len(case.patterns)
            assert r["fused"] == list(want), (rank, r)
        if case.near_miss is None:
            assert r["near_misses"] == [], (rank, r)
        else:
            assert r["near_misses"] and all(case.near_miss in n for n in r["near_misses"]), (rank, r)


@pytest.mark.parametrize("name", list(W2_CASES))
def test_w2(w2, name):
    _check_case(name, W2_CASES[name], w2, 2)


@pytest.mark.parametrize("name", list(W3_CASES))
def test_w3(w3, name):
    _check_case(name, W3_CASES[name], w3, 3)


# --------------------------------------------------------------------------- a group that disagrees with the widths


def _world_gather(x, w):
    return funcol.all_gather_tensor(x @ w.t(), gather_dim=-1, group=dist.group.WORLD)


def test_group_of_another_size_than_the_gather_is_kept():
    """A gather of 3 slabs whose group argument names a group of 2 ranks (a graph another pass
    edited, or a custom op's wrong arguments): the op would be given 3 widths for 2 ranks, so the
    pass keeps it and says why; the same graph with its own group is rewritten (the control)."""
    from pass_helpers import capture, fake_world

    with fake_world(3):
        pair = dist.new_group([0, 1])

        def to_the_pair(graph):
            for node in graph.nodes:
                if node.op == "call_function" and "all_gather_into_tensor" in str(node.target):
                    node.args = (node.args[0], node.args[1], pair.group_name)

        args = torch.randn(4, K), torch.randn(WIDTH, K)
        _, edited = capture(_world_gather, *args, mutate=to_the_pair)
        _, control = capture(_world_gather, *args)
    assert edited.matches == [], edited
    assert [n.reason for n in edited.near_misses] == [
        f"the gather moves 3 slabs but group {pair.group_name!r} has 2 ranks"], edited
    assert [m.pattern for m in control.matches] == ["split_cat"] and control.near_misses == [], control


def test_w2_training_through_fused_layers(w2):
    for rank, results in enumerate(w2):
        r = results["training_layers"]
        assert r["equal"], (rank, r)
        assert [f is not None and f.startswith("fused") for f in r["fused"]] == [True] * 3, (rank, r)
        assert r["near_misses"] == [], (rank, r)
