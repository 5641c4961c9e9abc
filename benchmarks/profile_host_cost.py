"""Where an eager call's host time goes: each step of the op's call path, timed alone.

    PYTHONPATH=. torchrun --nproc-per-node 2 benchmarks/profile_host_cost.py [--profile]

A micro-benchmark of host time only (µs per call, best of 5 rounds of 2,000
calls, slowest rank), beside ``torch.add`` on the same machine.  Each row
times one step of ``torch.ops.tpfuse.all_gather_hidden`` at T=1 x 4096 bf16:
the dispatcher hops, the checks, the choice of backend, the launch.  With
``--profile`` rank 0 also prints cProfile's top functions over 2,000 op calls.
"""

import os

# Never NVLink multicast on the shared hosts (docs/safety.md, "Multicast"); set before torch loads NCCL.
os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
os.environ["NVSHMEM_DISABLE_NVLS"] = "1"

import argparse  # noqa: E402
import cProfile  # noqa: E402
import importlib  # noqa: E402
import io  # noqa: E402
import pstats  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import tpfuse  # noqa: E402,F401  (registers the op)
from tpfuse.compile_ops import dispatch, failures, program_order, validation, workspace  # noqa: E402
from tpfuse.compile_ops.backend import GatherCall  # noqa: E402
from tpfuse.compile_ops.groups import resolve_group  # noqa: E402

op_module = importlib.import_module("tpfuse.compile_ops.all_gather_hidden")


def _slowest(value):
    t = torch.tensor([value], device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def per_call(fn, n=2000, rounds=5):
    """Best round's µs per call of ``fn`` (host time; the GPU drains between rounds)."""
    for _ in range(50):
        fn()
    best = float("inf")
    for _ in range(rounds):
        torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
    torch.cuda.synchronize()
    dist.barrier()
    return _slowest(best)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    dist.init_process_group("nccl")
    rank, W = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(rank % torch.cuda.device_count())
    name = dist.group.WORLD.group_name
    group = resolve_group(name)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    widths = [4096] * W
    op = torch.ops.tpfuse.all_gather_hidden
    reference = {"torch.add (reference)": lambda: torch.add(x, 1),
                 "torch.empty (CUDA)": lambda: torch.empty(1, 4096 * W, dtype=x.dtype, device=x.device)}
    _print(rank, {label: per_call(fn) for label, fn in reference.items()})
    for forced in ("flag", "p2p"):
        os.environ["TPFUSE_BACKEND"] = forced
        ws = workspace.workspace(group, x.device.index)
        rows = {
            f"[{forced}] op": lambda: op(x, widths, name),
            f"[{forced}] op.default below autograd": _below(lambda: op.default(x, widths, name)),
            f"[{forced}] impl (no dispatcher)": lambda: op_module._all_gather_hidden_impl(x, widths, name),
            f"[{forced}] backend.gather": lambda b=next(o for o in dispatch.BACKENDS if o.name == forced): b.gather(
                x, widths, group),
        }
        if forced == "flag":
            call = GatherCall("cuda", x.dtype, 1, tuple(widths), group, forced)
            rows.update({
                "  resolve_group": lambda: resolve_group(name),
                "  check args": lambda: validation.check_gather_args(x, widths, group, -1),
                "  forced_backend": dispatch.forced_backend,
                "  GatherCall": lambda: GatherCall("cuda", x.dtype, 1, tuple(widths), group, "flag"),
                "  choose (flag)": lambda: dispatch.choose(call),
                "  workspace lookup": lambda: workspace.workspace(group, x.device.index),
                "  raise_if_failed": lambda: failures.raise_if_failed(ws),
                "  raw_stream": lambda: program_order.raw_stream(x.device.index),
                "  current_device": torch.cuda.current_device,
                "  is_current_stream_capturing": torch.cuda.is_current_stream_capturing,
            })
        _print(rank, {label: per_call(fn) for label, fn in rows.items()})
        if args.profile and forced == "flag":
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(2000):
                op(x, widths, name)
            prof.disable()
            torch.cuda.synchronize()
            if rank == 0:
                buf = io.StringIO()
                pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
                print(buf.getvalue())
    del os.environ["TPFUSE_BACKEND"]
    if rank == 0:
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, W={W}")
    dist.barrier()
    dist.destroy_process_group()


def _print(rank, results):
    if rank == 0:
        for label, us in results.items():
            print(f"{label:<42} {us:8.2f} µs", flush=True)


def _below(fn):
    def call():
        with torch._C._AutoDispatchBelowAutograd():
            return fn()
    return call


if __name__ == "__main__":
    main()
