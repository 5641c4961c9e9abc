"""The fused linear + gather rewrite: ``all_gather_hidden(mm/addmm(x, W.T))`` -> ``linear_all_gather_hidden``.

A post-rewrite step: it runs after the gather patterns (so every graph form
they recognise feeds it) and before barrier elision (which then decides the
fused op's slot and entry barrier like any other tpfuse gather: the fused op
uses the same workspace, slots and barriers).  Off unless
``tpfuse.enable(fuse_linear=True)``.

For every rewritten gather whose producer is a column linear
(``records.Producer`` kind ``"column_linear"``), it checks:

- the linear's output feeds only the gather (through the reshapes that the
  producer record names): otherwise fusing would compute the linear twice;
- those reshapes keep the linear's last dim (its output columns are the gathered columns);
- the gathered columns are not trimmed by 1 to W-1 after the gather, as torch's uneven
  ``Shard`` does (the ranks with a narrower shard gather ``pad(linear)``, cannot fuse, and
  every rank must run the same op);
- the bias, if any, is a ``[w]`` vector (``addmm`` also broadcasts ``[T, w]``);
- the reduction dim K is a static, positive int;
- the cost rule ``compile_ops.linear_cost.decide(T, K, widths, dtype, device_name=...)``
  for the GPU model ``linear_cost.compile_time_device_name()`` (this process's;
  a (model, W) with no measurement is not fused), with the constants of the tuned
  config this process finds for it where one has them (docs/tuning.md; its hash is
  in ``cache_key``).  With a symbolic T the rule is
  asked for every T the shape environment allows (``linear_cost.decide_range``):
  the pass rewrites when any of them fuses, and the op applies the rule again to
  every call's T with the model its ranks agreed on.  T and the agreed model are
  the same on every rank, and the op's unfused path is the plain gather, so a
  rewrite that some calls do not fuse stays rank-consistent.

Each decision (fused or not, and the rule that fired) is recorded in the
match's ``linear_fusion`` field, and a failing check is also a near-miss.
"""

from __future__ import annotations

import hashlib
import inspect
from dataclasses import replace

import sympy
import torch
from torch.fx import Graph, Node

from . import graph_facts as facts
from .records import GatherMatch, NearMiss

PATTERN = "fused_linear"


def _fused_op():
    return torch.ops.tpfuse.linear_all_gather_hidden.default


def _gather_op():
    return torch.ops.tpfuse.all_gather_hidden.default


def cache_key() -> str:
    """The cost rule, the kernel config and the fused op's schema live outside tpfuse/passes:
    they must be part of the pass's cache key (a changed threshold changes the graph)."""
    from ..compile_ops import linear_cost
    from ..kernels import linear_push

    digest = hashlib.sha256(inspect.getsource(linear_cost).encode())
    # The rule decides per GPU model: a graph rewritten for one card must not be reused on another.
    digest.update(linear_cost.compile_time_device_name().encode())
    # ... and with a tuned config's constants where one applies: a graph rewritten under one config
    # must not be served under another (docs/tuning.md)
    digest.update(selection_cache_key().encode())
    digest.update(inspect.getsource(linear_push.launch_config).encode())
    digest.update(str(_fused_op()._schema).encode())  # the node the rewrite emits
    return digest.hexdigest()


def selection_cache_key() -> str:
    """What the tuned configs this process finds decide for its GPU model, as a hash ("" where none applies).

    A compiled graph depends on it: the linear rule's constants, and the backend the report plans
    (``dispatch.planned_backend``), so the pass's cache key holds it (manager.py's ``uuid``)."""
    from ..compile_ops import dispatch, linear_cost, tuned

    names = sorted({linear_cost.compile_time_device_name(), dispatch.local_device_name()})
    return ",".join(tuned.selection_key(name) for name in names)


def _tokens(shape) -> object:
    return facts.product(list(shape[:-1]))


def _token_range(lhs: Node, tokens) -> tuple[int, int | None]:
    """(lowest, highest or None) of a symbolic T, from the shape environment's value ranges;
    (1, None) when there is none to ask."""
    shape_env = getattr(getattr(facts.val(lhs), "fake_mode", None), "shape_env", None)
    if shape_env is None:
        return 1, None
    try:
        bounds = shape_env.bound_sympy(tokens)
    except Exception:  # noqa: BLE001 - an expression it cannot bound: assume any T
        return 1, None
    lower, upper = (int(b) if isinstance(b, (int, sympy.Integer)) else None for b in (bounds.lower, bounds.upper))
    return max(lower or 1, 1), upper


