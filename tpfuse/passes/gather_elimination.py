"""Gather elimination: a hidden-axis gather consumed only by reductions over that axis is not gathered.

Runs on the post-grad graph after the gather rewrite (``hidden_gather.py``) turned every gather
it knows into ``tpfuse::all_gather_hidden``, and before barrier elision; so one walk covers every
gather form the pattern pass knows, and gathers written with ``tpfuse.all_gather_hidden`` by
hand (docs/passes.md, "Gather elimination").

From each gather the walk follows the gathered tensor through the steps that commute with the
gather: elementwise ops whose other operands are scalars, broadcast along the hidden axis, or
full width (applied to this rank's band through ``tpfuse::hidden_band``); prefix slices
``[..., :V]`` that drop vocabulary padding; and row selections and views that leave the
gathered (last) axis alone (``logits[:, -1, :]``, ``index``, ``view(-1, V)``, ...), replayed
on the slab so that only the selected rows are reduced and their partials travel.  Every other
user is a *consumer*, offered to the registered ``EliminationMatcher`` objects, highest
priority first.  A matcher answers with an ``Elimination`` (the consumer nodes it replaces, and
a traceable replacement that computes them from this rank's band), a ``Reject`` (its consumer,
but not rewritable: a near-miss), or ``None``.  Where two eliminations cover the same node (a
softmax's amax is an amax too) the wider one is taken.  The gather goes only if EVERY consumer
is covered and the partials take at most half the bytes of a gathered row (``_cost_problem``);
otherwise it stays, and when a matcher claimed or rejected a consumer, or a consumer stands
between the gather and a reduction (a select of the gathered axis before an argmax), the
report says why.

``find_gather_eliminations`` returns frozen records and changes nothing;
``rewrite_gather_eliminations`` consumes them.  The EXACT family (argmax, argmin, max,
min, amax, amin, topk) is built in (``EXACT_MATCHERS``); the sum family is
``eliminate_sums.MATCHERS`` (both registered by ``tpfuse/passes/__init__.py``); a user registers
their own with ``register_elimination`` (docs/patterns.md, "Eliminating a gather before your own
reduction").
"""

from __future__ import annotations

import contextlib
import hashlib
import operator
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
    ``steps`` (elementwise ops, prefix slices, row selections and views of the leading dims,
    gather side first).  Its last axis is the gathered one.  ``valid_columns`` is ``V`` when a
    slice ``[..., :V]`` is among the steps (None: every column).  ``hidden_widths`` and
    ``group_name`` are the gather's."""

    gather: Node
    local: Node
    hidden_widths: tuple[int, ...]
    group_name: str
    value: Node
    consumer: Node
    steps: tuple[Node, ...]
    valid_columns: int | None = None
    kinds: tuple[str, ...] = ()  # how each step is replayed on the band (POINTWISE, ROWS, ...)

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
    ``partials``: (elements per rank per row, dtype) that travel instead, or a tuple of such pairs
    when the replacement exchanges more than once; the report and the cost rule read them.
    ``inputs`` may be computed from the gathered tensor only through the ``outputs`` of another
    elimination of the same gather (the token of an eliminated argmax)."""

    consumer: str
    outputs: tuple[Node | None, ...]
    replacement: Callable
    claims: tuple[Node, ...] = ()
    region: tuple[Node, ...] = ()
    inputs: tuple[Node, ...] = ()
    extra: tuple[tuple[str, Any], ...] = ()
    partials: tuple = (2, torch.int32)  # (words, dtype) or ((words, dtype), ...)


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

#: ops that pick rows (or views of the leading dims) and commute with the gather when they leave the
#: gathered (last) axis alone: replayed on each rank's slab, so only the picked rows are reduced
SELECTS = facts.op_overloads("select.int")
INDEXES = facts.op_overloads("index.Tensor")
INDEX_SELECTS = facts.op_overloads("index_select.default")
GATHERS = facts.op_overloads("gather.default")
UNSQUEEZES = facts.op_overloads("unsqueeze.default")
SQUEEZES = facts.op_overloads("squeeze.dim", "squeeze.dims", "squeeze.default")
ALIASES = facts.op_overloads("alias.default")
_ROW_OPS = (SELECTS | facts.SLICES | INDEXES | INDEX_SELECTS | GATHERS | facts.RESHAPES | UNSQUEEZES | SQUEEZES
            | facts.PERMUTES | facts.TRANSPOSES | facts.T_OPS | ALIASES)
#: ops that only move, pick or copy elements: followed (never rewritten) from a consumer that is no
#: step, to find the reduction a near-miss is about
_MOVES_ELEMENTS = _ROW_OPS | facts.op_overloads(
    "expand.default", "as_strided.default", "narrow.default", "split.Tensor", "split_with_sizes.default",
    "unfold.default", "flip.default", "roll.default", "repeat.default", "clone.default", "cat.default")
#: reductions a near-miss may name (over any axis): what the built-in matchers reduce, and sums
_REDUCTIONS = facts.op_overloads(
    "argmax.default", "argmin.default", "max.dim", "min.dim", "max.default", "min.default", "amax.default",
    "amin.default", "topk.default", "sort.default", "sort.stable", "logsumexp.default", "sum.dim_IntList")
#: how many nodes the near-miss search follows from a consumer
_NEAR_MISS_REACH = 64

#: step kinds: how ``_band_of`` replays a step on this rank's slab
POINTWISE, PREFIX_SLICE, ROWS, RESHAPE, ROWS_GATHER = "pointwise", "prefix_slice", "rows", "reshape", "rows_gather"


@dataclass(frozen=True)
class _Leaf:
    value: Node
    consumer: Node
    steps: tuple[Node, ...]
    kinds: tuple[str, ...]
    valid_columns: int | None
    why: str = ""  # why the consumer is no step, when it nearly is one


def _positions(graph: Graph) -> dict[Node, int]:
    return {n: i for i, n in enumerate(graph.nodes)}


def _depends_on(node: Node, gather: Node, positions: dict[Node, int]) -> bool:
    """``node`` reads the gather's result, directly or not (a walk back over nodes after it)."""
    return _path_from(node, gather, frozenset(), positions) is not None


