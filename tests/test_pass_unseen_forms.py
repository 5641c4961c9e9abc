"""Tensor-parallel code the pattern pass was not written against, on real gloo ranks.

Each form is compiled twice on every rank, with tpfuse off and with ``tpfuse.backend(...)``
(Inductor or ``aot_eager``), and every rank's outputs must be bit-identical: a gather moves
bytes, so a rewrite never changes the answer (docs/troubleshooting.md, "Outputs differ from
eager after compiling").  Where the pass cannot prove a form it leaves it and says why: those
cases assert the near-miss's reason.  The fused linear's cases force its cost rule to fuse
(``_fusion_forced``): which shapes fuse is the rule's business (tests/test_pass_linear_fusion.py),
that a fused graph computes what the unfused one does is the rewrite's, whatever the rule says.

One spawned run per world size does every case (compiles on the CPU are slow); a case that
raises is recorded with its traceback, so one crash fails its own test only.
"""

from __future__ import annotations

import contextlib
import traceback
from dataclasses import dataclass, replace
from typing import Callable

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F

from multiproc import run_ranks

K, WIDTH, TOKENS = 16, 8, 6  # input features, columns per rank, tokens
HAS_GATHER_SINGLE = hasattr(funcol, "all_gather_single")  # torch 2.13's name; torch 2.11 has only all_gather_tensor


def group():
    return dist.group.WORLD


# --------------------------------------------------------------------------- gathers, each after a column linear


def funcol_last(x, w):
    return funcol.all_gather_tensor(x @ w.t(), gather_dim=-1, group=group())


def funcol_dim1(x, w):
    return funcol.all_gather_tensor(F.linear(x, w), gather_dim=1, group=group())


def funcol_3d_dim2(x, w):
    return funcol.all_gather_tensor(torch.matmul(x, w.t()), gather_dim=2, group=group())


def gather_single_last(x, w):
    return funcol.all_gather_single(x @ w.t(), gather_dim=-1, group=group())


def dim0_chunk_cat(x, w):
    rows = funcol.all_gather_tensor(x @ w.t(), gather_dim=0, group=group())
    return torch.cat(rows.chunk(dist.get_world_size()), dim=-1)


def list_cat(x, w):
    y = x @ w.t()
    parts = [torch.empty_like(y) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, y)
    return torch.cat(parts, -1)


def list_cat_into_zeros(x, w):
    y = x @ w.t()
    parts = [torch.zeros_like(y) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, y)
    return torch.cat(parts, -1)


def into_tensor(y):
    """``dist.all_gather_into_tensor`` into a fresh ``[W*T, w]`` buffer: the ranks' slabs stacked on dim 0."""
    out = torch.empty(dist.get_world_size() * y.shape[0], y.shape[1], dtype=y.dtype)
    dist.all_gather_into_tensor(out, y)
    return out


def into_tensor_rearrange(x, w):
    y = x @ w.t()
    return into_tensor(y).view(dist.get_world_size(), y.shape[0], -1).permute(1, 0, 2).reshape(y.shape[0], -1)


def dim0_unflatten_movedim(x, w):  # the einops spelling: "(W T) w -> T (W w)"
    rows = funcol.all_gather_tensor(x @ w.t(), gather_dim=0, group=group())
    return rows.unflatten(0, (dist.get_world_size(), -1)).movedim(0, -2).flatten(-2)


_MESH = None  # made before any compile (a mesh made while Dynamo traces fails in torch itself)


def _sharded_last(y, shape=None):
    from torch.distributed.tensor import DTensor, Shard

    extra = {} if shape is None else {"shape": shape, "stride": tuple(torch.empty(shape).stride())}
    return DTensor.from_local(y, _MESH, [Shard(y.dim() - 1)], run_check=False, **extra)


def dtensor_redistribute(x, w):
    from torch.distributed.tensor import Replicate

    return _sharded_last(x @ w.t()).redistribute(_MESH, [Replicate()]).to_local()


def dtensor_full_tensor(x, w):
    return _sharded_last(x @ w.t()).full_tensor()


def dtensor_uneven(x, w):
    """A logical width of W*w - 1: the last rank holds a column less, which DTensor pads before its
    gather and trims after."""
    world, y = dist.get_world_size(), x @ w.t()
    if dist.get_rank() == world - 1:
        y = y[..., :-1]
    return _sharded_last(y, shape=(*y.shape[:-1], world * w.shape[0] - 1)).full_tensor()


