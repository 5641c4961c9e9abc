"""The GPU side of ``python -m tpfuse tune``: the protocol runners, the CUDA timer, the linear probe.

Real ranks (``gpu_runners``): one process and one GPU per rank, NCCL and
symmetric memory between them; each runner moves a bf16 ``[T, width]`` slab
per rank through one protocol, as the op would:

| runner | what one call runs | its negative control |
|---|---|---|
| ``flag`` | the flag protocol (``push.gather_hidden``, ``Backend.FLAG``) | stale epochs accepted (``ACCEPT_STALE``) |
| ``barrier_push`` | the barrier push, both barriers | no barrier at all, one slot |
| ``barrier_push_elided`` | entry barrier elided, ping-pong slots | no barrier at all, one slot |
| ``nccl`` | NCCL all-gather + rearrange (the op's NCCL backend) | bands in reverse order |
| ``nccl_symmetric`` | the same from NCCL symmetric windows, where torch and NCCL expose them | bands in reverse order |

A control shows that the check would catch a wrong result: for the push
protocols it is the protocol with its safety removed (the race the protocol
exists to prevent), for NCCL, which tpfuse does not implement, a wrong
rearrange.

One GPU (``emulated_runners``, ``--one-gpu W``): W ranks emulated by W streams
of one GPU, each with its own workspace in that GPU's memory, running the
op's own launchers (the emulation tests/gpu/flag_one_gpu.py also builds;
this is the library's copy, since the library never imports the tests).  It
exercises the loop and the kernels, not the links: its output is never a
config.

Never NVLink multicast (docs/safety.md): ``tune.main`` sets the variables
before any rank starts, and nothing here runs the multimem kernel.
"""

from __future__ import annotations

import random
import statistics
from types import SimpleNamespace

import torch

from .compile_ops import collective, push, tuned_configs
from .compile_ops import workspace as workspaces
from .compile_ops.backend import Backend
from .compile_ops.program_order import ProgramOrder
from .compile_ops.tuned_configs import CorrectnessRecord
from .compile_ops.workspace import FLAG_MAX_SLAB_BYTES

#: calls alternate between these shapes (T changes between calls, as in decode + prefill), per-rank width
STRESS_SHAPES = ((1, 4096), (32, 4096))
#: distinct inputs in turn: a stale result (a previous call's) never equals the current reference
RING = 8
#: per-rank delay before each stressed call, GPU cycles (up to ~10 µs): the ranks drift against each other
MAX_DELAY_CYCLES = 20_000
BF16 = torch.bfloat16


def bits(seed: int, shape, device) -> torch.Tensor:
    """Random bf16 bit patterns (NaNs included), the same on every GPU for a seed: every rank can build
    every rank's input, hence the reference, without communicating."""
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randint(-(2**15), 2**15 - 1, shape, generator=g, dtype=torch.int16, device=device).view(BF16)


def sleep(cycles: int) -> None:
    if cycles:
        torch.cuda._sleep(cycles)


def device_key(ctx) -> tuned_configs.DeviceKey:
    """This machine's key; every rank must have the same GPU model (one config describes one card)."""
    key = tuned_configs.local_device_key()
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

    def unavailable(self) -> str:
        return ""

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
            sleep(rng.randint(0, MAX_DELAY_CYCLES))
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

    def __init__(self, ctx):
        super().__init__(ctx)
        self._controls = {}

    def control(self, x):
        launch = self._controls.get(x.shape)
        if launch is None:
            ws = workspaces.workspace(self.group, self.device.index)
            workspaces.ensure_capacity(ws, x.numel() * self.W * x.element_size())
            launch = self._controls[x.shape] = push.push_launcher(
                ws, x, [x.shape[-1]] * self.W, Backend.P2P, slot=0, skip_entry_sync=True, copy_out=False,
                exit_sync=False)
        return launch(x)


class BarrierPushRunner(_PushRunner):
    name = "barrier_push"

    def gather(self, x):
        return push.gather_hidden(x, [x.shape[-1]] * self.W, self.group, Backend.P2P, -1, False)


class ElidedPushRunner(_PushRunner):
    """Entry barrier elided over ping-pong slots: what the barrier-elision pass emits where it proved it safe
    (docs/barrier_elision.md); every call's exit barrier is the fence that makes the next one safe."""

    name = "barrier_push_elided"

    def __init__(self, ctx):
        super().__init__(ctx)
        self.slot = 0

    def gather(self, x):
        self.slot ^= 1
        return push.gather_hidden(x, [x.shape[-1]] * self.W, self.group, Backend.P2P, self.slot, True)


