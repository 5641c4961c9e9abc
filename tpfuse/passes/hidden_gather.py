"""Find and rewrite hidden-axis gathers: ``find_hidden_gathers`` then ``rewrite_hidden_gathers``.

Finding never changes the graph; it returns match and near-miss records, so a
test (or a dry run) can look at what would be rewritten.  Rewriting consumes
the found matches.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from torch.fx import Graph, Node

from . import graph_facts as facts
from .collectives import GATHER, called_op, node_collective_kind, op_label
from .patterns import Candidate, FusionPattern, GatherSite, Reject, anchor_arg
from .records import ENTRY_BARRIER_KEPT, GatherMatch, NearMiss, Producer

SITE = "gather_site"  # the pattern name of near-misses found before any pattern ran
NO_PATTERN = "no_pattern"  # patterns were offered the site; none claimed it
NO_ANCHOR = "no_anchor"  # a gather collective no registered pattern is anchored on
NOT_A_GATHER = "not_a_gather"  # another collective, listed apart from the near-misses
PATTERNS_DOC = "docs/patterns.md#anchoring-on-your-frameworks-own-gather-op"
OTHER_COLLECTIVES_DOC = "docs/troubleshooting.md#other-collectives"


@dataclass
class Found:
    """One matched gather: the records for the report, the nodes for the rewrite."""

    record: GatherMatch
    pattern: FusionPattern = field(repr=False)
    site: GatherSite = field(repr=False)
    candidate: Candidate = field(repr=False)


@dataclass
class FindResult:
    matches: list[Found] = field(default_factory=list)
    near_misses: list[NearMiss] = field(default_factory=list)
    other_collectives: list[NearMiss] = field(default_factory=list)  # not gathers: listed apart


# --------------------------------------------------------------------------- sites


def read_functional_site(gather: Node) -> GatherSite | str:
    """``wait_tensor(all_gather_into_tensor(local, world_size, group_name))``, or why not."""
    if gather.target in facts.ALL_GATHERS_COALESCED:
        return (f"a coalesced all_gather moves {len(gather.args[0])} tensors in one collective; "
                "tpfuse rewrites single-tensor gathers (gather each tensor on its own)")
    local, world_size, group_name = gather.args[:3]
    users = list(gather.users)
    if len(users) != 1 or users[0].target not in facts.WAITS:
        used_by = ", ".join(facts.describe(u) for u in users) or "nothing"
        return f"all_gather_into_tensor result is used by {used_by}, not by exactly one wait_tensor"
    if not isinstance(world_size, int) or not isinstance(group_name, str):
        return (f"world size {world_size!r} / group {group_name!r} are not literal int / str "
                "arguments of the gather")
    problem = _local_problem(local)
    if problem:
        return problem
    return GatherSite(gather, local, world_size, group_name, wait=users[0], group_id=group_name)


def read_anchor_site(anchor: Node, pattern: FusionPattern) -> GatherSite | str:
    """A site of any anchor op, read through the pattern's ``anchor_args`` and
    ``group_resolver``, or why it cannot be read."""
    spec, op = pattern.site_args(), op_label(anchor.target)
    try:
        local = anchor_arg(anchor, spec.local)
        group_id = anchor_arg(anchor, spec.group)
        world_size = None if spec.world_size is None else anchor_arg(anchor, spec.world_size)
    except KeyError as err:
        return f"{op} call {anchor.name}: {err.args[0]}"
    problem = _local_problem(local)
    if problem:
        return problem
    try:
        group_name = pattern.resolve_group(group_id)
    except Exception as err:  # noqa: BLE001 - the reason is reported, not swallowed
        return (f"group argument {group_id!r} of {op} cannot be mapped to a process group by "
                f"pattern {pattern.name!r}'s group_resolver: {type(err).__name__}: {err}")
    if world_size is None:
        world_size = _group_size(group_name)
    if not isinstance(world_size, int) or isinstance(world_size, bool):
        return f"world size {world_size!r} of {op} call {anchor.name} is not a literal int"
    return GatherSite(anchor, local, world_size, group_name, wait=None, group_id=group_id)


def _local_problem(local) -> str | None:
    if not isinstance(local, Node) or facts.ndim(local) in (None, 0):
        return "the gathered tensor has no shape metadata or no hidden (last) dim"
    return None


def _group_size(group_name: str) -> Any:
    from tpfuse.compile_ops.groups import resolve_group  # the op's own resolution rule

    try:
        return resolve_group(group_name).world_size
    except Exception as err:  # noqa: BLE001 - reported as the world size's problem
        return f"<unknown: {err}>"


class _SiteReader:
    """Reads each anchor call once per way of reading it (patterns sharing
    ``anchor_args`` and ``group_resolver`` share the site); a site that cannot be
    read is one near-miss, not one per pattern."""

    def __init__(self, near_misses: list[NearMiss]) -> None:
        self.near_misses, self.cache = near_misses, {}

    def read(self, node: Node, pattern: FusionPattern) -> GatherSite | None:
        functional = pattern.reads_functional_gather
        key = (node, None) if functional else (node, pattern.anchor_args, pattern.group_resolver)
        if key not in self.cache:
            site = read_functional_site(node) if functional else read_anchor_site(node, pattern)
            if isinstance(site, str):
                self.near_misses.append(NearMiss(SITE, site, (node.name,)))
                site = None
            self.cache[key] = site
        return self.cache[key]


# --------------------------------------------------------------------------- producer


def find_producer(local: Node) -> Producer:
    """``mm``/``addmm`` of a transposed graph input (behind reshapes), else "other" (an ``addmm``
    that scales, too)."""
    node, reshapes = local, []
    while isinstance(node, Node) and facts.is_reshape(node):
        reshapes.append(node.name)
        node = node.args[0]
    if not isinstance(node, Node) or node.op != "call_function":
        op = node.op if isinstance(node, Node) else type(node).__name__
        return Producer("other", getattr(node, "name", str(node)), op)
    if (node.target in facts.MATMULS or node.target in facts.ADDMMS) and not _scaled(node):
        is_addmm = node.target in facts.ADDMMS
        bias, lhs, rhs = (node.args[0], *node.args[1:3]) if is_addmm else (None, *node.args[:2])
        weight = _transposed_input(rhs)
        if weight is not None:
            return Producer(
                "column_linear", node.name, "addmm" if is_addmm else "mm",
                input=_name(lhs), weight=weight.name, bias=_name(bias), reshapes=tuple(reshapes),
            )
    return Producer("other", node.name, facts.target_name(node))


def _scaled(node: Node) -> bool:
    """``addmm(b, x, W.T, beta=, alpha=)`` with a factor other than 1 computes ``beta*b + alpha*(x @ W.T)``,
    not a linear layer: a fused linear of ``(x, W, b)`` would drop the factors."""
    return any(node.kwargs.get(name, 1) != 1 for name in ("beta", "alpha"))


def _transposed_input(node) -> Node | None:
    """The weight ``W`` when ``node`` is ``W.T`` of a placeholder / get_attr."""
    if isinstance(node, Node) and facts.permutation(node) == (1, 0):
        weight = node.args[0]
        if isinstance(weight, Node) and weight.op in ("placeholder", "get_attr"):
            return weight
    return None


def _name(node) -> str | None:
    return node.name if isinstance(node, Node) else None


# --------------------------------------------------------------------------- find / rewrite


def find_hidden_gathers(
    graph: Graph,
    patterns: list[FusionPattern],
    *,
    only_after_linear: bool = False,
) -> FindResult:
    """Offer every call of an anchor op to every pattern anchored on it (highest
    priority first); list every other collective (``collectives.py``)."""
    result = FindResult()
    by_op: dict = {}
    for pattern in patterns:
        for op in pattern.anchor_ops:
            by_op.setdefault(op, []).append(pattern)
    reader = _SiteReader(result.near_misses)
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        anchored = by_op.get(node.target)
        if anchored:
            _offer(node, anchored, reader, result, only_after_linear)
        else:
            _unclaimed_collective(node, result)
    return result


def _offer(node: Node, patterns: list[FusionPattern], reader: _SiteReader, result: FindResult,
           only_after_linear: bool) -> None:
    found, claimed, offered = None, False, None
    for pattern in patterns:
        site = reader.read(node, pattern)
        if site is None:
            continue
        offered = site
        outcome = _match(pattern, site)
        if outcome is None:
            continue
        claimed = True
        if isinstance(outcome, Reject):
            nodes = (site.anchor.name,) + tuple(n.name for n in outcome.nodes)
            result.near_misses.append(NearMiss(pattern.name, outcome.reason, nodes))
            continue
        reason = _failed_precondition(pattern, site, outcome)
        producer = find_producer(site.local)
        if reason is None and only_after_linear and producer.kind != "column_linear":
            reason = f"producer is {producer}, and only_after_linear=True"
        if reason is not None:
            result.near_misses.append(
                NearMiss(pattern.name, reason, (site.anchor.name, outcome.output.name))
            )
            continue
        found = Found(_record(pattern, site, outcome, producer), pattern, site, outcome)
        break
    if found is not None:
        result.matches.append(found)
    elif not claimed and offered is not None:
        result.near_misses.append(_unrecognised(offered, patterns))


def _match(pattern: FusionPattern, site: GatherSite):
    try:
        return pattern.match(site)
    except Exception as err:  # noqa: BLE001
        if pattern.builtin:
            raise  # our own bug: fail loudly
        # A user matcher's bug must not break the user's compile, nor vanish.
        return Reject(f"the matcher raised {type(err).__name__}: {err}")


def _unrecognised(site: GatherSite, patterns: list[FusionPattern]) -> NearMiss:
    if site.wait is not None:
        used_by = ", ".join(facts.describe(u) for u in site.wait.users) or "nothing"
        if facts.ndim(site.local) == 1:  # its dim 0 is its last axis: the gather stacks hidden columns, not rows
            what, kept = "[W*w] columns of a 1-D slab", "its dim 0 is its hidden axis; the gather stays as it is"
        else:
            what, kept = "[W*T, ...] rows", "a gather along dim 0 stays as it is"
        return NearMiss(
            NO_PATTERN,
            f"no pattern recognises how the gathered {what} are used (by {used_by}); {kept}",
            (site.gather.name, site.wait.name),
        )
    names = ", ".join(p.name for p in patterns)
    return NearMiss(
        NO_PATTERN,
        f"the pattern(s) anchored on {op_label(site.op)} ({names}) do not recognise call "
        f"{site.anchor.name}: each returned None",
        (site.anchor.name,),
        doc=PATTERNS_DOC,
    )


def _unclaimed_collective(node: Node, result: FindResult) -> None:
    """A collective no pattern anchors on: a near-miss if it gathers, else listed apart."""
    kind = node_collective_kind(node)
    if kind is None:
        return
    op = op_label(called_op(node))
    if node.target in facts.ALL_GATHERS_COALESCED:
        result.near_misses.append(NearMiss(SITE, read_functional_site(node), (node.name,)))
    elif kind == GATHER and node.target in facts.ALL_GATHERS:  # left out by enable(patterns=...)
        result.near_misses.append(NearMiss(
            NO_ANCHOR, f"collective `{op}`: none of the selected patterns anchors on it "
            "(tpfuse.enable(patterns=...) left them out)", (node.name,),
        ))
    elif kind == GATHER:
        result.near_misses.append(NearMiss(
            NO_ANCHOR, f"opaque collective `{op}`: no registered pattern anchors on it",
            (node.name,), doc=PATTERNS_DOC,
        ))
    else:
        result.other_collectives.append(NearMiss(
            NOT_A_GATHER, f"`{op}` is not a gather; tpfuse rewrites all-gathers only", (node.name,),
            doc=OTHER_COLLECTIVES_DOC,
        ))


def _failed_precondition(pattern: FusionPattern, site: GatherSite, candidate: Candidate):
    for precondition in pattern.preconditions:
        reason = precondition.check(site, candidate)
        if reason is not None:
            return reason
    return None


def _record(pattern, site: GatherSite, candidate: Candidate, producer: Producer) -> GatherMatch:
    region = _region(site, candidate)
    return GatherMatch(
        pattern=pattern.name,
        gather=site.anchor.name,
        wait=site.wait.name if site.wait is not None else None,
        output=candidate.output.name,
        nodes=tuple(n.name for n in region),
        local=site.local.name,
        group_name=site.group_name,
        world_size=site.world_size,
        hidden_widths=tuple(int(w) if isinstance(w, int) else w for w in site.hidden_widths),
        dtype=site.dtype,
        producer=producer,
        device=facts.val(site.local).device.type,
        skip_entry_sync=False,  # decided by barrier elision, after the rewrite
        reason=ENTRY_BARRIER_KEPT,
        before=tuple(node_line(n) for n in region),
    )


def _region(site: GatherSite, candidate: Candidate) -> tuple[Node, ...]:
    """Every node that dies with the rewrite, anchor first, each once."""
    nodes = (site.anchor, site.wait, *candidate.region)
    return tuple(dict.fromkeys(n for n in nodes if n is not None))


def rewrite_hidden_gathers(graph: Graph, found: list[Found]) -> list[GatherMatch]:
    """Replace each match's output by its pattern's replacement; drop the dead region."""
    rewritten, replaced, renames = [], {}, {}
    for match in found:
        site, candidate = _after_earlier_rewrites(match.site, match.candidate, replaced)
        new = match.pattern.replacement(graph, site, candidate, match.record.skip_entry_sync)
        candidate.output.replace_all_uses_with(new)
        replaced[candidate.output] = new
        renames[candidate.output.name] = new.name
        _erase_dead(_region(site, candidate))
        added = [n for n in _upstream(new) if n.op == "call_function"]
        ops = [n for n in added if n.target is _GATHER_OP()]
        widths = tuple(ops[0].args[1]) if ops else match.record.hidden_widths  # user patterns
        rewritten.append(replace(
            match.record,
            replacement=new.name,
            hidden_widths=widths,
            after=tuple(node_line(n) for n in added),
        ))
    return [replace(m, producer=renamed_producer(m.producer, renames)) for m in rewritten]


def renamed_producer(producer: Producer, renames: dict[str, str]) -> Producer:
    """The producer with the operands that earlier rewrites replaced named by their replacements.

    Every match is found before any is rewritten, so a linear that reads an earlier gather's
    output (layers in a row, where Inductor drops the no-op slice between them) names that
    output; the earlier rewrite erased it, and the fused linear, which looks its operands up by
    name, would find none and be left out without a word."""
    def now(name):
        while name in renames:
            name = renames[name]
        return name

    return replace(producer, input=now(producer.input), bias=now(producer.bias))


def _after_earlier_rewrites(site: GatherSite, candidate: Candidate, replaced: dict) -> tuple:
    """The site and candidate with the outputs of earlier rewrites read as what replaced them.

    Every match is found before any is rewritten, so a gather of a gathered tensor (two hidden
    gathers in a row, e.g. over both axes of a 2-D mesh) names the first gather's output as its
    slab; that node is erased by the first rewrite, and a replacement reading it would compute
    from a node no longer in the graph."""
    if not replaced:
        return site, candidate

    def now(node):
        return replaced.get(node, node) if isinstance(node, Node) else node

    return (replace(site, local=now(site.local)),
            replace(candidate, inputs=tuple(now(n) for n in candidate.inputs)))


def _GATHER_OP():
    import torch

    return torch.ops.tpfuse.all_gather_hidden.default


def node_line(node: Node) -> str:
    """``name = op(arg, ...)``: a cheap one-line form for the report (``format_node``
    costs ~20 us a node; the report keeps a few lines per match)."""
    def arg(a):
        if isinstance(a, Node):
            return a.name
        if isinstance(a, (list, tuple)):
            return "[" + ", ".join(map(arg, a)) + "]"
        return repr(a)

    target = facts.target_name(node) if node.op == "call_function" else node.op
    args = ", ".join([arg(a) for a in node.args] + [f"{k}={arg(v)}" for k, v in node.kwargs.items()])
    return f"{node.name} = {target}({args})"


def _upstream(node: Node, limit: int = 16) -> list[Node]:
    """The nodes the replacement added: back from ``node`` along first arguments to the
    first node that was not there before (bounded; replacements are a few nodes)."""
    chain = [node]
    while len(chain) < limit and chain[0].args and isinstance(chain[0].args[0], Node):
        if "tpfuse" in str(chain[0].target):
            break
        chain.insert(0, chain[0].args[0])
    return chain if "tpfuse" in str(chain[0].target) else [node]


def _erase_dead(region) -> None:
    """Erase the matched nodes once they have no users, then what only they used:
    size arithmetic (``add = u0 + u0`` for a slice end) and fresh buffers
    (``empty`` that an in-place gather copied into).

    ``wait_tensor`` is not always marked side-effecting, and an orphaned
    collective would still be launched by some backends, so the region is
    erased explicitly rather than left to dead-code elimination."""
    pending, erased = list(region), set()
    progress = True
    while progress:  # region order need not be topological
        progress = False
        for node in pending:
            if node not in erased and not node.users:
                inputs = node.all_input_nodes
                node.graph.erase_node(node)
                erased.add(node)
                pending += [a for a in inputs if a not in pending and _pure_orphan(a)]
                progress = True


def _pure_orphan(node: Node) -> bool:
    if node.op != "call_function":
        return False
    return getattr(node.target, "__module__", None) == "_operator" or node.target in facts.FRESH