def decode_view(x, w):  # T == 1: funcol's view form (dim written positively)
    return funcol.all_gather_tensor(x[:1] @ w.t(), gather_dim=1, group=group())


def gathered_then_mutated(x, w):
    h = funcol.all_gather_tensor(x @ w.t(), gather_dim=-1, group=group())
    h[:, 0] = 0
    h.mul_(2)
    return h


def gather_of_gathered(x, w):
    """Two hidden gathers in a row (here both on one group; over the two axes of a 2-D mesh in real
    code): the second gathers the first's output."""
    h = funcol.all_gather_tensor(x @ w.t(), gather_dim=-1, group=group())
    parts = [torch.empty_like(h) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, h)
    return torch.cat(parts, -1)


def relu_after_gather(x, w):  # Inductor pushes the relu through the cat onto every band
    return torch.relu(funcol.all_gather_tensor(x @ w.t(), gather_dim=-1, group=group()))


# --------------------------------------------------------------------------- linear spellings


def nn_linear_bias_3d(x, w, b):
    return funcol.all_gather_tensor(F.linear(x, w, b), gather_dim=2, group=group())


def addmm_bias(x, w, b):
    return funcol.all_gather_tensor(torch.addmm(b, x, w.t()), gather_dim=-1, group=group())


def addmm_scaled(x, w, b):
    """``beta*b + alpha*(x @ w.T)``: not a linear layer; a fused linear of (x, w, b) would drop the factors."""
    return funcol.all_gather_tensor(torch.addmm(b, x, w.t(), beta=0.5, alpha=2.0), gather_dim=-1, group=group())


def transposed_input(x, w):  # a non-contiguous input: a transposed view of [K, T] activations
    return funcol.all_gather_tensor(F.linear(x.t().contiguous().t(), w), gather_dim=-1, group=group())


def linear_used_elsewhere(x, w):
    y = x @ w.t()
    return funcol.all_gather_tensor(y, gather_dim=-1, group=group()), y.sum(-1)


def heads_gathered(x, w):
    """The linear's [T, w] output viewed as [T, 2, w/2] and gathered along the last axis: each head's
    half-columns side by side, which is not the gather of the linear's columns."""
    y = (x @ w.t()).view(x.shape[0], 2, -1)
    return funcol.all_gather_tensor(y, gather_dim=2, group=group())


# --------------------------------------------------------------------------- near-misses: must stay as they are


def rows_kept_as_rows(x, w):
    return funcol.all_gather_tensor(x @ w.t(), gather_dim=0, group=group()) * 2


def dtensor_row_shards(x, w):
    from torch.distributed.tensor import DTensor, Shard

    return DTensor.from_local(x @ w.t(), _MESH, [Shard(0)], run_check=False).full_tensor()


def middle_dim(x, w):
    return funcol.all_gather_tensor(torch.matmul(x, w.t()), gather_dim=1, group=group())


def list_cat_wrong_axis(x, w):
    y = x @ w.t()
    parts = [torch.empty_like(y) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, y)
    return torch.cat(parts, 0)


def interleaving_permute(x, w):  # view(W, T, w).permute(1, 2, 0): columns interleaved, not side by side
    y = x @ w.t()
    return into_tensor(y).view(dist.get_world_size(), y.shape[0], -1).permute(1, 2, 0).reshape(y.shape[0], -1)


def interleaving_permute_decode(x, w):
    rows = funcol.all_gather_tensor(x[:1] @ w.t(), gather_dim=0, group=group())
    return rows.view(dist.get_world_size(), 1, -1).permute(1, 2, 0).reshape(1, -1)


def interleaving_stack(x, w):  # stack on the last axis then flatten: column c of every rank, then c+1
    y = x @ w.t()
    parts = [torch.empty_like(y) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, y)
    return torch.stack(parts, -1).flatten(-2)


def reversed_rank_order(x, w):
    rows = funcol.all_gather_tensor(x @ w.t(), gather_dim=0, group=group())
    return torch.cat(rows.chunk(dist.get_world_size())[::-1], dim=-1)


def rows_mutated_before_rearrange(x, w):
    y = x @ w.t()
    out = into_tensor(y)
    out[0].fill_(3.0)
    return out.view(dist.get_world_size(), y.shape[0], -1).permute(1, 0, 2).reshape(y.shape[0], -1)


