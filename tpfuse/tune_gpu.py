"""The GPU side of ``python -m tpfuse tune``: the protocol runners, the CUDA timer, the linear probe.

Real ranks (``gpu_runners``): one process and one GPU per rank, NCCL and
symmetric memory between them; each runner moves a bf16 ``[T, width]`` slab
per rank through one protocol, as the op would: through the backend's
launcher, made once per call shape and kept (compile_ops/launchers.py), so an
eager call costs what the op's repeated call costs.

| runner | what one call runs | its negative control |
|---|---|---|
| ``flag`` | the flag protocol (the ``flag`` backend's launcher) | stale epochs accepted (``ACCEPT_STALE``) |
| ``p2p`` | the barrier push, both barriers (the ``p2p`` backend's launcher) | no barrier at all, one slot |
| ``p2p_entry_elided`` | the same, entry barrier elided, ping-pong slots | no barrier at all, one slot |
| ``nccl`` | NCCL all-gather + rearrange (the op's NCCL backend) | bands in reverse order |
| ``nccl_symmetric`` | the ``nccl_symmetric`` backend's launcher, where the host has NCCL windows | bands in reverse order |

A control shows that the check would catch a wrong result: for the push
protocols it is the protocol with its safety removed (the race the protocol
exists to prevent), for NCCL, which tpfuse does not implement, a wrong
rearrange.

One GPU (``emulated_runners``, ``--one-gpu W``): W ranks emulated by W streams
of one GPU (``EmulatedRanks``), each with its own workspace in that GPU's
memory, running the protocols' own launchers.  The one-GPU tests build on the
same class (tests/gpu/flag_one_gpu.py).  It exercises the loop and the
kernels, not the links: its output is never a config.

Never NVLink multicast (docs/safety.md): ``tune.main`` sets the variables
before any rank starts, and nothing here runs the multimem kernel.
"""

from __future__ import annotations

import random
import statistics
from types import SimpleNamespace

import torch

from .compile_ops import collective, nccl_symmetric, tuned
from .compile_ops import workspace as workspaces
from .compile_ops.backend import GatherCall
from .compile_ops.barrier import P2P, slots
from .compile_ops.barrier import launcher as barrier_launcher
from .compile_ops.flag import FLAG
from .compile_ops.flag import buffers as flag_buffers
from .compile_ops.flag import launcher as flag_launcher
from .compile_ops.groups import GroupFacts
from .compile_ops.nccl_symmetric import NCCL_SYMMETRIC
from .compile_ops.program_order import ProgramOrder
from .compile_ops.tuned import CorrectnessRecord
from .kernels import flag as flag_protocol
from .kernels.barrier import signal_pad_bytes
from .kernels.flag import MAX_SLAB_BYTES as FLAG_MAX_SLAB_BYTES

#: calls alternate between these shapes (T changes between calls, as in decode + prefill), per-rank width
STRESS_SHAPES = ((1, 4096), (32, 4096))
#: distinct inputs in turn: a stale result (a previous call's) never equals the current reference
RING = 8
#: per-rank delay before each stressed call, GPU cycles (up to ~10 µs): the ranks drift against each other
MAX_DELAY_CYCLES = 20_000
#: and now and then a rank comes late (~1 ms, longer than the host takes to issue a call on every rank):
#: its peers then finish, and check, before it has even started, whatever order the host issued them in
LATE_CYCLES, LATE_CHANCE = 2_000_000, 1 / 8
BF16 = torch.bfloat16


def bits(seed: int, shape, device) -> torch.Tensor:
    """Random bf16 bit patterns (NaNs included), the same on every GPU for a seed: every rank can build
    every rank's input, hence the reference, without communicating."""
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randint(-(2**15), 2**15 - 1, shape, generator=g, dtype=torch.int16, device=device).view(BF16)


def call_delay(rng: random.Random) -> int:
    """One rank's delay before one stressed call, GPU cycles; the stress and its negative control draw
    from the same delays, so a control that is caught shows what the stress's check can see."""
    return LATE_CYCLES if rng.random() < LATE_CHANCE else rng.randint(0, MAX_DELAY_CYCLES)


