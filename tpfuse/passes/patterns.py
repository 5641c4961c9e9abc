"""Fusion patterns: one object per graph form, and the registry the pass reads.

A pattern is anchored at a *gather site*: a functional
``all_gather_into_tensor`` and the ``wait_tensor`` of its result.  The pass
offers every site to every registered pattern, highest priority first:

- ``pattern.match(site)`` returns a :class:`Candidate` (the nodes whose value
  becomes the op's output), a :class:`Reject` with a reason (the form is the
  pattern's, but something about it is wrong: recorded as a near-miss), or
  ``None`` (not this pattern's form: nothing is recorded).
- Each of ``pattern.preconditions`` then checks the candidate; a failing one
  returns the near-miss reason.
- The first candidate that passes is rewritten by ``pattern.replacement``.

The built-in forms (``builtin_patterns.py``) are registered through this same
API; user patterns join them, the same report and the same cache key.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.fx import Graph, Node

from . import graph_facts as facts


@dataclass(frozen=True)
class GatherSite:
    """``wait_tensor(all_gather_into_tensor(local, world_size, group_name))``.

    World size and group come from the matched nodes, never from a literal in
    a pattern."""

    gather: Node
    wait: Node
    local: Node
    world_size: int
    group_name: str

    @property
    def local_shape(self) -> tuple:
        return facts.shape(self.local)

    @property
    def hidden_width(self) -> Any:
        return self.local_shape[-1]

    @property
    def rows(self) -> Any:
        """Leading size of the local slab: the band height of each rank in the result."""
        return self.local_shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return facts.val(self.local).dtype

    @property
    def hidden_widths(self) -> tuple:
        # all_gather_into_tensor moves equal shapes, so every rank has this width
        return (self.hidden_width,) * self.world_size


@dataclass(frozen=True)
class Candidate:
    """What a pattern found at a site.

    ``output`` is the node whose value the replacement computes; ``region``
    lists the nodes (besides the gather and the wait) that die with the
    rewrite; ``inputs`` are the tensors the replacement reads."""

    output: Node
    region: tuple[Node, ...]
    inputs: tuple[Node, ...]
    extra: tuple[tuple[str, Any], ...] = ()  # pattern-specific facts, e.g. ("columns", 1000)

    def fact(self, name: str, default: Any = None) -> Any:
        return dict(self.extra).get(name, default)


@dataclass(frozen=True)
class Reject:
    """The form is this pattern's, but it cannot be rewritten, because ``reason``."""

    reason: str
    nodes: tuple[Node, ...] = ()


@dataclass(frozen=True)
class Precondition:
    """A named check; ``check(site, candidate)`` returns ``None`` or the near-miss reason."""

    name: str
    check: Callable[[GatherSite, Candidate], str | None]


#: ``replacement(graph, site, candidate, skip_entry_sync)`` inserts nodes before
#: ``candidate.output`` and returns the node that replaces its value.
Replacement = Callable[[Graph, GatherSite, Candidate, bool], Node]
Matcher = Callable[[GatherSite], "Candidate | Reject | None"]


@dataclass(frozen=True)
class FusionPattern:
    """One graph form: its name, matcher, replacement, preconditions and priority.

    ``replacement`` is either a graph emitter (an object with ``emits_graph =
    True``, as the built-in patterns use) or a plain traceable function of the
    candidate's inputs (see ``traced.py``); a traceable replacement needs a
    ``search`` (the reference computation on the gathered rows) and an
    ``example`` so that it is checked when it is registered.
    ``rank_dependent=True`` declares that the replacement takes ``rank=`` and
    builds a different graph on each rank (the cache key then includes the rank).
    """

    name: str
    match: Matcher
    replacement: Any
    preconditions: tuple[Precondition, ...] = ()
    priority: int = 0
    description: str = ""
    search: Callable | None = None
    example: Any = None  # traced.Example
    rank_dependent: bool = False
    builtin: bool = field(default=False, compare=False)

    def __post_init__(self) -> None:
        from .traced import PatternError, TracedReplacement

        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise PatternError(f"tpfuse: pattern name {self.name!r} must be an identifier-like string")
        if not callable(self.match):
            raise PatternError(f"tpfuse: pattern {self.name!r}: match must be callable (site -> "
                               "Candidate | Reject | None)")
        if not isinstance(self.priority, int):
            raise PatternError(f"tpfuse: pattern {self.name!r}: priority must be an int")
        preconditions = tuple(self.preconditions)
        bad = [p for p in preconditions if not isinstance(p, Precondition)]
        if bad:
            raise PatternError(f"tpfuse: pattern {self.name!r}: preconditions must be "
                               f"Precondition(name, check) objects, got {bad!r}")
        object.__setattr__(self, "preconditions", preconditions)
        if not getattr(self.replacement, "emits_graph", False):
            object.__setattr__(self, "replacement",
                               TracedReplacement(self.replacement, self.rank_dependent))

    def cache_key(self) -> str:
        """Changes whenever the pattern's behaviour can change: name, priority and
        the source of every function it runs."""
        parts = [self.name, str(self.priority), str(self.rank_dependent), repr(self.example)]
        functions = (self.match, self.replacement, *(p.check for p in self.preconditions))
        if self.search is not None:
            functions += (self.search,)
        for fn in functions:
            parts.append(_function_fingerprint(fn))
        parts += [p.name for p in self.preconditions]
        return hashlib.sha256("\x00".join(parts).encode()).hexdigest()

    def check(self) -> None:
        """The registration-time checks of a traceable replacement (raises PatternError)."""
        from .traced import Example, PatternError, TracedReplacement, check_traced_pattern

        if not isinstance(self.replacement, TracedReplacement):
            return  # a graph emitter: checked by graph tests, like the built-ins
        if self.search is None or not isinstance(self.example, Example):
            raise PatternError(
                f"tpfuse: pattern {self.name!r}: a traceable replacement needs search= (the "
                "computation it replaces, as a function of the gathered rows) and "
                "example=Example(...) so that both can be checked now, at registration"
            )
        check_traced_pattern(self.name, self.search, self.replacement.fn, self.example,
                             self.rank_dependent)


