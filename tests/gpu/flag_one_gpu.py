"""The flag protocol with W ranks emulated on one GPU: one CUDA stream per rank.

Every emulated rank has its own flag buffer, epoch slots and status word in
the one GPU's memory, and its own stream; its kernel is the production kernel
(compiled and launched by the protocol's own launcher, ``compile_ops/flag/launcher.py``) for
its rank.  The emulation itself is the library's (``tpfuse.tune_gpu.EmulatedRanks``,
which ``python -m tpfuse tune --one-gpu W`` runs); this file adds what the tests
need.  The W kernels of a call run concurrently, so the ranks really race:
a fast rank can start its next call while a slow one still reads, and random
per-rank delays shift them against each other.  What this cannot show is the
NVLink path (the peers' stores land in local memory); the multi-GPU tests
(tests/gpu/test_flag_gather.py) cover that.
"""

import random

import torch

from gpu_helpers import as_int, bits  # noqa: F401  (re-exported for the flag tests)
from tpfuse.kernels import flag as flag_protocol
from tpfuse.tune_gpu import EmulatedRanks

FLAG_MAX_SLAB_BYTES = flag_protocol.MAX_SLAB_BYTES

INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32}


def width_kinds(kind, W):
    """The width cases of the flag tests: even, uneven, not whole 16-byte vectors, tiny and odd."""
    return {
        "even_4096": [4096] * W,
        "uneven": [1024 + 512 * r for r in range(W)],
        "not_multiple_of_16_bytes": [1001 + 2 * r for r in range(W)],
        "tiny_odd": [1 + 2 * r for r in range(W)],
    }[kind]


class OneGpuGroup(EmulatedRanks):
    """W emulated ranks of one dtype and one set of widths: the library's emulation (``tpfuse.tune_gpu.
    EmulatedRanks``, which ``python -m tpfuse tune --one-gpu`` runs) with what the tests add: poisoned
    results, free-running calls, a per-rank grid cap and the epochs' agreement."""

    def __init__(self, widths, dtype, timeout_s=10.0, max_slab_bytes=FLAG_MAX_SLAB_BYTES, ordered=True, **options):
        super().__init__(widths, dtype, timeout_s, max_slab_bytes, ordered, **options)
        self.status = [ws.status for ws in self.workspaces]

    @property
    def max_blocks(self):
        """Per rank, the grid cap (a test may lower one rank's to make it a slow reader)."""
        return _MaxBlocks(self.workspaces)

    def launch_barrier_push(self, rank, x, out):
        self.launcher(rank, x, "barrier push")(x, out)

    def launch(self, rank, x, out):
        assert x.shape[0] * max(self.widths) * self.dtype.itemsize <= self.max_slab_bytes, "slab beyond the buffers"
        self.launcher(rank, x)(x, out)

    def poisoned(self, T):
        """One rank's result buffer, every bit set: a band no store reached shows."""
        return torch.full((T, sum(self.widths)), -1, dtype=INT_OF_SIZE[self.dtype.itemsize],
                          device="cuda").view(self.dtype)

    def call(self, xs, outs=None, delays=None, skip=None):
        """One gather on every rank (each on its own stream, after its delay); returns the results."""
        assert xs[0].shape[0] * max(self.widths) * self.dtype.itemsize <= self.max_slab_bytes, \
            "slab beyond the buffers"
        if outs is None:
            outs = [self.poisoned(xs[0].shape[0]) for _ in range(self.W)]
        self.run("flag", xs, outs, delays, skip=skip)
        return outs

    def call_free_running(self, xs_per_rank, outs_per_rank, delays_per_rank, barrier_push=None):
        """Many calls with no join between them: rank r runs its calls back to back on its stream.

        ``barrier_push[j]`` (the same on every rank) sends call j through the barrier push."""
        main = torch.cuda.current_stream()
        # Every launcher first: loading a kernel's module waits for the kernels already running on
        # the GPU, and here those wait for ranks this one host thread has not issued yet.
        for kind in ("flag", "barrier push") if barrier_push is not None and any(barrier_push) else ("flag",):
            self.launcher(0, xs_per_rank[0][0], kind)
        for r in range(self.W):
            self.streams[r].wait_stream(main)
            with torch.cuda.stream(self.streams[r]):
                for j, (x, out, delay) in enumerate(zip(xs_per_rank[r], outs_per_rank[r], delays_per_rank[r])):
                    if delay:
                        torch.cuda._sleep(delay)
                    if barrier_push is not None and barrier_push[j]:
                        self.launch_barrier_push(r, x, out)
                    else:
                        self.launch(r, x, out)
        for r in range(self.W):
            main.wait_stream(self.streams[r])

    def epochs_agree(self):
        """Every slot of every rank holds the same epoch (the grid may have changed between calls)."""
        torch.cuda.synchronize()
        first = self.epochs[0][0]
        return all(bool((e == first).all()) for e in self.epochs)


class _MaxBlocks:
    """``group.max_blocks[r] = n`` sets rank r's grid cap (its launchers are made after)."""

    def __init__(self, workspaces):
        self.workspaces = workspaces

    def __getitem__(self, rank):
        return self.workspaces[rank].facts.max_blocks

    def __setitem__(self, rank, blocks):
        self.workspaces[rank].facts.max_blocks = blocks


def inputs(seed, T, widths, dtype):
    return [bits(seed * 64 + r, (T, w), dtype) for r, w in enumerate(widths)]


def reference(xs):
    return as_int(torch.cat(xs, dim=-1))



def delayed_run(group, T, iters, seed, max_cycles=20000, ring=64, barrier_push_share=0.0):
    """``iters`` calls per rank, free running in rings of ``ring`` calls with random per-rank delays.

    With ``barrier_push_share`` > 0 that share of the calls (random, the same on every rank)
    goes through the barrier push instead.  Returns (corrupted results, first failure code or 0).  Within a ring no
    rank waits for another except through the protocol itself, so a fast rank
    runs up to a ring ahead of a slow one whenever the protocol lets it.
    """
    rng = random.Random(seed)
    xs = [inputs(seed * 1000 + j, T, group.widths, group.dtype) for j in range(ring)]
    refs = [reference(x) for x in xs]
    corrupted = torch.zeros((), dtype=torch.int64, device="cuda")
    done = 0
    while done < iters:
        n = min(ring, iters - done)
        outs = [[torch.full((T, sum(group.widths)), -1, dtype=INT_OF_SIZE[group.dtype.itemsize], device="cuda")
                 .view(group.dtype) for _ in range(n)] for _ in range(group.W)]
        delays = [[rng.randint(0, max_cycles) for _ in range(n)] for _ in range(group.W)]
        choice = [rng.random() < barrier_push_share for _ in range(n)] if barrier_push_share else None
        group.call_free_running([[xs[j][r] for j in range(n)] for r in range(group.W)], outs, delays, choice)
        for r in range(group.W):
            for j in range(n):
                corrupted += (as_int(outs[r][j]) != refs[j]).any()
        done += n
        code = max(group.failure_codes())
        if code:
            return int(corrupted), code
    return int(corrupted), 0
