"""One eliminated consumer rewritten: its steps replayed on this rank's slab, its replacement traced in.

The gather's input is this rank's slab.  The steps between the gather and the consumer are replayed
on it (row selections as they are, so only the selected rows are reduced and their partials travel;
reshapes to the band's width; elementwise ops with full-width operands cut to the band by
``tpfuse::hidden_band``), the matcher's replacement is traced on that band, and its nodes are
copied into the graph in place of the consumer's (docs/passes.md, "What is rewritten").
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.fx import Graph, Node
from torch.fx.node import map_arg

from ..compile_ops import reduce_hidden  # noqa: F401 - registers the ops the rewrite emits
from . import graph_facts as facts
from .computed_from import node_positions
from .elimination_matchers import POINTWISE, PREFIX_SLICE, RESHAPE, ROWS_GATHER, Elimination, ReductionSite

# --------------------------------------------------------------------------- the steps on the slab


def band_of(site: ReductionSite) -> Callable:
    """A function (slab, *operands) -> this rank's band of ``site.value``: the steps replayed on
    the slab (row selections as they are, reshapes to the band's width), full-width operands cut
    to the band by ``tpfuse::hidden_band``."""
    widths, group = [int(w) for w in site.hidden_widths], site.group_name
    local_width = facts.shape(site.local)[-1]
    operands = band_operands(site)

    def banded(operand):
        return torch.ops.tpfuse.hidden_band(operand, widths, local_width, group)

    def band(slab, *values):
        env = dict(zip(operands, values))
        current, chain = slab, site.gather
        for step, kind in zip(site.steps, _kinds(site)):
            if kind == PREFIX_SLICE:
                chain = step
                continue
            if kind == RESHAPE:
                current, chain = current.reshape(_band_shape(step, current)), step
                continue

            def value_of(n, chain=chain, current=current, kind=kind):
                if n is chain:
                    return current
                shape = facts.shape(n)
                if kind == POINTWISE and len(shape) and not facts.same_size(shape[-1], 1):
                    return banded(env[n])
                return banded(env[n]) if kind == ROWS_GATHER else env[n]

            current = step.target(*map_arg(step.args, value_of), **map_arg(step.kwargs, value_of))
            chain = step
        return current

    return band


def band_operands(site: ReductionSite) -> list[Node]:
    """The graph values the replayed steps read besides the chain itself (a bias, a row index)."""
    chain_nodes = {site.gather, *site.steps}
    replayed = [s for s, k in zip(site.steps, _kinds(site)) if k not in (PREFIX_SLICE, RESHAPE)]
    return list(dict.fromkeys(n for s in replayed for n in s.all_input_nodes if n not in chain_nodes))


def _kinds(site: ReductionSite) -> tuple[str, ...]:
    """The kind of each step (a site built by hand without kinds: elementwise ops and slices)."""
    if len(site.kinds) == len(site.steps):
        return site.kinds
    return tuple(PREFIX_SLICE if s.target in facts.SLICES else POINTWISE for s in site.steps)


def _band_shape(step: Node, band) -> list:
    """The shape of a reshape of the gathered tensor (leading dims merged or split, the gathered axis
    kept), for the band: the leading dims as the graph has them (one symbolic one as -1), the band's width."""
    return [d if isinstance(d, int) else -1 for d in facts.shape(step)[:-1]] + [band.shape[-1]]


# --------------------------------------------------------------------------- the replacement traced in


def replace_consumer(graph: Graph, site: ReductionSite, elimination: Elimination) -> list[Node]:
    """Trace the replacement on the band, copy it into the graph, redirect the outputs' uses;
    returns the nodes added (those still used)."""
    from torch._guards import detect_fake_mode
    from torch.fx.experimental.proxy_tensor import make_fx

    operands = band_operands(site)
    band = band_of(site)
    keywords = dict(hidden_widths=[int(w) for w in site.hidden_widths], group_name=site.group_name,
                    valid_columns=site.valid_columns, **dict(elimination.extra))
    n_operands = len(operands)

    def computation(slab, *rest):
        return elimination.replacement(band(slab, *rest[:n_operands]), *rest[n_operands:], **keywords)

    inputs = [site.local, *operands, *elimination.inputs]
    values = [facts.val(n) for n in inputs]
    mode = detect_fake_mode(values)
    if mode is None:
        traced = make_fx(computation, tracing_mode="fake")(*values)
    else:
        with mode:
            traced = make_fx(computation, tracing_mode="real")(*values)
    anchor = _insertion_point(inputs, site)
    env, feed, out, added = {}, iter(inputs), None, []
    # before the node after the anchor, not "after the anchor": that would reverse the copies' order
    with graph.inserting_before(anchor.next):
        for node in traced.graph.nodes:
            if node.op == "placeholder":
                env[node] = next(feed)
            elif node.op == "output":
                out = node.args[0]
            else:
                env[node] = graph.node_copy(node, lambda n: env[n])
                added.append(env[node])
    results = out if isinstance(out, (list, tuple)) else (out,)
    if len(results) != len(elimination.outputs):
        raise ValueError(f"tpfuse: elimination {elimination.consumer!r} returned {len(results)} value(s) for "
                         f"{len(elimination.outputs)} output node(s)")
    for old, new in zip(elimination.outputs, results):
        if old is not None:
            _check_same(old, env[new], elimination.consumer)
            old.replace_all_uses_with(env[new])
    return _without_unused(added)


def _without_unused(added: list[Node]) -> list[Node]:
    """The added nodes less the views and getitems of returned values nobody uses (the tpfuse
    ops stay: they communicate)."""
    kept = []
    for node in reversed(added):
        if not node.users and "tpfuse" not in str(node.target):
            node.graph.erase_node(node)
        else:
            kept.append(node)
    return kept[::-1]


def _insertion_point(inputs: list[Node], site: ReductionSite) -> Node:
    """Right after the latest input: every input is defined there, and every user of the
    outputs comes later (the outputs read those inputs, or the gather, which precedes them)."""
    positions = node_positions(site.graph)
    return max(inputs, key=lambda n: positions[n])


def _check_same(old: Node, new: Node, what: str) -> None:
    want, got = facts.val(old), facts.val(new)
    if not (isinstance(want, torch.Tensor) and isinstance(got, torch.Tensor)):
        return
    if want.dtype != got.dtype or not facts.same_shape(tuple(want.shape), tuple(got.shape)):
        raise ValueError(f"tpfuse: elimination {what!r} computes {list(got.shape)} {got.dtype} for "
                         f"{old.name}, which is {list(want.shape)} {want.dtype}")


def erase_dead_after(gather: Node, region: list[Node]) -> None:
    """Erase the gather, every node computed from it and every node of the matched regions (a
    constant of logsumexp's shift) that nothing uses any more, latest first; other orphans are
    left to Inductor's dead-code elimination."""
    pending, seen = [gather], {gather, *region}
    while pending:
        node = pending.pop()
        for user in node.users:
            if user not in seen:
                seen.add(user)
                pending.append(user)
    positions = node_positions(gather.graph)
    for node in sorted((n for n in seen if n.graph is not None), key=lambda n: positions[n], reverse=True):
        if node.op == "call_function" and not node.users and not node.is_impure():
            node.graph.erase_node(node)
