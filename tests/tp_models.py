"""Small tensor-parallel models, written the three ways users write them.

Shared by the gloo numerics tests, the GPU test and the demo.  Every model is
*unmodified* TP code: nothing in it knows about tpfuse.  Each rank holds a
different column shard (seeded by rank), the input is the same on every rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn as nn

HIDDEN, SHARD = 32, 16  # input width, columns per rank


def _shard(rank: int, rows: int, cols: int, device) -> nn.Parameter:
    g = torch.Generator().manual_seed(1000 + rank)
    return nn.Parameter(torch.randn(rows, cols, generator=g).to(device) / cols**0.5)


class FuncolMLP(nn.Module):
    """Two column-parallel linears, each gathered with ``funcol.all_gather_tensor``."""

    rewrites = 2

    def __init__(self, rank: int, world_size: int, device="cpu"):
        super().__init__()
        self.w1 = _shard(rank, SHARD, HIDDEN, device)
        self.w2 = _shard(rank + 100, SHARD, SHARD * world_size, device)
        self.b2 = _shard(rank + 200, 1, SHARD, device)

    def forward(self, x):
        group = dist.group.WORLD
        h = funcol.all_gather_tensor(x @ self.w1.t(), gather_dim=x.dim() - 1, group=group)
        y = torch.relu(h) @ self.w2.t() + self.b2[0]
        return funcol.all_gather_tensor(y, gather_dim=y.dim() - 1, group=group)


class C10dMLP(nn.Module):
    """In-place c10d: ``all_gather_into_tensor`` + view/permute rearrangement, then
    ``all_gather(list)`` + ``cat``."""

    rewrites = 2

    def __init__(self, rank: int, world_size: int, device="cpu"):
        super().__init__()
        self.world_size = world_size
        self.w1 = _shard(rank, SHARD, HIDDEN, device)
        self.w2 = _shard(rank + 100, SHARD, SHARD * world_size, device)

    def forward(self, x):
        W = self.world_size
        y = x @ self.w1.t()
        T = y.shape[0]
        stacked = torch.empty(W * T, y.shape[1], dtype=y.dtype, device=y.device)
        dist.all_gather_into_tensor(stacked, y)
        h = stacked.view(W, T, -1).permute(1, 0, 2).reshape(T, -1)
        z = torch.relu(h) @ self.w2.t()
        parts = [torch.empty_like(z) for _ in range(W)]
        dist.all_gather(parts, z)
        return torch.cat(parts, dim=-1)


def dtensor_mlp(rank: int, world_size: int, device="cpu") -> nn.Module:
    """``nn.Linear`` layers with ``ColwiseParallel(output_layouts=Replicate())``, 3-D input."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    torch.manual_seed(7)  # the full weights are identical on every rank before sharding
    model = nn.Sequential(
        nn.Linear(HIDDEN, SHARD * world_size),
        nn.ReLU(),
        nn.Linear(SHARD * world_size, SHARD * world_size),
    ).to(device)
    mesh = init_device_mesh(torch.device(device).type, (world_size,))
    plan = {"0": ColwiseParallel(output_layouts=Replicate()),
            "2": ColwiseParallel(output_layouts=Replicate())}
    model = parallelize_module(model, mesh, plan)
    model.rewrites = 2
    return model


def tokens(T: int, device="cpu", three_d: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(T)
    # decode (T == 1) with B == 1 is the case where funcol emits its view form
    shape = (1 if T == 1 else 2, T, HIDDEN) if three_d else (T, HIDDEN)
    return torch.randn(*shape, generator=g).to(device)


class MisrearrangedC10d(nn.Module):
    """A negative control: ``view(T, W, -1)`` instead of ``view(W, T, -1)`` does not put
    the ranks' columns side by side.  No built-in pattern rewrites it (near-miss); a
    deliberately careless pattern that does must be caught by the numerics check."""

    def __init__(self, rank: int, world_size: int, device="cpu"):
        super().__init__()
        self.world_size = world_size
        self.w1 = _shard(rank, SHARD, HIDDEN, device)

    def forward(self, x):
        W = self.world_size
        y = x @ self.w1.t()
        T = y.shape[0]
        stacked = torch.empty(W * T, y.shape[1], dtype=y.dtype, device=y.device)
        dist.all_gather_into_tensor(stacked, y)
        return stacked.view(T, W, -1).permute(1, 0, 2).reshape(T, -1)
