"""Helpers shared by the GPU tests (imported by the test modules and their spawned ranks)."""

import pytest
import torch


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
