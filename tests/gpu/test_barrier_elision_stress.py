"""Stress of the barrier-elision pass on real GPUs: compiled graphs with elided entry barriers.

Run on a 2- or 4-GPU machine (torch 2.11 / triton 3.6 there):

    PYTHONPATH=. python -m pytest -q -s tests/gpu/test_barrier_elision_stress.py

What it shows, per world size:

1. **Elided graphs are bit-exact** (``test_elided_chain_is_bit_exact``).  A
   compiled chain of tpfuse gathers (uneven widths, one all_reduce between)
   is compiled with the pass (entry barriers skipped where it proved them
   redundant) and, as the reference, without elision.  Both run >= 10,000
   iterations each for a small and a multi-chunk size, with a random spin
   kernel of per-rank random length before and after every gather (a test op
   inside the graph, so the ranks drift inside the graph, not only between
   calls).  Inputs come from a pool, chosen per iteration (same choice on
   every rank), so stale data from an earlier iteration is caught too.
2. **The rule matters** (``test_forced_skip_corrupts``).  The negative
   control forces a skip the pass refuses: a graph whose first tpfuse gather
   writes the slot a zero-copy gather (a test op that returns a view of slot
   0) is still being read through, after a random delay.  The pass keeps that
   gather's entry barrier ("no fence precedes it"): bit-exact.  Forced to
   skip, a fast peer overwrites the slot before the slow rank's reader runs:
   corruption, which the test requires to appear.
3. The time saved per gather by elision (no spins, CUDA-graph replay, printed,
   not asserted).

Every rank sets ``TPFUSE_BACKEND=p2p`` (the push path, on every rank alike)
and never touches NVLink multicast (tests/conftest.py and tpfuse.ranks set
the no-multicast environment of docs/safety.md, "Multicast").
"""

from __future__ import annotations

import os
import random
import time

import pytest
import torch

from multiproc import run_ranks
from gpu_helpers import needs as _needs

pytestmark = [pytest.mark.gpu, pytest.mark.multigpu]

ITERS = int(os.environ.get("TPFUSE_STRESS_ITERS", "10000"))
POOL = 8  # distinct inputs, chosen per iteration
MAX_SPIN = 20000  # cycles (~10 us) of the random per-rank delays
DEVICE = "cuda"  # a CPU dry run of the chain (gloo) sets "cpu": graph plumbing and decisions only


# --------------------------------------------------------------------------- test ops


@torch.library.custom_op("tpfuse_stress::spin", mutates_args=())
def spin(x: torch.Tensor, cycles: torch.Tensor) -> torch.Tensor:
    """A copy of ``x`` after a spin kernel of ``cycles`` (a CPU int64 scalar; no sync)."""
    n = int(cycles)
    if n > 0 and x.is_cuda:
        torch.cuda._sleep(n)
    return x.clone()


@spin.register_fake
def _(x, cycles):
    return torch.empty_like(x)


@torch.library.custom_op("tpfuse_stress::slot_view_gather", mutates_args=())
def slot_view_gather(x: torch.Tensor, hidden_widths: list[int], group_name: str) -> torch.Tensor:
    """The zero-copy form of the gather: a *view of workspace slot 0* (entry barrier kept).

    A hidden alias on purpose (test only): its readers read the symmetric slot.
    The graph returns it as an output, so Inductor never reuses its memory."""
    from tpfuse.compile_ops.barrier import P2P
    from tpfuse.compile_ops.groups import resolve_group

    return P2P.gather(x, hidden_widths, resolve_group(group_name), 0, False, zero_copy=True)


@slot_view_gather.register_fake
def _(x, hidden_widths, group_name):
    return x.new_empty(*x.shape[:-1], sum(hidden_widths))


# --------------------------------------------------------------------------- graphs


def _gather(t, widths):
    import torch.distributed as dist

    return torch.ops.tpfuse.all_gather_hidden(t, widths, dist.group.WORLD.group_name)


def _bands(widths):
    offsets = [0]
    for w in widths:
        offsets.append(offsets[-1] + w)
    return offsets


