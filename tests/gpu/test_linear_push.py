"""The fused column-linear + P2P push kernel on real GPUs: accuracy, rank agreement, CUDA graphs, stress, controls.

Passed on 2 and 4 GPUs (4xH200, torch 2.11, Triton 3.6), except the zero-copy modes
(correctness ``zero_copy``, stress ``zero_copy_ping_pong``), written after the last GPU
run and not yet run.  Run on the GPU machines with::

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=. \\
        python -m pytest -q tests/gpu/test_linear_push.py

Tolerance (stated).  Inputs are scaled so that outputs are about
N(0, 1): ``x ~ N(0, 1)``, ``W ~ N(0, 1) / sqrt(K)``, ``b ~ N(0, 1)``.  The
reference is the fp32 linear of the same bf16/fp16 operands, rounded to the
output dtype.  The kernel accumulates in fp32 in another order and rounds
once, so it may differ by a rounding step of the output plus fp32
reordering: ``|fused - ref| <= ATOL + RTOL * |ref|`` with bf16 ATOL = RTOL =
2**-6 (two bf16 ulps at 1.0), fp16 ATOL = RTOL = 2**-9.  Beyond accuracy,
every rank's result must be **bit-identical** to every other rank's (each
band is computed once, by its owner, and moved as bytes), and a stressed or
replayed call bit-identical to a quiet call (the kernel's reduction order is
fixed).
"""

import os
import random

import pytest
import torch

from multiproc import run_ranks
from gpu_helpers import needs as _needs, world_group as _group, quiesce as _quiesce

pytestmark = [pytest.mark.gpu, pytest.mark.multigpu]

TOL = {torch.bfloat16: 2.0**-6, torch.float16: 2.0**-9}
TOKENS = (1, 7, 20, 32, 128, 300)
#: both barriers; entry elided on a quiesced slot; zero-copy (the result a view of the slot)
MODES = ("both_barriers", "entry_elided_slot1", "zero_copy")


def CASES(W):  # noqa: N802 - a table
    """(dtype, K, kind, widths): bf16 at a short and a long K, even and uneven bands; fp16 once;
    and LM-head-wide bands, where launch_config takes swap-AB with column shares (T <= 16),
    128- or 64-column round-robin tiles (T = 20, 32), and 64-row tiles beyond.

    Each case compiles its own kernels (K, widths, bias, token bucket and entry mode are
    compile-time constants), so the table is kept to what exercises distinct code."""
    even, uneven = [1024] * W, [1024 + 512 * r for r in range(W)]
    wide = [16384] * (W - 1) + [16000]
    return [(torch.bfloat16, 256, "uneven", uneven), (torch.bfloat16, 4096, "even", even),
            (torch.bfloat16, 4096, "uneven", uneven), (torch.float16, 4096, "uneven", uneven),
            (torch.bfloat16, 4096, "wide", wide)]


def _randn(seed, shape, dtype, scale=1.0):
    # A CUDA generator gives the same stream on every GPU: every rank can build every rank's weights.
    g = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randn(shape, generator=g, device="cuda") * scale).to(dtype)


def _problem(seed, T, K, widths, dtype, has_bias):
    x = _randn(seed, (T, K), dtype)
    weights = [_randn(seed * 16 + 1 + r, (w, K), dtype, K**-0.5) for r, w in enumerate(widths)]
    biases = [_randn(seed * 16 + 9 + r, (w,), dtype) if has_bias else None for r, w in enumerate(widths)]
    ref = torch.cat([x.float() @ w.float().t() + (b.float() if b is not None else 0) for w, b in zip(weights, biases)],
                    -1).to(dtype)
    return x, weights, biases, ref


def _poison(ws, nbytes):
    from tpfuse.compile_ops.barrier import slots

    slots.ensure_capacity(ws, max(nbytes, 1))
    _quiesce()
    slots.slots_of(ws).buffer.fill_(0xFF)


def _agree_across_ranks(out):
    """Every rank's result, gathered: all must be bit-identical."""
    import torch.distributed as dist

    everyone = [torch.empty_like(out) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, out.contiguous())
    return all(torch.equal(e.view(torch.int16), everyone[0].view(torch.int16)) for e in everyone)


