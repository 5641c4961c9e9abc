"""``python -m tpfuse tune``: measure this machine and write the config ``auto`` follows here (docs/tuning.md).

    python -m tpfuse.tune --nproc 4              # spawns 4 ranks, one GPU each
    torchrun --nproc-per-node 8 -m tpfuse.tune   # or under torchrun
    python -m tpfuse.tune --one-gpu 4            # smoke: 4 ranks emulated on one GPU; writes no config

On W ranks it runs, for every protocol the machine allows (the flag protocol,
the barrier push, the barrier push with its entry barrier elided, NCCL
all-gather + rearrange, NCCL with symmetric windows where torch and NCCL
expose them):

1. its correctness stress first: >= 1000 calls with random per-rank delays,
   bit-exact against the reference, then a negative control that the check
   must catch (``CorrectnessRecord``);
2. its time over a T x width grid (bf16), in CUDA-graph replay and eager, the
   slowest rank's median;

then derives the crossovers under the documented rule (crossover_rule.py),
fits the fused-linear rule's constants on this card (linear_constants.py,
after the fused kernel's own stress), and writes the config into the user's
tuned-config folder (``config.tuned_config_dir()``), printing where.  Every
step prints a progress line; the whole run is meant to take under two minutes
at W = 2, 4 and 8.

The ranks, the timer, the protocol runners and the linear probe are
injectable (``TunePlan``): the GPU ones live in ``tune_gpu.py``; the CPU tests
run the same loop on gloo ranks with a fake timer and fake runners
(tests/test_tune.py).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from . import config as settings
from .compile_ops import tuned
from .compile_ops.linear_constants import fit as fit_linear
from .compile_ops.tuned import CorrectnessRecord

#: the grid: decode sizes, where the protocols differ; slabs 2 KiB .. 4 MiB per rank, so the flag
#: protocol (up to 256 KiB) and the barrier push against NCCL both cross over inside it
DEFAULT_TOKENS = (1, 8, 32, 128, 512)
DEFAULT_WIDTHS = (1024, 4096)
#: the stress: calls with random per-rank delays, then calls of the negative control
STRESS_CALLS = tuned.MIN_STRESS_CALLS
CONTROL_CALLS = 200
#: the time the run should stay within (a warning beyond it, never a cut: a partial grid would bias the rule)
BUDGET_S = 120.0


@dataclass(frozen=True)
class Timing:
    """What one timing is of: the timer may use it (a fake one does), a real one ignores it."""

    protocol: str
    T: int
    width: int
    mode: str  # "graph" or "eager"


@dataclass(frozen=True)
class TunePlan:
    """What a tune run does.  The factories are module-level callables (spawned ranks unpickle them):

    - ``runners(ctx, plan)`` -> the protocol runners: ``name``, ``unavailable() -> str``,
      ``serves(T, width) -> bool`` (the same on every rank), ``call(T, width) -> fn`` (one gather per
      ``fn()``), ``stress(calls, control_calls, seed) -> CorrectnessRecord`` (this rank's view);
    - ``timer(ctx, plan)`` -> ``time(fn, timing) -> µs per call`` on this rank;
    - ``linear_probe(ctx, plan)`` -> None, or ``unavailable()``, ``stress(...)`` and
      ``measure() -> {"hbm_bytes_per_s", "sms", "rows"}`` (rows already the slowest rank's);
    - ``device_key(ctx)`` -> the ``DeviceKey`` the config is written for.
    None: the GPU ones (``tune_gpu.py``).
    """

    tokens: tuple = DEFAULT_TOKENS
    widths: tuple = DEFAULT_WIDTHS
    stress_calls: int = STRESS_CALLS
    control_calls: int = CONTROL_CALLS
    seed: int = 0
    out_dir: str | None = None  # None: the user's tuned-config folder
    linear: bool = True
    one_gpu: bool = False  # W ranks emulated on one GPU: a smoke run, its output is not a config
    runners: Callable | None = None
    timer: Callable | None = None
    linear_probe: Callable | None = None
    device_key: Callable | None = None
    command: str = "python -m tpfuse tune"
    host: str = field(default_factory=socket.gethostname)


# --------------------------------------------------------------------------- the ranks


class RankContext:
    """This rank's view of the tune's ranks: the reductions the loop needs, over a process group or none."""

    def __init__(self, rank: int, world_size: int, group=None, device: torch.device | None = None):
        self.rank, self.world_size, self.group = rank, world_size, group
        self.device = device or torch.device("cpu")

    def _reduce(self, value: float, op: str) -> float:
        if self.group is None:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op={"max": dist.ReduceOp.MAX, "sum": dist.ReduceOp.SUM}[op], group=self.group.pg)
        return float(t.item())

    def max(self, value: float) -> float:
        return self._reduce(value, "max")

    def sum(self, value: int) -> int:
        return int(self._reduce(value, "sum"))

    def gather(self, value) -> list:
        """Every rank's ``value`` (small picklable objects), in rank order."""
        if self.group is None:
            return [value]
        import torch.distributed as dist

        out = [None] * self.world_size
        dist.all_gather_object(out, value, group=self.group.pg)
        return out

    def barrier(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        if self.group is not None:
            self.max(0.0)  # a collective every rank must reach
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def one_gpu_context(world_size: int) -> RankContext:
    """The ranks of ``--one-gpu W``: one process; the W ranks are streams of this GPU (tune_gpu.EmulatedRanks)."""
    return RankContext(0, world_size, None, torch.device("cuda", torch.cuda.current_device()))


def agreed_reason(ctx: RankContext, reason: str) -> str:
    """"" when no rank has a reason, else the first rank's that has one: every rank skips alike."""
    reasons = ctx.gather(reason)
    return next((f"rank {r}: {why}" if len(reasons) > 1 else why for r, why in enumerate(reasons) if why), "")


def combined(ctx: RankContext, record: CorrectnessRecord) -> CorrectnessRecord:
    """One record for the group: wrong results summed, the control caught if any rank caught it."""
    errors = [e for e in ctx.gather(record.error) if e]
    return replace(record, calls=int(-ctx.max(-record.calls)), mismatches=ctx.sum(record.mismatches),
                   control_detected=ctx.max(float(record.control_detected)) > 0, error=errors[0] if errors else "")


class Progress:
    """One line per step on rank 0: the step, its count and the time so far."""

    def __init__(self, ctx: RankContext, total: int, out=None):
        self.ctx, self.total, self.done, self.start = ctx, total, 0, time.monotonic()
        self.out = out or sys.stdout

    def step(self, what: str) -> None:
        self.done += 1
        if self.ctx.rank == 0:
            print(f"tune: [{self.done:>3}/{self.total}] {self.elapsed():6.1f} s  {what}", file=self.out, flush=True)

    def elapsed(self) -> float:
        return time.monotonic() - self.start


# --------------------------------------------------------------------------- the loop


def _factories(plan: TunePlan):
    from . import tune_gpu

    return (plan.runners or (tune_gpu.emulated_runners if plan.one_gpu else tune_gpu.gpu_runners),
            plan.timer or tune_gpu.cuda_timer,
            plan.linear_probe or (None if plan.one_gpu else tune_gpu.linear_probe),
            plan.device_key or tune_gpu.device_key)


def stress_all(ctx, runners, plan, progress) -> tuple[dict, dict]:
    """Each protocol's availability (agreed) and correctness record, before any timing."""
    unavailable, records = {}, {}
    for runner in runners:
        unavailable[runner.name] = agreed_reason(ctx, runner.unavailable())
        if not unavailable[runner.name]:
            records[runner.name] = combined(ctx, runner.stress(plan.stress_calls, plan.control_calls, plan.seed))
            ctx.barrier()
        verdict = unavailable[runner.name] or records[runner.name].failure() or "passes"
        progress.step(f"stress {runner.name}: {verdict}")
    return unavailable, records


def measure_rows(ctx, runners, timer, plan, unavailable, progress) -> list[dict]:
    """The grid: per (T, width) the slowest rank's median µs of every protocol that ran it, NaN elsewhere."""
    rows = []
    for width in plan.widths:
        for T in plan.tokens:
            row = {"T": T, "width": width, "graph": {}, "eager": {}}
            for runner in runners:
                runs = not unavailable[runner.name] and runner.serves(T, width)
                fn = runner.call(T, width) if runs else None
                for mode in ("graph", "eager"):
                    timing = Timing(runner.name, T, width, mode)
                    row[mode][runner.name] = ctx.max(timer.time(fn, timing)) if runs else float("nan")
                    result = f"{row[mode][runner.name]:.2f} us" if runs else "not run"
                    progress.step(f"{runner.name} T={T} width={width} {mode}: {result}")
                del fn
            rows.append(row)
    return rows


def measure_linear(ctx, probe, plan, progress) -> dict:
    """The fused kernel's record, then its rows and the constants fitted to them (None when not measured)."""
    if probe is None:
        progress.step("linear rule: not measured")
        progress.step("linear rule: not measured")
        return {"unavailable": "not measured in this mode", "constants": None, "correctness": None, "rows": []}
    reason = agreed_reason(ctx, probe.unavailable())
    if reason:
        progress.step(f"linear rule: {reason}")
        progress.step(f"linear rule: {reason}")
        return {"unavailable": reason, "constants": None, "correctness": None, "rows": []}
    record = combined(ctx, probe.stress(plan.stress_calls, plan.control_calls, plan.seed))
    progress.step(f"stress fused linear: {record.failure() or 'passes'}")
    measured = probe.measure()
    try:
        constants = fit_linear(measured["rows"], ctx.world_size, measured["hbm_bytes_per_s"], measured["sms"])
        why = ""
    except ValueError as err:  # the model does not describe this card: say so, keep linear_cost's rule
        constants, why = None, str(err)
    progress.step(f"linear rule: {'fitted' if constants else why}")
    return {"unavailable": why, "constants": constants.as_dict() if constants else None,
            "correctness": record.as_dict(), "rows": measured["rows"], "hbm_bytes_per_s": measured["hbm_bytes_per_s"],
            "sms": measured["sms"]}


def tune_rank(ctx: RankContext, plan: TunePlan) -> dict:
    """The whole measurement on this rank (collective over ``ctx``); returns the config's content."""
    make_runners, make_timer, make_probe, make_key = _factories(plan)
    runners, timer = make_runners(ctx, plan), make_timer(ctx, plan)
    probe = make_probe(ctx, plan) if (plan.linear and make_probe) else None
    steps = len(runners) * (1 + 2 * len(plan.tokens) * len(plan.widths)) + 2
    progress = Progress(ctx, steps)
    unavailable, records = stress_all(ctx, runners, plan, progress)
    rows = measure_rows(ctx, runners, timer, plan, unavailable, progress)
    for runner in runners:  # e.g. NCCL windows must be deregistered before the group goes
        if hasattr(runner, "close"):
            runner.close()
    linear = measure_linear(ctx, probe, plan, progress)
    seconds = progress.elapsed()
    if ctx.rank == 0 and seconds > BUDGET_S:
        print(f"tune: took {seconds:.0f} s, more than the {BUDGET_S:.0f} s it should", flush=True)
    key = make_key(ctx)
    return {
        "format": tuned.SMOKE_FORMAT if plan.one_gpu else tuned.FORMAT,
        "format_version": tuned.FORMAT_VERSION,
        "key": key.as_dict(ctx.world_size),
        "measured": {"host": plan.host, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                         timespec="seconds"), "command": plan.command, "seconds": round(seconds, 1),
                     "grid": {"tokens": list(plan.tokens), "widths": list(plan.widths)}, "dtype": "bfloat16",
                     "one_gpu_emulation": plan.one_gpu},
        "protocols": {r.name: {"unavailable": unavailable[r.name],
                               "correctness": records[r.name].as_dict() if r.name in records else None}
                      for r in runners},
        "rows": rows,
        "crossovers": tuned.derive_crossovers(rows, ctx.world_size),
        "linear": linear,
    }


def write(data: dict, plan: TunePlan) -> str:
    """Rank 0: the config into the tuned-config folder; a smoke run's output beside it, never among the configs."""
    folder = plan.out_dir or settings.tuned_config_dir()
    if data["format"] == tuned.FORMAT:
        return tuned.write_config(data, folder)
    folder = os.path.join(folder, "one_gpu_smoke")  # find_config reads *.json of the folder itself only
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"one_gpu_w{data['key']['world_size']}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(tuned.json_safe(data), f, indent=1, sort_keys=True)
    return path


def spawned_rank(rank: int, world_size: int, plan: TunePlan):
    """One spawned rank (``ranks.run_ranks``): tune, and rank 0 writes; returns the path on rank 0."""
    import torch.distributed as dist

    from .compile_ops.groups import resolve_group

    group = resolve_group(dist.group.WORLD.group_name)
    device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in group.backend else torch.device("cpu")
    data = tune_rank(RankContext(rank, world_size, group, device), plan)
    return write(data, plan) if rank == 0 else None


# --------------------------------------------------------------------------- the command


def _ints(text: str) -> tuple:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated positive integers, e.g. 1,8,32")
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated positive integers, e.g. 1,8,32")
    return values


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tpfuse tune", description=(
        "measure this machine's protocols (correctness stress first, then the T x width grid) and write the "
        "config auto follows here (docs/tuning.md)"))
    p.add_argument("--nproc", type=int, default=None,
                   help="ranks to spawn, one GPU each (default: every visible GPU); ignored under torchrun")
    p.add_argument("--one-gpu", type=int, default=None, metavar="W",
                   help="smoke mode: W ranks emulated on one GPU; runs the loop, writes no config")
    p.add_argument("--tokens", type=_ints, default=DEFAULT_TOKENS, help="T of the grid (default 1,8,32,128,512)")
    p.add_argument("--widths", type=_ints, default=DEFAULT_WIDTHS,
                   help="per-rank widths of the grid (default 1024,4096)")
    p.add_argument("--stress-calls", type=int, default=STRESS_CALLS,
                   help=f"stressed calls per protocol (a record passes from {STRESS_CALLS})")
    p.add_argument("--skip-linear", action="store_true", help="do not fit the fused-linear rule's constants")
    p.add_argument("--out", default=None, help="folder to write into (default: the user's tuned-config folder)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the spawned ranks")
    return p