def _path_from(node: Node, gather: Node, stops, positions: dict[Node, int]) -> list[Node] | None:
    """A chain of inputs from ``gather`` to ``node`` that passes no node of ``stops`` (None: there is none)."""
    start = positions[gather]
    pending, came_from = [node], {node: None}
    while pending:
        current = pending.pop()
        if current is gather:
            path = [current]
            while came_from[path[-1]] is not None:
                path.append(came_from[path[-1]])
            return path
        if current in stops or positions.get(current, -1) <= start:
            continue
        for source in current.all_input_nodes:
            if source not in came_from:
                came_from[source] = current
                pending.append(source)
    return None


def _operand_problem(operand: Node, chain: Node, gather: Node, positions) -> str | None:
    """None when ``operand`` may be applied to a band: scalar, broadcast along the hidden axis,
    or exactly as wide as the chain (then banded); else why not."""
    shape = facts.shape(operand)
    if shape is None:
        return f"operand {operand.name} has no shape metadata"
    if _depends_on(operand, gather, positions):
        return f"operand {operand.name} is computed from the gathered tensor"
    drawn = _random_source(operand, frozenset((gather,)))
    if drawn is not None:
        return (f"operand {operand.name} is drawn at random ({drawn.name}): a rank's band of its own draw is not "
                "a band of the other ranks' draws")
    width = facts.shape(chain)[-1]
    if len(shape) == 0 or facts.same_size(shape[-1], 1) or facts.same_size(shape[-1], width):
        return None
    return f"operand {operand.name} has last dim {shape[-1]}, neither 1 nor the gathered width {width}"


#: how many nodes the search for a random source of an operand looks at
_RANDOM_REACH = 256


def _random_source(operand: Node, stops=frozenset()) -> Node | None:
    """A random op ``operand`` is computed from (Inductor's ``inductor_random`` reads seeds drawn by
    ``inductor_seeds``), not looking behind ``stops`` (values every rank holds alike, e.g. an eliminated
    argmax's token), or None.  Ranks need not share the seed, so such an operand cut to the band
    would mix the ranks' draws."""
    pending, seen = [operand], set()
    while pending and len(seen) < _RANDOM_REACH:
        node = pending.pop()
        if node in seen or node in stops:
            continue
        seen.add(node)
        target = node.target
        if isinstance(target, (torch._ops.OpOverload, torch._ops.HigherOrderOperator)) and \
                torch.Tag.nondeterministic_seeded in getattr(target, "tags", ()):
            return node
        pending += node.all_input_nodes
    return None


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


def _row_step(user: Node, chain: Node, gather: Node, positions) -> tuple[str | None, str | None]:
    """(kind, None) for a row selection or view that leaves the gathered (last) axis as it is; (None, why)
    for one of those ops that touches it; (None, None) for any other op."""
    if user.op != "call_function" or user.target not in _ROW_OPS:
        return None, None
    if not user.args or user.args[0] is not chain:
        return None, f"{user.name} reads the gathered tensor other than as its input"
    rank, width, out = facts.ndim(chain), facts.shape(chain)[-1], facts.shape(user)
    if out is None or not out:
        return None, f"{user.name} leaves no gathered axis"
    why = _touches_hidden_axis(user, rank, width)
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
        if _depends_on(operand, gather, positions):
            return None, f"the row index {operand.name} of {user.name} is computed from the gathered tensor"
        if _random_source(operand, frozenset((gather,))) is not None:
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


