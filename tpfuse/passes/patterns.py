"""Fusion patterns: one object per graph form, and the registry the pass reads.

A pattern is anchored at a *gather site*: a call of one of its ``anchors``
(by default the functional ``all_gather_into_tensor``, whose ``wait_tensor``
the site also carries; any other op overload, e.g. a serving framework's own
opaque gather op, when the pattern names it).  The pass offers every site to
every pattern anchored on its op, highest priority first:

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
class AnchorArgs:
    """Which arguments of an anchor op are the local slab, the world size and the group.

    Each is a position in the call or an argument name of the op's schema.
    ``world_size=None`` takes the world size from the resolved group (for ops
    that pass only a group).  The default reads the first three positions, as
    the functional gather ``all_gather_into_tensor(input, group_size,
    group_name)`` spells them."""

    local: int | str = 0
    world_size: int | str | None = 1
    group: int | str = 2


#: How the functional gather's arguments are read (the default anchor).
FUNCTIONAL_ANCHOR_ARGS = AnchorArgs()


@dataclass(frozen=True)
class GatherSite:
    """One call of an anchor op, read into the facts every pattern needs.

    For the functional gather: ``wait_tensor(all_gather_into_tensor(local,
    world_size, group_name))``, with ``wait`` set.  For any other anchor op
    (``wait`` is ``None``): ``anchor`` is the call, and its value is whatever
    the op returns.  World size and group come from the anchor's arguments
    (through the pattern's ``group_resolver``), never from a literal in a
    pattern."""

    anchor: Node
    local: Node
    world_size: int
    group_name: str  # a registered c10d group name: what tpfuse::all_gather_hidden takes
    wait: Node | None = None
    group_id: Any = None  # the group argument as the graph spells it (e.g. a framework's name)

    @property
    def gather(self) -> Node:
        """The anchor node (named for the functional gather, the common case)."""
        return self.anchor

    @property
    def result(self) -> Node:
        """The node whose value is the gathered result: the wait, or the anchor itself."""
        return self.wait if self.wait is not None else self.anchor

    @property
    def op(self) -> Any:
        return self.anchor.target

    @property
    def args(self) -> tuple:
        return self.anchor.args

    @property
    def kwargs(self) -> dict:
        return dict(self.anchor.kwargs)

    @property
    def graph(self) -> Graph:
        return self.anchor.graph

    @property
    def facts(self):
        """``tpfuse.passes.graph_facts``: shapes, sizes compared without guards, node meanings."""
        return facts

    def arg(self, which: int | str, default: Any = None) -> Any:
        """An argument of the anchor call, by position or by its schema name."""
        return anchor_arg(self.anchor, which, default)

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


_MISSING = object()


def anchor_arg(node: Node, which: int | str, default: Any = _MISSING) -> Any:
    """Argument ``which`` (position or schema name) of a call, positional or keyword."""
    names = _schema_names(node.target)
    if isinstance(which, str):
        if which in node.kwargs:
            return node.kwargs[which]
        if which not in names:
            if default is _MISSING:
                raise KeyError(f"{_op_name(node.target)} has no argument {which!r}; its "
                               f"arguments are {names}")
            return default
        which = names.index(which)
    if which < len(node.args):
        return node.args[which]
    if which < len(names) and names[which] in node.kwargs:
        return node.kwargs[names[which]]
    if default is _MISSING:
        raise KeyError(f"{_op_name(node.target)} call {node.name} has no argument {which}")
    return default


def _schema_names(target: Any) -> list[str]:
    schema = getattr(target, "_schema", None)
    return [a.name for a in schema.arguments] if schema is not None else []


def _op_name(target: Any) -> str:
    schema = getattr(target, "_schema", None)
    if schema is not None:
        overload = f".{schema.overload_name}" if schema.overload_name else ""
        return f"{schema.name}{overload}"
    return getattr(target, "__name__", str(target))


def default_group_resolver(group_id: Any) -> Any:
    """A c10d group name passes through; a ``ProcessGroup`` becomes its name."""
    return group_id


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
    """One graph form: its anchors, matcher, replacement, preconditions and priority.

    ``anchors`` names the op overload(s) a site starts from (empty: the
    functional ``all_gather_into_tensor``); ``anchor_args`` says which of the
    anchor's arguments are the slab, the world size and the group, and
    ``group_resolver`` maps the group argument as the graph spells it (a
    framework's own group name) to a ``ProcessGroup`` or its c10d name.
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
    anchors: tuple = ()
    anchor_args: AnchorArgs | None = None
    group_resolver: Callable[[Any], Any] | None = None
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
        object.__setattr__(self, "anchors", _anchor_ops(self.name, self.anchors))
        self._check_anchor_args()
        if self.group_resolver is not None and not callable(self.group_resolver):
            raise PatternError(f"tpfuse: pattern {self.name!r}: group_resolver must be callable "
                               "(group argument -> ProcessGroup | c10d group name)")
        if not getattr(self.replacement, "emits_graph", False):
            object.__setattr__(self, "replacement",
                               TracedReplacement(self.replacement, self.rank_dependent))

    @property
    def anchor_ops(self) -> frozenset:
        """The op overloads this pattern is offered (the functional gather by default)."""
        return frozenset(self.anchors) if self.anchors else facts.ALL_GATHERS

    @property
    def reads_functional_gather(self) -> bool:
        """Sites are read as ``wait_tensor(all_gather_into_tensor(...))`` (the default)."""
        return self.anchor_args is None and self.anchor_ops <= facts.ALL_GATHERS

    def site_args(self) -> AnchorArgs:
        return self.anchor_args or FUNCTIONAL_ANCHOR_ARGS

    def resolve_group(self, group_id: Any) -> str:
        """The c10d group name of the anchor's group argument (raises with the reason)."""
        resolved = (self.group_resolver or default_group_resolver)(group_id)
        name = getattr(resolved, "group_name", resolved)  # a ProcessGroup, or already its name
        if not isinstance(name, str):
            raise TypeError(f"the group resolver returned {type(resolved).__name__}; accepted are a "
                            "ProcessGroup or a c10d group name (str)")
        return name

    def _check_anchor_args(self) -> None:
        from .traced import PatternError

        if self.reads_functional_gather:
            return  # the functional gather's own reading (hidden_gather.read_functional_site)
        spec = self.site_args()
        if not isinstance(spec, AnchorArgs):
            raise PatternError(f"tpfuse: pattern {self.name!r}: anchor_args must be "
                               f"AnchorArgs(local=, world_size=, group=), got {spec!r}")
        for op in self.anchor_ops:
            names = _schema_names(op)
            for role in ("local", "world_size", "group"):
                which = getattr(spec, role)
                if which is None and role == "world_size":
                    continue
                known = which in names if isinstance(which, str) else (
                    isinstance(which, int) and 0 <= which < max(len(names), 1))
                if not known:
                    raise PatternError(
                        f"tpfuse: pattern {self.name!r}: anchor_args.{role}={which!r} is not an "
                        f"argument of {_op_name(op)}, whose arguments are {names}; give a position "
                        "or one of these names")

    def cache_key(self) -> str:
        """Changes whenever the pattern's behaviour can change: name, priority and
        the source of every function it runs."""
        parts = [self.name, str(self.priority), str(self.rank_dependent), repr(self.example),
                 repr(sorted(map(str, self.anchors))), repr(self.anchor_args)]
        functions = (self.match, self.replacement, *(p.check for p in self.preconditions))
        if self.group_resolver is not None:
            functions += (self.group_resolver,)
        if self.search is not None:
            functions += (self.search,)
        for fn in functions:
            parts.append(function_fingerprint(fn))
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


def _anchor_ops(name: str, anchors: Any) -> tuple:
    """Anchors as op overloads: an ``OpOverload``, every overload of an
    ``OpOverloadPacket``, or ``"namespace::op[.overload]"``."""
    from .traced import PatternError

    if isinstance(anchors, (str, torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        anchors = (anchors,)
    ops = []
    for anchor in anchors:
        if isinstance(anchor, str):
            anchor = _op_from_string(name, anchor)
        if isinstance(anchor, torch._ops.OpOverloadPacket):
            ops += [getattr(anchor, o) for o in anchor.overloads()]
        elif isinstance(anchor, torch._ops.OpOverload):
            ops.append(anchor)
        else:
            raise PatternError(
                f"tpfuse: pattern {name!r}: anchor {anchor!r} is not an op; accepted are an "
                "OpOverload (torch.ops.ns.op.default), an OpOverloadPacket (torch.ops.ns.op) "
                "or a string 'ns::op' / 'ns::op.overload'")
    return tuple(ops)


def _op_from_string(name: str, spec: str) -> Any:
    from .traced import PatternError

    namespace, sep, op = spec.partition("::")
    op_name, _, overload = op.partition(".")
    packet = getattr(getattr(torch.ops, namespace, None), op_name, None) if sep and op_name else None
    if packet is None or (overload and not hasattr(packet, overload)):
        raise PatternError(
            f"tpfuse: pattern {name!r}: anchor {spec!r} is not a registered op; accepted are "
            "'ns::op' or 'ns::op.overload' of an op registered before the pattern is created")
    return getattr(packet, overload) if overload else packet


def function_fingerprint(fn: Callable) -> str:
    fingerprint = getattr(fn, "cache_key", None)  # objects may declare their own
    if callable(fingerprint):
        return str(fingerprint())
    target = getattr(fn, "__wrapped__", fn)
    if isinstance(target, __import__("functools").partial):
        return function_fingerprint(target.func) + repr(target.args) + repr(sorted(target.keywords))
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
