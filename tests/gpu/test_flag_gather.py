"""The flag protocol across real GPUs (NCCL ranks, symmetric memory, NVLink), through the op.

Correctness for every dtype and width case, CUDA-graph replays with T changing
between graphs, 10,000 calls with random per-rank delays, calls interleaved
with the barrier push on one group in random order, the two negative controls
and a missing rank's timeout.  The same checks with W ranks emulated on one
GPU are in test_flag_gather_one_gpu.py.
"""

import os
import random
import time

import pytest
import torch

from flag_one_gpu import width_kinds as _widths
from gpu_helpers import as_int as _as_int, bits as _bits, delayed_loop as _delayed_loop
from gpu_helpers import needs as _needs, quiesce as _quiesce, world_group as _group
from multiproc import run_ranks

pytestmark = [pytest.mark.gpu, pytest.mark.multigpu]

DTYPES = ("bfloat16", "float16", "float32", "int8", "float8_e4m3fn")


def _op(x, widths):
    import torch.distributed as dist

    return torch.ops.tpfuse.all_gather_hidden(x, widths, dist.group.WORLD.group_name)


def _correctness(rank, W):
    from tpfuse.compile_ops import collective
    from tpfuse.compile_ops.dispatch import choose_backend
    from tpfuse.kernels.flag import MAX_SLAB_BYTES as FLAG_MAX_SLAB_BYTES

    os.environ["TPFUSE_BACKEND"] = "flag"
    group = _group()
    failures, cases, seed, refused, over = [], 0, 0, 0, 0
    for dname in DTYPES:
        dtype = getattr(torch, dname)
        for kind in ("even_4096", "uneven", "not_multiple_of_16_bytes", "tiny_odd"):
            widths = _widths(kind, W)
            for T in (1, 7, 32, 1, 3):
                seed += 1
                xs = [_bits(seed * 16 + r, (T, w), dtype) for r, w in enumerate(widths)]
                ref = _as_int(torch.cat(xs, dim=-1))
                cases += 1
                if T * max(widths) * dtype.itemsize > FLAG_MAX_SLAB_BYTES:
                    # Too large for the flag buffers: forcing the flag path must say so.
                    over += 1
                    try:
                        _op(xs[rank], widths)
                        failures.append((dname, kind, T, "no error above the flag buffers"))
                    except RuntimeError as err:
                        refused += "exceeds the flag buffers" in str(err)
                    continue
                out = _op(xs[rank], widths)
                nccl = collective.gather_hidden(xs[rank], widths, group)
                if not (torch.equal(_as_int(out), ref) and torch.equal(_as_int(nccl), ref)):
                    failures.append((dname, kind, T))
    chosen = choose_backend("cuda", torch.bfloat16, [4096] * W, group).value
    del os.environ["TPFUSE_BACKEND"]
    auto = choose_backend("cuda", torch.bfloat16, [4096] * W, group).value
    return {"failures": failures, "cases": cases, "refused": refused, "over": over, "forced": chosen, "auto": auto}


@pytest.mark.parametrize("W", [2, 4])
def test_correctness_bit_exact(W):
    _needs(W)
    for rank, res in enumerate(run_ranks(W, _correctness, backend="nccl", timeout=600)):
        assert res["failures"] == [], f"rank {rank}: {res['failures'][:10]}"
        assert res["cases"] == len(DTYPES) * 4 * 5
        assert res["refused"] == res["over"] >= 1  # float32 at T=32: slabs over the flag buffers
        assert res["forced"] == "flag"
        assert res["auto"] in ("flag", "p2p")  # "flag" where the crossover is measured


