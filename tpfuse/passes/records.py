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
    gather: str  # the anchor node: all_gather_into_tensor, or the op the pattern anchors on
    wait: str | None  # the wait_tensor of a functional gather; None for other anchors
    output: str  # the node whose value the gather replaces
    nodes: tuple[str, ...]  # every node of the matched region, gather first
    local: str  # this rank's slab, the op's ``x``
    group_name: str
    world_size: int
    hidden_widths: tuple[int, ...]
    dtype: torch.dtype
    producer: Producer
    device: str = "cpu"  # device type of the gathered tensor: decides which backend runs
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
    # The consumers that made the gather unnecessary (gather_elimination.py); None: it stays.
    eliminated: str | None = None
    before: tuple[str, ...] = field(default=(), repr=False, compare=False)
    after: tuple[str, ...] = field(default=(), repr=False, compare=False)

    @property
    def key(self) -> str:
        """The node a report row and its ``why:`` lines are keyed by: the tpfuse gather
        once rewritten, else the node it would replace."""
        return self.tpfuse_gather or self.replacement or self.output


@dataclass(frozen=True)
class GatherElimination:
    """A tpfuse gather whose every consumer reduces over the gathered axis, so it is not gathered:
    each rank reduces its own band and only the partials travel (gather_elimination.py)."""

    gather: str  # the tpfuse::all_gather_hidden node that is gone
    consumers: tuple[str, ...]  # what each elimination replaced, e.g. ("argmax",)
    matchers: tuple[str, ...]  # the matcher of each
    nodes: tuple[str, ...]  # the consumer nodes replaced
    group_name: str
    world_size: int
    hidden_widths: tuple[int, ...]
    dtype: torch.dtype
    steps: tuple[str, ...] = ()  # elementwise steps now applied to each rank's band (div, tanh, ...)
    valid_columns: int | None = None  # V of a [..., :V] slice moved to the ranks
    gathered_bytes: str = ""  # the gather's output per call, bytes (symbolic in T where T is)
    partial_bytes: str = ""  # what travels instead, per call, bytes
    partials: str = ""  # each elimination's partials per rank, e.g. "[s0, 2] int32"
    replacement: str | None = None  # the last node the rewrite added; None in a dry run
    after: tuple[str, ...] = field(default=(), repr=False, compare=False)

    def __str__(self) -> str:
        return (f"{self.gather} -> {', '.join(self.consumers)}: {self.gathered_bytes} B gathered per call "
                f"before, {self.partial_bytes} B of partials ({self.partials}) now")


#: Where near-miss reasons are explained, unless a record names another section.
NEAR_MISS_DOC = "docs/troubleshooting.md#near-miss-reasons"


@dataclass(frozen=True)
class NearMiss:
    """A candidate that a pattern looked at and rejected, why, and the doc section to read."""

    pattern: str
    reason: str
    nodes: tuple[str, ...] = ()
    doc: str = NEAR_MISS_DOC


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
    # collectives that are not gathers (all_reduce, ...): listed, never rewritten
    other_collectives: list[NearMiss] = field(default_factory=list)
    # device type of every tpfuse gather node after the rewrite (decides the backend)
    devices: dict = field(default_factory=dict)
    # gathers not gathered any more: every consumer reduces over the gathered axis
    eliminations: list[GatherElimination] = field(default_factory=list)
    # Loaded from Inductor's FX graph cache: the passes did not run in this compile;
    # these are the records stored when the entry was compiled (``cached_from``).
    from_cache: bool = False
    cached_from: str | None = None

    @property
    def rewritten(self) -> int:
        return sum(m.replacement is not None for m in self.matches)

    def header(self) -> str:
        mode = ", dry run" if self.dry_run else ""
        origin = f"compile {self.compile_id}, "
        if self.from_cache:
            origin = f"loaded from the FX graph cache, compiled as {self.cached_from}; "
        others = (f", {len(self.other_collectives)} other collective(s)"
                  if self.other_collectives else "")
        timing = "" if self.from_cache else f", {self.pass_ms:.1f} ms"
        eliminated = f", {len(self.eliminations)} eliminated" if self.eliminations else ""
        return (f"graph {self.graph_index} ({origin}rank {self.rank}{mode}): "
                f"{len(self.matches)} match(es), {self.rewritten} rewritten{eliminated}, "
                f"{len(self.near_misses)} near-miss(es){others}{timing}")

    def lines(self) -> list[str]:
        lines = [self.header()]
        lines += _match_lines(self)
        lines += _direct_gather_lines(self)
        lines += _elimination_lines(self.eliminations)
        lines += _near_miss_lines(self.near_misses)
        lines += _other_collective_lines(self.other_collectives)
        if self.dump_path:
            lines.append(f"  dump: {self.dump_path}")
        return lines


