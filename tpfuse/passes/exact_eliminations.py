"""The exact family of gather elimination: argmax, argmin, max, min, amax, amin, topk.

Each reduces over the gathered (last) axis to values every rank can merge exactly (a value and
its global index), so ``tpfuse::max_hidden`` and ``tpfuse::topk_hidden`` reduce each rank's band
and exchange only a few words per row (docs/passes.md, "What is rewritten", the consumer table).
Registered by ``tpfuse/passes/__init__.py`` as ``EXACT_MATCHERS``.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import Node

from ..compile_ops import reduce_hidden
from . import graph_facts as facts
from .elimination_matchers import Elimination, EliminationMatcher, ReductionSite
from .patterns import Reject, function_fingerprint

aten = torch.ops.aten


def _exact_replacement(kind: str):
    """The replacement of one exact consumer, as a function of this rank's band."""

    def max_family(band, *, hidden_widths, group_name, valid_columns, largest, keepdim, want):
        values, indices = torch.ops.tpfuse.max_hidden(band, hidden_widths, group_name, largest, valid_columns)
        if keepdim:
            values, indices = values.unsqueeze(-1), indices.unsqueeze(-1)
        return {"indices": indices, "values": values, "both": (values, indices)}[want]

    def topk(band, *, hidden_widths, group_name, valid_columns, k, largest, sorted):  # noqa: A002
        return tuple(torch.ops.tpfuse.topk_hidden(band, k, hidden_widths, group_name, largest, sorted,
                                                  valid_columns))

    return {"max": max_family, "topk": topk}[kind]


def _getitems(node: Node) -> tuple[Node | None, ...] | None:
    """The ``getitem`` users of a tuple-valued node by index, or None when it is used otherwise."""
    items: list[Node | None] = [None, None]
    for user in node.users:
        if user.op != "call_function" or user.target is not operator.getitem:
            return None
        items[user.args[1]] = user
    return tuple(items)


def _match_argmax(site: ReductionSite, largest: bool):
    node, name = site.consumer, "argmax" if largest else "argmin"
    dim, keepdim = facts.arg(node, 1, "dim", None), facts.arg(node, 2, "keepdim", False)
    if not site.reduces_hidden_axis(dim):
        return site.other_axis_reject(name, dim)
    return Elimination(name, (node,), _exact_replacement("max"),
                       extra=(("largest", largest), ("keepdim", keepdim), ("want", "indices")))


def _match_max_dim(site: ReductionSite, largest: bool):
    node, name = site.consumer, "max.dim" if largest else "min.dim"
    dim, keepdim = facts.arg(node, 1, "dim", None), facts.arg(node, 2, "keepdim", False)
    if not site.reduces_hidden_axis(dim):
        return site.other_axis_reject(name, dim)
    items = _getitems(node)
    if items is None:
        return Reject(f"{node.name} ({name}) is used other than through getitem", (node,))
    return Elimination(name, items, _exact_replacement("max"), region=tuple(i for i in items if i),
                       extra=(("largest", largest), ("keepdim", keepdim), ("want", "both")))


def _match_amax(site: ReductionSite, largest: bool):
    node, name = site.consumer, "amax" if largest else "amin"
    dims, keepdim = facts.arg(node, 1, "dim", []), facts.arg(node, 2, "keepdim", False)
    if not site.reduces_hidden_axis(list(dims) if isinstance(dims, (list, tuple)) else dims):
        return site.other_axis_reject(name, list(dims) if isinstance(dims, (list, tuple)) else dims)
    return Elimination(name, (node,), _exact_replacement("max"),
                       extra=(("largest", largest), ("keepdim", keepdim), ("want", "values")))


def _match_topk(site: ReductionSite):
    node = site.consumer
    k, dim = facts.arg(node, 1, "k", None), facts.arg(node, 2, "dim", -1)
    largest, is_sorted = facts.arg(node, 3, "largest", True), facts.arg(node, 4, "sorted", True)
    if not site.reduces_hidden_axis(dim):
        return site.other_axis_reject("topk", dim)
    if not isinstance(k, int):
        return Reject(f"{node.name} (topk): k={k!r} is not a literal int", (node,))
    if not 1 <= k <= site.columns:
        return Reject(f"{node.name} (topk): k={k} is outside 1..{site.columns}", (node,))
    items = _getitems(node)
    if items is None:
        return Reject(f"{node.name} (topk) is used other than through getitem", (node,))
    return Elimination("topk", items, _exact_replacement("topk"), region=tuple(i for i in items if i),
                       extra=(("k", k), ("largest", bool(largest)), ("sorted", bool(is_sorted))),
                       partials=(2 * k, torch.int32))


def _exact(name, match, consumers, description):
    return EliminationMatcher(name=name, match=_values_it_takes(match), consumers=consumers, priority=10,
                              description=description, builtin=True)


def _values_it_takes(match):
    """The ops take float32, bfloat16 and float16 values with int32 global indices: anything else
    is a near-miss, not a compile error."""

    def checked(site: ReductionSite):
        if site.dtype not in reduce_hidden.VALUE_DTYPES:
            accepted = ", ".join(str(d).removeprefix("torch.") for d in reduce_hidden.VALUE_DTYPES)
            return Reject(f"{site.consumer.name} ({facts.target_name(site.consumer)}) reduces {site.dtype} values; "
                          f"the exact reductions take {accepted}")
        if sum(site.hidden_widths) >= torch.iinfo(torch.int32).max:
            return Reject(f"{sum(site.hidden_widths)} columns do not fit the int32 indices the partials carry")
        return match(site)

    checked.cache_key = lambda: function_fingerprint(match) + function_fingerprint(_values_it_takes)
    return checked


EXACT_MATCHERS = (
    _exact("argmax", lambda site: _match_argmax(site, True), (aten.argmax.default,),
           "argmax over the gathered axis -> tpfuse::max_hidden (indices)"),
    _exact("argmin", lambda site: _match_argmax(site, False), (aten.argmin.default,),
           "argmin over the gathered axis -> tpfuse::max_hidden(largest=False) (indices)"),
    _exact("max_dim", lambda site: _match_max_dim(site, True), (aten.max.dim,),
           "max(dim) over the gathered axis -> tpfuse::max_hidden"),
    _exact("min_dim", lambda site: _match_max_dim(site, False), (aten.min.dim,),
           "min(dim) over the gathered axis -> tpfuse::max_hidden(largest=False)"),
    _exact("amax", lambda site: _match_amax(site, True), (aten.amax.default,),
           "amax over the gathered axis -> tpfuse::max_hidden (values)"),
    _exact("amin", lambda site: _match_amax(site, False), (aten.amin.default,),
           "amin over the gathered axis -> tpfuse::max_hidden(largest=False) (values)"),
    _exact("topk", _match_topk, (aten.topk.default,), "topk over the gathered axis -> tpfuse::topk_hidden"),
)
