"""Run a function on W local ranks: spawned processes, one process group.

``run_ranks(W, fn, *args)`` starts W processes on a free port, initialises the
default process group (gloo, or NCCL with one GPU per rank) in each, calls
``fn(rank, world_size, *args)`` and returns the per-rank results in rank order.
A failure on any rank raises here with that rank's traceback; a rank that dies
or does not finish within ``timeout`` seconds raises instead of hanging.

Used by ``python -m tpfuse demo`` and by the multi-process tests.
"""

from __future__ import annotations

import os
import queue
import socket
import time
import traceback

#: Never use NVLink multicast on the shared GPU hosts (docs/safety.md, "Multicast"). Set in
#: this process and in every rank it starts.
SAFE_GPU_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world_size, port, backend, fn, args, results):
    os.environ.update(SAFE_GPU_ENV)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    import torch
    import torch.distributed as dist

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
    except BaseException:  # report everything to the parent, which raises it
        results.put((rank, False, traceback.format_exc()))


def run_ranks(world_size, fn, *args, backend="gloo", timeout=300.0):
    import torch.multiprocessing as mp

    os.environ.update(SAFE_GPU_ENV)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_rank_main, args=(r, world_size, port, backend, fn, args, results))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    outcomes = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outcomes) < world_size:
            try:
                rank, ok, value = results.get(timeout=0.5)
                outcomes[rank] = (ok, value)
                continue
            except queue.Empty:
                pass
            missing = sorted(set(range(world_size)) - set(outcomes))
            dead = [r for r in missing if procs[r].exitcode is not None]
            if dead:
                time.sleep(0.5)  # a dying rank may still have its report in flight
                while not results.empty():
                    rank, ok, value = results.get()
                    outcomes[rank] = (ok, value)
                dead = [r for r in dead if r not in outcomes]
                if dead:
                    codes = {r: procs[r].exitcode for r in dead}
                    raise RuntimeError(f"rank(s) {dead} of {world_size} died without a report (exit codes {codes})")
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank(s) {missing} of {world_size} did not finish within {timeout}s")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    failures = [f"--- rank {r} ---\n{v}" for r, (ok, v) in sorted(outcomes.items()) if not ok]
    if failures:
        raise AssertionError("failure on rank(s):\n" + "\n".join(failures))
    return [outcomes[r][1] for r in range(world_size)]
