"""The nccl_symmetric backend on real GPUs (compile_ops/nccl_symmetric/; docs/op.md): bit-exact, every shape.

Each test spawns W NCCL ranks and runs many checks in them.  Inputs are random bit patterns (NaN payloads
included) compared bit for bit through integer views, against every rank's input (each rank builds them all)
and against the classic NCCL path (``collective.gather_hidden``); results are written into NaN-filled tensors
and the windows are filled with 0xFF before each case, so a byte not written, or left from an earlier call,
shows.  Then: the tune's stress of the backend (1000 calls with random per-rank delays, and its negative
control, bands in reverse order, which the check must catch); calls on two streams in turn interleaved with
p2p calls on the same group (the group's program order); CUDA-graph replay; growth and release of the windows.

Where this host cannot register NCCL symmetric windows (NCCL before 2.27, a torch whose register_mem_pool
takes no ``symm``), every rank refuses with the same reason and the test skips, naming it.  NVLink multicast
stays off (NCCL_NVLS_ENABLE=0, set by the rank launcher; docs/safety.md, "NCCL symmetric windows").

    pytest -q tests/gpu/test_nccl_symmetric.py -k "[2]"
"""

import os
import random
import tempfile

import pytest
import torch

from gpu_helpers import as_int, bits, needs, quiesce, world_group
from multiproc import run_ranks

pytestmark = [pytest.mark.gpu, pytest.mark.multigpu]

TOKENS = (0, 1, 7, 128, 513)
DTYPES = ("bfloat16", "float16", "float32", "float8_e4m3fn")


def _widths(kind, W):
    return {"even": [1024] * W, "uneven": [1024 + 512 * r for r in range(W)],
            "odd": [1001 + 2 * r for r in range(W)]}[kind]


def _refusal(group, W):
    """The backend's agreed answer for this group, forced (collective: every rank asks it at the same point)."""
    from tpfuse.compile_ops.backend import GatherCall
    from tpfuse.compile_ops.nccl_symmetric import NCCL_SYMMETRIC

    return NCCL_SYMMETRIC.refusal(GatherCall("cuda", torch.bfloat16, 1, (1024,) * W, group, NCCL_SYMMETRIC.name))


def _poison_windows(ws):
    from tpfuse.compile_ops.nccl_symmetric import windows

    quiesce()  # nobody is writing into a window now
    state = windows.windows_of(ws)
    for t in [state.send, state.recv] + [t for _, *pair in state.retired for t in pair]:
        if t is not None:
            t.fill_(0xFF)
    quiesce()


def _nan_filled(shape, dtype):
    out = torch.empty(shape, dtype=dtype, device="cuda")
    as_int(out).fill_(-1)  # all ones: NaN for the float dtypes
    return out


