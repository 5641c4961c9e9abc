"""What an elimination matcher sees and answers, and the registry of matchers.

A matcher is offered one consumer of a gathered tensor (a ``ReductionSite``) and answers with an
``Elimination`` (the consumer's nodes and a traceable replacement computing them from this rank's
band), a ``Reject`` (its consumer, but not rewritable: a near-miss), or ``None``.  The built-in
families (``exact_eliminations.EXACT_MATCHERS``, ``eliminate_sums.MATCHERS``) are registered by
``tpfuse/passes/__init__.py``; a user registers their own with ``register_elimination``
(docs/patterns.md, "Eliminating a gather before your own reduction").
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch.fx import Graph, Node

from . import graph_facts as facts
from .patterns import Reject, function_fingerprint

#: step kinds: how ``elimination_rewrite.band_of`` replays a step on this rank's slab
POINTWISE, PREFIX_SLICE, ROWS, RESHAPE, ROWS_GATHER = "pointwise", "prefix_slice", "rows", "reshape", "rows_gather"


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
        """``dims`` (an int or a list, as the consumer spells it) is exactly the last axis; or, of a
        1-D value, every axis (``logits[0, -1].argmax()``: ``dim=None``, ``amax(dim=[])``)."""
        if (dims is None or (isinstance(dims, (list, tuple)) and not dims)) and self.ndim == 1:
            return True
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
    family of ``exact_eliminations.py`` and the sum family of ``eliminate_sums.MATCHERS``, which
    both import this module)."""
    for matcher in matchers:
        if matcher.name not in ELIMINATIONS:
            ELIMINATIONS.register(matcher)


def cache_key() -> str:
    return ELIMINATIONS.cache_key()
