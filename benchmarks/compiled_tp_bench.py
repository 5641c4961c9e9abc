"""Shared by the compiled end-to-end benchmarks (``bench_hf_decode.py``, ``bench_eagle_draft.py``), and
by the kernel benchmarks for timing CUDA-graph replays (``replay_us``, ``graph_us``).

What a configuration is, how it is compiled in isolation from the others, how a run is timed
(CUDA events on GPUs, ``perf_counter`` on the CPU, the slowest rank of every sample), what is
counted per configuration, and the printed / written outputs.  The scripts set the
no-multicast variables before they import torch and then this module.

Configurations are ``(mode, variant)``:

- modes: ``default`` is ``torch.compile(fn)``, ``reduce-overhead`` is
  ``torch.compile(fn, mode="reduce-overhead")`` (CUDA graphs; CUDA only);
- variants: ``off`` (tpfuse's passes not installed), ``on`` (``tpfuse.enable()``),
  ``fuse`` (``tpfuse.enable(fuse_linear=True)``).

``tpfuse.enable`` is global, and Inductor reads the installed pass when it compiles, so each
configuration is compiled and warmed up (every graph it will run compiled, CUDA graphs recorded)
inside ``with tpfuse.enabled(**config):`` (``off``: after ``tpfuse.disable()``) and then kept.
Each configuration compiles with a backend of its own (``inductor_backend``: what
``torch.compile(mode=...)`` runs, as a new function), so Dynamo keeps one cache entry per
configuration and they can alternate in the timed rounds.  A recompile during the timed rounds
would run under whatever is installed then, so every compile after the warm-up is counted and
flagged, and the tpfuse calls each configuration makes are counted (``off`` must make none).
"""

from __future__ import annotations

import collections
import contextlib
import faulthandler
import importlib.metadata
import json
import os
import platform
import signal
import statistics
import sys
import time

import torch
import torch.distributed as dist

import tpfuse
from tpfuse.compile_ops import dispatch

MODES = {"default": None, "reduce-overhead": "reduce-overhead"}
VARIANTS = {"off": None, "on": {}, "fuse": {"fuse_linear": True}}


# --------------------------------------------------------------------------- set-up


def parse_list(text, allowed=None, kind=str):
    items = [kind(x) for x in text.split(",") if x.strip()]
    if allowed is not None:
        bad = [x for x in items if x not in allowed]
        if bad:
            raise SystemExit(f"unknown {bad}; accepted: {', '.join(allowed)}")
    return items


def init_distributed(device: str):
    """(rank, W, torch.device): NCCL on GPUs, gloo on the CPU; one rank per GPU (``LOCAL_RANK``)."""
    # A run stopped from outside (torchrun forwards SIGTERM) prints where every thread was.
    faulthandler.register(signal.SIGTERM, all_threads=True, chain=True)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda but no GPU is visible; use --device cpu --tiny for a smoke run")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
        dist.init_process_group("nccl", device_id=dev)
    else:
        dev = torch.device("cpu")
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), dev


def raise_recompile_limit(limit: int = 64) -> None:
    """Every configuration (and batch size) adds entries to the same code object's cache."""
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(limit, getattr(torch._dynamo.config, name)))
    if hasattr(torch._dynamo.config, "accumulated_recompile_limit"):
        torch._dynamo.config.accumulated_recompile_limit = max(
            4 * limit, torch._dynamo.config.accumulated_recompile_limit)


def versions(device: torch.device, W: int) -> dict:
    info = {"W": W, "device": device.type, "torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if "transformers" in sys.modules:
        info["transformers"] = sys.modules["transformers"].__version__
    else:
        try:
            info["transformers"] = importlib.metadata.version("transformers") + " (not used)"
        except importlib.metadata.PackageNotFoundError:
            info["transformers"] = "not installed (not used)"
    if device.type == "cuda":
        info["card"] = torch.cuda.get_device_name(device)
        info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    else:
        info["card"] = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
        info["nccl"] = None
    return info


def versions_line(info: dict) -> str:
    parts = [f"card: {info['W']} x {info['card']}", f"torch {info['torch']}", f"triton {info['triton']}"]
    parts.append(f"transformers {info['transformers']}")
    parts.append(f"NCCL {info['nccl']}" if info["nccl"] else "gloo")
    parts.append(f"Python {info['python']}")
    return " | ".join(parts)


class Log:
    """Prints on rank 0 and appends the same lines to ``<out>/<name>.log``."""

    def __init__(self, rank: int, out: str | None, name: str):
        self.rank = rank
        self.path = None
        if rank == 0 and out:
            os.makedirs(out, exist_ok=True)
            self.path = os.path.join(out, name + ".log")
            open(self.path, "w").close()

    def __call__(self, *lines: str) -> None:
        if self.rank != 0:
            return
        text = "\n".join(lines)
        print(text, flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(text + "\n")


def write_json(out: str | None, name: str, payload: dict, rank: int) -> None:
    if rank != 0 or not out:
        return
    os.makedirs(out, exist_ok=True)
    tmp = os.path.join(out, name + ".json.tmp")
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1, default=str)
    os.replace(tmp, os.path.join(out, name + ".json"))


# --------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Elapsed milliseconds of a region: CUDA events on GPUs (the device's time, which includes
    every wait for the host), ``perf_counter`` after the region's work on the CPU."""

    def __init__(self, device: torch.device):
        self.device = device

    @contextlib.contextmanager
    def __call__(self, into: list):
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            end.synchronize()
            into.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            yield
            into.append((time.perf_counter() - t0) * 1e3)


