"""Traceable replacements for user patterns: the registration-time check and the inliner.

A user pattern's replacement is an ordinary function of tensors,

    replacement(*inputs, hidden_widths=[...], group_name="...", [rank=r,] **facts) -> Tensor

written with torch ops, ``torch.ops.tpfuse.*`` or the user's own custom ops.
Its ``search`` is the reference: a function of the gathered ``[W*T, ..., w]``
rows (what ``wait_tensor`` returns) with the same keyword facts, computing
what the matched region computes.

At registration both are traced with ``make_fx`` on fake tensors of the
pattern's ``Example``; a function that cannot be traced, or a replacement
whose output shape or dtype differs from the search's, is refused then, with
the reason (not at compile time, and never silently).  At rewrite time the
replacement is traced on the matched nodes' own fake values and its graph is
inlined in place of the matched output.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.fx import Graph, Node

from . import graph_facts as facts


class PatternError(ValueError):
    """A pattern refused at registration; the message says what was wrong."""


@dataclass(frozen=True)
class Example:
    """Shapes on which a pattern's search and replacement are checked at registration.

    local_shape: one rank's slab (the gather's input), e.g. ``(8, 1024)``.
    facts: the candidate facts (``Candidate.extra``) the functions take, e.g.
        ``{"real_widths": (1024, 1000)}``."""

    local_shape: tuple[int, ...]
    world_size: int = 2
    dtype: torch.dtype = torch.float32
    rank: int = 0
    facts: dict = field(default_factory=dict)


def _trace(fn: Callable, args: tuple, what: str, name: str) -> torch.fx.GraphModule:
    from torch.fx.experimental.proxy_tensor import make_fx

    try:
        return make_fx(fn, tracing_mode="fake")(*args)
    except Exception as err:  # noqa: BLE001 - re-raised with the pattern's name
        raise PatternError(
            f"tpfuse: pattern {name!r}: its {what} cannot be traced on fake tensors "
            f"({type(err).__name__}: {err}); it must be a function of tensors written "
            "with torch ops (no data-dependent Python control flow, no .item())"
        ) from err


def _output_value(gm: torch.fx.GraphModule, what: str, name: str):
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    if isinstance(out, (list, tuple)):
        if len(out) != 1:
            raise PatternError(f"tpfuse: pattern {name!r}: its {what} must return one tensor")
        out = out[0]
    value = facts.val(out)
    if not isinstance(value, torch.Tensor):
        raise PatternError(f"tpfuse: pattern {name!r}: its {what} must return a tensor, not {value!r}")
    return value


def check_traced_pattern(name: str, search: Callable, replacement: Callable, example: Example,
                         rank_dependent: bool) -> None:
    """Trace search and replacement on the example; refuse on any mismatch."""
    W, shape = example.world_size, tuple(example.local_shape)
    keywords = dict(hidden_widths=[shape[-1]] * W, group_name="tpfuse_example_group",
                    **example.facts)
    if rank_dependent:
        keywords["rank"] = example.rank
    x = torch.zeros(shape, dtype=example.dtype)
    rows = torch.zeros((W * shape[0], *shape[1:]), dtype=example.dtype)
    searched = _output_value(_trace(lambda r: search(r, **keywords), (rows,), "search", name),
                             "search", name)
    replaced = _output_value(
        _trace(lambda t: replacement(t, **keywords), (x,), "replacement", name), "replacement", name
    )
    if tuple(searched.shape) != tuple(replaced.shape) or searched.dtype != replaced.dtype:
        raise PatternError(
            f"tpfuse: pattern {name!r}: on the example {example}, the replacement returns "
            f"{list(replaced.shape)} {replaced.dtype} but the search returns "
            f"{list(searched.shape)} {searched.dtype}; a replacement must compute the same "
            "shape and dtype as the region it replaces"
        )


class TracedReplacement:
    """The graph emitter for a traceable replacement function (see module docstring)."""

    emits_graph = True

    def __init__(self, fn: Callable, rank_dependent: bool = False) -> None:
        if not callable(fn):
            raise PatternError(f"tpfuse: replacement must be callable, got {type(fn).__name__}")
        self.fn, self.rank_dependent = fn, rank_dependent

    def cache_key(self) -> str:
        try:
            source = inspect.getsource(self.fn)
        except (OSError, TypeError):
            source = repr(self.fn)
        return f"traced:{self.rank_dependent}:{source}"

    def keywords(self, site, candidate) -> dict[str, Any]:
        keywords = dict(hidden_widths=[int(w) for w in site.hidden_widths],
                        group_name=site.group_name, **dict(candidate.extra))
        if self.rank_dependent:
            from tpfuse.compile_ops.groups import resolve_group

            keywords["rank"] = resolve_group(site.group_name).rank
        return keywords

    def __call__(self, graph: Graph, site, candidate, skip_entry_sync: bool) -> Node:
        from torch._guards import detect_fake_mode
        from torch.fx.experimental.proxy_tensor import make_fx

        keywords = self.keywords(site, candidate)
        values = [facts.val(n) for n in candidate.inputs]
        mode = detect_fake_mode(values)
        fn = lambda *tensors: self.fn(*tensors, **keywords)  # noqa: E731
        if mode is None:
            traced = make_fx(fn, tracing_mode="fake")(*values)
        else:
            with mode:
                traced = make_fx(fn, tracing_mode="real")(*values)
        env: dict[Node, Any] = {}
        inputs = iter(candidate.inputs)
        out = None
        with graph.inserting_before(candidate.output):
            for node in traced.graph.nodes:
                if node.op == "placeholder":
                    env[node] = next(inputs)
                elif node.op == "output":
                    out = node.args[0]
                    out = env[out[0] if isinstance(out, (list, tuple)) else out]
                else:
                    env[node] = graph.node_copy(node, lambda n: env[n])
        want, got = facts.shape(candidate.output), facts.shape(out)
        if not facts.same_shape(want, got):
            raise PatternError(
                f"tpfuse: a traced replacement returned {list(got)} where the matched output "
                f"{candidate.output.name} is {list(want)}"
            )
        return out