def rows_mutated_after_rearrange(x, w):
    y = x @ w.t()
    out = into_tensor(y)
    h = out.view(dist.get_world_size(), y.shape[0], -1).permute(1, 0, 2).reshape(y.shape[0], -1)
    out.mul_(2)  # h is a copy (a reshape of a permute), out is returned mutated
    return h, out


# --------------------------------------------------------------------------- the cases


@dataclass(frozen=True)
class Case:
    form: Callable
    backend: str = "inductor"
    dtype: torch.dtype = torch.float32
    patterns: tuple[str, ...] = ()  # the patterns that rewrite it
    near_miss: str | None = None  # a piece of the one near-miss expected, "pattern: reason"
    near_miss_on_last_rank: bool = True  # False: the last rank's graph differs (its shard is the narrow one)
    producer: str | None = None  # the producer kind of every match
    fuse: bool = False  # fuse_linear=True, the cost rule forced to fuse
    fused: bool | None = None  # with fuse: whether the linear was fused
    three_d: bool = False
    dynamic_tokens: tuple[int, ...] = ()  # mark_dynamic on the token dim, run at each of these T
    needs: bool = True  # the torch at hand has what the form calls


SPLIT, NARROW, REARRANGE, VIEW = ("split_cat",), ("narrow_cat",), ("rearrange",), ("view",)
LINEAR = "column_linear"

