"""The flag protocol with W ranks emulated on one GPU: one CUDA stream per rank.

Every emulated rank has its own flag buffer, epoch slots and status word in
the one GPU's memory, and its own stream; its kernel is the production kernel
(compiled and launched by the op's own host code, ``compile_ops.push``) for
its rank.  The W kernels of a call run concurrently, so the ranks really race:
a fast rank can start its next call while a slow one still reads, and random
per-rank delays shift them against each other.  What this cannot show is the
NVLink path (the peers' stores land in local memory); the multi-GPU tests
(tests/gpu/test_flag_gather.py) cover that.
"""

import random

import torch

from tpfuse.compile_ops import push
from tpfuse.compile_ops.dispatch import FLAG_MAX_SLAB_BYTES
from gpu_helpers import as_int, bits  # noqa: F401  (re-exported for the flag tests)
from tpfuse.kernels import flag_protocol

INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32}


def width_kinds(kind, W):
    """The width cases of the flag tests: even, uneven, not whole 16-byte vectors, tiny and odd."""
    return {
        "even_4096": [4096] * W,
        "uneven": [1024 + 512 * r for r in range(W)],
        "not_multiple_of_16_bytes": [1001 + 2 * r for r in range(W)],
        "tiny_odd": [1 + 2 * r for r in range(W)],
    }[kind]


class OneGpuGroup:
    """W emulated ranks of one dtype and one set of widths."""

    def __init__(self, widths, dtype, timeout_s=10.0, max_slab_bytes=FLAG_MAX_SLAB_BYTES, **options):
        self.widths, self.dtype, self.W = list(widths), dtype, len(widths)
        self.region_units = flag_protocol.region_units(max_slab_bytes)
        self.max_slab_bytes = max_slab_bytes
        nbytes = flag_protocol.buffer_bytes(self.W, max_slab_bytes)
        self.buffers = [torch.zeros(nbytes, dtype=torch.uint8, device="cuda") for _ in range(self.W)]
        self.buffer_args = tuple(b.data_ptr() for b in self.buffers) + (0,) * (8 - self.W)
        self.epochs = [torch.zeros(flag_protocol.EPOCH_SLOTS, dtype=torch.int32, device="cuda") for _ in range(self.W)]
        self.status = [torch.zeros(1, dtype=torch.int32, pin_memory=True) for _ in range(self.W)]
        self.timeout_ns = int(timeout_s * 1e9)
        self.plans = [push.flag_plan(r, torch.device("cuda", torch.cuda.current_device()), dtype, self.widths,
                                     **options) for r in range(self.W)]
        self.streams = [torch.cuda.Stream() for _ in range(self.W)]
        #: per rank, the most blocks its kernels get (all ranks' kernels must fit on the one GPU at once)
        self.max_blocks = [torch.cuda.get_device_properties(0).multi_processor_count // self.W] * self.W

    def add_barrier_push(self):
        """Also emulate the barrier push (entry and exit barriers, two slots) on the same ranks.

        Its own slots and signal pads, as in the op's workspace; the kernel is the op's
        (``push._build_plan``).  Its blocks meet the peers' blocks in barriers, so every
        rank gets the same grid, within what all W kernels can hold on the GPU at once.
        """
        from types import SimpleNamespace

        from tpfuse.compile_ops import workspace

        self.barrier_blocks = min(self.max_blocks)
        self.slot_bytes = workspace.slot_bytes_for(self.max_slab_bytes * self.W)
        self.slot_buffers = [torch.empty(2 * self.slot_bytes, dtype=torch.uint8, device="cuda") for _ in range(self.W)]
        pad_ints = workspace.signal_pad_bytes(self.barrier_blocks, self.W) // 4
        self.pads = [torch.zeros(pad_ints, dtype=torch.int32, device="cuda") for _ in range(self.W)]
        zeros = (0,) * (8 - self.W)
        self.pointer_args = (tuple(b.data_ptr() for b in self.slot_buffers) + zeros
                             + tuple(p.data_ptr() for p in self.pads) + zeros)
        device = torch.device("cuda", torch.cuda.current_device())
        self.barrier_plans = [push._build_plan(SimpleNamespace(group=SimpleNamespace(rank=r), device=device),
                                               self.dtype, self.widths, False, True, False) for r in range(self.W)]
        self.next_slot = [0] * self.W
        return self

    def launch_barrier_push(self, rank, x, out):
        plan = self.barrier_plans[rank]
        tokens = x.shape[0]
        nblocks = min(self.barrier_blocks, max(1, -(-tokens * plan.max_width_vec // plan.tile)))
        slot = self.next_slot[rank]
        self.next_slot[rank] ^= 1
        plan.run(nblocks, 1, 1, self.streams[rank].cuda_stream, plan.function, plan.packed_metadata, None, None,
                 None, x.data_ptr(), out.data_ptr(), slot * (self.slot_bytes // plan.unit),
                 self.status[rank].data_ptr(), tokens, self.timeout_ns, *self.pointer_args, *plan.constexpr_values)

    def launch(self, rank, x, out):
        assert x.shape[0] * max(self.widths) * self.dtype.itemsize <= self.max_slab_bytes, "slab beyond the buffers"
        plan = self.plans[rank]
        nblocks = push.flag_grid(plan, x.shape[0], self.max_blocks[rank])
        push.run_flag(plan, nblocks, self.streams[rank].cuda_stream, x, out, self.epochs[rank],
                      self.status[rank].data_ptr(), self.timeout_ns, self.region_units, self.buffer_args)

    def call(self, xs, outs=None, delays=None, skip=None):
        """One gather on every rank (each on its own stream, after its delay); returns the results."""
        main = torch.cuda.current_stream()
        T = xs[0].shape[0]
        if outs is None:
            outs = [torch.full((T, sum(self.widths)), -1, dtype=INT_OF_SIZE[self.dtype.itemsize], device="cuda")
                    .view(self.dtype) for _ in range(self.W)]
        for r in range(self.W):
            self.streams[r].wait_stream(main)  # inputs and poisoned outputs are ready
            with torch.cuda.stream(self.streams[r]):
                if delays is not None and delays[r]:
                    torch.cuda._sleep(delays[r])
                if r != skip:
                    self.launch(r, xs[r], outs[r])
        for r in range(self.W):
            main.wait_stream(self.streams[r])
        return outs

    def call_free_running(self, xs_per_rank, outs_per_rank, delays_per_rank, barrier_push=None):
        """Many calls with no join between them: rank r runs its calls back to back on its stream.

        ``barrier_push[j]`` (the same on every rank) sends call j through the barrier push."""
        main = torch.cuda.current_stream()
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

    def failure_codes(self):
        torch.cuda.synchronize()
        return [int(s[0]) for s in self.status]

    def epochs_agree(self):
        """Every slot of every rank holds the same epoch (the grid may have changed between calls)."""
        torch.cuda.synchronize()
        first = self.epochs[0][0]
        return all(bool((e == first).all()) for e in self.epochs)


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