def make_chain(rank, widths):
    """Four gathers; each next input reads the first and the last columns of the previous
    result; an all_reduce (max: exact in any order) after the second.  The pass: G1 keeps,
    G2 skips (slot 1), G3 skips (the all_reduce fences G1 and G2), G4 skips (slot 1)."""
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol

    w = widths[rank]

    def chain(x, c0, c1, c2, c3):
        h = x
        for i, c in enumerate((c0, c1, c2, c3)):
            g = _gather(spin(h, c), widths)
            g = spin(g, c)  # the readers of the gather run late on a slow rank
            if i == 1:
                g = funcol.all_reduce(g, "max", dist.group.WORLD)  # same shape on every rank
            h = torch.relu(g[:, :w]) * 0.5 + g[:, -w:]
        return h

    return chain


def make_slot_reader(rank, widths):
    """A zero-copy gather into slot 0 read after a delay, then a tpfuse gather that writes
    slot 0 and depends on that read.  The pass keeps its entry barrier (no fence precedes it)."""
    off = _bands(widths)
    mine = slice(off[rank], off[rank + 1])

    def slot_reader(x1, x2, c_read):
        view = slot_view_gather(x1, widths, _group_name())
        read = spin(view, c_read)  # the (slow) reader of the slot
        y = _gather(read[:, mine] + x2, widths)
        return read, y, view  # view: an output, so Inductor never reuses its memory

    return slot_reader


def _group_name():
    import torch.distributed as dist

    return dist.group.WORLD.group_name


class ForceSlotZeroSkip:
    """The negative control: after tpfuse, every tpfuse gather uses slot 0 and skips its entry barrier."""

    def __call__(self, graph):
        for node in graph.nodes:
            if node.op == "call_function" and node.target is torch.ops.tpfuse.all_gather_hidden.default:
                node.kwargs = {**node.kwargs, "slot": 0, "skip_entry_sync": True}

    def uuid(self):
        return "tpfuse-stress-force-slot0-skip"


def _compile(fn, example, elide, force=False, zero_copy=False):
    """``torch.compile`` with the tpfuse passes, compiled now by a first call on ``example``.

    ``force`` chains ``ForceSlotZeroSkip`` after the tpfuse passes (tpfuse.backend runs
    whatever post-grad pass is installed when it compiles)."""
    import torch._inductor.config as inductor_config

    import tpfuse

    torch._dynamo.reset()
    tpfuse.report()  # report() lists the graphs since the last one: start this compile's afresh
    compiled = torch.compile(fn, fullgraph=True, backend=tpfuse.backend(elide_barriers=elide, zero_copy=zero_copy))
    with inductor_config.patch(post_grad_custom_post_pass=ForceSlotZeroSkip() if force else None):
        compiled(*example)
    return compiled


# --------------------------------------------------------------------------- rank bodies


def _setup(rank):
    os.environ["TPFUSE_BACKEND"] = "p2p"  # identical on every rank
    torch.backends.cuda.matmul.allow_tf32 = False
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    dynamo_config.cache_size_limit = 64
    inductor_config.fx_graph_cache = False


def _inputs(seed, T, widths, rank, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    full = [torch.randn(T, w, generator=g) for w in widths]  # every rank's, so refs are local
    return full[rank].to(dtype=dtype, device=DEVICE), [t.to(dtype=dtype, device=DEVICE) for t in full]


def _as_int(t):
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _quiesce():
    import torch.distributed as dist

    _sync()
    dist.barrier()
    _sync()


def _run_loop(fn, xs, refs, spins, iters, rank, seed):
    """``iters`` calls of ``fn``; returns how many outputs differ from ``refs`` (bitwise)."""
    pick = random.Random(seed)  # the same input choice on every rank
    delay = random.Random(seed * 7919 + rank)  # per-rank delays
    bad = torch.zeros((), dtype=torch.int64, device=DEVICE)
    for _ in range(iters):
        k = pick.randrange(len(xs))
        for c in spins:
            c.fill_(delay.randint(0, MAX_SPIN))
        outs = fn(*xs[k], *spins)
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        for out, ref in zip(outs, refs[k]):
            bad += (_as_int(out) != _as_int(ref)).any()
    _sync()
    return int(bad)


def _graph_time(fn, args, per_graph=10, replays=50):
    """Median µs per call of ``fn`` over CUDA-graph replays (``per_graph`` calls captured)."""
    import statistics

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn(*args)
    torch.cuda.current_stream().wait_stream(stream)
    _quiesce()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(per_graph):
            fn(*args)
    _quiesce()
    samples = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / (replays * per_graph))
    return statistics.median(samples)


