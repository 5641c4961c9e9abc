"""Group lifecycle on real GPUs: a workspace dies with its group, and several TP groups coexist.

- Create the default group, gather through the push path, destroy it, create it again
  (the new group takes the old one's name), gather again: bit-exact, on a new workspace.
- A 2 x 2 DP x TP mesh on 4 GPUs: each TP group gathers its own data on its own workspace.
"""

import os

import pytest
import torch

from gpu_helpers import as_int, bits, needs
from multiproc import free_port, run_ranks

pytestmark = [pytest.mark.gpu, pytest.mark.multigpu]


def _gather_exact(widths, group_name, seed, rank, ranks):
    """Gather through the op on ``group_name``; compare with every rank's input, built locally."""
    xs = [bits(seed * 16 + r, (8, w), torch.bfloat16) for r, w in zip(ranks, widths)]
    out = torch.ops.tpfuse.all_gather_hidden(xs[ranks.index(rank)], widths, group_name)
    return torch.equal(as_int(out), as_int(torch.cat(xs, dim=-1)))


def _recreate(rank, world_size, second_port):
    import torch.distributed as dist

    from tpfuse.compile_ops import workspace
    from tpfuse.compile_ops.groups import resolve_group

    os.environ["TPFUSE_BACKEND"] = "p2p"
    widths = [1024 + 256 * r for r in range(world_size)]
    name = dist.group.WORLD.group_name
    first = _gather_exact(widths, name, 1, rank, list(range(world_size)))
    old_ws = workspace.workspace(resolve_group(name), rank, establish=False)
    dist.destroy_process_group()
    os.environ["MASTER_PORT"] = str(second_port)
    dist.init_process_group("nccl", rank=rank, world_size=world_size, device_id=torch.device("cuda", rank))
    name_again = dist.group.WORLD.group_name
    second = _gather_exact(widths, name_again, 2, rank, list(range(world_size)))
    new_ws = workspace.workspace(resolve_group(name_again), rank, establish=False)
    return {"first": first, "second": second, "same_name": name == name_again,
            "new_workspace": new_ws is not None and new_ws is not old_ws}


@pytest.mark.parametrize("W", [2, 4])
def test_destroy_and_recreate_the_group(W):
    needs(W)
    for rank, res in enumerate(run_ranks(W, _recreate, free_port(), backend="nccl", timeout=300)):
        assert res["first"] and res["second"], (rank, res)
        assert res["new_workspace"], (rank, res)


def _mesh(rank, world_size):
    import torch.distributed as dist

    os.environ["TPFUSE_BACKEND"] = "p2p"
    tp_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group
    mine = tp_groups[rank // 2]
    ranks = [0, 1] if rank < 2 else [2, 3]
    widths = [512, 768]
    return _gather_exact(widths, mine.group_name, 7 + rank // 2, rank, ranks)


def test_dp_by_tp_mesh_each_tp_group_gathers_its_own():
    needs(4)
    assert run_ranks(4, _mesh, backend="nccl", timeout=300) == [True] * 4