def preload_delay_kernel() -> None:
    """Load the delay kernel now, while nothing runs.  CUDA loads a runtime kernel lazily, at its first
    launch, and that load can wait for the kernels running (CUDA's lazy loading): on one GPU, a rank's
    kernel spinning for a peer whose launch the host has not issued yet would then wait forever, and the
    load with it.  (The protocols' Triton kernels are loaded when their launchers are made.)"""
    torch.cuda._sleep(1)
    torch.cuda.synchronize()


def sleep(cycles: int) -> None:
    if cycles:
        torch.cuda._sleep(cycles)


def device_key(ctx) -> tuned.DeviceKey:
    """This machine's key; every rank must have the same GPU model (one config describes one card)."""
    key = tuned.local_device_key()
    names = ctx.gather(key.gpu)
    if len(set(names)) != 1:
        raise RuntimeError(f"tpfuse tune: the ranks have different GPU models {names}; a config describes one")
    return key


# --------------------------------------------------------------------------- the timer


class CudaTimer:
    """Median µs per call over repeats, CUDA events; eager (host launches) or one CUDA graph of many calls."""

    def __init__(self, ctx, eager_calls: int = 20, graph_calls: int = 20, repeats: int = 7, warm: int = 3):
        self.ctx, self.eager_calls, self.graph_calls, self.repeats, self.warm = (ctx, eager_calls, graph_calls,
                                                                                 repeats, warm)

    def time(self, fn, timing) -> float:
        for _ in range(self.warm):  # eager calls first: set-up (collective) and slot growth never happen in a capture
            fn()
        self.ctx.barrier()
        return self._graph(fn) if timing.mode == "graph" else self._eager(fn)

    def _samples(self, body, per_sample: int) -> float:
        samples = []
        for _ in range(self.repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            body()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) * 1e3 / per_sample)
        self.ctx.barrier()
        return statistics.median(samples)

    def _eager(self, fn) -> float:
        def body():
            for _ in range(self.eager_calls):
                fn()

        return self._samples(body, self.eager_calls)

    def _graph(self, fn) -> float:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(self.graph_calls):
                fn()
        for _ in range(2):
            graph.replay()
        self.ctx.barrier()
        try:
            return self._samples(graph.replay, self.graph_calls)
        finally:
            del graph


def cuda_timer(ctx, plan) -> CudaTimer:
    return CudaTimer(ctx)


# --------------------------------------------------------------------------- real ranks