class FlagRunner(GatherRunner):
    name, control_what = "flag", "stale epochs accepted (ACCEPT_STALE: a unit counts before it arrived)"

    def __init__(self, ctx):
        super().__init__(ctx)
        self._controls = {}

    def serves(self, T, width):
        return T * width * BF16.itemsize <= FLAG_MAX_SLAB_BYTES

    def gather(self, x):
        return push.gather_hidden(x, [x.shape[-1]] * self.W, self.group, Backend.FLAG)

    def control(self, x):
        launch = self._controls.get(x.shape)
        if launch is None:
            ws = workspaces.workspace(self.group, self.device.index)
            workspaces.ensure_flag_buffers(ws, FLAG_MAX_SLAB_BYTES)
            launch = self._controls[x.shape] = push.flag_launcher(ws, x, [x.shape[-1]] * self.W, ACCEPT_STALE=True)
        return launch(x)


class NcclSymmetricRunner(NcclRunner):
    """NCCL all-gather between buffers registered as NCCL symmetric windows (NCCL >= 2.27 with a torch whose
    ProcessGroupNCCL registers a memory pool with ``symm=True``); the input is copied into the window, as a
    caller's tensor would have to be."""

    name = "nccl_symmetric"

    def __init__(self, ctx, max_slab_numel: int):
        super().__init__(ctx)
        self.pool = self.backend = None
        self.reason = self._set_up(max_slab_numel)

    def _set_up(self, numel: int) -> str:
        self.ctx.barrier()  # a collective first: the group's NCCL communicator exists before windows register on it
        version = tuple(torch.cuda.nccl.version())
        if version < (2, 27):
            return f"NCCL {'.'.join(map(str, version))} has no symmetric kernels (2.27 or later)"
        get_backend = getattr(self.group.pg, "_get_backend", None)
        backend = get_backend(self.device) if get_backend else None
        if getattr(backend, "mem_allocator", None) is None or not hasattr(backend, "register_mem_pool"):
            return f"torch {torch.__version__} exposes no NCCL window registration (ProcessGroupNCCL.register_mem_pool)"
        pool = torch.cuda.MemPool(backend.mem_allocator)
        with torch.cuda.use_mem_pool(pool):
            self.send = torch.empty(numel, dtype=BF16, device=self.device)
            self.stacked = torch.empty(self.W * numel, dtype=BF16, device=self.device)
        try:
            backend.register_mem_pool(pool, symm=True)  # collective: the same on every rank (same software)
        except TypeError:
            return f"torch {torch.__version__} registers NCCL windows without symm=True"
        except RuntimeError as err:
            return f"registering NCCL symmetric windows failed: {err}"
        self.pool, self.backend = pool, backend
        return ""

    def unavailable(self):
        return self.reason

    def gather(self, x):
        import torch.distributed as dist

        T, width = x.shape
        send = self.send[: x.numel()].view(T, width)
        send.copy_(x)
        stacked = self.stacked[: self.W * x.numel()]
        dist.all_gather_into_tensor(stacked, send, group=self.group.pg)
        return stacked.view(self.W, T, width).permute(1, 0, 2).reshape(T, self.W * width)

    def close(self):
        """Deregister before the group goes: a process group destroyed with windows still registered fails."""
        if self.pool is not None:
            torch.cuda.synchronize()
            self.backend.deregister_mem_pool(self.pool)
            self.pool = None


