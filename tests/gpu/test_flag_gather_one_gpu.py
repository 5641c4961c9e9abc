"""The flag protocol on one real GPU, W ranks emulated by W concurrent streams (tests/gpu/flag_one_gpu.py).

Runs the production kernel, compiled and launched by the op's host code, on
a real GPU: bit-exactness for every dtype and width case, epochs that stay
consistent while T (and so the grid) changes, CUDA-graph replays, random
per-rank delays, the two negative controls and the timeout.  The NVLink path
itself is covered by tests/gpu/test_flag_gather.py on several GPUs.
"""

import random
import time

import pytest
import torch

from tpfuse.kernels import failure
from tpfuse.kernels.flag import MAX_SLAB_BYTES as FLAG_MAX_SLAB_BYTES
from flag_one_gpu import OneGpuGroup, as_int, delayed_run, inputs, reference, width_kinds as _widths

pytestmark = [pytest.mark.gpu]

DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.int8, torch.float8_e4m3fn)
KINDS = ("even_4096", "uneven", "not_multiple_of_16_bytes", "tiny_odd")


@pytest.mark.parametrize("W, dtypes, kinds", [
    (2, DTYPES, KINDS), (4, DTYPES, KINDS), (8, (torch.bfloat16,), ("uneven", "tiny_odd"))])