class GatherRunner:
    """One protocol on real ranks: ``gather(x)`` and ``control(x)`` give this rank's ``[T, W * width]``."""

    name = ""
    control_what = ""

    def __init__(self, ctx):
        self.ctx, self.group = ctx, ctx.group
        self.W, self.rank, self.device = ctx.world_size, ctx.rank, ctx.device
        self._launchers = {}

    def unavailable(self) -> str:
        return ""

    def widths(self, x: torch.Tensor) -> list:
        """Every rank's width: the runners move equal slabs."""
        return [x.shape[-1]] * self.W

    def workspace(self):
        """The group's workspace on this rank's GPU (set up collectively at the first call)."""
        return workspaces.usable_workspace(self.group, self.device.index)

    def _kept(self, key, make):
        """The launcher made once per call shape and kept, as the op keeps it (compile_ops/launchers.py).  Every
        rank makes it at the same call: making one may set buffers up, collectively."""
        launch = self._launchers.get(key)
        if launch is None:
            launch = self._launchers[key] = make()
        return launch

    def serves(self, T: int, width: int) -> bool:
        return True

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def control(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def call(self, T: int, width: int):
        x = bits(1000 + self.rank, (T, width), self.device)
        return lambda: self.gather(x)

    def _cases(self, seed: int):
        cases = []
        for j in range(RING):
            T, width = STRESS_SHAPES[j % len(STRESS_SHAPES)]
            xs = [bits(seed * 100_000 + j * 16 + r, (T, width), self.device) for r in range(self.W)]
            cases.append((xs[self.rank], torch.cat(xs, dim=-1).view(torch.int16)))
        return cases

    def _count_wrong(self, gather, calls: int, seed: int) -> int:
        """Calls whose result differs from the reference in any bit, with a random delay before each."""
        rng = random.Random(seed * 7919 + self.rank)  # each rank its own delays
        cases, wrong = self._cases(seed), torch.zeros((), dtype=torch.int64, device=self.device)
        for j in range(calls):
            x, reference = cases[j % RING]
            sleep(call_delay(rng))
            wrong += (gather(x).view(torch.int16) != reference).any()
        torch.cuda.synchronize()
        return int(wrong)

    def stress(self, calls: int, control_calls: int, seed: int) -> CorrectnessRecord:
        wrong = self._count_wrong(self.gather, calls, seed)
        self.ctx.barrier()
        caught = self._count_wrong(self.control, control_calls, seed + 1)
        self.ctx.barrier()  # a control's late stores have landed before anything else runs
        return CorrectnessRecord(calls, True, "bit-exact", wrong, self.control_what, caught > 0)


def _reversed_bands(out: torch.Tensor, W: int) -> torch.Tensor:
    T, total = out.shape
    return out.view(T, W, total // W).flip(1).reshape(T, total)


class NcclRunner(GatherRunner):
    name, control_what = "nccl", "bands in reverse rank order (checks the check)"

    def gather(self, x):
        return collective.gather_hidden(x, [x.shape[-1]] * self.W, self.group)

    def control(self, x):
        return _reversed_bands(self.gather(x), self.W)


class _PushRunner(GatherRunner):
    control_what = "no entry or exit barrier, one slot (the race the barriers prevent)"

    def control(self, x):
        return self._kept(("control", x.shape), lambda: barrier_launcher.launcher(
            self.workspace(), x, self.widths(x), slot=0, skip_entry_sync=True, copy_out=False, exit_sync=False))(x)


class P2PRunner(_PushRunner):
    name = "p2p"

    def gather(self, x):
        return self._kept(("gather", x.shape), lambda: P2P.prepare(x, self.widths(x), self.group))(x)


class P2PEntryElidedRunner(_PushRunner):
    """Entry barrier elided over ping-pong slots: what the barrier-elision pass emits where it proved it safe
    (docs/barrier_elision.md); every call's exit barrier is the fence that makes the next one safe."""

    name = "p2p_entry_elided"

    def __init__(self, ctx):
        super().__init__(ctx)
        self.slot = 0

    def gather(self, x):
        self.slot ^= 1
        slot = self.slot
        return self._kept(("elided", x.shape, slot), lambda: P2P.prepare(x, self.widths(x), self.group, slot,
                                                                          skip_entry_sync=True))(x)


class FlagRunner(GatherRunner):
    """The flag backend's launcher, whatever its crossover says: the tune measures where the crossover is."""

    name, control_what = "flag", "stale epochs accepted (ACCEPT_STALE: a unit counts before it arrived)"

    def serves(self, T, width):
        return T * width * BF16.itemsize <= FLAG_MAX_SLAB_BYTES

    def gather(self, x):
        return self._kept(("gather", x.shape), lambda: FLAG.prepare(x, self.widths(x), self.group))(x)

    def control(self, x):
        return self._kept(("control", x.shape), lambda: flag_launcher.launcher(self.workspace(), x, self.widths(x),
                                                                               ACCEPT_STALE=True))(x)


class NcclSymmetricRunner(NcclRunner):
    """The ``nccl_symmetric`` backend's launcher (compile_ops/nccl_symmetric/), whatever its crossover says: the
    tune measures where the crossover is.  Unavailable, with the backend's own agreed reason, where this
    host's NCCL, torch or ``NCCL_NVLS_ENABLE`` allow no windows."""

    name = "nccl_symmetric"

    def __init__(self, ctx, tokens: int, width: int):
        super().__init__(ctx)
        # the backend's own refusal, forced (the crossover is what this run measures): it registers the windows
        # once, for the largest slab of the run (collective: every rank makes its runners in the same order)
        call = GatherCall("cuda", BF16, tokens, (width,) * self.W, self.group, NCCL_SYMMETRIC.name)
        self.reason = NCCL_SYMMETRIC.refusal(call)

    def unavailable(self):
        return self.reason

    def gather(self, x):
        return self._kept(("gather", x.shape), lambda: NCCL_SYMMETRIC.prepare(x, self.widths(x), self.group))(x)

    def close(self):
        """Deregister the windows before the group goes (collective): some torch releases fail to when they
        destroy a group that still has windows."""
        self._launchers.clear()
        nccl_symmetric.release(self.group.name)


def gpu_runners(ctx, plan) -> list:
    tokens = max(max(plan.tokens), max(t for t, _ in STRESS_SHAPES))
    width = max(max(plan.widths), max(w for _, w in STRESS_SHAPES))
    return [FlagRunner(ctx), P2PRunner(ctx), P2PEntryElidedRunner(ctx), NcclRunner(ctx),
            NcclSymmetricRunner(ctx, tokens, width)]


# --------------------------------------------------------------------------- the linear probe


class LinearProbe:
    """The fused linear + push against cuBLAS + the gather: its stress, then the rows the rule is fitted to."""

    #: LM heads, (K, full vocabulary): the wide bands the rule is fitted to (linear_cost.py)
    SHAPES = ((4096, 128256), (7168, 129280))
    TOKENS = (1, 8, 32)
    #: the stress shape (K, width per rank): small, so 1000 calls stay quick
    STRESS = (4096, 4096)
    control_what = "weight scaled by 1.125 (checks the tolerance check)"

    def __init__(self, ctx):
        self.ctx, self.group, self.W, self.device = ctx, ctx.group, ctx.world_size, ctx.device

    def unavailable(self) -> str:
        bad = [n for _, n in self.SHAPES if (n // self.W) % 8 or n % self.W]
        return f"vocabularies {bad} do not split into 16-byte rows at W={self.W}" if bad else ""

    def _fused(self, x, weight):
        from .compile_ops import linear_push

        return linear_push.linear_gather_hidden(x, weight, None, [weight.shape[0]] * self.W, self.group)

    def _unfused(self, x, weight):
        y = torch.nn.functional.linear(x, weight)
        return P2P.gather(y, [weight.shape[0]] * self.W, self.group)

    def _count_off(self, weight_for_check, calls, seed) -> int:
        k, width = self.STRESS
        g = torch.Generator(device=self.device).manual_seed(seed * 31 + self.ctx.rank)
        weight = torch.randn(width, k, generator=g, device=self.device).to(BF16) / k**0.5
        checked = weight_for_check(weight)
        xs = [torch.randn(T, k, generator=g, device=self.device).to(BF16) for T, _ in STRESS_SHAPES]
        rng = random.Random(seed * 7919 + self.ctx.rank)
        off = torch.zeros((), dtype=torch.int64, device=self.device)
        for j in range(calls):
            x = xs[j % len(xs)]
            sleep(rng.randint(0, MAX_DELAY_CYCLES))
            fused, reference = self._fused(x, checked).float(), self._unfused(x, weight).float()
            # the bf16 GEMM tolerance (benchmarks/bench_linear_gather.py checks the same)
            off += ((fused - reference).abs() > 2.0**-6 * (1 + reference.abs())).any()
        torch.cuda.synchronize()
        return int(off)

    def stress(self, calls, control_calls, seed) -> CorrectnessRecord:
        off = self._count_off(lambda w: w, calls, seed)
        self.ctx.barrier()
        caught = self._count_off(lambda w: w * 1.125, control_calls, seed + 1)
        self.ctx.barrier()
        return CorrectnessRecord(calls, True, "bf16 GEMM tolerance", off, self.control_what, caught > 0)

    def _hbm_bytes_per_s(self) -> float:
        """A device-to-device copy of 1 GiB: reads and writes, the bandwidth the weight stream sees."""
        src = torch.empty(1 << 29, dtype=BF16, device=self.device)
        dst = torch.empty_like(src)
        us = CudaTimer(self.ctx, eager_calls=5, repeats=5, warm=1).time(lambda: dst.copy_(src), _EAGER)
        return -self.ctx.max(-(2 * (1 << 30) / (us * 1e-6)))  # the slowest card's

    def _rows(self, k: int, n: int, timer) -> list:
        """One LM head's rows: graph-replay µs of the fused kernel, cuBLAS + the gather, cuBLAS alone."""
        width = n // self.W
        weight = torch.randn(width, k, device=self.device).to(BF16) / k**0.5
        rows = []
        for T in self.TOKENS:
            x = torch.randn(T, k, device=self.device).to(BF16)
            methods = {"fused": lambda: self._fused(x, weight), "cublas_tpfuse": lambda: self._unfused(x, weight),
                       "cublas_only": lambda: torch.nn.functional.linear(x, weight)}
            graph = {m: self.ctx.max(timer.time(fn, _GRAPH)) for m, fn in methods.items()}
            rows.append({"shape": f"lm_head_{k}", "T": T, "K": k, "N_r": width, "graph": graph})
        return rows

    def measure(self) -> dict:
        hbm = self._hbm_bytes_per_s()
        sms = int(-self.ctx.max(-torch.cuda.get_device_properties(self.device).multi_processor_count))
        timer = CudaTimer(self.ctx, graph_calls=32, repeats=10)  # 32 calls per graph, as linear_cost was fitted
        rows = [row for k, n in self.SHAPES for row in self._rows(k, n, timer)]
        return {"hbm_bytes_per_s": hbm, "sms": sms, "rows": rows}


_EAGER = SimpleNamespace(mode="eager")
_GRAPH = SimpleNamespace(mode="graph")


def linear_probe(ctx, plan) -> LinearProbe:
    return LinearProbe(ctx)


# --------------------------------------------------------------------------- torchrun


def torchrun_tune(plan, rank_fn):
    """Under torchrun: this rank's GPU, the NCCL default group, then ``rank_fn(rank, W, plan)``."""
    import torch.distributed as dist

    local = dist.get_node_local_rank(fallback_rank=None) if hasattr(dist, "get_node_local_rank") else None
    if local is not None:
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    else:  # an older torch: the rank is known once the group is
        dist.init_process_group("nccl")
        torch.cuda.set_device(dist.get_rank() % torch.cuda.device_count())
    try:
        return rank_fn(dist.get_rank(), dist.get_world_size(), plan)
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------- one GPU


class EmulatedRanks:
    """W ranks on one GPU, each a stream and a ``Workspace`` of the op's own in this GPU's memory.

    Each rank has its own status word, program order and flag buffers and epochs (with
    ``add_barrier_push`` also its slots and signal pads), and its calls go through the protocols'
    own launchers (compile_ops/flag/launcher.py, compile_ops/barrier/launcher.py): what runs is what
    the op runs, only the peers' addresses are local.  The W kernels of a call run concurrently, so
    the ranks really race (a fast rank can start its next call while a slow one still reads).  What
    cannot be shown: the links (the peers' stores land in local memory).

    ``flag_options`` select the flag kernel's test variants (negative controls; kernels/flag/gather.py).
    """

    #: the call kinds ``launcher`` makes: the flag protocol, the barrier push, and the barrier push with
    #: its safety removed (no barrier, one slot, no copy-out: the tune's negative control)
    KINDS = ("flag", "barrier push", "unsafe push")

    def __init__(self, widths, dtype=BF16, timeout_s: float | None = None,
                 max_slab_bytes: int = FLAG_MAX_SLAB_BYTES, ordered: bool = True, **flag_options):
        self.widths, self.dtype, self.W = list(widths), dtype, len(widths)
        self.max_slab_bytes, self.flag_options = max_slab_bytes, flag_options
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.timeout_ns = workspaces.barrier_timeout_ns() if timeout_s is None else int(timeout_s * 1e9)
        nbytes = flag_protocol.buffer_bytes(self.W, max_slab_bytes)
        self.flag_buffers = [torch.zeros(nbytes, dtype=torch.uint8, device=self.device) for _ in range(self.W)]
        self.epochs = [torch.zeros(flag_protocol.EPOCH_SLOTS, dtype=torch.int32, device=self.device)
                       for _ in range(self.W)]
        # every rank's blocks on the GPU at once: a rank's blocks wait for its peers'
        blocks = torch.cuda.get_device_properties(self.device).multi_processor_count // self.W
        buffer_args = workspaces.padded(b.data_ptr() for b in self.flag_buffers)
        self.workspaces = [self._rank(r, blocks, buffer_args, ordered) for r in range(self.W)]
        self.streams = [torch.cuda.Stream(self.device) for _ in range(self.W)]
        self._launchers = {}
        preload_delay_kernel()

    def _rank(self, rank: int, blocks: int, buffer_args: tuple, ordered: bool) -> workspaces.Workspace:
        status, view, ptr = workspaces.new_status()
        group = SimpleNamespace(rank=rank, world_size=self.W, name="emulated", pg=None)
        ws = workspaces.Workspace(group, self.device, GroupFacts(True, "", blocks, "emulated"), status=status,
                                  status_view=view, status_ptr=ptr, timeout_ns=self.timeout_ns,
                                  order=ProgramOrder(enforce=ordered))
        ws.protocols[flag_buffers.NAME] = flag_buffers.FlagBuffers(
            self.max_slab_bytes, flag_protocol.region_units(self.max_slab_bytes), self.flag_buffers[rank], None,
            buffer_args, self.epochs[rank])
        return ws

    def add_barrier_push(self, max_slab_bytes: int | None = None) -> "EmulatedRanks":
        """Also emulate the barrier push (entry and exit barriers, two slots) on the same ranks, for slabs of
        up to ``max_slab_bytes`` (default: the flag buffers').

        Its own slots and signal pads, as in the op's workspace, sized once: growing them is collective
        over a real group.  Its blocks meet the peers' blocks in barriers, so every rank gets the same
        grid, within what all W kernels can hold on the GPU at once."""
        blocks = min(ws.facts.max_blocks for ws in self.workspaces)
        slot_bytes = slots.slot_bytes_for((max_slab_bytes or self.max_slab_bytes) * self.W)
        self.slot_buffers = [torch.empty(2 * slot_bytes, dtype=torch.uint8, device=self.device)
                             for _ in range(self.W)]
        self.pads = [torch.zeros(signal_pad_bytes(blocks, self.W) // 4, dtype=torch.int32, device=self.device)
                     for _ in range(self.W)]
        pointer_args = (workspaces.padded(b.data_ptr() for b in self.slot_buffers)
                        + workspaces.padded(p.data_ptr() for p in self.pads))
        for ws, buffer in zip(self.workspaces, self.slot_buffers):
            ws.facts.max_blocks = blocks
            room = slots.slots_of(ws)
            room.slot_bytes, room.buffer, room.pointer_args = slot_bytes, buffer, pointer_args
        return self

    def launcher(self, rank: int, x: torch.Tensor, kind: str = "flag"):
        """Rank ``rank``'s launcher ``launch(x, out=None)`` of ``kind`` (``KINDS``) for calls shaped like ``x``.

        The first call of a shape makes every rank's launcher before any launches: compiling one rank's
        kernel while a peer's already waits would look like a peer that never came."""
        key = (kind, tuple(x.shape[:-1]))  # the leading dims: each rank has its own width
        if key not in self._launchers:
            self._launchers[key] = [self._make(ws, x, kind) for ws in self.workspaces]
        return self._launchers[key][rank]

    def _make(self, ws, x, kind):
        if kind == "flag":
            return flag_launcher.launcher(ws, x, self.widths, **self.flag_options)
        if kind == "barrier push":
            return barrier_launcher.launcher(ws, x, self.widths)
        if kind == "unsafe push":
            return barrier_launcher.launcher(ws, x, self.widths, slot=0, skip_entry_sync=True, copy_out=False,
                                             exit_sync=False)
        raise ValueError(f"tpfuse: no emulated call kind {kind!r}; accepted are {', '.join(self.KINDS)}")

    def run(self, kind: str, xs, outs=None, delays=None, after=None, skip=None) -> list:
        """One call of ``kind`` on every rank but ``skip``, each on its stream after its delay (GPU cycles);
        returns each rank's result.

        ``after(rank, result)`` runs on that rank's stream right after its launch: a check there sees the
        result as the rank would use it, before the peers' late stores (a check after the join would not).
        It is issued once every rank's kernel is: a kernel's first use may load its module (CUDA's lazy
        loading), and that load can wait for the kernels running, among them a rank's kernel spinning for
        a peer the host has not launched yet."""
        main = torch.cuda.current_stream()
        results = [None] * self.W
        for r in range(self.W):
            self.streams[r].wait_stream(main)  # inputs and outputs are ready
            with torch.cuda.stream(self.streams[r]):
                sleep(delays[r] if delays else 0)
                if r != skip:
                    results[r] = self.launcher(r, xs[r], kind)(xs[r], None if outs is None else outs[r])
        for r in range(self.W):
            if after is not None and r != skip:
                with torch.cuda.stream(self.streams[r]):  # still right after this rank's kernel on its stream
                    after(r, results[r])
            main.wait_stream(self.streams[r])
        return results

    def failure_codes(self) -> list:
        """Each rank's status word after the GPU finished: 0, or the code of a wait that timed out."""
        torch.cuda.synchronize()
        return [ws.failure_code() for ws in self.workspaces]


class EmulatedRunner:
    """A protocol on ``EmulatedRanks``: ``flag`` or ``p2p``."""

    def __init__(self, ctx, plan, name: str):
        self.ctx, self.plan, self.name, self.W = ctx, plan, name, ctx.world_size
        self.kind = "flag" if name == "flag" else "barrier push"
        self.control_what = ("stale epochs accepted (ACCEPT_STALE)" if name == "flag"
                             else "no entry or exit barrier, one slot")
        self._ranks = {}

    def ranks(self, width: int, control: bool = False) -> EmulatedRanks:
        key = (width, control and self.kind == "flag")
        if key not in self._ranks:
            options = {"ACCEPT_STALE": True} if key[1] else {}
            ranks = EmulatedRanks([width] * self.W, BF16, **options)
            if self.kind != "flag":
                max_tokens = max(max(self.plan.tokens), max(t for t, _ in STRESS_SHAPES))
                ranks.add_barrier_push(max_tokens * width * BF16.itemsize)
            self._ranks[key] = ranks
        return self._ranks[key]

    def unavailable(self) -> str:
        return ""

    def serves(self, T, width):
        return self.kind != "flag" or T * width * BF16.itemsize <= FLAG_MAX_SLAB_BYTES

    def _inputs(self, seed, T, width):
        device = self.ctx.device
        xs = [bits(seed * 16 + r, (T, width), device) for r in range(self.W)]
        outs = [torch.empty(T, width * self.W, dtype=BF16, device=device) for _ in range(self.W)]
        return xs, outs

    def call(self, T, width):
        ranks, (xs, outs) = self.ranks(width), self._inputs(1000, T, width)
        return lambda: ranks.run(self.kind, xs, outs)

    def _count_wrong(self, control: bool, calls: int, seed: int) -> int:
        rng = random.Random(seed)
        kind = "unsafe push" if control and self.kind != "flag" else self.kind
        cases = []
        for j in range(RING):
            T, width = STRESS_SHAPES[j % len(STRESS_SHAPES)]
            xs, outs = self._inputs(seed * 100 + j, T, width)
            cases.append((self.ranks(width, control), xs, outs, torch.cat(xs, dim=-1).view(torch.int16)))
        wrong = torch.zeros(self.W, dtype=torch.int64, device=self.ctx.device)  # one counter per rank's stream

        def check(rank, result, reference):
            wrong[rank] += (result.view(torch.int16) != reference).any()

        for j in range(calls):
            ranks, xs, outs, reference = cases[j % RING]
            delays = [call_delay(rng) for _ in range(self.W)]
            ranks.run(kind, xs, outs, delays, lambda r, result: check(r, result, reference))
        torch.cuda.synchronize()
        return int(wrong.sum())

    def stress(self, calls, control_calls, seed) -> CorrectnessRecord:
        wrong = self._count_wrong(False, calls, seed)
        caught = self._count_wrong(True, control_calls, seed + 1)
        return CorrectnessRecord(calls, True, "bit-exact", wrong, self.control_what, caught > 0)


def emulated_runners(ctx, plan) -> list:
    return [EmulatedRunner(ctx, plan, "flag"), EmulatedRunner(ctx, plan, "p2p")]