@dataclass
class Report:
    """The records of the graphs compiled since the last ``report()`` (or of all,
    with ``report(all=True)``), graph by graph.

    ``str(report)`` is a table; ``.matches`` and ``.near_misses`` flatten
    over graphs."""

    graphs: list[GraphReport] = field(default_factory=list)
    earlier: int = 0  # graphs compiled before, already returned by an earlier report()

    @property
    def matches(self) -> list[GatherMatch]:
        return [m for g in self.graphs for m in g.matches]

    @property
    def near_misses(self) -> list[NearMiss]:
        return [n for g in self.graphs for n in g.near_misses]

    @property
    def other_collectives(self) -> list[NearMiss]:
        return [n for g in self.graphs for n in g.other_collectives]

    @property
    def eliminations(self) -> list[GatherElimination]:
        return [e for g in self.graphs for e in g.eliminations]

    @property
    def rewritten(self) -> int:
        return sum(g.rewritten for g in self.graphs)

    def __str__(self) -> str:
        if not self.graphs:
            if self.earlier:
                return (f"tpfuse report: no graph compiled since the last tpfuse.report() "
                        f"({self.earlier} earlier graph(s): tpfuse.report(all=True) lists them)")
            return ("tpfuse report: no graph passed through the tpfuse passes "
                    "(not enabled, or nothing compiled since enable())")
        return "\n".join(line for g in self.graphs for line in g.lines())


# --------------------------------------------------------------------------- rendering
#
# Slots, entry barriers and zero-copy belong to the barrier protocol (p2p, multimem); on CPU tensors the
# op runs gloo's all_gather, where none of them exists, so their columns and ``why:``
# lines are shown only for gathers that run on CUDA.


def _backend(device: str, protocol: str = "") -> str:
    """The backend column: the backend the barrier pass expects the op to run, else by device (on CUDA
    the op chooses per call among flag, multimem, p2p and nccl)."""
    if device == "cuda" and protocol not in ("", "gloo", "none"):
        return protocol
    return {"cpu": "gloo", "cuda": "per call"}.get(device, device)


def _protocols(g: "GraphReport") -> dict:
    """gather node -> the protocol its decision records (barrier_elision.BarrierDecision.protocol)."""
    return {d.gather: (getattr(d, "protocol", ""), getattr(d, "protocol_reason", "")) for d in g.barriers}


def _match_lines(g: GraphReport) -> list[str]:
    if not g.matches:
        return []
    cuda = [m for m in g.matches if g.devices.get(m.key, m.device) != "cpu"]
    protocols = _protocols(g)
    rows = []
    for m in g.matches:
        protocol = protocols.get(m.tpfuse_gather, ("", ""))[0]
        state = "replaced" if m.replacement else "not rewritten"
        if m.eliminated:
            state = f"eliminated: {m.eliminated}"
        row = (m.key, m.pattern, f"{m.output} ({state})",
               f"{m.group_name!r} W={m.world_size}", _widths_text(m.hidden_widths),
               str(m.dtype).removeprefix("torch."), str(m.producer),
               _backend(g.devices.get(m.key, m.device), protocol))
        if cuda:
            row += _decision_cells(m, m in cuda, protocol)
        rows.append(row)
    header = ("node", "pattern", "output", "group", "widths", "dtype", "producer", "backend")
    if cuda:
        header += ("slot", "entry barrier", "result")
    lines = [_table(header, rows)]
    lines += _why([(m.key, m.skip_entry_sync, m.reason, m.zero_copy, m.zero_copy_reason)
                   + protocols.get(m.tpfuse_gather, ("", "")) for m in cuda])
    fusions = [m for m in g.matches if m.linear_fusion is not None]
    if fusions:
        lines.append(_table(("node", "producer", "fused linear"),
                            [(m.key, str(m.producer), m.linear_fusion) for m in fusions]))
    return lines