def _function_fingerprint(fn: Callable) -> str:
    fingerprint = getattr(fn, "cache_key", None)  # objects may declare their own
    if callable(fingerprint):
        return str(fingerprint())
    target = getattr(fn, "__wrapped__", fn)
    if isinstance(target, __import__("functools").partial):
        return _function_fingerprint(target.func) + repr(target.args) + repr(sorted(target.keywords))
    try:
        return inspect.getsource(target)
    except (OSError, TypeError):
        code = getattr(target, "__code__", None)
        if code is None:
            return repr(target)
        return hashlib.sha256(code.co_code + repr(code.co_consts).encode()).hexdigest()


# --------------------------------------------------------------------------- registry


class PatternRegistry:
    """Registered patterns, ordered by priority (high first), then registration order."""

    def __init__(self) -> None:
        self._patterns: dict[str, FusionPattern] = {}
        self._order: dict[str, int] = {}
        self._counter = 0

    def register(self, pattern: FusionPattern, *, replace: bool = False) -> FusionPattern:
        if not isinstance(pattern, FusionPattern):
            raise TypeError(
                f"tpfuse: register_pattern expects a FusionPattern, got {type(pattern).__name__}"
            )
        pattern.check()  # a bad pattern fails here, with the reason, not mid-compile
        if pattern.name in self._patterns and not replace:
            raise ValueError(
                f"tpfuse: a pattern named {pattern.name!r} is already registered; "
                "unregister it first or pass replace=True"
            )
        self._patterns[pattern.name] = pattern
        self._counter += 1
        self._order.setdefault(pattern.name, self._counter)
        return pattern

    def unregister(self, name: str) -> FusionPattern:
        if name not in self._patterns:
            raise KeyError(
                f"tpfuse: no pattern named {name!r}; registered are {sorted(self._patterns)}"
            )
        self._order.pop(name)
        return self._patterns.pop(name)

    def __contains__(self, name: str) -> bool:
        return name in self._patterns

    def get(self, name: str) -> FusionPattern:
        return self._patterns[name]

    def ordered(self) -> list[FusionPattern]:
        return sorted(self._patterns.values(), key=lambda p: (-p.priority, self._order[p.name]))

    def names(self) -> list[str]:
        return [p.name for p in self.ordered()]

    def cache_key(self) -> str:
        keys = [p.cache_key() for p in self.ordered()]
        return hashlib.sha256("\x00".join(keys).encode()).hexdigest()

    @contextlib.contextmanager
    def scoped(self, *patterns: FusionPattern) -> Iterator[None]:
        """Register ``patterns`` for the duration of a ``with`` block."""
        added = []
        try:
            for p in patterns:
                added.append(self.register(p).name)
            yield
        finally:
            for name in reversed(added):
                if name in self._patterns:
                    self.unregister(name)


REGISTRY = PatternRegistry()


def register_pattern(pattern: FusionPattern | None = None, *, replace: bool = False,
                     **fields: Any) -> FusionPattern:
    """Register a pattern: ``register_pattern(FusionPattern(...))`` or
    ``register_pattern(name=..., match=..., replacement=..., search=..., example=...)``.

    It joins the same pass, report and cache key as the built-in patterns.
    Refused here, with the reason, when it is malformed or its replacement does
    not compute the search's shape and dtype on the example."""
    if pattern is None:
        pattern = FusionPattern(**fields)
    elif fields:
        raise TypeError("tpfuse: give either a FusionPattern or its fields, not both")
    return REGISTRY.register(pattern, replace=replace)


def pattern_scope(*patterns: FusionPattern):
    """``with tpfuse.pattern_scope(p1, p2):`` -- registered inside the block only."""
    return REGISTRY.scoped(*patterns)


def unregister_pattern(name: str) -> FusionPattern:
    return REGISTRY.unregister(name)


def registered_patterns() -> list[FusionPattern]:
    return REGISTRY.ordered()


def select(names: Sequence[str] | None) -> list[FusionPattern]:
    ordered = REGISTRY.ordered()
    if names is None:
        return ordered
    unknown = sorted(set(names) - {p.name for p in ordered})
    if unknown:
        raise ValueError(
            f"tpfuse: unknown pattern(s) {unknown}; registered are {[p.name for p in ordered]}"
        )
    return [p for p in ordered if p.name in set(names)]
