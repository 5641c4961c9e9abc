"""Gather elimination: a hidden-axis gather consumed only by reductions over that axis is not gathered.

Runs on the post-grad graph after the gather rewrite (``hidden_gather.py``) turned every gather
it knows into ``tpfuse::all_gather_hidden``, and before barrier elision; so one walk covers every
gather form the pattern pass knows, and gathers written with ``tpfuse.all_gather_hidden`` by
hand (docs/passes.md, "Gather elimination").

From each gather the walk follows the gathered tensor through the steps that commute with the
gather (``Step``): elementwise ops whose other operands are scalars, broadcast along the
hidden axis, or full width (applied to this rank's band through ``tpfuse::hidden_band``), and
prefix slices ``[..., :V]`` that drop vocabulary padding.  Every other user is a *consumer*,
offered to the registered ``EliminationMatcher`` objects, highest priority first.  A matcher
answers with an ``Elimination`` (the consumer nodes it replaces, and a traceable replacement
that computes them from this rank's band), a ``Reject`` (its consumer, but not rewritable:
a near-miss), or ``None``.  The gather goes only if EVERY consumer is eliminated; otherwise
it stays, and when some matcher claimed or rejected a consumer, the report says why
(another user, an unsupported consumer, a reduction over another axis).

``find_gather_eliminations`` returns frozen records and changes nothing;
``rewrite_gather_eliminations`` consumes them.  The EXACT family (argmax, argmin, max,
min, amax, amin, topk) is built in (``EXACT_MATCHERS``); the sum family is
``eliminate_sums.MATCHERS`` (both registered by ``tpfuse/passes/__init__.py``); a user registers their own with ``register_elimination``
(docs/patterns.md, "Eliminating a gather before your own reduction").
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator

import torch
from torch.fx import Graph, Node
from torch.fx.node import map_arg

from ..compile_ops import reduce_hidden  # noqa: F401 - registers the ops the rewrite emits
from . import graph_facts as facts
from .patterns import Reject, function_fingerprint
from .records import GatherElimination, GatherMatch, NearMiss

aten = torch.ops.aten
DOC = "docs/passes.md#gather-elimination"


def _gather_op():
    return torch.ops.tpfuse.all_gather_hidden.default


# --------------------------------------------------------------------------- what a matcher sees


@dataclass(frozen=True)
class ReductionSite:
    """One consumer of a gathered tensor, offered to the matchers.

    ``value`` is the full-width tensor the consumer reads: the gather's result after
    ``steps`` (elementwise ops and prefix slices, gather side first).  Its last axis is the
    gathered one.  ``valid_columns`` is ``V`` when a slice ``[..., :V]`` is among the steps
    (None: every column).  ``hidden_widths`` and ``group_name`` are the gather's."""

    gather: Node
    local: Node
    hidden_widths: tuple[int, ...]
    group_name: str
    value: Node
    consumer: Node
    steps: tuple[Node, ...]
    valid_columns: int | None = None

    @property
    def graph(self) -> Graph:
        return self.gather.graph

    @property
    def facts(self):
        """``tpfuse.passes.graph_facts``: shapes, sizes compared without guards, node meanings."""
        return facts

    @property
    def world_size(self) -> int:
        return len(self.hidden_widths)

    @property
    def ndim(self) -> int:
        return facts.ndim(self.value)

    @property
    def columns(self) -> int:
        """How many global columns the consumer reduces over."""
        total = sum(self.hidden_widths)
        return total if self.valid_columns is None else min(total, self.valid_columns)

    @property
    def dtype(self) -> torch.dtype:
        return facts.val(self.value).dtype

    def reduces_hidden_axis(self, dims: Any) -> bool:
        """``dims`` (an int or a list, as the consumer spells it) is exactly the last axis."""
        if isinstance(dims, int):
            dims = [dims]
        if not isinstance(dims, (list, tuple)) or len(dims) != 1 or not isinstance(dims[0], int):
            return False
        return facts.nonneg_dim(dims[0], self.ndim) == self.ndim - 1

    def other_axis_reject(self, what: str, dims: Any) -> Reject:
        """The near-miss of a consumer that reduces over some other axis (or all of them)."""
        where = "all dims" if dims is None or dims == [] else f"dim {dims}"
        return Reject(f"{what} reduces over {where}, not the gathered (last) axis "
                      f"{self.ndim - 1}", (self.consumer,))