def replay_us(graph, calls: int, repeats: int) -> list[float]:
    """µs per call of each of ``repeats`` timed replays of ``graph``, which holds ``calls`` calls (CUDA events:
    the device's time of the whole replay, divided by the calls)."""
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / calls)
    return samples


def graph_us(record, calls: int = 20, repeats: int = 30) -> list[float]:
    """``replay_us`` of a graph of ``calls`` calls of ``record()``: run once first (what it launches is
    compiled and loaded outside the capture), then captured, replayed three times untimed."""
    record()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            record()
    for _ in range(3):
        graph.replay()
    return replay_us(graph, calls, repeats)


def slowest(values, device: torch.device) -> list[float]:
    """The element-wise maximum over ranks (every rank passes the same number of values)."""
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def spread(samples) -> dict:
    s = sorted(samples)
    if not s:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    q = statistics.quantiles(s, n=4, method="inclusive") if len(s) > 1 else [s[0]] * 3
    return {"median": statistics.median(s), "min": s[0], "max": s[-1], "q1": q[0], "q3": q[2], "n": len(s)}


def fmt_spread(d: dict, digits: int = 3) -> str:
    return f"{d['median']:.{digits}f} [{d['min']:.{digits}f}-{d['max']:.{digits}f}]"


def wall(device: torch.device, fn):
    """(result, seconds) of ``fn()`` after the device finished; the slowest rank's seconds."""
    sync(device)
    dist.barrier()
    t0 = time.perf_counter()
    result = fn()
    sync(device)
    seconds = time.perf_counter() - t0
    return result, slowest([seconds], device)[0]


# --------------------------------------------------------------------------- configurations


def graph_break_count() -> int:
    return sum(torch._dynamo.utils.counters["graph_break"].values())


def graph_break_reasons() -> dict:
    return dict(torch._dynamo.utils.counters["graph_break"])


def compiled_graph_count() -> int:
    """Graphs Dynamo handed to a backend so far (a recompile adds one)."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def fx_cache_hits() -> int:
    return torch._dynamo.utils.counters["inductor"]["fxgraph_cache_hit"]


def chosen_backends() -> collections.Counter:
    return collections.Counter(dispatch.chosen)


def counter_delta(after: collections.Counter, before: collections.Counter) -> dict:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


@contextlib.contextmanager
def variant_installed(variant: str):
    """tpfuse as the variant asks, for the compile and warm-up of one configuration."""
    config = VARIANTS[variant]
    if config is None:
        tpfuse.disable()
        yield
        return
    with tpfuse.enabled(**config):
        yield


def inductor_backend(mode: str):
    """Inductor in ``mode``, as a backend of this configuration's own.

    ``torch.compile(fn, mode=m)`` hands Dynamo an Inductor wrapper that compares *equal* to every
    other wrapper of the same mode, so a second ``torch.compile`` of the same function (the
    ``on`` configuration after ``off``) reuses the first one's compiled code without compiling,
    whatever tpfuse has installed since.  This backend does what that wrapper does --
    ``compile_fx(gm, inputs, config_patches=list_mode_options(m))``, ``{"triton.cudagraphs": True}``
    for reduce-overhead -- but is a new function per configuration, so Dynamo keeps one cache
    entry per configuration.  The tpfuse pass is read from Inductor's global config at compile
    time, as under ``torch.compile(mode=m)``.
    """
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    patches = dict(list_mode_options(MODES[mode])) if MODES[mode] else {}

    def backend(gm, example_inputs):
        return compile_fx(gm, example_inputs, config_patches=patches)

    def reset():
        # torch._dynamo.reset() calls this, as it calls the wrapper's: CUDA-graph trees go with the code
        if patches.get("triton.cudagraphs"):
            from torch._inductor.cudagraph_trees import reset_cudagraph_trees

            reset_cudagraph_trees()

    backend.reset = reset
    backend.__name__ = f"inductor_{mode.replace('-', '_')}"
    return backend


def compile_fn(fn, mode: str):
    return torch.compile(fn, backend=inductor_backend(mode), dynamic=False)


def mark_step() -> None:
    """A new CUDA-graph-trees iteration before each step (a no-op without CUDA graphs)."""
    torch.compiler.cudagraph_mark_step_begin()


def tpfuse_summary(report) -> dict:
    """What the pass did in the graphs of one configuration's compile."""
    return {
        "graphs": len(report.graphs),
        "rewritten": report.rewritten,
        "matches": [{"pattern": m.pattern, "widths": list(m.hidden_widths), "producer": str(m.producer),
                     "linear_fusion": m.linear_fusion, "skip_entry_sync": m.skip_entry_sync}
                    for m in report.matches],
        "fused_linear": sum(1 for m in report.matches if (m.linear_fusion or "").startswith("fused ")),
        "near_misses": [f"{n.pattern}: {n.reason}" for n in report.near_misses],
        "other_collectives": len(report.other_collectives),
        "table": str(report),
    }


