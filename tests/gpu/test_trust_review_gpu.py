"""Rank consistency on real GPUs: what the CPU tests (tests/test_trust_review.py) cannot reach.

- The fused linear op with a gradient wanted on one rank only: the forward must run the same
  kernels on every rank (before, the rank that wanted a gradient ran cuBLAS and the barrier
  gather while its peer ran the fused linear + push, whose barriers pair differently).
- Settings that steer dispatch, different on one rank: refused on every rank, naming them, before
  the first dispatch on the group (a CUDA call without TPFUSE_CHECK=1 exchanges nothing before its
  kernels).
- TPFUSE_CHECK=1: a weight that one rank refuses is refused by every rank on CUDA too.
- nccl_symmetric: after the windows grew, a rank that dropped its kept launchers and a peer that
  kept its own still move a call through the same (current) windows.

    pytest -q tests/gpu/test_trust_review_gpu.py

One spawn of two NCCL ranks runs every scenario (start-up and kernel builds dominate), each on a
group of its own where it sets one up; waits are bounded at 30 s (TPFUSE_BARRIER_TIMEOUT_S; a rank
still building a kernel must not count as missing), so a mismatch shows as an error, not a hang.
"""

import os
import tempfile

import pytest
import torch

from gpu_helpers import needs, quiesce
from multiproc import run_ranks

pytestmark = [pytest.mark.gpu, pytest.mark.multigpu]

W = 2


def _every_rank_bits(t):
    """Every rank's copy of ``t`` (through NCCL), to compare the ranks' results bit for bit."""
    import torch.distributed as dist

    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return [o.view(torch.int16) for o in out]


def _linear_grad_on_one_rank(rank, world_size):
    import torch.distributed as dist
    import torch.nn.functional as F

    os.environ.update(TPFUSE_LINEAR_PUSH="fused", TPFUSE_BACKEND="p2p")
    name = dist.new_group(list(range(world_size))).group_name
    k, widths, tokens = 512, [1024] * world_size, 16
    gen = torch.Generator(device="cuda").manual_seed(1)
    weights = [torch.randn(w, k, device="cuda", generator=gen).to(torch.bfloat16) / 16 for w in widths]
    weight = weights[rank].clone().requires_grad_(rank == 0)  # a gradient wanted on rank 0 only
    out = {"same_on_every_rank": [], "close": []}
    for i in range(8):
        x = torch.randn(tokens, k, device="cuda", generator=gen).to(torch.bfloat16)
        y = torch.ops.tpfuse.linear_all_gather_hidden(x, weight, None, widths, name)
        torch.cuda.synchronize()
        mine, *others = _every_rank_bits(y.detach())
        out["same_on_every_rank"].append(all(torch.equal(mine, o) for o in others))
        ref = torch.cat([F.linear(x.float(), w.float()) for w in weights], -1)
        out["close"].append(bool(((y.detach().float() - ref).abs() <= 2**-6 * (1 + ref.abs())).all()))
    # Every rank wants a gradient: the backward is the reduce-scatter, then linear's backward on the band.
    weight.requires_grad_(True)
    x = torch.randn(tokens, k, device="cuda", generator=gen).to(torch.bfloat16).requires_grad_()
    upstream = torch.randn(tokens, sum(widths), device="cuda", generator=gen).to(torch.bfloat16)
    torch.ops.tpfuse.linear_all_gather_hidden(x, weight, None, widths, name).backward(upstream)
    # Every rank drew the same upstream (one generator seed on every GPU): band r of the sum is W times it.
    band = upstream.float()[:, rank * 1024:(rank + 1) * 1024] * world_size
    want = band.t() @ x.detach().float()
    out["grad_weight_close"] = bool(((weight.grad.float() - want).abs() <= 2**-5 * (1 + want.abs())).all())
    for variable in ("TPFUSE_LINEAR_PUSH", "TPFUSE_BACKEND"):
        os.environ.pop(variable)
    return out


def _settings_apart_at_dispatch(rank, world_size):
    """A variable set on one rank only: the push grid (TPFUSE_PUSH_BLOCK_V, p2p forced on both), and the
    backend itself (rank 1 forces nccl while rank 0 is on auto: before, rank 0 set a workspace up, a
    collective, while rank 1 ran NCCL's gather).  Each on a fresh group, then the same call with the
    settings alike on the same group (the control)."""
    import torch.distributed as dist

    x = torch.ones(4, 1024, dtype=torch.bfloat16, device="cuda")
    out = {}
    for case, common, one_rank in (("block_v", {"TPFUSE_BACKEND": "p2p"}, {"TPFUSE_PUSH_BLOCK_V": "128"}),
                                   ("backend", {}, {"TPFUSE_BACKEND": "nccl"})):
        name = dist.new_group(list(range(world_size))).group_name
        os.environ.update({**common, **(one_rank if rank == 1 else {})})
        try:
            torch.ops.tpfuse.all_gather_hidden(x, [1024] * world_size, name)
            out[case] = None
        except RuntimeError as err:
            out[case] = str(err)
        for variable in one_rank:
            os.environ.pop(variable, None)
        quiesce()
        y = torch.ops.tpfuse.all_gather_hidden(x * (rank + 1), [1024] * world_size, name)
        out[case + "_alike"] = torch.equal(y, torch.cat([x * (r + 1) for r in range(world_size)], -1))
        for variable in common:
            os.environ.pop(variable)
        quiesce()
    return out


