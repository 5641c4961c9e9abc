"""The compiler half of ``python -m tpfuse demo``: an unmodified TP model, compiled with tpfuse.

The model is plain tensor-parallel code, written the way people write it
(no tpfuse in it): an MLP whose column-parallel up-projection is gathered with
``funcol.all_gather_tensor``, then an ``nn.Linear`` LM head parallelised with
DTensor's ``ColwiseParallel(output_layouts=Replicate())`` (a vocab-parallel
head with replicated logits).  Each rank compiles it with ``tpfuse.enabled()``
and Inductor; the demo prints the report, the before/after of each rewritten
region, and checks that the compiled outputs equal the uncompiled model's,
bit for bit.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn as nn

HIDDEN, SHARD, VOCAB_SHARD = 64, 32, 48


class FuncolMLP(nn.Module):
    def __init__(self, rank: int, device: str):
        super().__init__()
        g = torch.Generator().manual_seed(1234 + rank)  # each rank holds its own column shard
        self.up = nn.Parameter((torch.randn(SHARD, HIDDEN, generator=g) / HIDDEN**0.5).to(device))

    def forward(self, x):
        h = x @ self.up.t()  # [T, SHARD] on each rank
        h = funcol.all_gather_tensor(h, gather_dim=h.dim() - 1, group=dist.group.WORLD)
        # relu, not gelu: Inductor's fused gelu rounds differently from eager, and the
        # demo checks the compiled model bit for bit against the uncompiled one
        return torch.relu(h)  # [T, SHARD * W]


class TinyTPModel(nn.Module):
    def __init__(self, rank: int, world_size: int, device: str):
        super().__init__()
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Replicate
        from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

        self.mlp = FuncolMLP(rank, device)
        torch.manual_seed(7)  # the full LM head is identical on every rank before sharding
        self.lm_head = nn.Linear(SHARD * world_size, VOCAB_SHARD * world_size, bias=False).to(device)
        mesh = init_device_mesh(torch.device(device).type, (world_size,))
        parallelize_module(self, mesh, {"lm_head": ColwiseParallel(output_layouts=Replicate())})

    def forward(self, x):
        return self.lm_head(self.mlp(x))  # [T, VOCAB_SHARD * W] logits on every rank


def compile_check(rank: int, world_size: int, device: str) -> dict:
    import warnings

    import tpfuse

    # The model calls funcol.all_gather_tensor, as most TP code in use does; torch 2.13
    # marks that name deprecated on each eager call.  Only that note is hidden, and only in the demo.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\._functional_collectives\.all_gather_tensor` "
                            r"is deprecated", category=FutureWarning)

    torch.manual_seed(0)
    model = TinyTPModel(rank, world_size, device)
    x = torch.randn(8, HIDDEN, device=device)
    # an earlier run's FX graph cache entry may serve the graph: its report is stored with it
    with torch.no_grad(), tpfuse.enabled():
        expected = model(x)
        got = torch.compile(model, fullgraph=True)(x)
    rep = tpfuse.report()
    return {
        "equal": bool(torch.equal(expected, got)),
        "shape": tuple(got.shape),
        "report": str(rep),
        "rewritten": rep.rewritten,
        "near_misses": len(rep.near_misses),
        "regions": [(m.pattern, m.before, m.after) for m in rep.matches],
    }


def run_compile_demo(device: str, nproc: int, timeout: float, backend: str) -> bool:
    from ..ranks import run_ranks

    print(f"\ntorch.compile of an unmodified {nproc}-rank TP model with tpfuse.enable() (Inductor)")
    per_rank = run_ranks(nproc, compile_check, device, backend=backend, timeout=timeout)
    first = per_rank[0]
    print(first["report"])
    for pattern, before, after in first["regions"]:
        print(f"\n[{pattern}] before:")
        print("\n".join("    " + line for line in before))
        print("  after:")
        print("\n".join("    " + line for line in after))
    equal = all(r["equal"] for r in per_rank)
    same_decisions = all(r["rewritten"] == first["rewritten"] for r in per_rank)
    print(f"\n{first['rewritten']} gather(s) rewritten on every rank: {'yes' if same_decisions else 'NO'}; "
          f"compiled output {first['shape']} equals the uncompiled model on every rank: "
          f"{'yes' if equal else 'NO'}")
    return equal and same_decisions and first["rewritten"] == 2
