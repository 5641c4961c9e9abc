"""Worked example of docs/patterns.md: a serving framework's own opaque gather op.

Serving frameworks wrap the gather in a custom op of their own, so Inductor
(and tpfuse) never sees the collective inside.  vLLM's, for example, is
``all_gather(tensor, dim, world_size, group_name)``: ``all_gather_into_tensor``
on dim 0, then a movedim/reshape that concatenates the ranks' tensors along
``dim``, with a fake kernel that returns the gathered shape; ``group_name``
names one of the framework's own groups, not a c10d group.

``myserve::all_gather`` below has that public signature and those semantics,
written here from scratch (nothing is imported from a framework).  The model
code calls it like a framework's column-parallel LM head does.  No built-in
pattern anchors on it, so ``tpfuse.report()`` lists it as a near-miss.
``MYSERVE_GATHER`` is the pattern that anchors on the op and rewrites a gather
along the last axis into ``tpfuse::all_gather_hidden``.

    python examples/framework_gather_op.py      # the walkthrough on 2 gloo ranks
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from tpfuse import AnchorArgs, Candidate, Example, FusionPattern, Reject
from tpfuse.passes import DEFAULT_PRECONDITIONS

HIDDEN, VOCAB_PER_RANK = 64, 48
GROUP = "tp:0"  # the framework's name for its tensor-parallel group

# --------------------------------------------------------------------------- the framework

_gather_dim0 = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # newer name first

#: The framework's own registry: its group names -> process groups.
FRAMEWORK_GROUPS: dict[str, dist.ProcessGroup] = {}


def init_framework_groups() -> None:
    """One tensor-parallel group over every rank, registered under the framework's name."""
    FRAMEWORK_GROUPS[GROUP] = dist.new_group(list(range(dist.get_world_size())))


@torch.library.custom_op("myserve::all_gather", mutates_args=())
def all_gather(tensor: torch.Tensor, dim: int, world_size: int, group_name: str) -> torch.Tensor:
    """Every rank's ``tensor``, concatenated along ``dim``."""
    if dim < 0:
        dim += tensor.dim()
    size = tensor.shape
    stacked = tensor.new_empty((world_size * size[0], *size[1:]))
    _gather_dim0(stacked, tensor.contiguous(), group=FRAMEWORK_GROUPS[group_name])
    moved = stacked.reshape(world_size, *size).movedim(0, dim)
    return moved.reshape(*size[:dim], world_size * size[dim], *size[dim + 1:])


@all_gather.register_fake
def _(tensor, dim, world_size, group_name):
    if dim < 0:
        dim += tensor.dim()
    size = list(tensor.shape)
    size[dim] = size[dim] * world_size
    return tensor.new_empty(size)


class VocabParallelHead(nn.Module):
    """Unmodified framework-style model code: nothing here knows about tpfuse."""

    def __init__(self, rank: int, world_size: int):
        super().__init__()
        g = torch.Generator().manual_seed(70 + rank)
        self.weight = nn.Parameter(torch.randn(VOCAB_PER_RANK, HIDDEN, generator=g) / HIDDEN**0.5)
        self.world_size = world_size

    def forward(self, h):
        local = h @ self.weight.t()  # [T, VOCAB_PER_RANK]
        return torch.ops.myserve.all_gather(local, -1, self.world_size, GROUP)


# --------------------------------------------------------------------------- the pattern


def framework_group(group_name):
    """The group resolver: the framework's group name -> its ProcessGroup."""
    return FRAMEWORK_GROUPS[group_name]


def match_last_dim_gather(site):
    """``myserve::all_gather(x, dim, W, group)`` with ``dim`` the last axis of ``x``."""
    dim, rank = site.arg("dim"), site.facts.ndim(site.local)
    if not isinstance(dim, int):
        return Reject(f"{site.anchor.name}: dim {dim!r} is not a literal int")
    if site.facts.nonneg_dim(dim, rank) != rank - 1:
        return Reject(f"{site.anchor.name} gathers along dim {dim} of a {rank}-D tensor, "
                      "not along the last (hidden) axis")
    return Candidate(output=site.anchor, region=(), inputs=(site.local,))