def _cuda_graph(rank, W):
    os.environ["TPFUSE_BACKEND"] = "flag"
    widths = [1024 + 256 * r for r in range(W)]
    graphs = {}
    for T in (1, 8, 32):
        # Two inputs, both written before each replay (no arithmetic on them: random bits
        # hold NaN payloads, which arithmetic would canonicalise).
        xs = [_bits(rank + 10 * k, (T, widths[rank]), torch.bfloat16) for k in range(2)]
        _op(xs[0], widths)  # eager first: buffers and kernels
        _quiesce()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = [_op(x, widths) for x in xs]
        graphs[T] = (graph, xs, outs)
    rng = random.Random(0)  # the same order on every rank
    bad = []
    for i in range(100):
        T = rng.choice((1, 8, 32))
        graph, xs, outs = graphs[T]
        for k, x in enumerate(xs):
            x.copy_(_bits(1000 + i * 8 + 4 * k + rank, x.shape, torch.bfloat16))
        graph.replay()
        for k, out in enumerate(outs):
            ref = _as_int(torch.cat([_bits(1000 + i * 8 + 4 * k + r, (T, w), torch.bfloat16)
                                     for r, w in enumerate(widths)], -1))
            if not torch.equal(_as_int(out), ref):
                bad.append((i, T, k))
    torch.cuda.synchronize()
    return bad


@pytest.mark.parametrize("W", [2, 4])
def test_cuda_graph_replays_with_T_changing(W):
    _needs(W)
    for rank, bad in enumerate(run_ranks(W, _cuda_graph, backend="nccl", timeout=300)):
        assert bad == [], f"rank {rank}: {bad[:10]}"


def _stress(rank, W, iters):
    from tpfuse.compile_ops import workspace
    from tpfuse.compile_ops.barrier import P2P
    from tpfuse.compile_ops.flag import FLAG

    group = _group()
    widths = [2048 + 64 * r for r in range(W)]
    results = {}
    for T in (1, 32):
        results[f"flag/T={T}"] = _delayed_loop(rank, W, iters, T, widths,
                                               lambda x, i: FLAG.gather(x, widths, group), 11 + T)
        _quiesce()
    # Interleaved with the barrier push in a random (rank-consistent) order.
    order = random.Random(5)
    choice = [order.random() < 0.5 for _ in range(iters)]
    results["flag_and_barrier_interleaved"] = _delayed_loop(
        rank, W, iters, 8, widths,
        lambda x, i: (FLAG if choice[i] else P2P).gather(x, widths, group), 7)
    results["failure_code"] = workspace.workspace(group, rank).failure_code()
    return results


@pytest.mark.parametrize("W", [2, 4])
def test_stress_random_delays_and_interleaving_bit_exact(W):
    _needs(W)
    os.environ["TPFUSE_BACKEND"] = "flag"  # sets the flag buffers up at the first call
    try:
        results = run_ranks(W, _stress, int(os.environ.get("TPFUSE_STRESS_ITERS", "10000")), backend="nccl",
                            timeout=900)
    finally:
        del os.environ["TPFUSE_BACKEND"]
    for rank, res in enumerate(results):
        assert not any(res.values()), f"rank {rank}: {res}"


def _negative(rank, W, iters, options):
    """Free-running calls of a negative-control kernel variant; returns (corrupted, failure code)."""
    from tpfuse.compile_ops import workspace
    from tpfuse.compile_ops.flag import launcher

    os.environ["TPFUSE_BACKEND"] = "flag"
    group = _group()
    widths = [2048] * W
    ws = workspace.workspace(group, rank)
    ws.timeout_ns = int(0.05e9)
    # the protocol's own launcher (it makes the buffers, collectively, on every rank alike)
    launch = launcher.launcher(ws, torch.empty(32, 2048, dtype=torch.bfloat16, device="cuda"), widths, **options)

    def call(x, i):
        return launch(x)

    corrupted = _delayed_loop(rank, W, iters, 32, widths, call, 3)
    return {"corrupted": corrupted, "code": ws.failure_code()}


@pytest.mark.parametrize("W", [2, 4])
def test_negative_controls_detect_corruption(W):
    _needs(W)
    one_buffer = run_ranks(W, _negative, 2000, {"PARITY": False, "ACCEPT_STALE": True}, backend="nccl", timeout=300)
    stale = run_ranks(W, _negative, 2000, {"ACCEPT_STALE": True}, backend="nccl", timeout=300)
    print(f"W={W} one buffer: {one_buffer}; stale epochs accepted: {stale}")
    assert sum(r["corrupted"] for r in one_buffer) > 0
    assert sum(r["corrupted"] for r in stale) > 0