def _correctness(rank, W):
    import torch.distributed as dist

    from tpfuse.compile_ops import collective, dispatch, workspace
    from tpfuse.compile_ops.nccl_symmetric import launcher, release

    os.environ["TPFUSE_TUNED_CONFIG_DIR"] = tempfile.mkdtemp()  # no tuned config: auto's default
    group = world_group()
    reason = _refusal(group, W)
    if reason:
        os.environ["TPFUSE_BACKEND"] = "nccl_symmetric"
        try:
            torch.ops.tpfuse.all_gather_hidden(bits(rank, (1, 1024), torch.bfloat16), [1024] * W,
                                               dist.group.WORLD.group_name)
            raised = ""
        except RuntimeError as err:
            raised = str(err)
        return {"unsupported": reason, "raised": raised}
    ws = workspace.workspace(group, rank)
    failures, cases, seed = [], 0, 0
    before = dispatch.chosen["nccl_symmetric"]
    os.environ["TPFUSE_BACKEND"] = "nccl_symmetric"
    for dname in DTYPES:
        dtype = getattr(torch, dname)
        for kind in ("even", "uneven", "odd"):
            widths = _widths(kind, W)
            for T in TOKENS:
                seed += 1  # the same sequence on every rank
                xs = [bits(seed * 16 + r, (T, w), dtype) for r, w in enumerate(widths)]
                reference = torch.cat([as_int(t) for t in xs], dim=-1)
                x = xs[rank]
                via_op = torch.ops.tpfuse.all_gather_hidden(x, widths, dist.group.WORLD.group_name)
                _poison_windows(ws)
                out = _nan_filled((T, sum(widths)), dtype)
                launcher.launcher(ws, x, widths)(x, out)
                # the classic NCCL path as a second reference (its rearrange has no float8 kernels everywhere)
                classic = collective.gather_hidden(x, widths, group) if dtype.itemsize > 1 else via_op
                torch.cuda.synchronize()
                cases += 1
                for name, got in (("op", via_op), ("launcher into NaN", out), ("classic nccl", classic)):
                    if got.shape != (T, sum(widths)) or not torch.equal(as_int(got), reference):
                        failures.append((dname, kind, T, name))
    # 3-D input: the leading dims are flattened
    x3 = bits(7 + rank, (2, 4, 1024), torch.bfloat16)
    want = torch.cat([bits(7 + r, (2, 4, 1024), torch.bfloat16) for r in range(W)], dim=-1)
    three_d = torch.equal(as_int(torch.ops.tpfuse.all_gather_hidden(x3, [1024] * W, dist.group.WORLD.group_name)),
                          as_int(want))
    forced_calls = dispatch.chosen["nccl_symmetric"] - before
    forced = dispatch.choose_backend("cuda", torch.bfloat16, [1024] * W, group, 8).value
    del os.environ["TPFUSE_BACKEND"]
    auto = dispatch.choose_backend("cuda", torch.bfloat16, [1024] * W, group, 8).value  # no tuned config here
    release(group.name)  # before the group is destroyed
    return {"failures": failures, "cases": cases, "three_d": three_d, "forced_calls": forced_calls,
            "forced": forced, "auto": auto}


def _skip_if_unsupported(results):
    reasons = {r.get("unsupported", "") for r in results}
    assert len(reasons) == 1, f"the ranks disagree on whether the group has windows: {reasons}"
    (reason,) = reasons
    if reason:
        # a forced call raises that reason (where the ranks tried one)
        assert all(reason in r.get("raised", reason) for r in results), results
        pytest.skip(f"this host has no NCCL symmetric windows: {reason}")


@pytest.mark.parametrize("W", [2, 4])
def test_bit_exact_into_nan_filled_results(W):
    needs(W)
    results = run_ranks(W, _correctness, backend="nccl", timeout=400)
    _skip_if_unsupported(results)
    for rank, res in enumerate(results):
        assert res["failures"] == [], f"rank {rank}: {res['failures'][:10]}"
        assert res["cases"] == len(DTYPES) * 3 * len(TOKENS) and res["three_d"]
        assert res["forced_calls"] == res["cases"] + 1  # every op call above ran nccl_symmetric
        assert res["forced"] == "nccl_symmetric"
        assert res["auto"] == "p2p"  # auto never takes it without a tuned config's passing record


# ---------------------------------------------------------------------------
def _stress_and_order(rank, W, iters):
    from tpfuse import tune, tune_gpu
    from tpfuse.compile_ops.barrier import P2P
    from tpfuse.compile_ops.nccl_symmetric import NCCL_SYMMETRIC

    group = world_group()
    reason = _refusal(group, W)
    if reason:
        return {"unsupported": reason}
    ctx = tune.RankContext(rank, W, group, torch.device("cuda", rank))
    runner = tune_gpu.NcclSymmetricRunner(ctx, 32, 4096)
    record = runner.stress(iters, 200, seed=5)

    # The group's calls from two streams in turn (each rank its own choice), nccl_symmetric and p2p interleaved
    # (the same sequence on every rank), random delays: every result bit-exact.
    T, widths, ring = 8, [2048] * W, 16
    xs = [bits(900 + j * 16 + rank, (T, 2048), torch.bfloat16) for j in range(ring)]
    refs = [as_int(torch.cat([bits(900 + j * 16 + r, (T, 2048), torch.bfloat16) for r in range(W)], -1))
            for j in range(ring)]
    shared, mine = random.Random(17), random.Random(31 + rank)
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    main = torch.cuda.current_stream()
    for s in streams:
        s.wait_stream(main)  # the inputs are ready
    outs = []
    for i in range(iters):
        backend = NCCL_SYMMETRIC if shared.random() < 0.5 else P2P
        with torch.cuda.stream(streams[mine.randrange(2)]):
            torch.cuda._sleep(mine.randint(0, 20000))
            outs.append(backend.gather(xs[i % ring], widths, group))
    for s in streams:
        main.wait_stream(s)
    wrong = sum(int(not torch.equal(as_int(out), refs[i % ring])) for i, out in enumerate(outs))
    runner.close()
    return {"record": record.as_dict(), "failure": record.failure(), "two_streams_wrong": wrong}