W2_CASES = {
    # gather spellings: rewritten, bit-exact
    "funcol_last_bf16": Case(funcol_last, dtype=torch.bfloat16, patterns=SPLIT, producer=LINEAR),
    "funcol_dim1_aot": Case(funcol_dim1, backend="aot_eager", patterns=SPLIT, producer=LINEAR),
    "funcol_3d_dim2_fp16": Case(funcol_3d_dim2, dtype=torch.float16, three_d=True, patterns=SPLIT, producer=LINEAR),
    "gather_single_last_aot": Case(gather_single_last, backend="aot_eager", patterns=SPLIT, producer=LINEAR,
                                   needs=HAS_GATHER_SINGLE),
    "dim0_chunk_cat": Case(dim0_chunk_cat, patterns=SPLIT, producer=LINEAR),
    "list_cat_bf16": Case(list_cat, dtype=torch.bfloat16, patterns=NARROW, producer=LINEAR),
    "list_cat_into_zeros_aot": Case(list_cat_into_zeros, backend="aot_eager", patterns=NARROW, producer=LINEAR),
    "into_tensor_rearrange_aot": Case(into_tensor_rearrange, backend="aot_eager", patterns=REARRANGE,
                                      producer=LINEAR),
    "dim0_unflatten_movedim": Case(dim0_unflatten_movedim, patterns=REARRANGE, producer=LINEAR),
    "dtensor_redistribute": Case(dtensor_redistribute, patterns=SPLIT, producer=LINEAR),
    "dtensor_full_tensor_aot": Case(dtensor_full_tensor, backend="aot_eager", patterns=SPLIT, producer=LINEAR),
    "dtensor_uneven": Case(dtensor_uneven, patterns=SPLIT),
    "decode_view_bf16": Case(decode_view, dtype=torch.bfloat16, patterns=VIEW, producer=LINEAR),
    "gathered_then_mutated": Case(gathered_then_mutated, patterns=SPLIT, producer=LINEAR),
    "relu_after_gather": Case(relu_after_gather, patterns=SPLIT, producer=LINEAR),
    "gather_of_gathered": Case(gather_of_gathered, patterns=("split_cat", "narrow_cat")),
    "gather_of_gathered_aot": Case(gather_of_gathered, backend="aot_eager", patterns=("split_cat", "narrow_cat")),
    # linear spellings
    "nn_linear_bias_3d_bf16": Case(nn_linear_bias_3d, dtype=torch.bfloat16, three_d=True, patterns=SPLIT,
                                   producer=LINEAR),
    "addmm_bias_aot": Case(addmm_bias, backend="aot_eager", patterns=SPLIT, producer=LINEAR),
    "addmm_scaled_aot": Case(addmm_scaled, backend="aot_eager", patterns=SPLIT, producer="other"),
    "transposed_input": Case(transposed_input, patterns=SPLIT, producer=LINEAR),
    "linear_used_elsewhere": Case(linear_used_elsewhere, patterns=SPLIT, producer=LINEAR),
    # the fused linear, its rule forced to fuse
    "fused_funcol_bf16_aot": Case(funcol_last, backend="aot_eager", dtype=torch.bfloat16, patterns=SPLIT,
                                  fuse=True, fused=True),
    "fused_list_cat_aot": Case(list_cat, backend="aot_eager", patterns=NARROW, fuse=True, fused=True),
    "fused_rearrange_aot": Case(into_tensor_rearrange, backend="aot_eager", patterns=REARRANGE, fuse=True,
                                fused=True),
    "fused_decode_view_aot": Case(decode_view, backend="aot_eager", patterns=VIEW, fuse=True, fused=True),
    "fused_relu_after_gather": Case(relu_after_gather, patterns=SPLIT, fuse=True, fused=True),
    "fused_bias_3d_bf16_aot": Case(nn_linear_bias_3d, backend="aot_eager", dtype=torch.bfloat16, three_d=True,
                                   patterns=SPLIT, fuse=True, fused=True),
    "fused_bias_3d_dynamic_aot": Case(nn_linear_bias_3d, backend="aot_eager", three_d=True, patterns=SPLIT,
                                      fuse=True, fused=True, dynamic_tokens=(5, 7)),
    "fused_bias_3d_dynamic": Case(nn_linear_bias_3d, three_d=True, patterns=SPLIT, fuse=True, fused=True,
                                  dynamic_tokens=(5, 7)),
    "fused_addmm_scaled_aot": Case(addmm_scaled, backend="aot_eager", patterns=SPLIT, producer="other",
                                   fuse=True, fused=False),
    "fused_heads_gathered_aot": Case(heads_gathered, backend="aot_eager", patterns=SPLIT, fuse=True, fused=False,
                                     near_miss="its last dim is not the linear's 8 output columns"),
    # every rank must run the same op: the last rank gathers pad(linear) and cannot fuse, so none does
    "fused_dtensor_uneven_aot": Case(dtensor_uneven, backend="aot_eager", patterns=SPLIT, fuse=True, fused=False,
                                     near_miss="gathered columns, as torch's uneven Shard does",
                                     near_miss_on_last_rank=False),
    "fused_linear_used_elsewhere_aot": Case(linear_used_elsewhere, backend="aot_eager", patterns=SPLIT, fuse=True,
                                            fused=False, near_miss="fusing would compute the linear twice"),
    # near-misses: left as they are, with the reason
    "rows_kept_as_rows": Case(rows_kept_as_rows, near_miss="no_pattern: no pattern recognises how the gathered"),
    "dtensor_row_shards_aot": Case(dtensor_row_shards, backend="aot_eager",
                                   near_miss="no_pattern: no pattern recognises how the gathered"),
    "middle_dim": Case(middle_dim, three_d=True, near_miss="split_cat: cat concatenates the rank bands on dim 1"),
    "list_cat_wrong_axis_aot": Case(list_cat_wrong_axis, backend="aot_eager",
                                    near_miss="narrow_cat: cat concatenates the rank bands on dim 0"),
    "interleaving_permute": Case(interleaving_permute, near_miss="by [1, 2, 0]; only moving the rank axis"),
    "interleaving_permute_decode_aot": Case(interleaving_permute_decode, backend="aot_eager",
                                            near_miss="by [1, 2, 0]; only moving the rank axis"),
    "interleaving_stack": Case(interleaving_stack, near_miss="not by a single cat"),
    "reversed_rank_order": Case(reversed_rank_order, near_miss="rank bands of 6 rows in rank order"),
    "rows_mutated_before_rearrange_aot": Case(rows_mutated_before_rearrange, backend="aot_eager",
                                              near_miss="no_pattern: no pattern recognises how the gathered"),
    "rows_mutated_after_rearrange": Case(rows_mutated_after_rearrange,
                                         near_miss="wait_tensor result is also used raw"),
}

#: W=3 through aot_eager only: three ranks on two cores pay Inductor's start-up three times over
W3_CASES = {
    name: replace(W2_CASES[name], backend="aot_eager") for name in (
        "funcol_last_bf16", "dim0_chunk_cat", "list_cat_into_zeros_aot", "into_tensor_rearrange_aot",
        "dtensor_uneven", "decode_view_bf16", "fused_bias_3d_dynamic_aot", "interleaving_permute",
        "fused_dtensor_uneven_aot",
        "interleaving_permute_decode_aot", "rows_kept_as_rows",
    )
}


