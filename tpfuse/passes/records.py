"""What the passes found: match and near-miss records, per graph and per compilation.

Records name nodes by their graph names (strings) and carry plain facts, so a
report outlives the graph it describes and prints the same on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

#: The barrier decision of every match until the barrier-elision pass exists.
ENTRY_BARRIER_KEPT = "entry barrier kept: no elision proof attempted"


@dataclass(frozen=True)
class Producer:
    """What computed the gathered tensor.

    ``kind`` is ``"column_linear"`` for ``mm``/``addmm`` (possibly behind
    reshapes, as for 3-D inputs) whose weight operand is a transposed graph
    input, else ``"other"``.  The fused linear+push rewrite needs the linear's
    ``input``, ``weight`` and ``bias`` nodes."""

    kind: str
    node: str
    op: str
    input: str | None = None
    weight: str | None = None
    bias: str | None = None
    reshapes: tuple[str, ...] = ()

    def __str__(self) -> str:
        if self.kind == "column_linear":
            via = f" via {'/'.join(self.reshapes)}" if self.reshapes else ""
            bias = f" + {self.bias}" if self.bias else ""
            return f"{self.op}({self.input} @ {self.weight}.T{bias}){via}"
        return f"other: {self.node} ({self.op})"


@dataclass(frozen=True)
class GatherMatch:
    """A hidden-axis gather that a pattern recognised (and, unless dry-run, rewrote)."""

    pattern: str
    gather: str  # the all_gather_into_tensor node
    wait: str
    output: str  # the node whose value the gather replaces
    nodes: tuple[str, ...]  # every node of the matched region, gather first
    local: str  # this rank's slab, the op's ``x``
    group_name: str
    world_size: int
    hidden_widths: tuple[int, ...]
    dtype: torch.dtype
    producer: Producer
    skip_entry_sync: bool = False
    reason: str = ENTRY_BARRIER_KEPT
    replacement: str | None = None  # the tpfuse node, once rewritten
    # Filled in by the barrier-elision pass (barrier_elision.py); -1: left to the op.
    slot: int = -1
    tpfuse_gather: str | None = None  # the tpfuse::all_gather_hidden node inside the replacement
    zero_copy: bool = False
    zero_copy_reason: str = "copy kept: no zero-copy proof attempted"
    # The fused linear+gather decision (linear_fusion.py) and the rule that fired; None when not asked.
    linear_fusion: str | None = None
    before: tuple[str, ...] = field(default=(), repr=False, compare=False)
    after: tuple[str, ...] = field(default=(), repr=False, compare=False)


@dataclass(frozen=True)
class NearMiss:
    """A candidate that a pattern looked at and rejected, and why."""

    pattern: str
    reason: str
    nodes: tuple[str, ...] = ()


@dataclass
class GraphReport:
    """Everything the passes decided for one graph."""

    graph_index: int
    compile_id: str
    rank: int
    matches: list[GatherMatch] = field(default_factory=list)
    near_misses: list[NearMiss] = field(default_factory=list)
    dry_run: bool = False
    pass_ms: float = 0.0
    dump_path: str | None = None
    # barrier_elision.BarrierDecision of every tpfuse gather in the graph (rewritten or not)
    barriers: list = field(default_factory=list)

    @property
    def rewritten(self) -> int:
        return sum(m.replacement is not None for m in self.matches)


@dataclass
class Report:
    """The records of one compilation (or several), graph by graph.

    ``str(report)`` is a table; ``.matches`` and ``.near_misses`` flatten
    over graphs."""

    graphs: list[GraphReport] = field(default_factory=list)

    @property
    def matches(self) -> list[GatherMatch]:
        return [m for g in self.graphs for m in g.matches]

    @property
    def near_misses(self) -> list[NearMiss]:
        return [n for g in self.graphs for n in g.near_misses]

    @property
    def rewritten(self) -> int:
        return sum(g.rewritten for g in self.graphs)

    def __str__(self) -> str:
        if not self.graphs:
            return (
                "tpfuse report: no graph passed through the tpfuse passes "
                "(not enabled, nothing compiled yet, or every graph came from the FX graph cache)"
            )
        lines = []
        for g in self.graphs:
            mode = ", dry run" if g.dry_run else ""
            lines.append(
                f"graph {g.graph_index} (compile {g.compile_id}, rank {g.rank}{mode}): "
                f"{len(g.matches)} match(es), {g.rewritten} rewritten, "
                f"{len(g.near_misses)} near-miss(es), {g.pass_ms:.1f} ms"
            )
            if g.matches:
                lines.append(_table(
                    ("pattern", "output", "group", "widths", "dtype", "producer", "slot", "entry barrier",
                     "result"),
                    [
                        (
                            m.pattern,
                            f"{m.output} -> {m.replacement or '(not rewritten)'}",
                            f"{m.group_name!r} W={m.world_size}",
                            _widths_text(m.hidden_widths),
                            str(m.dtype).removeprefix("torch."),
                            str(m.producer),
                            str(m.slot),
                            "skipped" if m.skip_entry_sync else "kept",
                            "zero-copy" if m.zero_copy else "copied",
                        )
                        for m in g.matches
                    ],
                ))
                lines += _why([(m.tpfuse_gather or m.output, m.skip_entry_sync, m.reason, m.zero_copy,
                                m.zero_copy_reason) for m in g.matches])
            fusions = [m for m in g.matches if m.linear_fusion is not None]
            if fusions:
                lines.append(_table(("output", "producer", "fused linear"),
                                    [(m.output, str(m.producer), m.linear_fusion) for m in fusions]))
            matched = {m.tpfuse_gather for m in g.matches}
            direct = [d for d in g.barriers if d.gather not in matched]
            if direct:
                lines.append(_table(
                    ("tpfuse gather", "group", "slot", "entry barrier", "result"),
                    [(d.gather, repr(d.group_name), str(d.slot), "skipped" if d.skip_entry_sync else "kept",
                      "zero-copy" if d.zero_copy else "copied") for d in direct],
                ))
                lines += _why([(d.gather, d.skip_entry_sync, d.reason, d.zero_copy, d.zero_copy_reason)
                               for d in direct])
            if g.near_misses:
                lines.append(_table(
                    ("near-miss pattern", "nodes", "reason"),
                    [(n.pattern, ", ".join(n.nodes), n.reason) for n in g.near_misses],
                ))
            if g.dump_path:
                lines.append(f"  dump: {g.dump_path}")
        return "\n".join(lines)


def _why(rows: list[tuple[str, bool, str, bool, str]]) -> list[str]:
    """The reasons behind the table's two decision columns, two lines per gather."""
    out = ["  why:"]
    for name, skipped, barrier, zero_copy, copy in rows:
        barrier = barrier.removeprefix("entry barrier kept: ")
        out += [f"    {name}: entry barrier {'skipped' if skipped else 'kept'}: {barrier}",
                f"    {' ' * len(name)}  result {'zero-copy' if zero_copy else 'copied'}: {copy}"]
    return out


def _widths_text(widths: tuple[int, ...]) -> str:
    # [4096, 4096, 4096, 4096] prints as 4x4096; uneven widths as a list
    if widths and all(w == widths[0] for w in widths):
        return f"{len(widths)}x{widths[0]}"
    return "[" + ",".join(map(str, widths)) + "]"


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    cols = list(zip(header, *rows))
    widths = [max(len(str(c)) for c in col) for col in cols]
    fmt = "  " + " | ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*header), "  " + "-+-".join("-" * w for w in widths)]
    out += [fmt.format(*map(str, r)) for r in rows]
    return "\n".join(line.rstrip() for line in out)