def decide(match: GatherMatch, graph: Graph):
    """(decision text, near-miss reason or None, fused?) for one rewritten match; changes nothing."""
    from ..compile_ops import linear_cost

    producer = match.producer
    if producer.kind != "column_linear":
        return None, None, False
    nodes = {n.name: n for n in graph.nodes}
    linear = nodes.get(producer.node)
    lhs = nodes.get(producer.input)
    weight = nodes.get(producer.weight)
    if linear is None or lhs is None or weight is None:
        return None, None, False
    chain = [nodes[name] for name in producer.reshapes if name in nodes]
    # The linear's value must reach only the gather (through the producer's reshapes).
    for node in [linear, *reversed(chain)]:
        if len(node.users) != 1:
            users = ", ".join(sorted(u.name for u in node.users))
            why = f"not fused [shape]: {node.name} is also used by {users}; fusing would compute the linear twice"
            return why, why, False
    refused = (_columns_regrouped(linear, chain)
               or _uneven_shards(nodes.get(match.replacement or match.output), len(match.hidden_widths)))
    if refused:
        return refused, refused, False
    k = facts.shape(lhs)[-1] if facts.shape(lhs) else None
    if not isinstance(k, int) or k <= 0:
        why = f"not fused [shape]: the reduction dim K={k} is not a static positive int"
        return why, why, False
    if producer.bias is not None:
        bias_shape = facts.shape(nodes[producer.bias])
        if bias_shape is None or len(bias_shape) != 1:
            why = (f"not fused [shape]: the bias {producer.bias} has shape "
                   f"{list(bias_shape) if bias_shape else '?'}, not [w]")
            return why, why, False
    decision = _decision(linear_cost, lhs, k, match)
    text = str(decision)
    return text, (None if decision.fuse else text), decision.fuse


def _columns_regrouped(linear: Node, chain: list[Node]) -> str | None:
    """Why the gathered slab's columns are not the linear's, or None.

    The fused op gathers ``linear(x, W, b)`` by its output columns and reshapes the result's
    leading dims.  That is the gather of the slab only where the reshapes between the linear and
    the gather keep its last dim: ``[T, N] -> [B, S, N]``.  A reshape that changes the last dim
    (``[T, N] -> [T, 2, N/2]``, then a gather of the halves) interleaves other columns."""
    if not chain:
        return None
    local, columns = chain[0], facts.shape(linear)[-1]
    if facts.same_size(facts.shape(local)[-1], columns):
        return None
    return (f"not fused [shape]: {local.name} reshapes the linear's output to {list(facts.shape(local))}; "
            f"its last dim is not the linear's {columns} output columns, so the gathered columns are not "
            "the linear's")


def _uneven_shards(gathered: Node | None, world_size: int) -> str | None:
    """Why the gathered columns look unevenly sharded, or None.

    torch's ``Shard`` of a width V that W does not divide (DTensor's ``full_tensor()``,
    ``redistribute(Replicate())``) gives every rank ``ceil(V/W)`` columns, padding the narrower
    shards before the gather, and trims the ``W*ceil(V/W) - V`` (1 to W-1) padded columns after
    it.  Only the ranks with a full shard hold the linear next to the gather; the others gather
    ``pad(linear)`` and would not fuse, and every rank must run the same op (the ranks pair their
    calls, docs/contract.md).  No rank sees its peers' graphs, but every rank sees the trim: one
    ``[..., :n]``, the gathered columns' only use, that drops 1 to W-1 of them."""
    users = list(gathered.users) if isinstance(gathered, Node) else []
    if len(users) != 1 or users[0].target in facts.SPLITS:
        return None
    bands = facts.bands_of_user(gathered, users[0])
    if not bands or bands[0].dim != facts.ndim(gathered) - 1 or not facts.same_size(bands[0].start, 0):
        return None
    total, kept = facts.shape(gathered)[-1], bands[0].length
    if not (isinstance(total, int) and isinstance(kept, int) and 0 < total - kept < world_size):
        return None
    return (f"not fused [shape]: {users[0].name} keeps {kept} of the {total} gathered columns, as torch's "
            "uneven Shard does: a rank with a narrower shard pads it before its gather and would not fuse, "
            "and every rank must run the same op")


def _decision(linear_cost, lhs: Node, k: int, match: GatherMatch):
    """The cost rule at this graph's T, or over every T a symbolic T may take."""
    tokens = _tokens(facts.shape(lhs))
    tokens = int(tokens) if isinstance(tokens, sympy.Integer) else tokens
    widths = tuple(int(w) for w in match.hidden_widths)
    args = (k, widths, str(match.dtype).removeprefix("torch."), match.dtype.itemsize)
    device_name = linear_cost.compile_time_device_name()

    def rule(**constants):
        if isinstance(tokens, int):
            return linear_cost.decide(tokens, *args, device_name=device_name, **constants)
        return linear_cost.decide_range(*_token_range(lhs, tokens), *args, device_name=device_name, **constants)

    tuned_constants = _tuned_constants(device_name, len(widths))
    if not tuned_constants:
        return rule()
    return graph_verdict(rule(**tuned_constants), rule())