def _step_of(user: Node, chain: Node, gather: Node, positions) -> tuple[str | None, int | None, str]:
    """(kind, prefix end, "") when ``user`` is a step of ``chain``; (None, None, why) when it is not."""
    is_slice, end, why = _prefix_slice(user, chain)
    if is_slice:
        return PREFIX_SLICE, end, ""
    if why is None:
        kind, why = _row_step(user, chain, gather, positions)
        if kind is not None:
            return kind, None, ""
    if why is None:
        why = _elementwise_step(user, chain, gather, positions)
        if why is None:
            return POINTWISE, None, ""
    return None, None, why


def _leaves(gather: Node, positions) -> list[_Leaf]:
    """Every consumer reached from the gather through steps, in graph order."""
    leaves, pending = [], [(gather, (), (), None)]
    while pending:
        chain, steps, kinds, valid = pending.pop(0)
        for user in chain.users:
            kind, end, why = _step_of(user, chain, gather, positions)
            if kind is None:
                leaves.append(_Leaf(chain, user, steps, kinds, valid, why))
                continue
            columns = valid if end is None else end if valid is None else min(valid, end)
            pending.append((user, steps + (user,), kinds + (kind,), columns))
    return sorted(leaves, key=lambda leaf: positions.get(leaf.consumer, 0))


def _reduction_after(node: Node, width: Any, reductions) -> Node | None:
    """The first reduction reached from ``node`` (itself included) through ops that move, pick or
    compute elements, or keep a last axis as wide as the gathered one (a cumsum), or None: a
    consumer on such a path is a near-miss, one that feeds a matmul is not."""
    pending, seen = [node], set()
    while pending and len(seen) < _NEAR_MISS_REACH:
        current = pending.pop(0)
        if current in seen or current.op != "call_function":
            continue
        seen.add(current)
        if current.target in reductions:
            return current
        target, shape = current.target, facts.shape(current)
        passes = (target is operator.getitem or target in _MOVES_ELEMENTS
                  or (isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags)
                  or (bool(shape) and facts.same_size(shape[-1], width)))
        if passes:
            pending += list(current.users)
    return None


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
    positions = _positions(graph)
    reductions = _REDUCTIONS | frozenset(op for m in matchers if not m.builtin for op in m.consumers)
    for gather in gathers:
        known = _gather_facts(gather)
        if known is not None:
            _find_one(gather, *known, matchers, positions, reductions, result)
    return result


def _find_one(gather, local, widths, group, matchers, positions, reductions, result: EliminationFind) -> None:
    first: dict[Node, _Leaf] = {}
    for leaf in _leaves(gather, positions):
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
    explained = _explained(rejects)
    chosen = _choose(gather, candidates, rejects, explained, first, positions)
    covered = frozenset().union(*(c.covers for c in chosen))
    missing = [leaf for consumer, leaf in first.items() if consumer not in covered]
    if missing:
        near = _near_miss(gather, missing, rejects, explained, chosen, reductions)
        if near is not None:
            result.near_misses.append(near)
        return
    if not chosen:
        return
    sites, eliminations = tuple(c.site for c in chosen), tuple(c.elimination for c in chosen)
    too_costly = _cost_problem(gather, widths, eliminations)
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


def _explained(rejects: dict) -> dict:
    """node -> the consumer whose matcher's Reject is about it (a rejected softmax's inner nodes):
    those consumers are not listed again, each with a reason of its own, in the near-miss."""
    return {node: consumer for consumer, said in rejects.items() for *_, nodes in said for node in nodes}


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
        drawn = _random_source(node, stops | {gather})
        if drawn is not None:  # e.g. a token sampled by each rank: the ranks' bands would answer for different ones
            return (f"{candidate.elimination.consumer}: its input {node.name} is drawn at random ({drawn.name}); "
                    "every rank must read the same")
        path = _path_from(node, gather, stops, positions)
        if path is not None:
            via = next((n for n in path if n in consumers), path[1] if len(path) > 1 else node)
            return (f"{candidate.elimination.consumer}: its input {node.name} is computed from the gathered "
                    f"logits through {facts.describe(via)}, which is not eliminated")
    return None