def test_bit_exact_every_dtype_and_width_with_T_changing(W, dtypes, kinds):
    failures, cases = [], 0
    for dtype in dtypes:
        for kind in kinds:
            group = OneGpuGroup(_widths(kind, W), dtype)
            # the largest T the flag buffers hold (at most 128): a full region
            T_max = min(128, FLAG_MAX_SLAB_BYTES // (max(group.widths) * dtype.itemsize))
            for i, T in enumerate(min(T, T_max) for T in (1, 7, 32, 1, 128, 3)):
                xs = inputs(i, T, group.widths, dtype)
                outs = group.call(xs)
                cases += 1
                ref = reference(xs)
                if not all(torch.equal(as_int(o), ref) for o in outs):
                    failures.append((str(dtype), kind, T))
            assert group.failure_codes() == [0] * W, (dtype, kind)
            assert group.epochs_agree(), (dtype, kind)
    assert cases == len(dtypes) * len(kinds) * 6
    assert failures == [], failures[:10]


@pytest.mark.parametrize("W", [2, 4])
def test_cuda_graph_replays_with_T_changing_between_graphs(W):
    """Three graphs of two calls each, T = 1, 8 and 32, replayed 100 times in random order."""
    widths = [1024 + 256 * r for r in range(W)]
    group = OneGpuGroup(widths, torch.bfloat16)
    graphs = {}
    for T in (1, 8, 32):
        xs = [inputs(100 + T, T, widths, torch.bfloat16) for _ in range(2)]
        outs = [group.call(x) for x in xs]  # warm up (compiles, advances the epochs like any call)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = [group.call(x) for x in xs]
        graphs[T] = (graph, xs, outs)
    rng = random.Random(0)
    bad = []
    for i in range(100):
        T = rng.choice((1, 8, 32))
        graph, xs, outs = graphs[T]
        for k in range(2):
            for r in range(W):
                xs[k][r].copy_(inputs(10_000 + 2 * i + k, T, widths, torch.bfloat16)[r])
                outs[k][r].fill_(float("nan"))
        graph.replay()
        for k in range(2):
            ref = reference([x for x in xs[k]])
            if not all(torch.equal(as_int(o), ref) for o in outs[k]):
                bad.append((i, T, k))
    assert bad == [], bad[:10]
    assert group.failure_codes() == [0] * W
    assert group.epochs_agree()


@pytest.mark.parametrize("W", [2, 4])
@pytest.mark.parametrize("T", [1, 32])
def test_random_per_rank_delays_bit_exact(W, T):
    group = OneGpuGroup([2048 + 64 * r for r in range(W)], torch.bfloat16)
    corrupted, code = delayed_run(group, T, iters=10_000, seed=W * 100 + T)
    assert (corrupted, code) == (0, 0)
    assert group.epochs_agree()


@pytest.mark.parametrize("W", [2, 4])
def test_negative_control_one_buffer(W):
    """Without the parity alternation a fast rank's next call overwrites units a slow rank has not read.

    Rank 0 reads with one block (slowly, tile after tile), the others with
    many, so the fast ranks' next call lands while rank 0 still reads.  The
    epoch check turns the overwrite into a wait that gives up; with stale
    epochs accepted as well it is silent corruption.
    """
    widths = [2048] * W
    one_buffer = OneGpuGroup(widths, torch.bfloat16, timeout_s=0.05, PARITY=False)
    one_buffer.max_blocks[0] = 1
    corrupted, code = delayed_run(one_buffer, 32, iters=2000, seed=1, max_cycles=2000)
    print(f"one buffer, W={W}: corrupted {corrupted}, failure code {code:#x}")
    assert failure.describe(code)[0] == "flag wait", (corrupted, code)  # it gave up: its data was overwritten
    silent = OneGpuGroup(widths, torch.bfloat16, timeout_s=0.05, PARITY=False, ACCEPT_STALE=True)
    silent.max_blocks[0] = 1
    corrupted, code = delayed_run(silent, 32, iters=2000, seed=2, max_cycles=2000)
    print(f"one buffer, stale epochs accepted, W={W}: corrupted {corrupted}, failure code {code:#x}")
    assert corrupted > 0, (corrupted, code)
    # The control: the same slow reader with the parity alternation is exact.
    parity = OneGpuGroup(widths, torch.bfloat16, timeout_s=5.0)
    parity.max_blocks[0] = 1
    assert delayed_run(parity, 32, iters=2000, seed=3, max_cycles=2000) == (0, 0)


@pytest.mark.parametrize("W", [2, 4])
def test_negative_control_stale_epoch_accepted(W):
    """A receiver that takes any written unit reads the previous same-parity call's data."""
    group = OneGpuGroup([2048] * W, torch.bfloat16, timeout_s=0.05, ACCEPT_STALE=True)
    corrupted, code = delayed_run(group, 32, iters=2000, seed=3)
    print(f"stale epochs accepted, W={W}: corrupted {corrupted}, failure code {code:#x}")
    assert corrupted > 0, (corrupted, code)


@pytest.mark.parametrize("W", [2, 4])
def test_flag_and_barrier_push_interleave_in_any_order(W):
    """Half the calls, at random (the same on every rank), go through the barrier push on its own slots
    and signal pads: the two protocols share nothing, so any interleaving stays exact."""
    group = OneGpuGroup([1024 + 8 * r for r in range(W)], torch.bfloat16).add_barrier_push()
    corrupted, code = delayed_run(group, 8, iters=4000, seed=6, barrier_push_share=0.5)
    assert (corrupted, code) == (0, 0)
    assert group.epochs_agree()


@pytest.mark.parametrize("W", [2, 4])
def test_clear_period_one_stays_exact(W):
    """Buffers zeroed after every read (the wrap-around guard, run on every call here)."""
    group = OneGpuGroup([1000 + 8 * r for r in range(W)], torch.float16, CLEAR_PERIOD=1)
    corrupted, code = delayed_run(group, 8, iters=2000, seed=4)
    assert (corrupted, code) == (0, 0)


@pytest.mark.parametrize("W", [2, 4])
def test_missing_rank_times_out_and_is_named(W):
    group = OneGpuGroup([512] * W, torch.bfloat16, timeout_s=0.5)
    xs = inputs(0, 4, group.widths, torch.bfloat16)
    group.call(xs)  # everyone
    t0 = time.perf_counter()
    group.call(xs, skip=W - 1)  # the last rank never arrives
    codes = group.failure_codes()  # returns: the waits gave up instead of hanging
    waited = time.perf_counter() - t0
    assert waited < 5, waited
    for rank, code in enumerate(codes[:-1]):
        which, _, peer = failure.describe(code)
        assert which == "flag wait" and peer == W - 1, (rank, hex(code))
    assert codes[-1] == 0
    # The host's report of that code names the rank and the missing peer.
    from types import SimpleNamespace

    from tpfuse.compile_ops import failures

    ws = SimpleNamespace(failure_code=lambda: codes[0], failed_call=lambda: 0, timeout_ns=group.timeout_ns,
                         group=SimpleNamespace(rank=0, name="emulated", pg=None))
    with pytest.raises(RuntimeError, match=f"flag wait .*waiting for rank {W - 1}"):
        failures.raise_if_failed(ws)


# --------------------------------------------------------------------------- program order and failed calls


def _two_streams_released_together(group, kind, trials, seed, T_choices=(1, 8, 32), skew=0.5):
    """Rank 0 issues calls A then B on one group from two streams that a gate releases at once; every
    other rank issues A then B on its own stream.  In a share ``skew`` of the trials rank 0's stream of A
    also sleeps first, so that without the ordering B would surely run before A.  Returns (wrong
    results, failure codes)."""
    rng = random.Random(seed)
    side = [torch.cuda.Stream(), torch.cuda.Stream()]
    gate = torch.cuda.Stream()
    wrong = 0
    for trial in range(trials):
        T = rng.choice(T_choices)
        a = inputs(seed * 10_000 + 2 * trial, T, group.widths, group.dtype)
        b = inputs(seed * 10_000 + 2 * trial + 1, T, group.widths, group.dtype)
        outs = {(r, k): torch.full((T, sum(group.widths)), float("nan"), dtype=group.dtype, device="cuda")
                for r in range(group.W) for k in "ab"}
        gate.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(gate):
            torch.cuda._sleep(rng.randint(20_000, 200_000))  # the host queues everything below meanwhile
        released = torch.cuda.Event()
        released.record(gate)
        for r in range(group.W):
            streams = side if r == 0 else [group.streams[r], group.streams[r]]
            for k, x, stream in (("a", a, streams[0]), ("b", b, streams[1])):
                stream.wait_event(released)
                with torch.cuda.stream(stream):
                    if r != 0 and rng.random() < 0.5:
                        torch.cuda._sleep(rng.randint(0, 20_000))
                    if r == 0 and k == "a" and rng.random() < skew:
                        torch.cuda._sleep(200_000)  # A held back: B is released first
                    group.launcher(r, x[r], kind)(x[r], outs[(r, k)])
        for stream in side + group.streams:
            torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        for r in range(group.W):
            wrong += int(not torch.equal(as_int(outs[(r, "a")]), reference(a)))
            wrong += int(not torch.equal(as_int(outs[(r, "b")]), reference(b)))
        if any(group.failure_codes()):
            break
    return wrong, group.failure_codes()


@pytest.mark.parametrize("kind", ["flag", "barrier push"])
def test_two_streams_on_one_rank_pair_in_host_order(kind):
    """300 trials, two calls released together on two streams of rank 0: 0 wrong results, no failure."""
    group = OneGpuGroup([4096, 4096], torch.bfloat16, timeout_s=5.0).add_barrier_push()
    wrong, codes = _two_streams_released_together(group, kind, 300, seed=1)
    print(f"two streams, {kind}, ordered: wrong {wrong} of 600 results, codes {codes}")
    assert (wrong, codes) == (0, [0, 0])


def test_two_streams_without_the_ordering_return_wrong_data():
    """The control: with the program order off, the same schedule pairs calls by GPU run order and returns
    other calls' bytes (with a clean status, which is what the ordering exists to prevent)."""
    group = OneGpuGroup([4096, 4096], torch.bfloat16, timeout_s=2.0, ordered=False)
    wrong, codes = _two_streams_released_together(group, "flag", 300, seed=1, skew=1.0)
    print(f"two streams, flag, unordered: wrong {wrong} results, codes {codes}")
    assert wrong > 0


@pytest.mark.parametrize("kind", ["flag", "barrier push"])
def test_missing_rank_under_graph_replay_poisons_raises_and_is_reported(kind, monkeypatch):
    """Rank 0 replays a graph of one call that rank 1 never makes: the call's whole result is NaN, the
    watchdog reports it while nothing of ours runs on the host, and rank 0's next call raises."""
    from tpfuse.compile_ops import failures

    monkeypatch.setenv("TPFUSE_WATCHDOG", "report")
    monkeypatch.setenv("TPFUSE_WATCHDOG_INTERVAL_S", "0.1")
    group = OneGpuGroup([1024, 1024], torch.bfloat16, timeout_s=0.2).add_barrier_push()
    xs = inputs(5, 8, group.widths, torch.bfloat16)
    group.call(xs) if kind == "flag" else _barrier_push_call(group, xs)  # both ranks, eager: launchers made
    assert group.failure_codes() == [0, 0]
    ws = group.workspaces[0]
    failures.watch(ws)
    launch = group.launcher(0, xs[0], kind)
    out = torch.zeros(8, 2048, dtype=torch.bfloat16, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        launch(xs[0], out)
    reports_before = len(failures.reports)
    graph.replay()  # rank 1 never arrives
    torch.cuda.synchronize()
    assert out.isnan().all(), "a timed-out call must leave its whole result poisoned"
    deadline = time.monotonic() + 5
    while len(failures.reports) == reports_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(failures.reports) > reports_before, "the watchdog did not report the failed replay"
    assert "waiting for rank 1" in failures.reports[-1]
    with pytest.raises(RuntimeError, match="waiting for rank 1.*destroy the process group"):
        launch(xs[0], out)


def _barrier_push_call(group, xs):
    main = torch.cuda.current_stream()
    outs = [torch.empty(xs[0].shape[0], sum(group.widths), dtype=xs[0].dtype, device="cuda") for _ in xs]
    for r in range(group.W):
        group.streams[r].wait_stream(main)
        with torch.cuda.stream(group.streams[r]):
            group.launch_barrier_push(r, xs[r], outs[r])
    for r in range(group.W):
        main.wait_stream(group.streams[r])
    torch.cuda.synchronize()
    assert all(torch.equal(as_int(o), reference(xs)) for o in outs)
