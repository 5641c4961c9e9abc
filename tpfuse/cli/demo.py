"""``python -m tpfuse demo``: tpfuse on spawned ranks, checked against torch.cat."""

from __future__ import annotations

import logging

import torch

from .errors import CommandError

log = logging.getLogger("tpfuse.demo")


def gather_check(rank: int, world_size: int, device: str) -> list[tuple]:
    """Gather random slabs of uneven, odd widths; compare bytes with torch.cat."""
    import tpfuse

    rows = []
    widths = [256 + 8 * r + (r % 2) for r in range(world_size)]
    for tokens in (1, 8, 128):
        for dtype in (torch.bfloat16, torch.float32):
            slabs = [
                torch.randn(tokens, w, generator=torch.Generator().manual_seed(97 * r + tokens))
                .to(dtype)
                .to(device)
                for r, w in enumerate(widths)
            ]
            out = tpfuse.all_gather_hidden(slabs[rank], hidden_widths=widths)
            expected = torch.cat(slabs, dim=-1)
            same = torch.equal(out.view(torch.uint8), expected.view(torch.uint8))
            rows.append((tokens, str(dtype).removeprefix("torch."), tuple(out.shape), same))
    return rows


def run(device: str = "cpu", nproc: int = 2, timeout: float = 300.0) -> int:
    from ..ranks import run_ranks

    backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda" and torch.cuda.device_count() < nproc:
        raise CommandError(f"--device cuda --nproc {nproc} needs {nproc} GPUs, found {torch.cuda.device_count()}; "
                           "accepted: --nproc up to the GPUs present, or --device cpu")
    print(f"tpfuse demo: {nproc} {backend} ranks on {device}, torch {torch.__version__}")
    log.info("spawning %d ranks (each imports torch: a few seconds)", nproc)
    per_rank = run_ranks(nproc, gather_check, device, backend=backend, timeout=timeout)

    print("\nall_gather_hidden: every rank's slab, concatenated along the hidden axis")
    print(f"{'T':>5} {'dtype':>9} {'output shape':>14}  bit-exact vs torch.cat on every rank")
    ok = True
    for i, (tokens, dtype, shape, _) in enumerate(per_rank[0]):
        same = all(rows[i][3] for rows in per_rank)
        ok &= same
        print(f"{tokens:>5} {dtype:>9} {str(shape):>14}  {'yes' if same else 'NO'}")

    from .demo_compile import run_compile_demo  # the compiler half

    ok &= run_compile_demo(device, nproc, timeout, backend)
    print("\nOK" if ok else "\nMISMATCH")
    return 0 if ok else 1