def _correctness(rank, W):
    import torch.distributed as dist

    from tpfuse.compile_ops import linear_push, workspace
    from tpfuse.compile_ops.barrier import slots

    group = _group()
    ws = workspace.workspace(group, rank)
    failures, cases, seed, worst = [], 0, 0, 0.0
    for dtype, K, kind, widths in CASES(W):
        for T in TOKENS:
            for has_bias in (False, True):
                seed += 1
                x, weights, biases, ref = _problem(seed, T, K, widths, dtype, has_bias)
                for mode in MODES:
                    _poison(ws, T * sum(widths) * dtype.itemsize)
                    skip, slot = (True, 1) if mode == "entry_elided_slot1" else (False, -1)  # safe: quiesced
                    out = linear_push.linear_gather_hidden(x, weights[rank], biases[rank], widths, group, slot,
                                                           skip, mode == "zero_copy")
                    torch.cuda.synchronize()
                    cases += 1
                    err = ((out.float() - ref.float()).abs() - TOL[dtype] * ref.float().abs()).max().item()
                    worst = max(worst, err)
                    if out.shape != ref.shape or err > TOL[dtype] or not _agree_across_ranks(out):
                        failures.append((str(dtype), K, kind, T, has_bias, mode, err))
    # The op through dispatch: TPFUSE_LINEAR_PUSH=fused and unfused agree within the tolerance,
    # and 3-D leading dims are flattened.
    dtype, widths = torch.bfloat16, [1024] * W
    x, weights, biases, ref = _problem(999, 8, 4096, widths, dtype, True)
    x3 = x.view(2, 4, 4096)
    outs = {}
    for mode in ("fused", "unfused"):
        os.environ["TPFUSE_LINEAR_PUSH"] = mode
        from tpfuse.compile_ops.linear_decision import _parse_mode

        _parse_mode.cache_clear()
        outs[mode] = torch.ops.tpfuse.linear_all_gather_hidden(x3, weights[rank], biases[rank], widths,
                                                               dist.group.WORLD.group_name)
    os.environ.pop("TPFUSE_LINEAR_PUSH")
    op_ok = all(o.shape == (2, 4, 1024 * W) for o in outs.values()) and all(
        ((o.view(8, -1).float() - ref.float()).abs() <= TOL[dtype] * (1 + ref.float().abs())).all() for o in outs.values())
    return {"failures": failures, "cases": cases, "worst_excess": worst, "op_ok": bool(op_ok),
            "multicast_ptr": slots.slots_of(ws).multicast_ptr}


@pytest.mark.parametrize("W", [2, 4])
def test_correctness_within_bf16_gemm_tolerance_and_ranks_agree(W):
    _needs(W)
    results = run_ranks(W, _correctness, backend="nccl", timeout=900)
    for rank, res in enumerate(results):
        assert res["failures"] == [], f"rank {rank}: {res['failures'][:10]}"
        assert res["cases"] == len(CASES(W)) * len(TOKENS) * 2 * len(MODES)
        assert res["op_ok"]
        assert res["multicast_ptr"] == 0  # multicast stays off on the shared hosts


# ---------------------------------------------------------------------------
def _cuda_graph(rank, W):
    from tpfuse.compile_ops import linear_push

    group = _group()
    dtype, T, K = torch.bfloat16, 32, 2048
    widths = [1024 + 256 * r for r in range(W)]
    x_a, weights, biases, _ = _problem(1, T, K, widths, dtype, True)
    x_b = _randn(2, (T, K), dtype)

    def call(x, slot, skip):
        return linear_push.linear_gather_hidden(x, weights[rank], biases[rank], widths, group, slot, skip)

    def step():
        # Slots 0, 1 with both barriers, then 0, 1 with the entry barrier elided (each slot's
        # last reader finished before every peer passed the next call's exit barrier).
        return call(x_a, 0, False), call(x_b, 1, False), call(x_a, 0, True), call(x_b, 1, True)

    step()
    _quiesce()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    bad = []
    for i in range(100):
        x_a.copy_(_randn(1000 + 2 * i, (T, K), dtype))
        x_b.copy_(_randn(1001 + 2 * i, (T, K), dtype))
        graph.replay()
        torch.cuda.synchronize()
        quiet = [call(x_a, -1, False), call(x_b, -1, False)]  # eager, both barriers
        torch.cuda.synchronize()
        for k, out in enumerate(outs):
            if not torch.equal(out.view(torch.int16), quiet[k % 2].view(torch.int16)):
                bad.append((i, k))
    return bad


