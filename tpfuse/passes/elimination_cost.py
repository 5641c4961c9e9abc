"""The cost rule of gather elimination: eliminate only where the partials save enough bytes.

A pure function of the widths, the dtype and the consumers' partials, so every rank decides alike
and a symbolic ``T`` needs no guard (docs/passes.md, "When it does not pay (the cost rule)").
"""

from __future__ import annotations

import torch
from torch.fx import Node

from . import graph_facts as facts
from .elimination_matchers import Elimination

#: The gather is eliminated only when the partials of all its consumers take at most 1/MIN_SAVING_RATIO
#: of the bytes of a gathered row (docs/passes.md, "Gather elimination", "When it does not pay (the cost rule)").
MIN_SAVING_RATIO = 2


def partial_pairs(elimination: Elimination) -> tuple[tuple[int, torch.dtype], ...]:
    """``Elimination.partials`` as ((words per rank per row, dtype), ...): one pair, or one per exchange."""
    p = elimination.partials
    return (tuple(p),) if len(p) == 2 and isinstance(p[0], int) else tuple(tuple(x) for x in p)


def partial_row_bytes(widths, elimination: Elimination) -> int:
    """The bytes of one row's partials, every rank's, over all of the elimination's exchanges."""
    return sum(words * len(widths) * dtype.itemsize for words, dtype in partial_pairs(elimination))


def cost_problem(gather: Node, widths, eliminations) -> str | None:
    """Why eliminating would not pay, or None.  Per row (so T may be symbolic), every rank alike: the
    gathered row moves ``sum(widths) * itemsize`` bytes and feeds one reduction kernel; eliminated,
    each consumer's exchange moves its partials (``words * W * 4`` bytes) and adds a local and a
    merge step.  Unless the exchange moves at most half the row's bytes, the saving cannot pay for
    the added steps (e.g. a top-k whose k is near the band's width, or several consumers on a row
    a few dozen columns wide)."""
    row = sum(widths) * facts.val(gather).dtype.itemsize
    partial = sum(partial_row_bytes(widths, e) for e in eliminations)
    if partial * MIN_SAVING_RATIO <= row:
        return None
    return (f"eliminating {', '.join(e.consumer for e in eliminations)} would move {partial} B of partials per row "
            f"against the {row} B of a gathered row; the rule takes at most 1/{MIN_SAVING_RATIO} of it")
