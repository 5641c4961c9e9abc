"""The checks both ops share: the widths, their count against the group, the slot, the group's size.

``tpfuse::all_gather_hidden`` and ``tpfuse::linear_all_gather_hidden`` take the same
``hidden_widths``, ``group_name`` and ``slot``, so they accept and reject them alike,
with the same messages, from here.  Each op keeps the checks only it needs (``x``'s
width for the gather, the weight's shape for the fused op).  Every check runs before
any communication, so a bad call raises on its own rank and never strands a peer
(docs/contract.md §4).
"""

from __future__ import annotations

from typing import Sequence

import torch

from .groups import Group, resolve_group

#: the workspace slots a call may name: one of the two ping-pong slots, or -1 (the op alternates)
SLOTS = (-1, 0, 1)


def check_not_scalar(x: torch.Tensor, last_dim: str = "hidden") -> None:
    """``x`` needs a last dimension: a scalar (0-d) input is refused with a ValueError.

    Called by the public wrappers (before they read ``x.shape[-1]``), the op
    implementations and the fake kernels, so eager calls, compiled calls and
    calls with or without ``hidden_widths`` all say the same."""
    if x.dim() == 0:
        raise ValueError(f"tpfuse: x is a scalar (0-d); it needs a last ({last_dim}) dimension, e.g. shape [T, w]")


def check_widths(hidden_widths: Sequence[int]) -> None:
    """One positive width per rank (no group needed: the fake kernels call it too)."""
    if len(hidden_widths) == 0:
        raise ValueError("tpfuse: hidden_widths is empty; give one width per rank")
    bad = [w for w in hidden_widths if w <= 0]
    if bad:
        raise ValueError(
            f"tpfuse: hidden_widths={list(hidden_widths)} has width(s) {bad} <= 0; "
            "every rank must contribute a positive number of columns"
        )


def check_one_width_per_rank(hidden_widths: Sequence[int], group: Group) -> None:
    if len(hidden_widths) != group.world_size:
        raise ValueError(
            f"tpfuse: len(hidden_widths)={len(hidden_widths)} but group "
            f"{group.name!r} has {group.world_size} ranks; give exactly one width per rank"
        )


def check_slot(slot: int) -> None:
    if slot not in SLOTS:
        raise ValueError(f"tpfuse: slot={slot} is not one of {SLOTS} (-1 lets the op choose)")


@torch._dynamo.assume_constant_result
def world_size_of(group_name: str) -> int:
    """The number of ranks of the named group: the default ``hidden_widths`` has one entry per rank."""
    # A group's size never changes, so Dynamo may bake it into the graph
    # instead of tracing into the C++ group registry.
    return resolve_group(group_name).world_size
