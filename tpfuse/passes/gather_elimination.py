"""Gather elimination: a hidden-axis gather consumed only by reductions over that axis is not gathered.

Runs on the post-grad graph after the gather rewrite (``hidden_gather.py``) turned every gather
it knows into ``tpfuse::all_gather_hidden``, and before barrier elision; so one walk covers every
gather form the pattern pass knows, and gathers written with ``tpfuse.all_gather_hidden`` by
hand (docs/passes.md, "Gather elimination").

From each gather the walk (``elimination_walk.py``) follows the gathered tensor through the steps
that commute with the gather, row selections among them (``row_selection.py``), replayed on the
slab so that only the selected rows are reduced and their partials travel
(``elimination_rewrite.py``).  Every other user is a *consumer*, offered to the registered
``EliminationMatcher`` objects (``elimination_matchers.py``), highest priority first.  Where two
eliminations cover the same node (a softmax's amax is an amax too) the wider one is taken.  The
gather goes only if EVERY consumer is covered and the partials take at most half the bytes of a
gathered row (``elimination_cost.py``); otherwise it stays, and the report says why
(``elimination_near_miss.py``).

This module decides per gather and holds the pass's entry points: ``find_gather_eliminations``
returns frozen records and changes nothing; ``rewrite_gather_eliminations`` consumes them.  The
EXACT family (argmax, argmin, max, min, amax, amin, topk) is ``exact_eliminations.EXACT_MATCHERS``;
the sum family is ``eliminate_sums.MATCHERS`` (both registered by ``tpfuse/passes/__init__.py``);
a user registers their own with ``register_elimination`` (docs/patterns.md, "Eliminating a gather
before your own reduction").  The names other modules import from here are re-exported.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch.fx import Graph, Node

from . import graph_facts as facts
from .computed_from import CANNOT_TELL, cannot_tell_why, node_positions, path_from, random_source
from .elimination_cost import cost_problem, partial_pairs, partial_row_bytes
from .elimination_matchers import (
    ELIMINATIONS,
    Elimination,
    EliminationMatcher,
    ReductionSite,
    cache_key,
    elimination_scope,
    register_builtin_eliminations,
    register_elimination,
    registered_eliminations,
    unregister_elimination,
)
from .elimination_near_miss import DOC, explained_by_rejects, named_reductions, near_miss
from .elimination_rewrite import erase_dead_after, replace_consumer
from .elimination_walk import reached_consumers
from .exact_eliminations import EXACT_MATCHERS
from .hidden_gather import node_line
from .patterns import Reject
from .records import GatherElimination, GatherMatch, NearMiss

__all__ = [
    "ELIMINATIONS", "EXACT_MATCHERS", "Elimination", "EliminationFind", "EliminationMatcher", "FoundElimination",
    "ReductionSite", "cache_key", "elimination_scope", "find_gather_eliminations", "mark_eliminated",
    "register_builtin_eliminations", "register_elimination", "registered_eliminations",
    "rewrite_gather_eliminations", "tpfuse_gather_of", "unregister_elimination",
]


def _gather_op():
    return torch.ops.tpfuse.all_gather_hidden.default


# --------------------------------------------------------------------------- find


@dataclass(frozen=True)
class FoundElimination:
    """One eliminable gather: its sites and what each matcher found (frozen; the graph is unchanged)."""

    gather: Node
    sites: tuple[ReductionSite, ...]
    eliminations: tuple[Elimination, ...]
    matchers: tuple[str, ...]
    record: GatherElimination


@dataclass
class EliminationFind:
    found: list[FoundElimination] = field(default_factory=list)
    near_misses: list[NearMiss] = field(default_factory=list)


@dataclass(frozen=True)
class _Candidate:
    """A matcher's Elimination at one consumer, and every node it replaces or lets die."""

    site: ReductionSite
    elimination: Elimination
    matcher: str

    @property
    def covers(self) -> frozenset:
        e = self.elimination
        return frozenset((self.site.consumer, *e.claims, *e.region, *(o for o in e.outputs if o is not None)))


def _gather_facts(gather: Node) -> tuple[Node, tuple[int, ...], str] | None:
    local, widths, group = (facts.arg_by_name(gather, i, n) for i, n in
                            enumerate(("x", "hidden_widths", "group_name")))
    if not isinstance(local, Node) or not isinstance(group, str) or not isinstance(widths, (list, tuple)):
        return None
    if not all(isinstance(w, int) for w in widths) or facts.ndim(local) in (None, 0):
        return None
    return local, tuple(widths), group


def find_gather_eliminations(graph: Graph, matchers: list[EliminationMatcher]) -> EliminationFind:
    """Every tpfuse gather whose consumers are all eliminated (records only; nothing changes)."""
    result = EliminationFind()
    gathers = [n for n in graph.nodes if n.op == "call_function" and n.target is _gather_op()]
    if not gathers or not matchers:
        return result
    positions = node_positions(graph)
    reductions = named_reductions(matchers)
    taken: dict[Node, Node] = {}  # node -> the gather whose elimination rewrites it
    for gather in gathers:
        known = _gather_facts(gather)
        if known is not None:
            found = len(result.found)
            _find_one(gather, *known, matchers, positions, reductions, result)
            if len(result.found) > found:
                _one_gather_per_node(result, taken)
    return result


