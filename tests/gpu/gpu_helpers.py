"""Helpers shared by the GPU tests (imported by the test modules and their spawned ranks)."""

import random

import pytest
import torch

_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32}


def needs(world_size):
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n < world_size:
        pytest.skip(f"needs {world_size} GPUs, found {n}")


def world_group():
    import torch.distributed as dist

    from tpfuse.compile_ops.groups import resolve_group

    return resolve_group(dist.group.WORLD.group_name)


def quiesce():
    """Every rank's GPU idle and every rank past this point: nobody is pushing now."""
    import torch.distributed as dist

    torch.cuda.synchronize()
    dist.barrier()
    torch.cuda.synchronize()


def bits(seed, shape, dtype, device="cuda"):
    """Random bit patterns of ``dtype`` (floats include NaNs and infinities)."""
    # A CUDA generator gives the same stream on every GPU, so each rank can
    # build every rank's input (and so the reference) without communicating.
    g = torch.Generator(device=device).manual_seed(seed)
    idt = _INT_OF_SIZE[dtype.itemsize]
    info = torch.iinfo(idt)
    return torch.randint(info.min, info.max, shape, generator=g, dtype=idt, device=device).view(dtype)


def as_int(t):
    return t.view(_INT_OF_SIZE[t.element_size()])


RING = 32  # inputs/outputs kept in flight, so the loop issues only delay + gather


def delayed_loop(rank, W, iters, T, widths, call, seed, max_delay_cycles=40000):
    """``iters`` gathers, each after a spin kernel of random length on this rank; returns mismatching iterations.

    The inputs are precomputed and the outputs checked every RING calls, so
    that between two gathers the stream holds only the delay: the GPU, not the
    host, sets the pace, and the ranks drift against each other by up to the
    delay.
    """
    dtype = torch.bfloat16
    xs = [bits(seed + j * 64 + rank, (T, widths[rank]), dtype) for j in range(RING)]
    refs = [
        as_int(torch.cat([bits(seed + j * 64 + r, (T, w), dtype) for r, w in enumerate(widths)], -1))
        for j in range(RING)
    ]
    rng = random.Random(seed * 31 + rank)
    bad = torch.zeros((), dtype=torch.int64, device="cuda")
    outs = []
    for i in range(iters):
        torch.cuda._sleep(rng.randint(0, max_delay_cycles))
        outs.append(call(xs[i % RING], i))
        if len(outs) == RING or i == iters - 1:
            for j, out in enumerate(outs):
                bad += (as_int(out) != refs[(i - len(outs) + 1 + j) % RING]).any()
            outs = []
    torch.cuda.synchronize()
    return int(bad)