# --------------------------------------------------------------------------- on every rank


def _inputs(rank: int, case: Case, tokens: int = TOKENS) -> list[torch.Tensor]:
    """The same activations on every rank, this rank's weight and bias bands."""
    def draw(*shape, seed):
        return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(case.dtype)

    x = draw(2, tokens, K, seed=tokens) if case.three_d else draw(tokens, K, seed=tokens)
    args = [x, draw(WIDTH, K, seed=100 + rank), draw(WIDTH, seed=200 + rank)]
    return args[: case.form.__code__.co_argcount]


@contextlib.contextmanager
def _fusion_forced(on: bool):
    """The fused linear's cost rule answering "fuse" for every shape, for the block."""
    from tpfuse.compile_ops import linear_cost

    saved = linear_cost.decide, linear_cost.compile_time_device_name
    if on:
        linear_cost.compile_time_device_name = lambda: "NVIDIA H200"
        linear_cost.decide = lambda *a, **k: linear_cost.LinearFusionDecision(True, "predicted_faster", "forced")
    try:
        yield
    finally:
        linear_cost.decide, linear_cost.compile_time_device_name = saved


def _same(a, b) -> bool:
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a, b))


def _record(rep, equal) -> dict:
    return {
        "equal": equal,
        "patterns": [m.pattern for m in rep.matches],
        "producers": [m.producer.kind for m in rep.matches],
        "fused": [m.linear_fusion for m in rep.matches],
        "near_misses": [f"{n.pattern}: {n.reason}" for n in rep.near_misses],
        "groups": sorted({m.group_name for m in rep.matches}),
    }


def _run_case(rank: int, case: Case) -> dict:
    import tpfuse

    token_counts = case.dynamic_tokens or (TOKENS,)
    compiled = {}
    for label, backend in (("off", case.backend), ("on", tpfuse.backend(case.backend, fuse_linear=case.fuse))):
        torch._dynamo.reset()
        tpfuse.report()
        fn = torch.compile(case.form, backend=backend)
        outs = []
        for tokens in token_counts:
            args = _inputs(rank, case, tokens)
            if case.dynamic_tokens:
                torch._dynamo.mark_dynamic(args[0], args[0].dim() - 2)
            outs.append(fn(*args))
        compiled[label] = outs
    return _record(tpfuse.report(), _same(compiled["off"], compiled["on"]))


def _run_cases(rank: int, world_size: int, names: list[str], cases: dict) -> dict:
    import torch._dynamo
    import torch._functorch.config
    import torch._inductor.config as inductor_config
    from torch.distributed.device_mesh import init_device_mesh

    from tpfuse.passes.dynamo_compat import allow_funcol_gather_tracing

    allow_funcol_gather_tracing()  # as the "on" compiles do: both trace the same graph on every torch
    global _MESH
    _MESH = init_device_mesh("cpu", (world_size,))
    torch._dynamo.config.cache_size_limit = 256
    # Forced fusion decisions must not reach, or come from, a cache shared with other runs.
    inductor_config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    results = {}
    for name in names:
        case = cases[name]
        if not case.needs:
            continue
        try:
            with _fusion_forced(case.fuse):
                results[name] = _run_case(rank, case)
        except Exception:  # noqa: BLE001 - recorded: the case's own test fails with it
            results[name] = {"error": traceback.format_exc()}
    results["scenarios"] = _scenarios(rank, world_size)
    return results


# --------------------------------------------------------------------------- scenarios


class _UserPass:
    """A post-grad pass a user installed before tpfuse: it must keep running, and come back after disable()."""

    def __init__(self):
        self.calls = 0

    def __call__(self, graph):
        self.calls += 1

    def uuid(self):
        return "tests.test_pass_unseen_forms._UserPass"


class _LinearGather(torch.nn.Module):
    def __init__(self, rank):
        super().__init__()
        self.proj = torch.nn.Linear(K, WIDTH)
        with torch.no_grad():
            g = torch.Generator().manual_seed(300 + rank)
            self.proj.weight.copy_(torch.randn(WIDTH, K, generator=g))
            self.proj.bias.copy_(torch.randn(WIDTH, generator=g))

    def forward(self, x):
        return funcol.all_gather_tensor(self.proj(x), gather_dim=x.dim() - 1, group=group())