@dataclass(frozen=True)
class Elimination:
    """What a matcher found: the consumer's nodes and how to compute them without the gather.

    ``outputs``: the nodes whose values the replacement returns, in order (``None`` for a
    returned value nobody uses); their uses are redirected.  ``claims``: users of
    ``site.value`` consumed besides ``site.consumer``.  ``region``: further nodes that die.
    ``inputs``: other graph values the replacement reads.  ``replacement`` is a traceable
    function::

        replacement(band, *inputs, hidden_widths=[...], group_name="...", valid_columns=V | None,
                    **dict(extra)) -> Tensor | tuple[Tensor, ...]

    where ``band`` is this rank's ``[..., w_rank]`` band of ``site.value`` (the steps already
    applied; with ``valid_columns`` its columns at global index >= V must be ignored).
    ``partials``: (elements per rank per row, dtype) that travel instead, for the report."""

    consumer: str
    outputs: tuple[Node | None, ...]
    replacement: Callable
    claims: tuple[Node, ...] = ()
    region: tuple[Node, ...] = ()
    inputs: tuple[Node, ...] = ()
    extra: tuple[tuple[str, Any], ...] = ()
    partials: tuple[int, torch.dtype] = (2, torch.int32)


Matcher = Callable[[ReductionSite], "Elimination | Reject | None"]