@pytest.mark.parametrize("W", [2, 4])
def test_stress_its_control_and_program_order(W):
    needs(W)
    results = run_ranks(W, _stress_and_order, 1000, backend="nccl", timeout=400)
    _skip_if_unsupported(results)
    for rank, res in enumerate(results):
        assert res["failure"] == "", (rank, res["record"])  # 1000 calls, random delays, no wrong result
        assert res["record"]["control_detected"], (rank, res["record"])  # the reversed bands were caught
        assert res["two_streams_wrong"] == 0, (rank, res)


# ---------------------------------------------------------------------------
def _graph_growth_release(rank, W):
    from tpfuse.compile_ops import workspace
    from tpfuse.compile_ops.nccl_symmetric import NCCL_SYMMETRIC, release, windows

    group = world_group()
    reason = _refusal(group, W)
    if reason:
        return {"unsupported": reason}
    ws = workspace.workspace(group, rank)
    dtype, widths = torch.bfloat16, [1024 + 128 * r for r in range(W)]
    x = bits(rank, (16, widths[rank]), dtype)
    launch = NCCL_SYMMETRIC.prepare(x, widths, group)
    launch(x)  # eager first: the windows exist before the capture
    quiesce()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [launch(x) for _ in range(4)]
    graph_bad = []
    for i in range(20):
        x.copy_(bits(100 + i * 16 + rank, x.shape, dtype))
        graph.replay()
        want = as_int(torch.cat([bits(100 + i * 16 + r, (16, w), dtype) for r, w in enumerate(widths)], -1))
        graph_bad += [(i, k) for k, out in enumerate(outs) if not torch.equal(as_int(out), want)]
    torch.cuda.synchronize()

    # a slab of 32 MiB grows the windows; the small shape's kept launcher still runs on the outgrown pair
    big = bits(7 + rank, (4096, 4096), dtype)
    big_out = NCCL_SYMMETRIC.gather(big, [4096] * W, group)
    big_ok = torch.equal(as_int(big_out), as_int(torch.cat([bits(7 + r, (4096, 4096), dtype) for r in range(W)], -1)))
    grown = windows.windows_of(ws).slab_bytes >= 32 << 20 and len(windows.windows_of(ws).retired) >= 1
    graph.replay()  # captured on the outgrown pair, which stays registered
    small_ok = all(torch.equal(as_int(out), want) for out in outs)
    del graph
    release(group.name)  # collective; the next call registers anew
    released = windows.NAME not in ws.protocols
    again = NCCL_SYMMETRIC.gather(x, widths, group)
    again_ok = torch.equal(as_int(again), want)
    release(group.name)  # before the group is destroyed
    return {"graph_bad": graph_bad, "big_ok": big_ok, "grown": grown, "small_ok": small_ok, "released": released,
            "again_ok": again_ok}


@pytest.mark.parametrize("W", [2, 4])
def test_graph_replay_growth_and_release(W):
    needs(W)
    results = run_ranks(W, _graph_growth_release, backend="nccl", timeout=300)
    _skip_if_unsupported(results)
    for rank, res in enumerate(results):
        assert res["graph_bad"] == [], (rank, res["graph_bad"][:10])
        assert res["big_ok"] and res["grown"] and res["small_ok"], (rank, res)
        assert res["released"] and res["again_ok"], (rank, res)
