"""The flag protocol with W ranks emulated on one GPU: one CUDA stream per rank.

Every emulated rank has its own flag buffer, epoch slots and status word in
the one GPU's memory, and its own stream; its kernel is the production kernel
(compiled and launched by the protocol's own launcher, ``compile_ops/flag/launcher.py``) for
its rank.  The W kernels of a call run concurrently, so the ranks really race:
a fast rank can start its next call while a slow one still reads, and random
per-rank delays shift them against each other.  What this cannot show is the
NVLink path (the peers' stores land in local memory); the multi-GPU tests
(tests/gpu/test_flag_gather.py) cover that.
"""

import random
from types import SimpleNamespace

import torch

from tpfuse.compile_ops import workspace
from tpfuse.compile_ops.barrier import launcher as barrier_launcher, slots
from tpfuse.compile_ops.flag import buffers as flag_buffers, launcher as flag_launcher
from tpfuse.compile_ops.groups import GroupFacts
from tpfuse.compile_ops.program_order import ProgramOrder
from gpu_helpers import as_int, bits  # noqa: F401  (re-exported for the flag tests)
from tpfuse.kernels import flag as flag_protocol
from tpfuse.kernels.barrier import signal_pad_bytes

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


class OneGpuGroup:
    """W emulated ranks of one dtype and one set of widths.

    Each rank is a ``Workspace`` of the op's own (kernels/failure.py status word,
    program order, flag buffers, and with ``add_barrier_push`` slots and signal
    pads) in this one GPU's memory, and its calls go through the op's own
    launchers (``flag/launcher.py``, ``barrier/launcher.py``): what runs is what
    the op runs, only the peers' addresses are local.
    """

    def __init__(self, widths, dtype, timeout_s=10.0, max_slab_bytes=FLAG_MAX_SLAB_BYTES, ordered=True, **options):
        self.widths, self.dtype, self.W = list(widths), dtype, len(widths)
        self.options = options
        self.max_slab_bytes = max_slab_bytes
        region_units = flag_protocol.region_units(max_slab_bytes)
        nbytes = flag_protocol.buffer_bytes(self.W, max_slab_bytes)
        self.buffers = [torch.zeros(nbytes, dtype=torch.uint8, device="cuda") for _ in range(self.W)]
        buffer_args = tuple(b.data_ptr() for b in self.buffers) + (0,) * (8 - self.W)
        self.epochs = [torch.zeros(flag_protocol.EPOCH_SLOTS, dtype=torch.int32, device="cuda") for _ in range(self.W)]
        self.timeout_ns = int(timeout_s * 1e9)
        device = torch.device("cuda", torch.cuda.current_device())
        #: per rank, the most blocks its kernels get (all ranks' kernels must fit on the one GPU at once)
        blocks = torch.cuda.get_device_properties(0).multi_processor_count // self.W
        self.workspaces = []
        for r in range(self.W):
            status, view, ptr = workspace.new_status()
            group = SimpleNamespace(rank=r, world_size=self.W, name="emulated", pg=None)
            flags = flag_buffers.FlagBuffers(max_slab_bytes, region_units, self.buffers[r], None, buffer_args,
                                             self.epochs[r])
            ws = workspace.Workspace(group, device, GroupFacts(True, "", blocks, "emulated"), status=status,
                                     status_view=view, status_ptr=ptr, timeout_ns=self.timeout_ns,
                                     order=ProgramOrder(enforce=ordered))
            ws.protocols[flag_buffers.NAME] = flags
            self.workspaces.append(ws)
        self.status = [ws.status for ws in self.workspaces]
        self.streams = [torch.cuda.Stream() for _ in range(self.W)]
        self._launchers = {}

    @property
    def max_blocks(self):
        """Per rank, the grid cap (a test may lower one rank's to make it a slow reader)."""
        return _MaxBlocks(self.workspaces)

    def add_barrier_push(self):
        """Also emulate the barrier push (entry and exit barriers, two slots) on the same ranks.

        Its own slots and signal pads, as in the op's workspace.  Its blocks meet the peers'
        blocks in barriers, so every rank gets the same grid, within what all W kernels can
        hold on the GPU at once.
        """
        blocks = min(ws.facts.max_blocks for ws in self.workspaces)
        slot_bytes = slots.slot_bytes_for(self.max_slab_bytes * self.W)
        self.slot_buffers = [torch.empty(2 * slot_bytes, dtype=torch.uint8, device="cuda") for _ in range(self.W)]
        pad_ints = signal_pad_bytes(blocks, self.W) // 4
        self.pads = [torch.zeros(pad_ints, dtype=torch.int32, device="cuda") for _ in range(self.W)]
        zeros = (0,) * (8 - self.W)
        pointer_args = (tuple(b.data_ptr() for b in self.slot_buffers) + zeros
                        + tuple(p.data_ptr() for p in self.pads) + zeros)
        for ws, buffer in zip(self.workspaces, self.slot_buffers):
            ws.facts.max_blocks = blocks
            room = slots.slots_of(ws)
            room.slot_bytes, room.buffer, room.pointer_args = slot_bytes, buffer, pointer_args
        return self

    def launcher(self, rank, x, kind="flag"):
        """Rank ``rank``'s launcher (the op's) for calls shaped like ``x``.

        The first call of a shape makes every rank's launcher before any launches: compiling
        one rank's kernel while a peer's already waits would look like a peer that never came.
        """
        key = (kind, tuple(x.shape[:-1]))  # the leading dims: each rank has its own width
        if key not in self._launchers:
            self._launchers[key] = [self._make_launcher(ws, x, kind) for ws in self.workspaces]
        return self._launchers[key][rank]

    def _make_launcher(self, ws, x, kind):
        if kind == "flag":
            return flag_launcher.launcher(ws, x, self.widths, **self.options)
        return barrier_launcher.launcher(ws, x, self.widths)

    def launch_barrier_push(self, rank, x, out):
        self.launcher(rank, x, "barrier push")(x, out)

    def launch(self, rank, x, out):
        assert x.shape[0] * max(self.widths) * self.dtype.itemsize <= self.max_slab_bytes, "slab beyond the buffers"
        self.launcher(rank, x)(x, out)

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

    def failure_codes(self):
        torch.cuda.synchronize()
        return [ws.failure_code() for ws in self.workspaces]

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