def _one_gather_per_node(result: EliminationFind, taken: dict) -> None:
    """Keep the gather just found when its elimination would rewrite a node that an earlier gather's
    elimination rewrites too: two gathers meeting in one reduction (``(a - 0.5 * b).argmax(-1)``,
    two models' logits).  The earlier elimination cuts this gather's logits to its band
    (``tpfuse::hidden_band``), so they must stay; rewriting the node twice would leave the second
    rewrite reading the first one's erased nodes."""
    item = result.found[-1]
    nodes = {n for site, e in zip(item.sites, item.eliminations)
             for n in (*site.steps, site.consumer, *e.claims, *e.region, *(o for o in e.outputs if o is not None))}
    shared = sorted((n for n in nodes if n in taken), key=lambda n: n.name)
    if not shared:
        taken.update(dict.fromkeys(nodes, item.gather))
        return
    result.found.pop()
    other = taken[shared[0]]
    result.near_misses.append(NearMiss(
        "gather_elimination", f"gather kept: {facts.describe(shared[0])} also reads the logits of {other.name}, "
        f"whose gather is eliminated there; its replacement cuts these logits to each rank's band",
        (item.gather.name, shared[0].name), doc=DOC))


def _find_one(gather, local, widths, group, matchers, positions, reductions, result: EliminationFind) -> None:
    first = {}
    for leaf in reached_consumers(gather, positions):
        first.setdefault(leaf.consumer, leaf)
    candidates, rejects = [], {}
    for consumer, leaf in first.items():
        site = ReductionSite(gather, local, widths, group, leaf.value, consumer, leaf.steps, leaf.valid_columns,
                             leaf.kinds)
        outcome, name, found = _offer(site, matchers)
        problem = None if outcome is None else _claim_problem(site, outcome, first)
        if problem is not None:
            outcome, found = None, found + [(name, problem, ())]
        rejects[consumer] = found
        if outcome is not None:
            candidates.append(_Candidate(site, outcome, name))
    explained = explained_by_rejects(rejects)
    chosen = _choose(gather, candidates, rejects, explained, first, positions)
    covered = frozenset().union(*(c.covers for c in chosen))
    missing = [leaf for consumer, leaf in first.items() if consumer not in covered]
    if missing:
        near = near_miss(gather, missing, rejects, explained, chosen, reductions)
        if near is not None:
            result.near_misses.append(near)
        return
    if not chosen:
        return
    sites, eliminations = tuple(c.site for c in chosen), tuple(c.elimination for c in chosen)
    too_costly = cost_problem(gather, widths, eliminations)
    if too_costly is not None:
        result.near_misses.append(NearMiss("gather_elimination", "gather kept: " + too_costly,
                                           (gather.name,) + tuple(s.consumer.name for s in sites), doc=DOC))
        return
    names = tuple(c.matcher for c in chosen)
    record = _record(gather, widths, group, sites, eliminations, names)
    result.found.append(FoundElimination(gather, sites, eliminations, names, record))


def _offer(site: ReductionSite, matchers) -> tuple[Elimination | None, str, list]:
    """The first Elimination of the matchers offered this consumer, with every Reject before it."""
    rejects = []  # (matcher name, reason, the nodes the reason is about)
    for matcher in matchers:
        if not matcher.offered(site.consumer):
            continue
        try:
            outcome = matcher.match(site)
        except Exception as err:  # noqa: BLE001
            if matcher.builtin:
                raise  # our own bug: fail loudly
            outcome = Reject(f"the matcher raised {type(err).__name__}: {err}")
        if isinstance(outcome, Reject):
            rejects.append((matcher.name, outcome.reason, tuple(outcome.nodes)))
        elif outcome is not None:
            return outcome, matcher.name, rejects
    return None, "", rejects


def _claim_problem(site: ReductionSite, found: Elimination, consumers) -> str | None:
    stray = [n.name for n in found.claims if n not in consumers]
    if stray:
        return f"claims {', '.join(stray)}, which are not consumers of {site.gather.name} (through steps)"
    if not found.outputs or all(o is None for o in found.outputs):
        return "returns no output node to replace"
    return None


def _choose(gather: Node, candidates: list[_Candidate], rejects: dict, explained: dict, consumers,
            positions) -> list[_Candidate]:
    """The eliminations that are rewritten: where two cover a node alike, the one covering more (a
    softmax's amax is also an amax); an elimination whose inputs read the gathered tensor other than
    through another chosen elimination's outputs is dropped (its reason joins the consumer's)."""
    pool = sorted(candidates, key=lambda c: (-len(c.covers), positions[c.site.consumer]))
    while True:
        chosen, covered = [], set()
        for candidate in pool:
            if not (candidate.covers & covered):
                chosen.append(candidate)
                covered |= candidate.covers
        unsafe = next(((c, why) for c in chosen if (why := _input_problem(gather, c, chosen, consumers, positions))),
                      None)
        if unsafe is None:
            return sorted(chosen, key=lambda c: positions[c.site.consumer])
        candidate, why = unsafe
        pool.remove(candidate)
        consumer = candidate.site.consumer
        rejects[consumer] = rejects[consumer] + [(candidate.matcher, why, tuple(candidate.covers))]
        explained.update((node, consumer) for node in candidate.covers if node is not consumer)


