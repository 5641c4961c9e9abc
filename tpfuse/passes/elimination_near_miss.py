"""Why a gather stays: the near-miss of gather elimination.

When a matcher claimed or refused a consumer, or a consumer stands between the gather and a
reduction (a select of the gathered axis before an argmax), the report says why the gather was
kept; a gather none of whose consumers came close (one feeding a matmul) is no near-miss
(docs/passes.md, "What is rewritten", the near-miss table).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch.fx import Node

from . import graph_facts as facts
from .elimination_walk import ReachedConsumer
from .records import NearMiss
from .row_selection import ROW_OPS

DOC = "docs/passes.md#gather-elimination"

#: ops that only move, pick or copy elements: followed (never rewritten) from a consumer that is no
#: step, to find the reduction a near-miss is about
MOVES_ELEMENTS = ROW_OPS | facts.op_overloads(
    "expand.default", "as_strided.default", "narrow.default", "split.Tensor", "split_with_sizes.default",
    "unfold.default", "flip.default", "roll.default", "repeat.default", "clone.default", "cat.default")
#: reductions a near-miss may name (over any axis): what the built-in matchers reduce, and sums; a softmax and
#: a log-softmax as graphs that Inductor does not decompose hold them (aot_eager, a training forward), which the
#: sum family's matchers, written for the decomposed softmax, do not read
REDUCTIONS = facts.op_overloads(
    "argmax.default", "argmin.default", "max.dim", "min.dim", "max.default", "min.default", "amax.default",
    "amin.default", "topk.default", "sort.default", "sort.stable", "logsumexp.default", "sum.dim_IntList",
    "_softmax.default", "_log_softmax.default")
#: how many nodes the near-miss search follows from a consumer
NEAR_MISS_REACH = 64


def named_reductions(matchers) -> frozenset:
    """The reductions a near-miss may name: the built-in ones and those the user's matchers are offered."""
    return REDUCTIONS | frozenset(op for m in matchers if not m.builtin for op in m.consumers)


def explained_by_rejects(rejects: dict) -> dict:
    """node -> the consumer whose matcher's Reject is about it (a rejected softmax's inner nodes):
    those consumers are not listed again, each with a reason of its own, in the near-miss."""
    return {node: consumer for consumer, said in rejects.items() for *_, nodes in said for node in nodes}


def near_miss(gather: Node, missing: list[ReachedConsumer], rejects: dict, explained: dict, chosen,
              reductions) -> NearMiss | None:
    """Why the gather stays, or None when nothing came close (no consumer was eliminated or rejected,
    and none leads to a reduction: a gather feeding a matmul). Per consumer not eliminated: the
    matchers' reasons, or the op that stands between the gather and a reduction and why."""
    reasons, names, close = [], [], bool(chosen)
    for leaf in missing:
        user, said = leaf.consumer, rejects.get(leaf.consumer, [])
        if said:
            reasons += [reason for _, reason, _ in said]
            names += [name for name, _, _ in said]
            close = True
            continue
        if explained.get(user, user) is not user:  # the inside of a rejected softmax: its Reject says why
            reasons += [reason for _, reason, _ in rejects[explained[user]]]
            names += [name for name, _, _ in rejects[explained[user]]]
            close = True
            continue
        if user.op == "output":
            reasons.append("the gathered logits are also used by the graph output")
            continue
        reduction = _reduction_after(user, facts.shape(leaf.value)[-1], reductions)
        close = close or reduction is not None
        reasons.append(_consumer_reason(leaf, reduction))
    if not close:
        return None
    nodes = (gather.name,) + tuple(leaf.consumer.name for leaf in missing if leaf.consumer.op != "output")
    pattern = names[0] if names and len(set(names)) == 1 and len(names) == len(reasons) else "gather_elimination"
    return NearMiss(pattern, "gather kept: " + "; ".join(dict.fromkeys(reasons)), nodes, doc=DOC)


def _consumer_reason(leaf: ReachedConsumer, reduction: Node | None) -> str:
    """Why a consumer no matcher spoke about keeps the gather: what it is, and the reduction it leads to."""
    user = leaf.consumer
    detail = leaf.why if leaf.why not in ("", "not an op", "not an elementwise op") else ""
    if reduction is not None and reduction is not user and not detail:
        detail = ("an op the pass does not move to the ranks: only elementwise ops, prefix slices, row "
                  "selections and views of the leading dims are")
    text = f"the gathered logits are also used by {facts.describe(user)}" + (f" ({detail})" if detail else "")
    if reduction is user:
        text += ", a reduction no matcher eliminates"
    elif reduction is not None:
        text += f", on the way to {facts.describe(reduction)}"
    return text


def _reduction_after(node: Node, width: Any, reductions) -> Node | None:
    """The first reduction reached from ``node`` (itself included) through ops that move, pick or
    compute elements, or keep a last axis as wide as the gathered one (a cumsum), or None: a
    consumer on such a path is a near-miss, one that feeds a matmul is not."""
    pending, seen = [node], set()
    while pending and len(seen) < NEAR_MISS_REACH:
        current = pending.pop(0)
        if current in seen or current.op != "call_function":
            continue
        seen.add(current)
        if current.target in reductions:
            return current
        target, shape = current.target, facts.shape(current)
        passes = (target is operator.getitem or target in MOVES_ELEMENTS
                  or (isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags)
                  or (bool(shape) and facts.same_size(shape[-1], width)))
        if passes:
            pending += list(current.users)
    return None