def _linear_then_break(x, w):
    y = x @ w.t()
    torch._dynamo.graph_break()  # the gather's graph gets y as an input
    return funcol.all_gather_tensor(y, gather_dim=-1, group=group())


def _scenario(fn, *args, backend="inductor", **compile_kwargs) -> dict:
    """``fn`` compiled with ``backend``, tpfuse off and on (``tpfuse.backend(backend)``), outputs compared."""
    import tpfuse

    torch._dynamo.reset()
    off = torch.compile(fn, backend=backend, **compile_kwargs)(*args)
    torch._dynamo.reset()
    tpfuse.report()
    on = torch.compile(fn, backend=tpfuse.backend(backend), **compile_kwargs)(*args)
    return _record(tpfuse.report(), _same(off, on))


def _scenarios(rank: int, world_size: int) -> dict:
    x = torch.randn(TOKENS, K, generator=torch.Generator().manual_seed(1))
    w = torch.randn(WIDTH, K, generator=torch.Generator().manual_seed(100 + rank))
    if world_size == 4:
        return _two_groups(rank, x, w)
    if world_size == 3:
        return {"dynamic_true": _scenario(_LinearGather(rank), torch.randn(2, 5, K), backend="aot_eager",
                                          dynamic=True)}
    return {
        "dynamic_true": _scenario(_LinearGather(rank), torch.randn(2, 5, K), dynamic=True),
        "training": _training(x, w),
        "fullgraph": _scenario(funcol_last, x, w, fullgraph=True),
        "reduce_overhead": _scenario(funcol_last, x, w, mode="reduce-overhead"),
        "graph_break": _scenario(_linear_then_break, x, w),
        "enable_disable": _enable_disable(rank, x),
    }