def gather_hidden(x, *, hidden_widths, group_name):
    """The replacement: one tpfuse gather along the hidden axis."""
    return torch.ops.tpfuse.all_gather_hidden(x, list(hidden_widths), group_name)


def reference(rows, *, hidden_widths, group_name):
    """What the op computes from the gathered ``[W*T, w]`` rows."""
    return torch.cat(rows.chunk(len(hidden_widths), dim=0), dim=-1)


MYSERVE_GATHER = FusionPattern(
    name="myserve_all_gather",
    anchors=(torch.ops.myserve.all_gather.default,),
    anchor_args=AnchorArgs(local="tensor", world_size="world_size", group="group_name"),
    group_resolver=framework_group,
    match=match_last_dim_gather,
    replacement=gather_hidden,
    search=reference,
    example=Example(local_shape=(4, 8), world_size=2),
    preconditions=DEFAULT_PRECONDITIONS,  # group resolves, dtype supported, static widths
    description="a serving framework's opaque all_gather on the last axis -> tpfuse::all_gather_hidden",
)


# --------------------------------------------------------------------------- the walkthrough


def compile_and_compare(model, inputs, *, dynamic, scope=()) -> dict:
    """Compile ``model`` once with tpfuse (and the patterns in ``scope``), run it on every
    input, and compare with the uncompiled model bit for bit."""
    import tpfuse

    torch._dynamo.reset()
    with torch.no_grad(), tpfuse.enabled(), tpfuse.pattern_scope(*scope):
        compiled = torch.compile(model, fullgraph=True, dynamic=dynamic)
        outs = [compiled(h) for h in inputs]
        rep = tpfuse.report()
        equal = [bool(torch.equal(out, model(h))) for out, h in zip(outs, inputs)]
    return {
        "equal": equal,
        "shapes": [tuple(o.shape) for o in outs],
        "graphs": len(rep.graphs),
        "from_cache": [g.from_cache for g in rep.graphs],
        "matches": [(m.pattern, m.hidden_widths) for m in rep.matches],
        "near_misses": [f"{n.pattern}: {n.reason}" for n in rep.near_misses],
        "report": str(rep),
    }


def tokens(T: int) -> torch.Tensor:
    return torch.randn(T, HIDDEN, generator=torch.Generator().manual_seed(T))


def walkthrough(rank: int, world_size: int) -> dict:
    """Without the pattern, then with it at T=1, T=7, and one graph for every T."""
    if GROUP not in FRAMEWORK_GROUPS:
        init_framework_groups()
    model = VocabParallelHead(rank, world_size)
    return {
        "no pattern": compile_and_compare(model, [tokens(7)], dynamic=False),
        "T=1": compile_and_compare(model, [tokens(1)], dynamic=False, scope=(MYSERVE_GATHER,)),
        "T=7": compile_and_compare(model, [tokens(7)], dynamic=False, scope=(MYSERVE_GATHER,)),
        "dynamic T": compile_and_compare(model, [tokens(T) for T in (3, 9, 5)], dynamic=True,
                                         scope=(MYSERVE_GATHER,)),
    }


def main() -> int:
    import sys

    from tpfuse.ranks import run_ranks

    per_rank = run_ranks(2, walkthrough)
    ok = True
    for label, result in per_rank[0].items():
        print(f"\n== {label} (rank 0) ==\n{result['report']}")
        equal = all(all(r[label]["equal"]) for r in per_rank)
        ok &= equal
        print(f"outputs {result['shapes']} equal the uncompiled model on every rank: "
              f"{'yes' if equal else 'NO'}")
    ok &= all(r["T=7"]["matches"] == [("myserve_all_gather", (VOCAB_PER_RANK,) * 2)] for r in per_rank)
    print("\nOK" if ok else "\nFAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    import sys

    sys.exit(main())
