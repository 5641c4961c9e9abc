"""Find and rewrite hidden-axis gathers: ``find_hidden_gathers`` then ``rewrite_hidden_gathers``.

Finding never changes the graph; it returns match and near-miss records, so a
test (or a dry run) can look at what would be rewritten.  Rewriting consumes
the found matches.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from torch.fx import Graph, Node

from . import graph_facts as facts
from .patterns import Candidate, FusionPattern, GatherSite, Reject
from .records import ENTRY_BARRIER_KEPT, GatherMatch, NearMiss, Producer

SITE = "gather_site"  # the pattern name of near-misses found before any pattern ran
NO_PATTERN = "no_pattern"


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


# --------------------------------------------------------------------------- sites


def gather_sites(graph: Graph, near_misses: list[NearMiss]) -> list[GatherSite]:
    """Every ``wait_tensor(all_gather_into_tensor(...))`` that a pattern may look at."""
    sites = []
    for gather in graph.nodes:
        if gather.op != "call_function":
            continue
        if gather.target in facts.ALL_GATHERS_COALESCED:
            near_misses.append(NearMiss(
                SITE, f"a coalesced all_gather moves {len(gather.args[0])} tensors in one "
                "collective; tpfuse rewrites single-tensor gathers (gather each tensor on its own)",
                (gather.name,),
            ))
            continue
        if gather.target not in facts.ALL_GATHERS:
            continue
        local, world_size, group_name = gather.args[:3]
        users = list(gather.users)
        if len(users) != 1 or users[0].target not in facts.WAITS:
            used_by = ", ".join(facts.describe(u) for u in users) or "nothing"
            near_misses.append(NearMiss(
                SITE, f"all_gather_into_tensor result is used by {used_by}, not by exactly "
                "one wait_tensor", (gather.name,),
            ))
            continue
        if not isinstance(world_size, int) or not isinstance(group_name, str):
            near_misses.append(NearMiss(
                SITE, f"world size {world_size!r} / group {group_name!r} are not literal "
                "int / str arguments of the gather", (gather.name,),
            ))
            continue
        if not isinstance(local, Node) or facts.ndim(local) in (None, 0):
            near_misses.append(NearMiss(
                SITE, "the gathered tensor has no shape metadata or no hidden (last) dim",
                (gather.name,),
            ))
            continue
        sites.append(GatherSite(gather, users[0], local, world_size, group_name))
    return sites


# --------------------------------------------------------------------------- producer


def find_producer(local: Node) -> Producer:
    """``mm``/``addmm`` of a transposed graph input (behind reshapes), else "other"."""
    node, reshapes = local, []
    while isinstance(node, Node) and facts.is_reshape(node):
        reshapes.append(node.name)
        node = node.args[0]
    if not isinstance(node, Node) or node.op != "call_function":
        op = node.op if isinstance(node, Node) else type(node).__name__
        return Producer("other", getattr(node, "name", str(node)), op)
    if node.target in facts.MATMULS or node.target in facts.ADDMMS:
        is_addmm = node.target in facts.ADDMMS
        bias, lhs, rhs = (node.args[0], *node.args[1:3]) if is_addmm else (None, *node.args[:2])
        weight = _transposed_input(rhs)
        if weight is not None:
            return Producer(
                "column_linear", node.name, "addmm" if is_addmm else "mm",
                input=_name(lhs), weight=weight.name, bias=_name(bias), reshapes=tuple(reshapes),
            )
    return Producer("other", node.name, facts.target_name(node))


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
    """Offer every gather site to every pattern (highest priority first)."""
    result = FindResult()
    for site in gather_sites(graph, result.near_misses):
        found, claimed = None, False
        for pattern in patterns:
            try:
                outcome = pattern.match(site)
            except Exception as err:  # noqa: BLE001
                if pattern.builtin:
                    raise  # our own bug: fail loudly
                # A user matcher's bug must not break the user's compile, nor vanish.
                outcome = Reject(f"the matcher raised {type(err).__name__}: {err}")
            if outcome is None:
                continue
            claimed = True
            if isinstance(outcome, Reject):
                nodes = (site.gather.name,) + tuple(n.name for n in outcome.nodes)
                result.near_misses.append(NearMiss(pattern.name, outcome.reason, nodes))
                continue
            reason = _failed_precondition(pattern, site, outcome)
            producer = find_producer(site.local)
            if reason is None and only_after_linear and producer.kind != "column_linear":
                reason = f"producer is {producer}, and only_after_linear=True"
            if reason is not None:
                result.near_misses.append(
                    NearMiss(pattern.name, reason, (site.gather.name, outcome.output.name))
                )
                continue
            found = Found(_record(pattern, site, outcome, producer), pattern, site, outcome)
            break
        if found is not None:
            result.matches.append(found)
        elif not claimed:
            used_by = ", ".join(facts.describe(u) for u in site.wait.users) or "nothing"
            result.near_misses.append(NearMiss(
                NO_PATTERN,
                f"no pattern recognises how the gathered [W*T, ...] rows are used (by "
                f"{used_by}); a gather along dim 0 stays as it is",
                (site.gather.name, site.wait.name),
            ))
    return result


def _failed_precondition(pattern: FusionPattern, site: GatherSite, candidate: Candidate):
    for precondition in pattern.preconditions:
        reason = precondition.check(site, candidate)
        if reason is not None:
            return reason
    return None


def _record(pattern, site: GatherSite, candidate: Candidate, producer: Producer) -> GatherMatch:
    region = (site.gather, site.wait, *candidate.region)
    return GatherMatch(
        pattern=pattern.name,
        gather=site.gather.name,
        wait=site.wait.name,
        output=candidate.output.name,
        nodes=tuple(n.name for n in region),
        local=site.local.name,
        group_name=site.group_name,
        world_size=site.world_size,
        hidden_widths=tuple(int(w) if isinstance(w, int) else w for w in site.hidden_widths),
        dtype=site.dtype,
        producer=producer,
        skip_entry_sync=False,  # no barrier-elision pass yet: never skip unproven (CONTEXT §2.3)
        reason=ENTRY_BARRIER_KEPT,
        before=tuple(node_line(n) for n in region),
    )


def rewrite_hidden_gathers(graph: Graph, found: list[Found]) -> list[GatherMatch]:
    """Replace each match's output by its pattern's replacement; drop the dead region."""
    rewritten = []
    for match in found:
        site, candidate = match.site, match.candidate
        new = match.pattern.replacement(graph, site, candidate, match.record.skip_entry_sync)
        candidate.output.replace_all_uses_with(new)
        _erase_dead((site.gather, site.wait, *candidate.region))
        added = [n for n in _upstream(new) if n.op == "call_function"]
        ops = [n for n in added if n.target is _GATHER_OP()]
        widths = tuple(ops[0].args[1]) if ops else match.record.hidden_widths  # user patterns
        rewritten.append(replace(
            match.record,
            replacement=new.name,
            hidden_widths=widths,
            after=tuple(node_line(n) for n in added),
        ))
    return rewritten


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
