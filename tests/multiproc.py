"""Run a function on W real ranks (spawned processes, gloo by default).

``run_ranks(W, fn, *args)`` starts W processes on a free port, initialises the
default process group in each, calls ``fn(rank, world_size, *args)`` and
returns the per-rank results in rank order.  A failure on any rank raises in
the test with that rank's traceback; a rank that does not finish within
``timeout`` seconds fails the test instead of hanging it.
"""

from __future__ import annotations

import os
import queue
import socket
import traceback

import torch.multiprocessing as mp

SAFE_GPU_ENV = {
    # Never use NVLink multicast on the shared GPU hosts (CONTEXT §4).
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, backend, fn, args, results):
    import torch
    import torch.distributed as dist

    os.environ.update(SAFE_GPU_ENV)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        kwargs = {}
        if backend == "nccl":
            torch.cuda.set_device(rank)
            kwargs["device_id"] = torch.device("cuda", rank)
        dist.init_process_group(backend, rank=rank, world_size=world_size, **kwargs)
        try:
            results.put((rank, True, fn(rank, world_size, *args)))
        finally:
            dist.destroy_process_group()
    except BaseException:  # report everything, including KeyboardInterrupt
        results.put((rank, False, traceback.format_exc()))


def run_ranks(world_size, fn, *args, backend="gloo", timeout=180.0):
    os.environ.update(SAFE_GPU_ENV)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(r, world_size, port, backend, fn, args, results))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    outcomes = {}
    try:
        for _ in range(world_size):
            rank, ok, value = results.get(timeout=timeout)
            outcomes[rank] = (ok, value)
    except queue.Empty:
        missing = sorted(set(range(world_size)) - set(outcomes))
        raise TimeoutError(
            f"rank(s) {missing} of {world_size} did not finish within {timeout}s"
        ) from None
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    failures = [f"--- rank {r} ---\n{v}" for r, (ok, v) in sorted(outcomes.items()) if not ok]
    if failures:
        raise AssertionError("failure on rank(s):\n" + "\n".join(failures))
    return [outcomes[r][1] for r in range(world_size)]
