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
    """One graph form: its name, matcher, replacement, preconditions and priority."""

    name: str
    match: Matcher
    replacement: Replacement
    preconditions: tuple[Precondition, ...] = ()
    priority: int = 0
    description: str = ""
    builtin: bool = field(default=False, compare=False)

    def cache_key(self) -> str:
        """Changes whenever the pattern's behaviour can change: name, priority and
        the source of every function it runs."""
        parts = [self.name, str(self.priority)]
        for fn in (self.match, self.replacement, *(p.check for p in self.preconditions)):
            parts.append(_function_fingerprint(fn))
        parts += [p.name for p in self.preconditions]
        return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


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


def register_pattern(pattern: FusionPattern, *, replace: bool = False) -> FusionPattern:
    return REGISTRY.register(pattern, replace=replace)


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