def config_name(mode: str, variant: str) -> str:
    return f"{mode}/{variant}"


def order_for_round(configs: list, r: int) -> list:
    """Round r starts at a different configuration, so that none always runs first or last."""
    k = r % len(configs)
    return configs[k:] + configs[:k]


def short_backends(d: dict) -> str:
    return ",".join(f"{k}:{v}" for k, v in sorted(d.items())) or "-"


def failures(rows: list, key: str, expect_rewritten: int) -> list[str]:
    """What must not pass silently: a configuration that failed, tokens other than ``off``'s (or
    other than its own warm-up's), a tpfuse configuration that rewrote fewer gathers than the
    model has or whose op never ran, tpfuse running in ``off`` (configurations not isolated), a
    recompile during the timed rounds."""
    out = []
    for row in rows:
        where = f"{key}={row[key]} {row['name']}"
        if "error" in row:
            out.append(f"{where}: {row['error']}")
            continue
        if row.get("same_tokens_as_off") is False:
            out.append(f"{where}: tokens differ from off ({row['token_mismatch']})")
        if row.get("rounds_with_other_tokens") or row.get("warmup_deterministic") is False:
            out.append(f"{where}: tokens differ between its own runs")
        used = sum(row.get("backends_warmup", {}).values()) + sum(row.get("backends_timed", {}).values())
        tp = row.get("tpfuse")
        if row["variant"] == "off" and used:
            out.append(f"{where}: tpfuse ran in the off configuration ({row['backends_warmup']} | "
                       f"{row.get('backends_timed')}): the configurations are not isolated")
        if row["variant"] != "off":
            if tp is not None and tp["rewritten"] < expect_rewritten:
                out.append(f"{where}: tpfuse rewrote {tp['rewritten']} of the {expect_rewritten} hidden-axis "
                           f"gathers ({'; '.join(tp['near_misses']) or 'no near-miss recorded'})")
            if not used:
                out.append(f"{where}: the tpfuse op never ran")
        if row.get("recompiles_timed"):
            out.append(f"{where}: recompiled {row['recompiles_timed']} time(s) during the timed rounds")
    return out


def start(args, benchmark: str):
    """Process group, versions and log of one run: (rank, W, device, info, name, log, t_start).

    Drops reduce-overhead from ``args.modes`` on the CPU (it needs CUDA graphs), saying so."""
    rank, W, device = init_distributed(args.device)
    raise_recompile_limit()
    info = versions(device, W)
    name = f"{benchmark}_w{W}"
    log = Log(rank, args.out, name)
    t_start = time.perf_counter()
    log(versions_line(info))
    if device.type == "cpu" and "reduce-overhead" in args.modes:
        log("reduce-overhead needs CUDA graphs: dropped on the CPU")
        args.modes = [m for m in args.modes if m != "reduce-overhead"]
    return rank, W, device, info, name, log, t_start


def out_of_time(args, t_start: float, next_s: float, device: torch.device) -> bool:
    """Whether the next piece (as long as ``next_s``, the last one) would pass ``--time-limit-s``:
    decided on the slowest rank, so every rank skips alike."""
    stop = args.time_limit_s and time.perf_counter() - t_start + next_s > args.time_limit_s
    return bool(slowest([1.0 if stop else 0.0], device)[0])


def finish(rank: int, device: torch.device, code: int = 0) -> None:
    """Exit without ``destroy_process_group``: it can hang once CUDA graphs captured NCCL
    collectives (the ``off`` graphs do; docs/benchmarks.md, the decode step).  Every rank is done
    with NCCL after this barrier; the watchdog still catches a stuck barrier."""
    print(f"rank {rank}: finished, tearing down", flush=True)
    faulthandler.dump_traceback_later(120, exit=True)
    dist.barrier()
    sync(device)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