def _input_problem(gather: Node, candidate: _Candidate, chosen: list[_Candidate], consumers, positions) -> str | None:
    """Why an input of ``candidate`` cannot be read once the gather is gone: it is computed from the
    gathered tensor other than through the outputs of another chosen elimination (e.g. the token of
    an eliminated argmax is fine; one counted from the logits is not)."""
    stops = frozenset(o for c in chosen if c is not candidate for o in c.elimination.outputs if o is not None)
    for node in candidate.elimination.inputs:
        drawn = random_source(node, stops | {gather})
        if drawn is CANNOT_TELL:
            return f"{candidate.elimination.consumer}: {cannot_tell_why(node)}"
        if drawn is not None:  # e.g. a token sampled by each rank: the ranks' bands would answer for different ones
            return (f"{candidate.elimination.consumer}: its input {node.name} is drawn at random ({drawn.name}); "
                    "every rank must read the same")
        path = path_from(node, gather, stops, positions)
        if path is not None:
            via = next((n for n in path if n in consumers), path[1] if len(path) > 1 else node)
            return (f"{candidate.elimination.consumer}: its input {node.name} is computed from the gathered "
                    f"logits through {facts.describe(via)}, which is not eliminated")
    return None


# --------------------------------------------------------------------------- the record


def _record(gather, widths, group, sites, eliminations, names) -> GatherElimination:
    value = facts.val(gather)
    rows = facts.product(value.shape[:-1])
    partial_bytes = sum(facts.product(facts.shape(site.value)[:-1]) * partial_row_bytes(widths, e)
                        for site, e in zip(sites, eliminations))
    partials = "; ".join(" + ".join(f"[{_lead(site)}{w}] {str(d).removeprefix('torch.')}" for w, d in partial_pairs(e))
                         for site, e in zip(sites, eliminations))
    steps = tuple(dict.fromkeys(facts.target_name(s) for site in sites for s in site.steps))
    return GatherElimination(
        gather=gather.name,
        consumers=tuple(e.consumer for e in eliminations),
        matchers=tuple(names),
        nodes=tuple(dict.fromkeys(n.name for site, e in zip(sites, eliminations)
                                  for n in (site.consumer, *e.claims))),
        group_name=group,
        world_size=len(widths),
        hidden_widths=widths,
        dtype=value.dtype,
        steps=steps,
        valid_columns=next((s.valid_columns for s in sites if s.valid_columns is not None), None),
        gathered_bytes=str(rows * sum(widths) * value.dtype.itemsize),
        partial_bytes=str(partial_bytes),
        partials=partials,
    )


def _lead(site: ReductionSite) -> str:
    lead = ", ".join(str(d) for d in facts.shape(site.value)[:-1])
    return f"{lead}, " if lead else ""


# --------------------------------------------------------------------------- rewrite


def rewrite_gather_eliminations(graph: Graph, found: list[FoundElimination]) -> list[GatherElimination]:
    """Replace every eliminated consumer; erase the gather and what it fed once unused."""
    records = []
    for item in found:
        added = []
        for site, elimination in zip(item.sites, item.eliminations):
            added += replace_consumer(graph, site, elimination)
        erase_dead_after(item.gather, [n for e in item.eliminations for n in (*e.claims, *e.region)])
        records.append(replace(item.record, replacement=added[-1].name if added else None,
                               after=tuple(node_line(n) for n in added)))
    return records


# --------------------------------------------------------------------------- the gather matches it marks


def tpfuse_gather_of(graph: Graph, matches: list[GatherMatch]) -> dict[int, str]:
    """For each match (by position), the tpfuse gather its replacement ends in (up first arguments),
    read before the elimination rewrite erases it."""
    nodes = {n.name: n for n in graph.nodes}
    out = {}
    for i, m in enumerate(matches):
        node = nodes.get(m.replacement) if m.replacement else None
        while isinstance(node, Node) and node.target is not _gather_op():
            node = node.args[0] if node.args and isinstance(node.args[0], Node) else None
        if node is not None:
            out[i] = node.name
    return out


def mark_eliminated(matches: list[GatherMatch], gathers: dict[int, str],
                    records: list[GatherElimination]) -> list[GatherMatch]:
    """The gather matches whose tpfuse gather was then eliminated, marked with the consumers."""
    by_gather = {r.gather: r for r in records}
    out = []
    for i, m in enumerate(matches):
        record = by_gather.get(gathers.get(i, ""))
        out.append(replace(m, eliminated=", ".join(record.consumers)) if record else m)
    return out