def gpu_runners(ctx, plan) -> list:
    largest = max(plan.tokens) * max(plan.widths)
    return [FlagRunner(ctx), BarrierPushRunner(ctx), ElidedPushRunner(ctx), NcclRunner(ctx),
            NcclSymmetricRunner(ctx, max(largest, max(t * w for t, w in STRESS_SHAPES)))]


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

        return linear_push.linear_gather_hidden(x, weight, None, [weight.shape[0]] * self.W, self.group,
                                                Backend.P2P, -1, False)

    def _unfused(self, x, weight):
        y = torch.nn.functional.linear(x, weight)
        return push.gather_hidden(y, [weight.shape[0]] * self.W, self.group, Backend.P2P, -1, False)

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
    """W ranks of one width on one GPU: each its own workspace (status word, program order, flag buffers,
    slots and signal pads) in this GPU's memory and its own stream, launching through the op's own
    launchers (``push.flag_launcher``, ``push.push_launcher``).  What cannot be shown: the links."""

    def __init__(self, W: int, width: int, max_tokens: int, **flag_options):
        self.W, self.width, self.flag_options = W, width, flag_options
        self.widths = [width] * W
        device = torch.device("cuda", torch.cuda.current_device())
        from .kernels import flag as flag_protocol

        flag_bytes = flag_protocol.buffer_bytes(W, FLAG_MAX_SLAB_BYTES)
        self.flag_buffers = [torch.zeros(flag_bytes, dtype=torch.uint8, device=device) for _ in range(W)]
        flag_args = tuple(b.data_ptr() for b in self.flag_buffers) + (0,) * (8 - W)
        self.epochs = [torch.zeros(flag_protocol.EPOCH_SLOTS, dtype=torch.int32, device=device) for _ in range(W)]
        # every rank's blocks on the GPU at once: the barrier push's blocks wait for their peers'
        blocks = torch.cuda.get_device_properties(device).multi_processor_count // W
        slot_bytes = workspaces.slot_bytes_for(max_tokens * width * W * BF16.itemsize)
        self.slots = [torch.empty(2 * slot_bytes, dtype=torch.uint8, device=device) for _ in range(W)]
        pads = [torch.zeros(workspaces.signal_pad_bytes(blocks, W) // 4, dtype=torch.int32, device=device)
                for _ in range(W)]
        self.pads = pads
        zeros = (0,) * (8 - W)
        pointer_args = tuple(b.data_ptr() for b in self.slots) + zeros + tuple(p.data_ptr() for p in pads) + zeros
        self.workspaces = []
        for r in range(W):
            status, view, ptr = workspaces.new_status()
            group = SimpleNamespace(rank=r, world_size=W, name="emulated", pg=None)
            flags = workspaces.FlagBuffers(FLAG_MAX_SLAB_BYTES, flag_protocol.region_units(FLAG_MAX_SLAB_BYTES),
                                           self.flag_buffers[r], None, flag_args, self.epochs[r])
            ws = workspaces.Workspace(group, device, workspaces.GroupFacts(True, "", blocks, "emulated"),
                                      status=status, status_view=view, status_ptr=ptr,
                                      timeout_ns=workspaces.barrier_timeout_ns(), flags=flags, order=ProgramOrder())
            ws.slot_bytes, ws.buffer, ws.pointer_args = slot_bytes, self.slots[r], pointer_args
            self.workspaces.append(ws)
        self.streams = [torch.cuda.Stream() for _ in range(W)]
        self._launchers = {}

    def _launcher(self, kind: str, rank: int, x: torch.Tensor):
        key = (kind, tuple(x.shape))
        if key not in self._launchers:  # every rank's launcher before any launch: compiling is no late peer
            self._launchers[key] = [self._make(kind, ws, x) for ws in self.workspaces]
        return self._launchers[key][rank]

    def _make(self, kind, ws, x):
        if kind == "flag":
            return push.flag_launcher(ws, x, self.widths, **self.flag_options)
        if kind == "control push":
            return push.push_launcher(ws, x, self.widths, Backend.P2P, slot=0, skip_entry_sync=True,
                                      copy_out=False, exit_sync=False)
        return push.push_launcher(ws, x, self.widths, Backend.P2P)

    def call(self, kind: str, xs, outs, delays=None, after=None):
        """One gather on every rank, each on its stream after its delay; returns each rank's result.

        ``after(rank, result)`` runs on that rank's stream right after its launch: a check there sees the
        result as the rank would use it, before the peers' late stores (a check after the join would not)."""
        main = torch.cuda.current_stream()
        results = [None] * self.W
        for r in range(self.W):
            self.streams[r].wait_stream(main)
            with torch.cuda.stream(self.streams[r]):
                sleep(delays[r] if delays else 0)
                results[r] = self._launcher(kind, r, xs[r])(xs[r], outs[r])
                if after is not None:
                    after(r, results[r])
        for r in range(self.W):
            main.wait_stream(self.streams[r])
        return results


class EmulatedRunner:
    """A protocol on ``EmulatedRanks``: ``flag`` or ``barrier_push``."""

    def __init__(self, ctx, plan, name: str):
        self.ctx, self.plan, self.name, self.W = ctx, plan, name, ctx.world_size
        self.kind = "flag" if name == "flag" else "push"
        self.control_what = ("stale epochs accepted (ACCEPT_STALE)" if name == "flag"
                             else "no entry or exit barrier, one slot")
        self._ranks = {}

    def ranks(self, width: int, control: bool = False) -> EmulatedRanks:
        key = (width, control and self.kind == "flag")
        if key not in self._ranks:
            max_tokens = max(max(self.plan.tokens), max(t for t, _ in STRESS_SHAPES))
            options = {"ACCEPT_STALE": True} if key[1] else {}
            self._ranks[key] = EmulatedRanks(self.W, width, max_tokens, **options)
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
        return lambda: ranks.call(self.kind, xs, outs)

    def _count_wrong(self, control: bool, calls: int, seed: int) -> int:
        rng = random.Random(seed)
        kind = "control push" if control and self.kind == "push" else self.kind
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
            delays = [rng.randint(0, MAX_DELAY_CYCLES) for _ in range(self.W)]
            ranks.call(kind, xs, outs, delays, lambda r, result: check(r, result, reference))
        torch.cuda.synchronize()
        return int(wrong.sum())

    def stress(self, calls, control_calls, seed) -> CorrectnessRecord:
        wrong = self._count_wrong(False, calls, seed)
        caught = self._count_wrong(True, control_calls, seed + 1)
        return CorrectnessRecord(calls, True, "bit-exact", wrong, self.control_what, caught > 0)


def emulated_runners(ctx, plan) -> list:
    return [EmulatedRunner(ctx, plan, "flag"), EmulatedRunner(ctx, plan, "barrier_push")]