@dataclass(frozen=True)
class EliminationMatcher:
    """One consumer family: ``match(site)`` -> ``Elimination`` | ``Reject`` | ``None``.

    ``consumers``: the op overloads (or packets) it is offered; empty: every consumer.
    At each consumer the highest-priority matcher that answers with an ``Elimination`` wins."""

    name: str
    match: Matcher
    consumers: tuple = ()
    priority: int = 0
    description: str = ""
    builtin: bool = field(default=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(f"tpfuse: elimination matcher name {self.name!r} must be an identifier-like string")
        if not callable(self.match):
            raise ValueError(f"tpfuse: elimination matcher {self.name!r}: match must be callable "
                             "(ReductionSite -> Elimination | Reject | None)")
        if not isinstance(self.priority, int):
            raise ValueError(f"tpfuse: elimination matcher {self.name!r}: priority must be an int")
        object.__setattr__(self, "consumers", _overloads(self.name, self.consumers))

    def offered(self, node: Node) -> bool:
        return not self.consumers or node.target in self.consumers

    def cache_key(self) -> str:
        parts = [self.name, str(self.priority), repr(sorted(map(str, self.consumers))),
                 function_fingerprint(self.match)]
        return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def _overloads(name: str, consumers: Any) -> tuple:
    if isinstance(consumers, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        consumers = (consumers,)
    out = []
    for op in consumers:
        if isinstance(op, torch._ops.OpOverloadPacket):
            out += [getattr(op, o) for o in op.overloads()]
        elif isinstance(op, torch._ops.OpOverload):
            out.append(op)
        else:
            raise ValueError(f"tpfuse: elimination matcher {name!r}: consumer {op!r} is not an op; accepted "
                             "are OpOverloads (torch.ops.aten.argmax.default) or packets (torch.ops.aten.max)")
    return tuple(out)


# --------------------------------------------------------------------------- registry


class EliminationRegistry:
    """Registered matchers, ordered by priority (high first), then registration order."""

    def __init__(self) -> None:
        self._matchers: dict[str, EliminationMatcher] = {}
        self._order: dict[str, int] = {}
        self._counter = 0

    def register(self, matcher: EliminationMatcher, *, replace: bool = False) -> EliminationMatcher:
        if not isinstance(matcher, EliminationMatcher):
            raise TypeError(f"tpfuse: register_elimination expects an EliminationMatcher, got "
                            f"{type(matcher).__name__}")
        if matcher.name in self._matchers and not replace:
            raise ValueError(f"tpfuse: an elimination matcher named {matcher.name!r} is already registered; "
                             "unregister it first or pass replace=True")
        self._matchers[matcher.name] = matcher
        self._counter += 1
        self._order.setdefault(matcher.name, self._counter)
        return matcher

    def unregister(self, name: str) -> EliminationMatcher:
        if name not in self._matchers:
            raise KeyError(f"tpfuse: no elimination matcher named {name!r}; registered are "
                           f"{sorted(self._matchers)}")
        self._order.pop(name)
        return self._matchers.pop(name)

    def __contains__(self, name: str) -> bool:
        return name in self._matchers

    def ordered(self) -> list[EliminationMatcher]:
        return sorted(self._matchers.values(), key=lambda m: (-m.priority, self._order[m.name]))

    def cache_key(self) -> str:
        return hashlib.sha256("\x00".join(m.cache_key() for m in self.ordered()).encode()).hexdigest()

    @contextlib.contextmanager
    def scoped(self, *matchers: EliminationMatcher) -> Iterator[None]:
        added = []
        try:
            for m in matchers:
                added.append(self.register(m).name)
            yield
        finally:
            for name in reversed(added):
                if name in self._matchers:
                    self.unregister(name)


ELIMINATIONS = EliminationRegistry()


def register_elimination(matcher: EliminationMatcher | None = None, *, replace: bool = False,
                         **fields: Any) -> EliminationMatcher:
    """Register a matcher: ``register_elimination(EliminationMatcher(...))`` or its fields.
    It joins the same pass, report and cache key as the built-in ones."""
    if matcher is None:
        matcher = EliminationMatcher(**fields)
    elif fields:
        raise TypeError("tpfuse: give either an EliminationMatcher or its fields, not both")
    return ELIMINATIONS.register(matcher, replace=replace)


def unregister_elimination(name: str) -> EliminationMatcher:
    return ELIMINATIONS.unregister(name)


def registered_eliminations() -> list[EliminationMatcher]:
    return ELIMINATIONS.ordered()


def elimination_scope(*matchers: EliminationMatcher):
    """``with tpfuse.elimination_scope(m1, m2):`` -- registered inside the block only."""
    return ELIMINATIONS.scoped(*matchers)


def register_builtin_eliminations(matchers) -> None:
    """Register the built-in matchers (``tpfuse/passes/__init__.py`` hands them over: the exact
    family below and the sum family of ``eliminate_sums.MATCHERS``, which imports this module)."""
    for matcher in matchers:
        if matcher.name not in ELIMINATIONS:
            ELIMINATIONS.register(matcher)


# --------------------------------------------------------------------------- the walk


@dataclass(frozen=True)
class _Leaf:
    value: Node
    consumer: Node
    steps: tuple[Node, ...]
    valid_columns: int | None
    why: str = ""  # why the consumer is no step, when it nearly is one


def _positions(graph: Graph) -> dict[Node, int]:
    return {n: i for i, n in enumerate(graph.nodes)}


def _depends_on(node: Node, gather: Node, positions: dict[Node, int]) -> bool:
    """``node`` reads the gather's result, directly or not (a walk back over nodes after it)."""
    start = positions[gather]
    pending, seen = [node], set()
    while pending:
        current = pending.pop()
        if current is gather:
            return True
        if current in seen or positions.get(current, -1) <= start:
            continue
        seen.add(current)
        pending += current.all_input_nodes
    return False


def _operand_problem(operand: Node, chain: Node, gather: Node, positions) -> str | None:
    """None when ``operand`` may be applied to a band: scalar, broadcast along the hidden axis,
    or exactly as wide as the chain (then banded); else why not."""
    shape = facts.shape(operand)
    if shape is None:
        return f"operand {operand.name} has no shape metadata"
    if _depends_on(operand, gather, positions):
        return f"operand {operand.name} is computed from the gathered tensor"
    width = facts.shape(chain)[-1]
    if len(shape) == 0 or facts.same_size(shape[-1], 1) or facts.same_size(shape[-1], width):
        return None
    return f"operand {operand.name} has last dim {shape[-1]}, neither 1 nor the gathered width {width}"


def _elementwise_step(user: Node, chain: Node, gather: Node, positions) -> str | None:
    """None when ``user`` is an elementwise step of ``chain`` that commutes with the gather; else why not."""
    if user.op != "call_function" or not isinstance(user.target, torch._ops.OpOverload):
        return "not an op"
    tags = user.target.tags
    if torch.Tag.pointwise not in tags or torch.Tag.nondeterministic_seeded in tags:
        return "not an elementwise op"
    if not facts.same_shape(facts.shape(user) or (), facts.shape(chain)):
        return f"{user.name} broadcasts the gathered tensor to another shape"
    for operand in user.all_input_nodes:
        if operand is not chain:
            problem = _operand_problem(operand, chain, gather, positions)
            if problem is not None:
                return problem
    return None


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
    if start not in (0, None) or step != 1 or not isinstance(end, (int, type(None))):
        return False, None, (f"{user.name} slices columns [{start}:{end}:{step}] of the gathered axis; only a "
                             "prefix slice [..., :V] with a literal V moves to the ranks")
    width = facts.shape(chain)[-1]
    if end is None or (isinstance(width, int) and end >= width):
        return True, None, None
    return True, end, None


def _leaves(gather: Node, positions) -> list[_Leaf]:
    """Every consumer reached from the gather through steps, in graph order."""
    leaves, pending = [], [(gather, (), None)]
    while pending:
        chain, steps, valid = pending.pop(0)
        for user in chain.users:
            is_slice, end, why = _prefix_slice(user, chain)
            if is_slice:
                columns = valid if end is None else end if valid is None else min(valid, end)
                pending.append((user, steps + (user,), columns))
                continue
            if why is None:
                why = _elementwise_step(user, chain, gather, positions)
                if why is None:
                    pending.append((user, steps + (user,), valid))
                    continue
            leaves.append(_Leaf(chain, user, steps, valid, why))
    return sorted(leaves, key=lambda leaf: positions.get(leaf.consumer, 0))


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
    positions = _positions(graph)
    for gather in gathers:
        known = _gather_facts(gather)
        if known is not None:
            _find_one(gather, *known, matchers, positions, result)
    return result


def _find_one(gather, local, widths, group, matchers, positions, result: EliminationFind) -> None:
    claimed: set[Node] = set()
    sites, eliminations, names, missing = [], [], [], []
    for leaf in _leaves(gather, positions):
        if leaf.consumer in claimed:
            continue
        site = ReductionSite(gather, local, widths, group, leaf.value, leaf.consumer, leaf.steps,
                             leaf.valid_columns)
        outcome, name, rejects = _offer(site, matchers)
        problem = None if outcome is None else _claim_problem(site, outcome)
        if problem is not None:
            outcome, rejects = None, rejects + [(name, problem)]
        if outcome is None:
            missing.append((leaf, rejects))
            continue
        claimed.update((leaf.consumer, *outcome.claims))
        sites.append(site)
        eliminations.append(outcome)
        names.append(name)
    if missing:
        if eliminations or any(rejects for _, rejects in missing):
            # a reduction was (nearly) found: say why the gather stays
            result.near_misses.append(_near_miss(gather, missing))
        return
    if eliminations:
        record = _record(gather, widths, group, sites, eliminations, names)
        result.found.append(FoundElimination(gather, tuple(sites), tuple(eliminations), tuple(names), record))


def _offer(site: ReductionSite, matchers) -> tuple[Elimination | None, str, list]:
    """The first Elimination of the matchers offered this consumer, with every Reject before it."""
    rejects = []
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
            rejects.append((matcher.name, outcome.reason))
        elif outcome is not None:
            return outcome, matcher.name, rejects
    return None, "", rejects


def _claim_problem(site: ReductionSite, found: Elimination) -> str | None:
    stray = [n.name for n in found.claims if n not in site.value.users]
    if stray:
        return f"claims {', '.join(stray)}, which do not read {site.value.name}"
    if not found.outputs or all(o is None for o in found.outputs):
        return "returns no output node to replace"
    return None


def _near_miss(gather: Node, missing: list) -> NearMiss:
    """Why the gather stays: per consumer that no matcher eliminated, the matchers' reasons, or
    that it is another user (the graph output, an op no matcher reduces)."""
    reasons, names = [], []
    for leaf, rejects in missing:
        user = leaf.consumer
        if rejects:
            reasons += [reason for _, reason in rejects]
            names += [name for name, _ in rejects]
            continue
        used_by = "the graph output" if user.op == "output" else facts.describe(user)
        detail = f" ({leaf.why})" if leaf.why and user.op != "output" and leaf.why not in (
            "not an op", "not an elementwise op") else ""
        reasons.append(f"the gathered logits are also used by {used_by}{detail}")
    nodes = (gather.name,) + tuple(leaf.consumer.name for leaf, _ in missing if leaf.consumer.op != "output")
    pattern = names[0] if names and len(set(names)) == 1 and len(names) == len(reasons) else "gather_elimination"
    return NearMiss(pattern, "gather kept: " + "; ".join(dict.fromkeys(reasons)), nodes, doc=DOC)


def _record(gather, widths, group, sites, eliminations, names) -> GatherElimination:
    value = facts.val(gather)
    rows = facts.product(value.shape[:-1])
    itemsize = value.dtype.itemsize
    words = sum(e.partials[0] for e in eliminations)
    partial_size = max(e.partials[1].itemsize for e in eliminations)
    lead = ", ".join(str(d) for d in value.shape[:-1])
    partials = "; ".join(f"[{lead}{', ' if lead else ''}{e.partials[0]}] {str(e.partials[1]).removeprefix('torch.')}"
                         for e in eliminations)
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
        gathered_bytes=str(rows * sum(widths) * itemsize),
        partial_bytes=str(rows * words * len(widths) * partial_size),
        partials=partials,
    )


# --------------------------------------------------------------------------- rewrite


def rewrite_gather_eliminations(graph: Graph, found: list[FoundElimination]) -> list[GatherElimination]:
    """Replace every eliminated consumer; erase the gather and its steps once unused."""
    records = []
    for item in found:
        added = []
        for site, elimination in zip(item.sites, item.eliminations):
            added += _replace(graph, site, elimination)
        dead = [item.gather] + [n for site, e in zip(item.sites, item.eliminations)
                                for n in (*site.steps, site.consumer, *e.claims, *e.region)]
        _erase_dead(dead)
        records.append(replace(item.record, replacement=added[-1].name if added else None,
                               after=tuple(_line(n) for n in added)))
    return records


def _band_of(site: ReductionSite) -> Callable:
    """A function (slab, *operands) -> this rank's band of ``site.value``: the steps replayed on
    the slab, full-width operands cut to the band by ``tpfuse::hidden_band``."""
    widths, group = [int(w) for w in site.hidden_widths], site.group_name
    local_width = facts.shape(site.local)[-1]
    steps = [s for s in site.steps if s.target not in facts.SLICES]
    operands = _operands(site)

    def band(slab, *values):
        env = dict(zip(operands, values))
        current, chain = slab, site.gather
        for step in site.steps:
            if step.target in facts.SLICES:
                chain = step
                continue

            def value_of(n, chain=chain, current=current):
                if n is chain:
                    return current
                operand = env[n]
                shape = facts.shape(n)
                if len(shape) and not facts.same_size(shape[-1], 1):
                    return torch.ops.tpfuse.hidden_band(operand, widths, local_width, group)
                return operand

            current = step.target(*map_arg(step.args, value_of), **map_arg(step.kwargs, value_of))
            chain = step
        return current

    band.steps = steps
    return band


def _operands(site: ReductionSite) -> list[Node]:
    chain_nodes = {site.gather, *site.steps}
    return list(dict.fromkeys(n for s in site.steps for n in s.all_input_nodes if n not in chain_nodes))


def _replace(graph: Graph, site: ReductionSite, elimination: Elimination) -> list[Node]:
    from torch._guards import detect_fake_mode
    from torch.fx.experimental.proxy_tensor import make_fx

    operands = _operands(site)
    band = _band_of(site)
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
    positions = _positions(site.graph)
    return max(inputs, key=lambda n: positions[n])


def _check_same(old: Node, new: Node, what: str) -> None:
    want, got = facts.val(old), facts.val(new)
    if not (isinstance(want, torch.Tensor) and isinstance(got, torch.Tensor)):
        return
    if want.dtype != got.dtype or not facts.same_shape(tuple(want.shape), tuple(got.shape)):
        raise ValueError(f"tpfuse: elimination {what!r} computes {list(got.shape)} {got.dtype} for "
                         f"{old.name}, which is {list(want.shape)} {want.dtype}")


def _erase_dead(nodes: list[Node]) -> None:
    """Erase the given nodes once nothing uses them (any order), then the gather's own inputs'
    orphans are left to Inductor's dead-code elimination."""
    pending = list(dict.fromkeys(nodes))
    progress = True
    while progress:
        progress = False
        for node in list(pending):
            if node.graph is not None and not node.users:
                node.graph.erase_node(node)
                pending.remove(node)
                progress = True


def _line(node: Node) -> str:
    from .hidden_gather import node_line

    return node_line(node)


# --------------------------------------------------------------------------- the exact family


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
        if user.op != "call_function" or user.target is not __import__("operator").getitem:
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


def cache_key() -> str:
    return ELIMINATIONS.cache_key()


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
