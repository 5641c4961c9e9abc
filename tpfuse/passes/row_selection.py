"""Row selections and views of the leading dims: steps of gather elimination's walk.

``logits[:, -1, :]``, ``index``, ``index_select``, a ``gather`` along the tokens, ``view(-1, V)``,
``unsqueeze``, ``permute`` of the leading dims, ...: when they leave the gathered (last) axis as it
is, they commute with the gather, so each rank replays them on its slab and only the selected rows
are reduced and their partials travel (docs/passes.md, "What is rewritten").  One that picks, moves
or reshapes the gathered axis is no step, and its reason joins the near-miss.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.fx import Node

from . import graph_facts as facts
from .computed_from import CANNOT_TELL, cannot_tell_why, depends_on, random_source
from .elimination_matchers import RESHAPE, ROWS, ROWS_GATHER

#: ops that pick rows (or views of the leading dims) and commute with the gather when they leave the
#: gathered (last) axis alone: replayed on each rank's slab, so only the picked rows are reduced
SELECTS = facts.op_overloads("select.int")
INDEXES = facts.op_overloads("index.Tensor")
INDEX_SELECTS = facts.op_overloads("index_select.default")
GATHERS = facts.op_overloads("gather.default")
UNSQUEEZES = facts.op_overloads("unsqueeze.default")
SQUEEZES = facts.op_overloads("squeeze.dim", "squeeze.dims", "squeeze.default")
ALIASES = facts.op_overloads("alias.default")
ROW_OPS = (SELECTS | facts.SLICES | INDEXES | INDEX_SELECTS | GATHERS | facts.RESHAPES | UNSQUEEZES | SQUEEZES
           | facts.PERMUTES | facts.TRANSPOSES | facts.T_OPS | ALIASES)


def row_step(user: Node, chain: Node, gather: Node, positions) -> tuple[str | None, str | None]:
    """(kind, None) for a row selection or view that leaves the gathered (last) axis as it is; (None, why)
    for one of those ops that touches it; (None, None) for any other op."""
    if user.op != "call_function" or user.target not in ROW_OPS:
        return None, None
    if not user.args or user.args[0] is not chain:
        return None, f"{user.name} reads the gathered tensor other than as its input"
    rank, width, out = facts.ndim(chain), facts.shape(chain)[-1], facts.shape(user)
    if out is None or not out:
        return None, f"{user.name} leaves no gathered axis"
    why = _touches_hidden_axis(user, rank, width) or _squeezes_a_band(user, rank, gather)
    if why is None and not facts.same_size(out[-1], width):
        why = f"{user.name} makes the last axis {out[-1]} wide, not the gathered {width}"
    if why is not None:
        return None, why
    if user.target in facts.RESHAPES:
        unknown = [d for d in out[:-1] if not isinstance(d, int)]
        if len(unknown) > 1:
            return None, f"{user.name} reshapes to {len(unknown)} symbolic leading dims; one is replayed on the ranks"
        return RESHAPE, None
    for operand in user.all_input_nodes[1:]:
        if depends_on(operand, gather, positions):
            return None, f"the row index {operand.name} of {user.name} is computed from the gathered tensor"
        drawn = random_source(operand, frozenset((gather,)))
        if drawn is CANNOT_TELL:
            return None, cannot_tell_why(operand)
        if drawn is not None:
            return None, f"the row index {operand.name} of {user.name} is drawn at random: ranks need not agree"
        if not isinstance(facts.val(operand), torch.Tensor):
            return None, f"{user.name} picks rows at a symbolic position {operand.name}"
    if user.target in GATHERS:
        index = facts.shape(user.args[2])
        if not facts.same_size(index[-1], width):
            return None, f"{user.name} gathers rows at {index[-1]} of the {width} columns"
        return ROWS_GATHER, None
    return ROWS, None


def _touches_hidden_axis(user: Node, rank: int, width: Any) -> str | None:
    """Why ``user`` (one of the row ops) selects, moves or reshapes the gathered (last) axis; None if not."""
    last, target = rank - 1, user.target
    if target in SELECTS and facts.nonneg_dim(user.args[1], rank) == last:
        return f"{user.name} selects one column of the gathered (last) axis"
    if target in facts.SLICES:  # a slice of the last axis is a prefix slice or has its own reason
        return None
    if target in INDEXES:
        indices = user.args[1]
        if len(indices) == rank and indices[-1] is not None:
            return f"{user.name} indexes the gathered (last) axis with a tensor"
    if target in INDEX_SELECTS and facts.nonneg_dim(user.args[1], rank) == last:
        return f"{user.name} selects columns of the gathered (last) axis"
    if target in GATHERS and facts.nonneg_dim(user.args[1], rank) == last:
        return f"{user.name} gathers columns of the gathered (last) axis"
    if target in UNSQUEEZES and facts.nonneg_dim(user.args[1], rank + 1) == rank:
        return f"{user.name} adds a dim after the gathered (last) axis"
    if target in SQUEEZES and facts.same_size(width, 1):
        return f"{user.name} squeezes the gathered axis of width 1"
    perm = facts.permutation(user) if target in facts.PERMUTES | facts.TRANSPOSES | facts.T_OPS else None
    if perm is not None and perm[-1] != last:
        return f"{user.name} moves the gathered axis to dim {perm.index(last)}"
    if target in facts.RESHAPES and not facts.same_size(facts.shape(user)[-1], width):
        return f"{user.name} reshapes the gathered (last) axis of {width} columns to {facts.shape(user)[-1]}"
    return None


def _squeezes_a_band(user: Node, rank: int, gather: Node) -> str | None:
    """Why a squeeze that may reach the last axis (``squeeze()``, or one naming it) cannot be replayed on
    the slabs: a rank whose own width is 1 would squeeze its band's axis away (wrong values, and a graph
    that differs between ranks), even where the gathered axis is wider; None if it can."""
    if user.target not in SQUEEZES or not _may_squeeze_last(user, rank):
        return None
    widths = facts.arg_by_name(gather, 1, "hidden_widths")
    if isinstance(widths, (list, tuple)) and all(isinstance(w, int) and w != 1 for w in widths):
        return None
    return (f"{user.name} squeezes the gathered (last) axis, and a rank of hidden widths {widths} is 1 wide: "
            "it would squeeze its band's axis; only a squeeze of leading dims is replayed there")


def _may_squeeze_last(user: Node, rank: int) -> bool:
    """``squeeze()`` (every size-1 dim) or ``squeeze(dim(s))`` naming the last axis."""
    dims = facts.arg(user, 1, "dim", None)
    if dims is None:
        return True
    dims = dims if isinstance(dims, (list, tuple)) else [dims]
    return any(facts.nonneg_dim(d, rank) == rank - 1 for d in dims)