def _checked_linear_refusal(rank, world_size):
    import torch.distributed as dist

    os.environ["TPFUSE_CHECK"] = "1"
    name = dist.new_group(list(range(world_size))).group_name
    x = torch.ones(4, 64, dtype=torch.bfloat16, device="cuda")
    weight = torch.ones(32, 64 if rank == 0 else 72, dtype=torch.bfloat16, device="cuda")
    try:
        torch.ops.tpfuse.linear_all_gather_hidden(x, weight, None, [32] * world_size, name)
        message = None
    except ValueError as err:
        message = str(err)
    os.environ.pop("TPFUSE_CHECK")
    return message


def _windows_after_one_rank_drops_its_launchers(rank, world_size):
    import torch.distributed as dist

    from tpfuse.compile_ops import launchers
    from tpfuse.compile_ops.nccl_symmetric import release

    os.environ.update(TPFUSE_TUNED_CONFIG_DIR=tempfile.mkdtemp(), TPFUSE_BACKEND="nccl_symmetric")
    group = dist.new_group(list(range(world_size)))
    name, widths = group.group_name, [1024] * world_size
    small = [torch.full((4, 1024), float(10 * i + rank), dtype=torch.bfloat16, device="cuda") for i in range(6)]
    try:
        torch.ops.tpfuse.all_gather_hidden(small[0], widths, name)  # 1 MiB windows, a kept launcher
    except RuntimeError as err:
        os.environ.pop("TPFUSE_BACKEND")
        return {"skip": str(err)}
    big = torch.ones(1024, 1024, dtype=torch.bfloat16, device="cuda")
    torch.ops.tpfuse.all_gather_hidden(big, widths, name)  # a 2 MiB slab: the windows grow on every rank
    if rank == 0:
        launchers.clear()  # rank-local: rank 1 keeps its launcher of the small shape
    same = []
    for i in range(1, 6):
        y = torch.ops.tpfuse.all_gather_hidden(small[i], widths, name)
        want = torch.cat([torch.full((4, 1024), float(10 * i + r), dtype=torch.bfloat16, device="cuda")
                          for r in range(world_size)], -1)
        same.append(torch.equal(y, want))
    quiesce()
    release(group)  # collective, before the group is destroyed (docs/op.md, "nccl_symmetric")
    os.environ.pop("TPFUSE_BACKEND")
    return {"same": same}


def _every_scenario(rank, world_size):
    os.environ["TPFUSE_BARRIER_TIMEOUT_S"] = "30"
    scenarios = {"linear_grad": _linear_grad_on_one_rank, "settings": _settings_apart_at_dispatch,
                 "checked_linear": _checked_linear_refusal, "windows": _windows_after_one_rank_drops_its_launchers}
    out = {}
    for name, scenario in scenarios.items():
        out[name] = scenario(rank, world_size)
        quiesce()
    return out


@pytest.fixture(scope="module")
def results():
    needs(W)
    return run_ranks(W, _every_scenario, backend="nccl", timeout=240)


def test_linear_op_with_a_gradient_on_one_rank_runs_the_same_kernels_everywhere(results):
    for rank, res in enumerate(r["linear_grad"] for r in results):
        assert all(res["same_on_every_rank"]) and all(res["close"]), (rank, res)
        assert res["grad_weight_close"], (rank, res)


@pytest.mark.parametrize("case, says", [("block_v", "TPFUSE_PUSH_BLOCK_V=128"), ("backend", "TPFUSE_BACKEND='nccl'")])
def test_settings_that_differ_are_refused_on_every_rank_before_dispatch(results, case, says):
    for rank, res in enumerate(r["settings"] for r in results):
        assert res[case] and says in res[case] and "rank 1" in res[case], (rank, res)
        assert res[case + "_alike"], (rank, res)  # the control: settings alike, the same call runs
    assert results[0]["settings"][case] == results[1]["settings"][case]


def test_checked_cuda_linear_call_one_rank_refuses_is_refused_everywhere(results):
    for rank, message in enumerate(r["checked_linear"] for r in results):
        assert message and "weight.shape=[32, 72] on rank 1" in message, (rank, message)


def test_nccl_symmetric_calls_meet_in_the_current_windows(results):
    windows = [r["windows"] for r in results]
    if all("skip" in w for w in windows):
        pytest.skip(f"nccl_symmetric unavailable here: {windows[0]['skip']}")
    for rank, res in enumerate(windows):
        assert all(res["same"]), (rank, res)