def graph_verdict(tuned, default):
    """The pass's decision from the tuned rule's and the default rule's (``linear_cost`` decisions).

    Every rank must hold the same graph, and a rank that does not find the tuned config decides by
    the default rule (docs/tuning.md, "What ``auto`` reads"): where the two differ, the graph follows
    the default rule's verdict.  Where that fuses, the fused op decides per call with the config the
    group agreed on at set-up; a tuned config can stop a fusion, never start one."""
    if tuned.fuse == default.fuse:
        return tuned
    if default.fuse:
        return replace(default, rule="per_call", reason=(
            f"{tuned.reason}; but the default rule fuses ({default.reason}), which the group follows where "
            "its ranks do not all find this config: fused op, decided per call with the agreed one"))
    return replace(default, reason=(
        f"{default.reason}; the tuned rule would fuse ({tuned.reason}), but a rank that does not find this "
        "config would not, and every rank must hold the same graph: not fused"))


def _tuned_constants(device_name: str, world_size: int) -> dict:
    """The linear rule's constants of the tuned config this process finds for (GPU model, W), where it has
    them: it stands in for the one the group will agree on, as the GPU model does (docs/tuning.md)."""
    from ..compile_ops import tuned

    selection = tuned.local_selection(world_size, device_name)
    if selection.linear_constants is None:
        return {}
    return {"constants": selection.linear_constants, "constants_from": selection.config_path}


def fuse_linear_gathers(graph: Graph, matches: list[GatherMatch], near_misses: list[NearMiss],
                        dry_run: bool = False) -> list[GatherMatch]:
    """Decide (and unless ``dry_run``, apply) the fused rewrite for every match; returns the updated records."""
    from .hidden_gather import renamed_producer

    out, renames = [], {}
    nodes = {n.name: n for n in graph.nodes}
    for m in matches:
        if m.replacement is None and not dry_run:
            out.append(m)
            continue
        m = replace(m, producer=renamed_producer(m.producer, renames))  # an earlier fused gather's input
        text, near_miss, fuse = decide(m, graph)
        if text is None:
            out.append(m)
            continue
        if near_miss is not None:
            near_misses.append(NearMiss(PATTERN, near_miss, (m.gather, m.producer.node)))
        if not fuse or dry_run:
            out.append(replace(m, linear_fusion=text))
            continue
        gather = _gather_node(nodes.get(m.replacement))
        if gather is None:  # a user pattern's replacement without a tpfuse gather: leave it
            out.append(replace(m, linear_fusion="not fused [shape]: no tpfuse gather in the replacement"))
            continue
        new = _rewrite(graph, gather, m, nodes)
        renames[gather.name] = new.name
        replacement = new.name if nodes.get(m.replacement) is gather else m.replacement
        out.append(replace(m, linear_fusion=text, replacement=replacement,
                           after=tuple(_line(n) for n in _added(new)) + m.after[1:]))
        nodes = {n.name: n for n in graph.nodes}
    return out


def _gather_node(node):
    """The tpfuse gather in a replacement: the node itself or up its first arguments."""
    while isinstance(node, Node):
        if node.op == "call_function" and node.target is _gather_op():
            return node
        node = node.args[0] if node.args else None
    return None


def _rewrite(graph: Graph, gather: Node, m: GatherMatch, nodes: dict) -> Node:
    producer = m.producer
    linear, lhs, weight = nodes[producer.node], nodes[producer.input], nodes[producer.weight]
    bias = nodes[producer.bias] if producer.bias is not None else None
    chain = [nodes[name] for name in producer.reshapes if name in nodes]
    transposed = linear.args[2] if linear.target in facts.ADDMMS else linear.args[1]
    want = facts.val(gather)
    with graph.inserting_before(gather):
        fused = graph.call_function(_fused_op(), (lhs, weight, bias, list(gather.args[1]), gather.args[2]))
        fused.meta["val"] = _fake_value(fused, want)
        new = fused
        if not facts.same_shape(facts.shape(fused), tuple(want.shape)):
            new = graph.call_function(torch.ops.aten.reshape.default, (fused, _gathered_size(gather)))
            new.meta["val"] = want
    gather.replace_all_uses_with(new)
    for node in (gather, *chain, linear, transposed):
        if isinstance(node, Node) and not node.users:
            graph.erase_node(node)
    return new


def _gathered_size(gather: Node) -> list:
    """The gather's output size as graph values: its slab's own reshape sizes (a symbolic leading dim
    stays the graph value that names it; a raw SymInt in a node's arguments is no graph value and
    fails when the code runs), the last one widened to the gathered width."""
    local, total = gather.args[0], facts.shape(gather)[-1]
    if isinstance(local, Node) and facts.is_reshape(local):
        return [*local.args[1][:-1], total]
    return list(facts.shape(gather))


def _fake_value(node: Node, want):
    """``[T, total]`` with the fused op's input's leading dims (the fake kernel's answer)."""
    lhs = facts.val(node.args[0])
    shape = (*lhs.shape[:-1], want.shape[-1])
    if tuple(want.shape) == tuple(shape):
        return want
    return want.new_empty(shape)


def _added(node: Node) -> list[Node]:
    chain = [node]
    while chain[0].target is not _fused_op() and chain[0].args and isinstance(chain[0].args[0], Node):
        chain.insert(0, chain[0].args[0])
    return chain


def _line(node: Node) -> str:
    from .hidden_gather import node_line

    return node_line(node)