def _timeout(rank, W):
    from tpfuse.compile_ops import workspace
    from tpfuse.compile_ops.flag import FLAG

    os.environ["TPFUSE_BARRIER_TIMEOUT_S"] = "2"
    os.environ["TPFUSE_BACKEND"] = "flag"
    group = _group()
    widths = [512] * W
    x = _bits(rank, (4, 512), torch.bfloat16)
    _op(x, widths)
    _quiesce()
    if rank == W - 1:
        return {"skipped": True}
    t0 = time.perf_counter()
    FLAG.gather(x, widths, group)
    torch.cuda.synchronize()
    waited = time.perf_counter() - t0
    try:
        FLAG.gather(x, widths, group)
        message = ""
    except RuntimeError as err:
        message = str(err)
    return {"skipped": False, "waited": waited, "message": message,
            "code": workspace.workspace(group, rank).failure_code()}


@pytest.mark.parametrize("W", [2, 4])
def test_missing_rank_raises_instead_of_hanging(W):
    _needs(W)
    results = run_ranks(W, _timeout, backend="nccl", timeout=120)
    for rank, res in enumerate(results[:-1]):
        assert res["waited"] < 7, res
        assert "flag wait" in res["message"] and f"waiting for rank {W - 1}" in res["message"], res


#: what the last rank passes instead of (bf16, x of [T=4, 512], widths [512] * W)
MISMATCHES = {
    "widths": {"width": 520},
    "dtype": {"dtype": "float16"},
    "equal_bytes_dtype": {"dtype": "float32", "width": 256},  # fp32 x 256 = bf16 x 512 bytes per row
    "T": {"shape": (2,)},
    "leading_dims": {"shape": (2, 2)},
}


def _mismatch(rank, W, backend):
    """TPFUSE_CHECK=1 on a push path: each disagreement raises on every rank, then the group works on."""
    os.environ["TPFUSE_BACKEND"] = backend
    os.environ["TPFUSE_CHECK"] = "1"
    _group()
    widths = [512] * W
    out = {}
    for seed, (name, change) in enumerate(MISMATCHES.items()):
        xs = [_bits(seed * 16 + r, (4, 512), torch.bfloat16) for r in range(W)]
        want = _as_int(torch.cat(xs, -1))
        good = torch.equal(_as_int(_op(xs[rank], widths)), want)
        x, my_widths = xs[rank], widths
        if rank == W - 1:
            width = change.get("width", 512)
            x = _bits(seed, change.get("shape", (4,)) + (width,), getattr(torch, change.get("dtype", "bfloat16")))
            my_widths = widths[:-1] + [width]
        try:
            _op(x, my_widths)
            message = ""
        except ValueError as err:
            message = str(err)
        again = torch.equal(_as_int(_op(xs[rank], widths)), want)
        out[name] = {"good": good, "message": message, "again": again}
    from tpfuse.compile_ops import dispatch
    out["ran"] = dict(dispatch.chosen)
    return out


@pytest.mark.parametrize("backend", ["flag", "p2p"])
@pytest.mark.parametrize("W", [2, 4])
def test_check_mode_refuses_disagreeing_calls_on_every_rank(W, backend):
    """Widths, dtype, dtype of equal bytes per row, T and leading dims differ on the last rank."""
    _needs(W)
    results = run_ranks(W, _mismatch, backend, backend="nccl", timeout=300)
    for rank, res in enumerate(results):
        assert set(res["ran"]) == {backend}, res["ran"]
        for name in MISMATCHES:
            r = res[name]
            assert r["good"] and r["again"], (rank, name, r)
            assert "disagree on the gather" in r["message"], (rank, name, r)
            assert r["message"] == results[0][name]["message"]  # the same error on every rank
