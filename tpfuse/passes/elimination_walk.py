"""The walk from a gather to its consumers, through the steps that commute with the gather.

From each gather the walk follows the gathered tensor through elementwise ops whose other operands
are scalars, broadcast along the hidden axis, or full width (applied to this rank's band through
``tpfuse::hidden_band``); prefix slices ``[..., :V]`` that drop vocabulary padding; and row
selections and views that leave the gathered (last) axis alone (``row_selection.py``).  Every other
user is a *consumer*, offered to the matchers (docs/passes.md, "What is rewritten").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import Node

from . import graph_facts as facts
from .computed_from import CANNOT_TELL, cannot_tell_why, depends_on, random_source
from .elimination_matchers import POINTWISE, PREFIX_SLICE
from .row_selection import row_step


@dataclass(frozen=True)
class ReachedConsumer:
    """A consumer reached from the gather, and the steps on the way (``ReductionSite``'s fields)."""

    value: Node
    consumer: Node
    steps: tuple[Node, ...]
    kinds: tuple[str, ...]
    valid_columns: int | None
    why: str = ""  # why the consumer is no step, when it nearly is one


def reached_consumers(gather: Node, positions) -> list[ReachedConsumer]:
    """Every consumer reached from the gather through steps, in graph order."""
    leaves, pending = [], [(gather, (), (), None)]
    while pending:
        chain, steps, kinds, valid = pending.pop(0)
        for user in chain.users:
            kind, end, why = _step_of(user, chain, gather, positions)
            if kind is None:
                leaves.append(ReachedConsumer(chain, user, steps, kinds, valid, why))
                continue
            columns = valid if end is None else end if valid is None else min(valid, end)
            pending.append((user, steps + (user,), kinds + (kind,), columns))
    return sorted(leaves, key=lambda leaf: positions.get(leaf.consumer, 0))


def _step_of(user: Node, chain: Node, gather: Node, positions) -> tuple[str | None, int | None, str]:
    """(kind, prefix end, "") when ``user`` is a step of ``chain``; (None, None, why) when it is not."""
    is_slice, end, why = _prefix_slice(user, chain)
    if is_slice:
        return PREFIX_SLICE, end, ""
    if why is None:
        kind, why = row_step(user, chain, gather, positions)
        if kind is not None:
            return kind, None, ""
    if why is None:
        why = _elementwise_step(user, chain, gather, positions)
        if why is None:
            return POINTWISE, None, ""
    return None, None, why


def _prefix_slice(user: Node, chain: Node) -> tuple[bool, int | None, str | None]:
    """(True, V, None) for ``chain[..., :V]`` (V None: the slice keeps every column); (False, None,
    why) for another slice of the hidden axis; (False, None, None) when ``user`` is no slice of it."""
    if user.op != "call_function" or user.target not in facts.SLICES or user.args[0] is not chain:
        return False, None, None
    rank = facts.ndim(chain)
    if facts.nonneg_dim(facts.arg(user, 1, "dim", 0), rank) != rank - 1:
        return False, None, None
    start, end, step = (facts.arg(user, 2, "start", 0), facts.arg(user, 3, "end", None),
                        facts.arg(user, 4, "step", 1))
    width = facts.shape(chain)[-1]
    start, end = _from_the_front(start, width), _from_the_front(end, width)
    if start not in (0, None) or step != 1 or not isinstance(end, (int, type(None))):
        return False, None, (f"{user.name} slices columns [{start}:{end}:{step}] of the gathered axis; only a "
                             "prefix slice [..., :V] with a literal V moves to the ranks")
    if end is None or (isinstance(width, int) and end >= width):
        return True, None, None
    if end < 0:  # only where the width is symbolic (``_from_the_front``)
        return False, None, f"{user.name} ends {-end} columns before the end of a gathered axis of symbolic width"
    if end == 0:
        return False, None, f"{user.name} keeps no column of the gathered axis"
    return True, end, None


def _from_the_front(bound, width):
    """A slice bound counted from the first column, as torch reads it (``[..., :-3]`` ends at
    ``width - 3``, a start before the first column starts at 0); a negative bound of a symbolic
    width stays as it is (and is refused: the ranks would not know where it ends)."""
    if not isinstance(bound, int) or bound >= 0 or not isinstance(width, int):
        return bound
    return max(0, bound + width)


def _elementwise_step(user: Node, chain: Node, gather: Node, positions) -> str | None:
    """None when ``user`` is an elementwise step of ``chain`` that commutes with the gather; else why not."""
    if user.op != "call_function" or not isinstance(user.target, torch._ops.OpOverload):
        return "not an op"
    tags = user.target.tags
    if torch.Tag.nondeterministic_seeded in tags:
        return f"{user.name} draws random numbers: each rank would draw its own band's"
    if torch.Tag.pointwise not in tags:
        return "not an elementwise op"
    if not facts.same_shape(facts.shape(user) or (), facts.shape(chain)):
        return f"{user.name} broadcasts the gathered tensor to another shape"
    for operand in user.all_input_nodes:
        if operand is not chain:
            problem = _operand_problem(operand, chain, gather, positions)
            if problem is not None:
                return problem
    return None


def _operand_problem(operand: Node, chain: Node, gather: Node, positions) -> str | None:
    """None when ``operand`` may be applied to a band: scalar, broadcast along the hidden axis,
    or exactly as wide as the chain (then banded); else why not."""
    shape = facts.shape(operand)
    if shape is None:
        return f"operand {operand.name} has no shape metadata"
    if depends_on(operand, gather, positions):
        return f"operand {operand.name} is computed from the gathered tensor"
    drawn = random_source(operand, frozenset((gather,)))
    if drawn is CANNOT_TELL:
        return cannot_tell_why(operand)
    if drawn is not None:
        return (f"operand {operand.name} is drawn at random ({drawn.name}): a rank's band of its own draw is not "
                "a band of the other ranks' draws")
    width = facts.shape(chain)[-1]
    if len(shape) == 0 or facts.same_size(shape[-1], 1) or facts.same_size(shape[-1], width):
        return None
    return f"operand {operand.name} has last dim {shape[-1]}, neither 1 nor the gathered width {width}"