def _two_groups(rank, x, w) -> dict:
    """Two groups of two, crossed ([0, 1], [2, 3] and [0, 2], [1, 3]): one graph gathers on both, side by
    side, and then in a row (the columns sharded over both axes of a 2 x 2 mesh)."""
    pairs = [dist.new_group(ranks) for ranks in ([0, 1], [2, 3], [0, 2], [1, 3])]
    mine, crossed = pairs[rank // 2], pairs[2 + rank % 2]

    def two_groups(x, w):
        y = x @ w.t()
        return (funcol.all_gather_tensor(y, gather_dim=-1, group=mine),
                funcol.all_gather_tensor(y * 2, gather_dim=-1, group=crossed))

    def in_a_row(x, w):
        h = funcol.all_gather_tensor(x @ w.t(), gather_dim=-1, group=crossed)
        return funcol.all_gather_tensor(h, gather_dim=-1, group=mine)

    # four ranks on two cores: aot_eager, no Inductor start-up
    return {"two_groups": _scenario(two_groups, x, w, backend="aot_eager"),
            "in_a_row": _scenario(in_a_row, x, w, backend="aot_eager")}


def _training(x, w) -> dict:
    """A loss of the gathered activations: the forward's gather rewritten, loss and gradient bit-exact."""
    import tpfuse

    def step(x, w):
        h = funcol.all_gather_tensor_autograd(x @ w.t(), gather_dim=-1, group=group())
        return (h * torch.arange(h.shape[-1], dtype=h.dtype)).sum()

    results = {}
    for label, backend in (("off", "inductor"), ("on", tpfuse.backend())):
        torch._dynamo.reset()
        tpfuse.report()
        weight = w.clone().requires_grad_()
        loss = torch.compile(step, backend=backend)(x, weight)
        loss.backward()
        results[label] = (loss.detach(), weight.grad)
    return _record(tpfuse.report(), _same(results["off"], results["on"]))


def _enable_disable(rank, x) -> dict:
    """One module compiled twice under ``enable()``, again after a reset, then after ``disable()``,
    with a user's pass installed before: it runs chained, and comes back."""
    import torch._inductor.config as inductor_config
    import tpfuse

    model = _LinearGather(rank)
    torch._dynamo.reset()
    expected = torch.compile(model)(x)
    user_pass = _UserPass()
    with inductor_config.patch(post_grad_custom_post_pass=user_pass):
        tpfuse.enable()
        torch._dynamo.reset()
        first, second = torch.compile(model), torch.compile(model)
        equal = [_same(first(x), expected), _same(second(x), expected)]
        rewritten = [tpfuse.report().rewritten]
        torch._dynamo.reset()
        equal.append(_same(torch.compile(model)(x), expected))
        rewritten.append(tpfuse.report().rewritten)
        calls_enabled = user_pass.calls
        tpfuse.disable()
        restored = inductor_config.post_grad_custom_post_pass is user_pass
        torch._dynamo.reset()
        equal.append(_same(torch.compile(model)(x), expected))
        rewritten.append(tpfuse.report().rewritten)
    return {"equal": equal, "rewritten": rewritten, "restored": restored,
            "user_pass_ran": [calls_enabled > 0, user_pass.calls > calls_enabled]}


# --------------------------------------------------------------------------- the checks


@pytest.fixture(scope="module")
def w2():
    return run_ranks(2, _run_cases, list(W2_CASES), W2_CASES, timeout=900)


@pytest.fixture(scope="module")
def w3():
    return run_ranks(3, _run_cases, list(W3_CASES), W3_CASES, timeout=900)


@pytest.fixture(scope="module")
def w4():
    return run_ranks(4, _run_cases, [], {}, timeout=900)


def _check_case(name: str, case: Case, per_rank: list[dict]) -> None:
    if not case.needs:
        pytest.skip(f"torch {torch.__version__} lacks what {case.form.__name__} calls")
    for rank, results in enumerate(per_rank):
        r = results[name]
        assert "error" not in r, f"rank {rank}:\n{r.get('error')}"
        assert r["equal"], f"rank {rank}: the output differs from the compile without tpfuse: {r}"
        assert r["patterns"] == list(case.patterns), (rank, r)
        if case.producer is not None:
            assert set(r["producers"]) == {case.producer}, (rank, r)
        if case.fuse:
            assert [f is not None and f.startswith("fused") for f in r["fused"]] == [case.fused], (rank, r)
        near_miss = case.near_miss if case.near_miss_on_last_rank or rank < len(per_rank) - 1 else None
        if near_miss is None:
            assert r["near_misses"] == [], (rank, r)
        else:
            assert len(r["near_misses"]) == 1 and near_miss in r["near_misses"][0], (rank, r)


@pytest.mark.parametrize("name", list(W2_CASES))
def test_w2(w2, name):
    _check_case(name, W2_CASES[name], w2)


@pytest.mark.parametrize("name", list(W3_CASES))
def test_w3(w3, name):
    _check_case(name, W3_CASES[name], w3)


def _check_scenario(per_rank, name, patterns, producers=(LINEAR,)):
    for rank, results in enumerate(per_rank):
        r = results["scenarios"][name]
        assert r["equal"], (rank, name, r)
        assert r["patterns"] == patterns, (rank, name, r)
        assert r["producers"] == list(producers), (rank, name, r)
        assert r["near_misses"] == [], (rank, name, r)


def test_fullgraph_reduce_overhead_dynamic_and_training(w2):
    for name in ("fullgraph", "reduce_overhead", "dynamic_true", "training"):
        _check_scenario(w2, name, ["split_cat"])


def test_graph_break_between_linear_and_gather(w2):
    # the gather's graph receives the linear's output as an input: rewritten, its producer "other"
    _check_scenario(w2, "graph_break", ["split_cat"], producers=["other"])


def test_same_module_compiled_twice_and_enable_disable(w2):
    for rank, results in enumerate(w2):
        r = results["scenarios"]["enable_disable"]
        assert r["equal"] == [True] * 4, (rank, r)
        # two compiles of one module share Dynamo's code (one graph); after a reset it is rewritten
        # again; after disable() nothing is
        assert r["rewritten"] == [1, 1, 0], (rank, r)
        assert r["user_pass_ran"] == [True, True] and r["restored"], (rank, r)


def test_w3_dynamic(w3):
    _check_scenario(w3, "dynamic_true", ["split_cat"])


def test_w4_two_groups_in_one_graph(w4):
    # the second gather's slab is y * 2, or the first gather's output: its producer is "other"
    for name in ("two_groups", "in_a_row"):
        _check_scenario(w4, name, ["split_cat", "split_cat"], producers=[LINEAR, "other"])
        for rank, results in enumerate(w4):
            assert len(results["scenarios"][name]["groups"]) == 2, (rank, name)
