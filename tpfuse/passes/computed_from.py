"""What a node is computed from: the gathered tensor, or a random draw.

Gather elimination moves steps and replacements onto each rank's band; a value may go there only
when it is not computed from the gathered tensor (it would not exist any more) and not drawn at
random (ranks need not share the seed, so each would read its own draw).  Both searches walk the
graph backwards from the node (docs/passes.md, "Gather elimination").
"""

from __future__ import annotations

import torch
from torch.fx import Graph, Node

#: how many nodes the search for a random source of an operand looks at
RANDOM_REACH = 256


def node_positions(graph: Graph) -> dict[Node, int]:
    return {n: i for i, n in enumerate(graph.nodes)}


def depends_on(node: Node, gather: Node, positions: dict[Node, int]) -> bool:
    """``node`` reads the gather's result, directly or not (a walk back over nodes after it)."""
    return path_from(node, gather, frozenset(), positions) is not None


def path_from(node: Node, gather: Node, stops, positions: dict[Node, int]) -> list[Node] | None:
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


class _CannotTell:
    """The search for a random source gave up at ``RANDOM_REACH`` nodes with inputs still to look at."""

    name = "cannot tell"

    def __repr__(self) -> str:
        return "CANNOT_TELL"


#: ``random_source``'s answer when it ran out of nodes to look at: callers must keep the gather, since
#: "no random op found so far" is not "not random" (a Gumbel token behind a long chain, a draft model)
CANNOT_TELL = _CannotTell()


def random_source(operand: Node, stops=frozenset()) -> Node | _CannotTell | None:
    """A random op ``operand`` is computed from (Inductor's ``inductor_random`` reads seeds drawn by
    ``inductor_seeds``), not looking behind ``stops`` (values every rank holds alike, e.g. an eliminated
    argmax's token); None when there is none; ``CANNOT_TELL`` when more than ``RANDOM_REACH`` nodes
    would have to be looked at.  Ranks need not share the seed, so such an operand cut to the band
    would mix the ranks' draws."""
    pending, seen = [operand], set()
    while pending:
        node = pending.pop()
        if node in seen or node in stops:
            continue
        if len(seen) >= RANDOM_REACH:
            return CANNOT_TELL
        seen.add(node)
        target = node.target
        if isinstance(target, (torch._ops.OpOverload, torch._ops.HigherOrderOperator)) and \
                torch.Tag.nondeterministic_seeded in getattr(target, "tags", ()):
            return node
        pending += node.all_input_nodes
    return None


def cannot_tell_why(operand: Node) -> str:
    """The near-miss of an operand whose random source ``random_source`` could not settle."""
    return f"cannot tell within {RANDOM_REACH} nodes whether {operand.name} depends on a random draw; kept"
