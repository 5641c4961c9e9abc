"""Worked example of docs/patterns.md: a padded-vocab LM head and the pattern that fuses it.

The vocabulary (``VOCAB`` = 1000 words here) is split over W ranks in equal
shards rounded up to a multiple of 64 rows, as Megatron-style code pads the
vocabulary (W=2: 512 rows per rank, the last rank holds 488 real rows).
After the gather the model strips each rank's padding before concatenating:

    parts = [empty_like(local)] * W;  dist.all_gather(parts, local)
    logits = cat([parts[r][:, :real[r]] for r in ranks], dim=-1)      # [T, VOCAB]

No built-in pattern rewrites that (the rank bands are sliced before the cat):
``tpfuse.report()`` shows a near-miss.  ``REAL_COLUMNS`` below is the user
pattern that rewrites it into one ``tpfuse::all_gather_hidden`` that gathers
only the real columns (uneven widths), so the padding never crosses the wire.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn

from tpfuse import Candidate, Example, FusionPattern, Precondition, Reject
from tpfuse.passes import graph_facts as gf
from tpfuse.passes import DEFAULT_PRECONDITIONS, rank_bands

VOCAB, HIDDEN = 1000, 64


def shard_rows(world_size: int, vocab: int = VOCAB) -> int:
    return math.ceil(vocab / (64 * world_size)) * 64


def real_widths(world_size: int, vocab: int = VOCAB) -> list[int]:
    shard = shard_rows(world_size, vocab)
    return [max(0, min(shard, vocab - r * shard)) for r in range(world_size)]


class PaddedVocabHead(nn.Module):
    """Unmodified model code: nothing here knows about tpfuse."""

    def __init__(self, rank: int, world_size: int, vocab: int = VOCAB):
        super().__init__()
        self.world_size, self.real = world_size, real_widths(world_size, vocab)
        shard = shard_rows(world_size, vocab)
        g = torch.Generator().manual_seed(50 + rank)
        weight = torch.randn(shard, HIDDEN, generator=g) / HIDDEN**0.5
        weight[self.real[rank]:] = 0  # padding rows
        self.weight = nn.Parameter(weight)

    def forward(self, h):
        local = h @ self.weight.t()  # [T, SHARD]
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local)
        return torch.cat([p[:, : self.real[r]] for r, p in enumerate(parts)], dim=-1)


# --------------------------------------------------------------------------- the pattern


def match_real_columns(site):
    """Rank bands, each cut to its first ``real[r]`` columns, concatenated on the last dim."""
    cut = rank_bands(site)
    if cut is None:
        return None  # the gathered rows are used some other way: not this form
    ends, widths, slices = [], [], []
    for band in cut.bands:
        node, width = band, site.hidden_width
        user = next(iter(band.users)) if len(band.users) == 1 else None
        last = gf.ndim(band) - 1
        if (user is not None and user.target in gf.SLICES
                and gf.nonneg_dim(gf.arg(user, 1, "dim", 0), last + 1) == last
                and gf.arg(user, 2, "start", 0) in (0, None) and gf.arg(user, 4, "step", 1) == 1):
            node, width = user, gf.shape(user)[-1]
            slices.append(user)
        ends.append(node)
        widths.append(width)
    consumers = {u for end in ends for u in end.users}
    cat = consumers.pop() if len(consumers) == 1 else None
    if cat is None or not gf.is_cat(cat) or list(cat.args[0]) != ends:
        return None
    if not slices:
        return None  # an unsliced gather is the built-in patterns' job
    if gf.cat_dim(cat) != gf.ndim(cat) - 1:
        return Reject(f"{cat.name} concatenates the cut bands on dim {gf.cat_dim(cat)}, not the last")
    return Candidate(
        output=cat,
        region=(*cut.region, *cut.bands, *slices, cat),
        inputs=(site.local,),
        extra=(("real_widths", tuple(int(w) for w in widths)),),
    )


def every_rank_has_real_columns(site, candidate):
    widths = candidate.fact("real_widths")
    empty = [r for r, w in enumerate(widths) if w <= 0]
    if empty:
        return f"rank(s) {empty} hold only padding; the op needs at least one column per rank"
    return None


def gather_real_columns(x, *, hidden_widths, group_name, real_widths, rank):
    """The replacement: gather only the real columns of every rank (uneven widths)."""
    return torch.ops.tpfuse.all_gather_hidden(
        x[..., : real_widths[rank]].contiguous(), list(real_widths), group_name
    )


def reference(rows, *, hidden_widths, group_name, real_widths, rank):
    """What the matched region computes from the gathered ``[W*T, w]`` rows."""
    parts = rows.chunk(len(hidden_widths), dim=0)
    return torch.cat([p[..., :w] for p, w in zip(parts, real_widths)], dim=-1)


REAL_COLUMNS = FusionPattern(
    name="real_columns",
    match=match_real_columns,
    replacement=gather_real_columns,
    search=reference,
    example=Example(local_shape=(4, 8), world_size=2, facts={"real_widths": (8, 5)}),
    preconditions=(*DEFAULT_PRECONDITIONS,  # group resolves, dtype supported, static widths
                   Precondition("every_rank_has_real_columns", every_rank_has_real_columns)),
    priority=20,
    rank_dependent=True,  # the replacement slices this rank's own width
    description="per-rank padding stripped after the gather -> gather only the real columns",
)


# --------------------------------------------------------------------------- the walkthrough


def walkthrough(rank: int, world_size: int, cache_dir: str | None = None) -> dict:
    """Compile the head twice on this rank -- built-in patterns only, then with
    REAL_COLUMNS registered -- and compare both with the uncompiled model."""
    import os

    import torch._inductor.config

    import tpfuse

    if cache_dir is not None:  # one directory shared by all ranks: rank-dependent graphs must not mix
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
        torch._inductor.config.fx_graph_cache = True
    model = PaddedVocabHead(rank, world_size)
    h = torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(3))
    results = {}
    with torch.no_grad():
        expected = model(h)
        for label, scope in (("builtins only", ()), ("with REAL_COLUMNS", (REAL_COLUMNS,))):
            torch._dynamo.reset()
            with tpfuse.enabled(), tpfuse.pattern_scope(*scope):
                out = torch.compile(model, fullgraph=True)(h)
                rep = tpfuse.report()
            results[label] = {
                "equal": bool(torch.equal(out, expected)),
                "shape": tuple(out.shape),
                "matches": [(m.pattern, m.hidden_widths) for m in rep.matches],
                "near_misses": [n.reason for n in rep.near_misses],
                "report": str(rep),
            }
    return results


def main() -> int:
    import sys
    import tempfile

    from tpfuse.ranks import run_ranks

    with tempfile.TemporaryDirectory() as cache_dir:
        per_rank = run_ranks(2, walkthrough, cache_dir)
    ok = True
    for label in ("builtins only", "with REAL_COLUMNS"):
        print(f"\n== {label} (rank 0) ==\n{per_rank[0][label]['report']}")
        equal = all(r[label]["equal"] for r in per_rank)
        ok &= equal
        print(f"output {per_rank[0][label]['shape']} equals the uncompiled model on every rank: "
              f"{'yes' if equal else 'NO'}")
    ok &= all(r["with REAL_COLUMNS"]["matches"] == [("real_columns", tuple(real_widths(2)))]
              for r in per_rank)
    print("\nOK" if ok else "\nFAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    import sys

    sys.exit(main())