def _decision_cells(record, applies: bool, protocol: str = "") -> tuple[str, str, str]:
    if not applies:
        return ("-", "-", "-")
    if protocol == "flag":  # no slot, no barrier, always a fresh result
        return ("-", "none (flag)", "copied")
    return (str(record.slot), "skipped" if record.skip_entry_sync else "kept",
            "zero-copy" if record.zero_copy else "copied")


def _direct_gather_lines(g: GraphReport) -> list[str]:
    """tpfuse gathers already in the graph (written by hand), not from a match."""
    matched = {m.tpfuse_gather for m in g.matches}
    direct = [d for d in g.barriers if d.gather not in matched]
    if not direct:
        return []
    cuda = [d for d in direct if g.devices.get(d.gather, "cpu") != "cpu"]
    protocols = _protocols(g)
    header = ("node", "group", "backend") + (("slot", "entry barrier", "result") if cuda else ())
    rows = [(d.gather, repr(d.group_name), _backend(g.devices.get(d.gather, "cpu"), protocols[d.gather][0]))
            + (_decision_cells(d, d in cuda, protocols[d.gather][0]) if cuda else ()) for d in direct]
    return [_table(header, rows)] + _why(
        [(d.gather, d.skip_entry_sync, d.reason, d.zero_copy, d.zero_copy_reason) + protocols[d.gather]
         for d in cuda])


def _elimination_lines(eliminations: list[GatherElimination]) -> list[str]:
    """One row per gather that is no longer gathered: by what, through which steps, the bytes saved."""
    if not eliminations:
        return []
    rows = [(e.gather, ", ".join(e.consumers), ", ".join(e.steps) or "-",
             "-" if e.valid_columns is None else f":{e.valid_columns}",
             f"{e.group_name!r} W={e.world_size}", _widths_text(e.hidden_widths),
             str(e.dtype).removeprefix("torch."), e.gathered_bytes, f"{e.partial_bytes} ({e.partials})")
            for e in eliminations]
    header = ("eliminated gather", "consumer", "steps on the band", "slice", "group", "widths", "dtype",
              "bytes gathered before", "bytes of partials now")
    return [_table(header, rows)]


def _near_miss_lines(near_misses: list[NearMiss]) -> list[str]:
    if not near_misses:
        return []
    table = _table(("near-miss pattern", "nodes", "reason"),
                   [(n.pattern, ", ".join(n.nodes), n.reason) for n in near_misses])
    return [table, "  read: " + ", ".join(dict.fromkeys(n.doc for n in near_misses))]


def _other_collective_lines(others: list[NearMiss]) -> list[str]:
    if not others:
        return []
    names = ", ".join(n for o in others for n in o.nodes)
    return [f"  other collectives, not gathers, left as they are: {names} "
            f"(read: {others[0].doc})"]


def _why(rows: list[tuple[str, bool, str, bool, str, str, str]]) -> list[str]:
    """The reasons behind the table's decision columns, two lines per gather, keyed
    by the same node name as the table's first column."""
    if not rows:
        return []
    out = ["  why:"]
    for name, skipped, barrier, zero_copy, copy, protocol, protocol_reason in rows:
        if protocol == "flag":
            out.append(f"    {name}: no barriers, flag protocol: {protocol_reason} (docs/flag_protocol.md)")
            continue
        barrier = barrier.removeprefix("entry barrier kept: ")
        if protocol not in ("", "gloo", "none"):
            out.append(f"    {name}: backend {protocol}: {protocol_reason}")
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
