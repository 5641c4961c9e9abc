"""Worked example of docs/patterns.md: eliminating a gather before your own reduction.

A serving framework samples with its own opaque op, ``myserve::greedy(logits)`` (the first
index of the largest logit of each row, as ``torch.argmax``).  The LM head gathers the
logits across the tensor-parallel ranks only to hand them to that op.  tpfuse cannot see
inside the op, so it keeps the gather; ``GREEDY_SAMPLER`` tells it that the op is a
reduction over the gathered axis and how each rank computes it from its own band: with
``tpfuse::max_hidden``, which moves two int32 words per row instead of the whole row.

    python examples/greedy_sampler_op.py      # the walkthrough on 2 gloo ranks
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

import tpfuse
from tpfuse import Elimination, EliminationMatcher, Reject

HIDDEN, VOCAB_PER_RANK = 16, 8


# --------------------------------------------------------------------------- the framework


@torch.library.custom_op("myserve::greedy", mutates_args=())
def greedy(logits: torch.Tensor) -> torch.Tensor:
    """The framework's sampler: the first index of each row's largest logit."""
    return logits.argmax(-1)


@greedy.register_fake
def _(logits):
    return logits.new_empty(logits.shape[:-1], dtype=torch.int64)


def sample(h, w):
    """Unmodified model code: the LM head's logits, gathered, then the framework's sampler."""
    logits = funcol.all_gather_tensor(h @ w.t(), gather_dim=h.dim() - 1, group=dist.group.WORLD)
    return torch.ops.myserve.greedy(logits)


# --------------------------------------------------------------------------- the matcher


def greedy_on_band(band, *, hidden_widths, group_name, valid_columns):
    """The replacement: what ``myserve::greedy`` returns, from this rank's band of the logits."""
    values, indices = torch.ops.tpfuse.max_hidden(band, hidden_widths, group_name, True, valid_columns)
    return indices


def match_greedy(site):
    """``myserve::greedy`` reads the gathered logits (``site.value``) and reduces their last axis."""
    if site.facts.ndim(site.value) < 1:
        return Reject(f"{site.consumer.name}: the logits have no last axis")
    return Elimination(consumer="myserve.greedy", outputs=(site.consumer,), replacement=greedy_on_band)


GREEDY_SAMPLER = EliminationMatcher(
    name="myserve_greedy",
    match=match_greedy,
    consumers=(torch.ops.myserve.greedy.default,),
    description="the framework's greedy sampler -> tpfuse::max_hidden on each rank's band",
)


# --------------------------------------------------------------------------- the walkthrough


def walkthrough(rank: int, world_size: int) -> bool:
    g = torch.Generator().manual_seed(rank)
    w = torch.randn(VOCAB_PER_RANK, HIDDEN, generator=g)
    h = torch.randn(4, HIDDEN, generator=torch.Generator().manual_seed(0))
    tokens = {}
    for label, scope in (("without the matcher", ()), ("with the matcher", (GREEDY_SAMPLER,))):
        torch._dynamo.reset()
        with tpfuse.enabled(), tpfuse.elimination_scope(*scope):
            tokens[label] = torch.compile(sample, fullgraph=True)(h, w)
            report = tpfuse.report()
        if rank == 0:
            print(f"--- {label}\n{report}")
    return torch.equal(tokens["without the matcher"], tokens["with the matcher"])


if __name__ == "__main__":
    from tpfuse.ranks import run_ranks

    print("same tokens on every rank:", all(run_ranks(2, walkthrough)))