def _plan(args) -> TunePlan:
    return TunePlan(tokens=args.tokens, widths=args.widths, stress_calls=args.stress_calls, out_dir=args.out,
                    linear=not args.skip_linear, one_gpu=args.one_gpu is not None,
                    command="python -m tpfuse tune " + " ".join(sys.argv[1:]))


def _under_torchrun() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_torchelastic_launched()


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    plan = _plan(args)
    from . import ranks, tune_gpu

    os.environ.update(ranks.SAFE_GPU_ENV)  # never NVLink multicast (docs/safety.md); the ranks inherit it
    if not torch.cuda.is_available():
        print("python -m tpfuse tune: no CUDA device; tuning measures GPUs (the CPU has nothing to tune)",
              file=sys.stderr)
        return 2
    if plan.one_gpu:
        if not 2 <= args.one_gpu <= 8:
            print(f"python -m tpfuse tune: --one-gpu {args.one_gpu}; accepted are 2..8 ranks", file=sys.stderr)
            return 2
        path = write(tune_rank(one_gpu_context(args.one_gpu), plan), plan)
        print(f"tune: one-GPU smoke output (not a config) written to {path}")
        return 0
    if _under_torchrun():
        path = tune_gpu.torchrun_tune(plan, spawned_rank)
    else:
        world_size = args.nproc or torch.cuda.device_count()
        if not 2 <= world_size <= min(8, torch.cuda.device_count()):
            print(f"python -m tpfuse tune: --nproc {world_size}; accepted are 2..{min(8, torch.cuda.device_count())} "
                  f"(one GPU per rank, {torch.cuda.device_count()} visible)", file=sys.stderr)
            return 2
        path = ranks.run_ranks(world_size, spawned_rank, plan, backend="nccl", timeout=args.timeout)[0]
    if path:
        print(f"tune: wrote {path}\n  auto follows it on this machine from the next process on; "
              f"python -m tpfuse explain shows it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