@pytest.mark.parametrize("W", [2, 4])
def test_cuda_graph_replays_bit_identical_to_eager(W):
    _needs(W)
    for rank, bad in enumerate(run_ranks(W, _cuda_graph, backend="nccl", timeout=300)):
        assert bad == [], f"rank {rank}: replays/outputs wrong: {bad[:10]}"


# ---------------------------------------------------------------------------
RING = 16


def _delayed_loop(rank, W, iters, T, K, widths, call, seed, max_delay_cycles=40000, compare_now=False):
    """``iters`` fused calls, each after a random spin on this rank; returns how many differ from quiet calls.

    ``compare_now``: compare each result before the next call (a zero-copy result is the slot,
    valid until the next call on that slot), instead of RING results at a time."""
    from tpfuse.compile_ops import linear_push

    group = _group()
    dtype = torch.bfloat16
    _, weights, biases, _ = _problem(seed, 1, K, widths, dtype, True)
    xs = [_randn(seed * 1000 + j, (T, K), dtype) for j in range(RING)]
    refs = []
    for x in xs:  # quiet references: both barriers, then a full quiesce
        refs.append(linear_push.linear_gather_hidden(x, weights[rank], biases[rank], widths, group))
        _quiesce()
    rng = random.Random(seed * 31 + rank)
    bad = torch.zeros((), dtype=torch.int64, device="cuda")
    outs = []
    for i in range(iters):
        torch.cuda._sleep(rng.randint(0, max_delay_cycles))
        outs.append(call(xs[i % RING], weights[rank], biases[rank], i))
        if compare_now or len(outs) == RING or i == iters - 1:
            for j, out in enumerate(outs):
                bad += (out.view(torch.int16) != refs[(i - len(outs) + 1 + j) % RING].view(torch.int16)).any()
            outs = []
    torch.cuda.synchronize()
    return int(bad)


def _stress(rank, W, iters):
    from tpfuse.compile_ops import linear_push

    group = _group()
    results = {}
    # rank 0 owns a wide band: its peers copy it out for long while it may already run ahead.
    # lm_head_shares: LM-head-wide bands at T=8, where launch_config takes even column shares
    # (the copy-out follows the shares; one band narrower, so the shares differ per peer).
    for name, T, K, widths in (("wide_uneven", 128, 1024, [8192] + [256] * (W - 1)),
                               ("decode_even", 1, 4096, [1024] * W),
                               ("lm_head_shares", 8, 1024, [16384] * (W - 1) + [16000])):
        def fused(x, w, b, i, skip=False, slot=-1, zero_copy=False, widths=widths):
            return linear_push.linear_gather_hidden(x, w, b, widths, group, slot, skip, zero_copy)

        results[f"{name}/both_barriers"] = _delayed_loop(rank, W, iters, T, K, widths, fused, 11)
        _quiesce()
        results[f"{name}/entry_elided_ping_pong"] = _delayed_loop(
            rank, W, iters, T, K, widths, lambda x, w, b, i: fused(x, w, b, i, True, i % 2), 12)
        _quiesce()
        # zero-copy, ping-pong without entry barriers: each result is read (compared) before the
        # next call, which is what the pass proves of a zero-copy result's readers
        results[f"{name}/zero_copy_ping_pong"] = _delayed_loop(
            rank, W, iters, T, K, widths, lambda x, w, b, i: fused(x, w, b, i, True, i % 2, True), 13,
            compare_now=True)
        _quiesce()
    return results