def _decisions():
    import tpfuse

    return [(d.slot, d.skip_entry_sync) for g in tpfuse.report().graphs for d in g.barriers]


def _chain_body(rank, W, iters):
    _setup(rank)
    results = {}
    for name, T, base in (("small", 16, 1024), ("multi_chunk", 2048, 4096)):
        widths = [base + 256 * r for r in range(W)]  # uneven
        chain = make_chain(rank, widths)
        xs = [(_inputs(1000 * j + T, T, widths, rank)[0],) for j in range(POOL)]
        spins = [torch.zeros((), dtype=torch.int64) for _ in range(4)]
        reference = _compile(chain, (*xs[0], *spins), elide=False)
        refs = [(reference(*x, *spins).clone(),) for x in xs]
        ref_decisions = _decisions()
        _quiesce()
        elided = _compile(chain, (*xs[0], *spins), elide=True)
        decisions = _decisions()
        _quiesce()
        t0 = time.perf_counter()
        results[f"{name}/elided"] = _run_loop(elided, xs, refs, spins, iters, rank, seed=1)
        results[f"{name}/reference"] = _run_loop(reference, xs, refs, spins, iters // 10, rank, seed=2)
        results[f"{name}/seconds"] = time.perf_counter() - t0
        results[f"{name}/decisions"] = decisions
        results[f"{name}/reference_decisions"] = ref_decisions
        # time per call without spins (a CUDA-graph replay, so host launch cost does not hide
        # the GPU time): what elision saves, 3 entry barriers of 4 gathers
        for c in spins:
            c.zero_()  # _run_loop leaves its last random delays in them
        _quiesce()
        for label, fn in (("us_barriers", reference), ("us_elided", elided)):
            results[f"{name}/{label}"] = _graph_time(fn, (*xs[0], *spins))
            _quiesce()
    return results


def _zero_copy_chain_body(rank, W, iters):
    """The chain with ``zero_copy=True``: gathers whose readers are proven done before their
    slot is rewritten return views of the slot; the rest copy.  Random delays as above."""
    import tpfuse

    _setup(rank)
    results = {}
    for name, T, base in (("small", 16, 1024), ("multi_chunk", 2048, 4096)):
        widths = [base + 256 * r for r in range(W)]
        chain = make_chain(rank, widths)
        xs = [(_inputs(1000 * j + T, T, widths, rank)[0],) for j in range(POOL)]
        spins = [torch.zeros((), dtype=torch.int64) for _ in range(4)]
        reference = _compile(chain, (*xs[0], *spins), elide=False)
        refs = [(reference(*x, *spins).clone(),) for x in xs]
        _quiesce()
        zero_copy = _compile(chain, (*xs[0], *spins), elide=True, zero_copy=True)
        results[f"{name}/zero_copy"] = [d.zero_copy for g in tpfuse.report().graphs for d in g.barriers]
        _quiesce()
        results[f"{name}/bad"] = _run_loop(zero_copy, xs, refs, spins, iters, rank, seed=5)
        for c in spins:
            c.zero_()
        _quiesce()
        elided = _compile(chain, (*xs[0], *spins), elide=True)
        for label, fn in (("us_copy", elided), ("us_zero_copy", zero_copy)):
            results[f"{name}/{label}"] = _graph_time(fn, (*xs[0], *spins))
            _quiesce()
    return results


def _slot_reader_body(rank, W, iters):
    _setup(rank)
    T = 512
    widths = [2048 + 256 * r for r in range(W)]
    fn = make_slot_reader(rank, widths)
    off = _bands(widths)
    xs, refs = [], []
    for j in range(POOL):
        x1, all1 = _inputs(50 + j, T, widths, rank)
        x2, all2 = _inputs(90 + j, T, widths, rank)
        gathered = torch.cat(all1, dim=-1)
        y = torch.cat([gathered[:, off[q]:off[q + 1]] + all2[q] for q in range(W)], dim=-1)
        xs.append((x1, x2))
        refs.append((gathered, y))
    spins = [torch.zeros((), dtype=torch.int64)]
    results = {}
    for label, force in (("pass_decides", False), ("forced_skip", True)):
        compiled = _compile(fn, (*xs[0], *spins), elide=True, force=force)
        results[f"{label}/decisions"] = _decisions()
        _quiesce()
        results[label] = _run_loop(compiled, xs, refs, spins, iters, rank, seed=3)
        _quiesce()
    return results


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("W", [2, 4])
def test_elided_chain_is_bit_exact(W):
    _needs(W)
    results = run_ranks(W, _chain_body, ITERS, backend="nccl", timeout=600)
    rows = []
    for rank, r in enumerate(results):
        for name in ("small", "multi_chunk"):
            # G1 keeps; G2 skips on slot 1; G3 skips after the all_reduce; G4 skips on slot 1.
            assert r[f"{name}/decisions"] == [(0, False), (1, True), (0, True), (1, True)], r
            assert r[f"{name}/reference_decisions"] == [(-1, False)] * 4, r
            assert r[f"{name}/elided"] == 0, f"rank {rank} {name}: {r[f'{name}/elided']} corrupted outputs"
            assert r[f"{name}/reference"] == 0, f"rank {rank} {name}: reference corrupted"
            rows.append((rank, name, r[f"{name}/us_barriers"], r[f"{name}/us_elided"], r[f"{name}/seconds"]))
    print(f"\n{torch.cuda.get_device_name(0)}, torch {torch.__version__}, W={W}, {ITERS} iterations")
    print("rank | size        | us/call barriers | us/call elided | saved per skipped barrier | stress s")
    for rank, name, slow, fast, secs in rows:
        print(f"{rank:4} | {name:11} | {slow:16.1f} | {fast:14.1f} | {(slow - fast) / 3:25.2f} | {secs:8.1f}")


@pytest.mark.parametrize("W", [2, 4])
def test_forced_skip_corrupts(W):
    _needs(W)
    iters = max(ITERS // 5, 200)
    results = run_ranks(W, _slot_reader_body, iters, backend="nccl", timeout=600)
    for rank, r in enumerate(results):
        # "no fence precedes it": barrier kept, slot left to the op (nothing relies on it)
        assert r["pass_decides/decisions"] == [(-1, False)], r
        assert r["forced_skip/decisions"] == [(-1, False)], r  # recorded decision; the node was forced after
        assert r["pass_decides"] == 0, f"rank {rank}: corrupted with the barrier the pass kept"
    corrupted = sum(r["forced_skip"] for r in results)
    print(f"\nnegative control W={W}: {corrupted} corrupted outputs over {iters} iterations x {W} ranks")
    assert corrupted > 0, "forcing the refused skip corrupted nothing: the stress test cannot detect the race"


@pytest.mark.parametrize("W", [2, 4])
def test_zero_copy_chain_is_bit_exact(W):
    """``tpfuse.backend(zero_copy=True)`` (experimental, off by default): bit-exact under the
    same random delays, and the time the skipped copy-outs save."""
    _needs(W)
    results = run_ranks(W, _zero_copy_chain_body, ITERS, backend="nccl", timeout=600)
    print(f"\n{torch.cuda.get_device_name(0)}, torch {torch.__version__}, W={W}, {ITERS} iterations, zero-copy")
    for rank, r in enumerate(results):
        for name in ("small", "multi_chunk"):
            assert any(r[f"{name}/zero_copy"]), f"rank {rank} {name}: the pass proved no zero-copy: {r}"
            assert r[f"{name}/bad"] == 0, f"rank {rank} {name}: {r[f'{name}/bad']} corrupted outputs with zero-copy"
            print(f"rank {rank} {name}: zero-copy gathers {r[f'{name}/zero_copy']}, µs per chain "
                  f"{r[f'{name}/us_copy']:.1f} copied -> {r[f'{name}/us_zero_copy']:.1f} zero-copy")