def _near_miss(gather: Node, missing: list[_Leaf], rejects: dict, explained: dict, chosen,
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
        detail = leaf.why if leaf.why not in ("", "not an op", "not an elementwise op") else ""
        if reduction is not None and reduction is not user and not detail:
            detail = ("an op the pass does not move to the ranks: only elementwise ops, prefix slices, row "
                      "selections and views of the leading dims are")
        text = f"the gathered logits are also used by {facts.describe(user)}" + (f" ({detail})" if detail else "")
        if reduction is user:
            text += ", a reduction no matcher eliminates"
        elif reduction is not None:
            text += f", on the way to {facts.describe(reduction)}"
        reasons.append(text)
    if not close:
        return None
    nodes = (gather.name,) + tuple(leaf.consumer.name for leaf in missing if leaf.consumer.op != "output")
    pattern = names[0] if names and len(set(names)) == 1 and len(names) == len(reasons) else "gather_elimination"
    return NearMiss(pattern, "gather kept: " + "; ".join(dict.fromkeys(reasons)), nodes, doc=DOC)


# --------------------------------------------------------------------------- the cost rule

#: The gather is eliminated only when the partials of all its consumers take at most 1/MIN_SAVING_RATIO
#: of the bytes of a gathered row (docs/passes.md, "Gather elimination", "When it is not worth it").
MIN_SAVING_RATIO = 2


def partial_pairs(elimination: Elimination) -> tuple[tuple[int, torch.dtype], ...]:
    """``Elimination.partials`` as ((words per rank per row, dtype), ...): one pair, or one per exchange."""
    p = elimination.partials
    return (tuple(p),) if len(p) == 2 and isinstance(p[0], int) else tuple(tuple(x) for x in p)


def _partial_row_bytes(widths, elimination: Elimination) -> int:
    return sum(words * len(widths) * dtype.itemsize for words, dtype in partial_pairs(elimination))


def _cost_problem(gather: Node, widths, eliminations) -> str | None:
    """Why eliminating would not pay, or None.  Per row (so T may be symbolic), every rank alike: the
    gathered row moves ``sum(widths) * itemsize`` bytes and feeds one reduction kernel; eliminated,
    each consumer's exchange moves its partials (``words * W * 4`` bytes) and adds a local and a
    merge step.  Unless the exchange moves at most half the row's bytes, the saving cannot pay for
    the added steps (e.g. a top-k whose k is near the band's width, or several consumers on a row
    a few dozen columns wide)."""
    row = sum(widths) * facts.val(gather).dtype.itemsize
    partial = sum(_partial_row_bytes(widths, e) for e in eliminations)
    if partial * MIN_SAVING_RATIO <= row:
        return None
    return (f"eliminating {', '.join(e.consumer for e in eliminations)} would move {partial} B of partials per row "
            f"against the {row} B of a gathered row; the rule takes at most 1/{MIN_SAVING_RATIO} of it")


def _record(gather, widths, group, sites, eliminations, names) -> GatherElimination:
    value = facts.val(gather)
    rows = facts.product(value.shape[:-1])
    partial_bytes = sum(facts.product(facts.shape(site.value)[:-1]) * _partial_row_bytes(widths, e)
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
            added += _replace(graph, site, elimination)
        _erase_dead_after(item.gather, [n for e in item.eliminations for n in (*e.claims, *e.region)])
        records.append(replace(item.record, replacement=added[-1].name if added else None,
                               after=tuple(_line(n) for n in added)))
    return records


def _band_of(site: ReductionSite) -> Callable:
    """A function (slab, *operands) -> this rank's band of ``site.value``: the steps replayed on
    the slab (row selections as they are, reshapes to the band's width), full-width operands cut
    to the band by ``tpfuse::hidden_band``."""
    widths, group = [int(w) for w in site.hidden_widths], site.group_name
    local_width = facts.shape(site.local)[-1]
    operands = _operands(site)

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


def _kinds(site: ReductionSite) -> tuple[str, ...]:
    """The kind of each step (a site built by hand without kinds: elementwise ops and slices)."""
    if len(site.kinds) == len(site.steps):
        return site.kinds
    return tuple(PREFIX_SLICE if s.target in facts.SLICES else POINTWISE for s in site.steps)


def _band_shape(step: Node, band) -> list:
    """The shape of a reshape of the gathered tensor (leading dims merged or split, the gathered axis
    kept), for the band: the leading dims as the graph has them (one symbolic one as -1), the band's width."""
    return [d if isinstance(d, int) else -1 for d in facts.shape(step)[:-1]] + [band.shape[-1]]


def _operands(site: ReductionSite) -> list[Node]:
    chain_nodes = {site.gather, *site.steps}
    replayed = [s for s, k in zip(site.steps, _kinds(site)) if k not in (PREFIX_SLICE, RESHAPE)]
    return list(dict.fromkeys(n for s in replayed for n in s.all_input_nodes if n not in chain_nodes))


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


def _erase_dead_after(gather: Node, region: list[Node]) -> None:
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
    positions = _positions(gather.graph)
    for node in sorted((n for n in seen if n.graph is not None), key=lambda n: positions[n], reverse=True):
        if node.op == "call_function" and not node.users and not node.is_impure():
            node.graph.erase_node(node)


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