def _negative_control(rank, W, iters):
    """Forced-off barriers must corrupt results, so the stress test above can fail."""
    from tpfuse.compile_ops import linear_push

    group = _group()
    wide = [8192] + [256] * (W - 1)
    results = {}

    def no_barriers(x, w, b, i):
        # No entry, no exit: the copy-out reads our slot before (some) peers pushed into it.
        return linear_push.linear_gather_hidden(x, w, b, wide, group, 0, True, exit_sync=False)

    results["no_exit_barrier"] = _delayed_loop(rank, W, iters, 128, 1024, wide, no_barriers, 21)
    _quiesce()
    # No control for "entry barrier off, one slot, copy-out" here: the hazard needs a peer's
    # next push to land while this rank still copies out of the slot, and the copy-out is
    # fused right behind the exit barrier at HBM speed, so random delays between calls never
    # opened that window (0 corrupted results in 2,000 calls at W=2 and W=4, twice).  The
    # zero-copy control in test_push_gather.py, whose reader is a later kernel, shows the
    # hazard; the flag protocol's one-buffer control (test_flag_gather_one_gpu.py) widens the
    # window with a one-block reader.
    shares = [16384] * W  # even column shares (T=8), no exit barrier: must corrupt too

    def no_barriers_shares(x, w, b, i):
        return linear_push.linear_gather_hidden(x, w, b, shares, group, 0, True, exit_sync=False)

    results["no_exit_barrier_column_shares"] = _delayed_loop(rank, W, iters, 8, 1024, shares, no_barriers_shares, 23)
    _quiesce()
    return results


@pytest.mark.parametrize("W", [2, 4])
def test_stress_random_delays_bit_identical(W):
    _needs(W)
    iters = int(os.environ.get("TPFUSE_STRESS_ITERS", "4000"))
    for rank, res in enumerate(run_ranks(W, _stress, iters, backend="nccl", timeout=900)):
        bad = {k: v for k, v in res.items() if v}
        assert not bad, f"rank {rank}: corrupted outputs {bad}"


@pytest.mark.parametrize("W", [2, 4])
def test_negative_control_detects_missing_barriers(W):
    _needs(W)
    results = run_ranks(W, _negative_control, 2000, backend="nccl", timeout=600)
    total = {k: sum(r[k] for r in results) for k in results[0]}
    print(f"fused negative control, W={W}, corrupted results per mode: {total}")
    # Without the exit barrier the copy-out races the peers' pushes: corruption must show.
    assert total["no_exit_barrier"] > 0 and total["no_exit_barrier_column_shares"] > 0, total


# ---------------------------------------------------------------------------
#: experimental config options the sweep can pick (launch_config never does), each run against the default
def _options(tma=False, swap_ab=False, balanced=False):
    return {"TMA": tma, "SWAP_AB": swap_ab, "BALANCED": balanced}


#: the config options the sweeps compared (launch_config picks some per T), each run on the same problem
OPTIONS = {"round_robin_mma_sync": _options(), "tma": _options(tma=True), "swap_ab": _options(swap_ab=True),
           "tma_swap_ab": _options(tma=True, swap_ab=True), "balanced": _options(balanced=True),
           "balanced_swap_ab": _options(balanced=True, swap_ab=True)}


def _config_options(rank, W):
    """Every config option the sweeps compared (TMA loads, swap-AB wgmma, even column shares,
    and the round-robin mma.sync path) against the reference: within its tolerance, ranks
    bit-identical."""
    from tpfuse.compile_ops import linear_push, workspace
    from tpfuse.kernels import linear_push as kernels

    group = _group()
    ws = workspace.workspace(group, rank)
    original = kernels.launch_config
    widths = [16384] * (W - 1) + [16000]  # wide bands (128-column tiles), one uneven
    found = {}
    try:
        for T in (1, 5, 32):
            x, weights, biases, ref = _problem(500 + T, T, 4096, widths, torch.bfloat16, True)
            for name, options in OPTIONS.items():
                kernels.launch_config = lambda *a, options=options, **kw: {**original(*a, **kw), **options}
                ws.plans.clear()
                out = linear_push.linear_gather_hidden(x, weights[rank], biases[rank], widths, group)
                torch.cuda.synchronize()
                tol = TOL[torch.bfloat16]
                found[f"T={T} {name}"] = {
                    "within": bool(((out.float() - ref.float()).abs() <= tol * (1 + ref.float().abs())).all()),
                    "agree": _agree_across_ranks(out)}
    finally:
        kernels.launch_config = original
        ws.plans.clear()
    return found


@pytest.mark.parametrize("W", [2, 4])
def test_experimental_weight_paths_match(W):
    _needs(W)
    for rank, found in enumerate(run_ranks(W, _config_options, backend="nccl", timeout=300)):
        print(f"rank {rank}: experimental weight paths {found}")
        assert all(v["within"] and v["agree"] for v in found.values()), (rank, found)
