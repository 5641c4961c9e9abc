"""Barrier elision: per tpfuse gather, its workspace slot, whether its entry barrier may go, and zero-copy.

Runs on the post-grad graph after the rewrite.  ``decide_barriers`` finds and
decides (frozen ``BarrierDecision`` records, one per
``tpfuse::all_gather_hidden`` node, each with a reason); ``apply_barrier_decisions``
writes ``slot`` / ``skip_entry_sync`` / ``zero_copy`` into the nodes.  The
safety argument is in docs/barrier_elision.md; in short:

**What the protocols guarantee** is stated once, next to the kernels, and
imported here: ``kernels/barrier/`` (the barrier protocol, backends ``p2p`` and
``multimem``: ``READS_END_IN_KERNEL``, every read of a slot ends inside the kernel
that wrote it, so the only hazard is a fast peer pushing a later call into a slot
we still copy out of; ``EXIT_FENCE``, a rank leaves a call's exit barrier only
after every peer started it; ``next_slot``, the alternation) and ``kernels/flag/``
(the flag protocol, backend ``flag``: no slot, no barrier, and ``FENCE``, finished
on one rank means started on every rank).

**Fences.** A node F "fences" H before G'' when H -> F -> G'' along data
edges and F's completion on any rank q implies that every rank r has started
F, hence (single stream, kernel order) finished H:

- (a) a tpfuse gather on g that provably launches (tokens > 0), by either
  protocol's fence fact above;
- (b) a c10d all_reduce / all_gather / reduce_scatter on g (H -> collective,
  its wait_tensor -> G''), of non-zero size: q's result contains r's
  contribution, which r's NCCL kernel sends only after r's stream reached it.

**Skip rule.**  G'' skips its entry barrier iff
1. some fence precedes G'' (so everything issued before this graph, on any
   slot, is finished on every rank before any rank writes in G''), and
2. every other gather H on g that may run before G'' (H is not a data
   descendant of G'') and uses G'''s slot is fenced before G''.

Condition 2 uses data dependencies only: Inductor does reorder independent
tpfuse gathers (``reorder_for_peak_memory``; see the test
``test_inductor_reorders_independent_gathers``), so "textually earlier" or
"the op order on the group" proves nothing.  A gather that may run just before
G'' with no fence in between must use the other slot: a peer may push G''
while we still copy that gather out.

**Slots** are chosen greedily (other slot than the unfenced gathers that may
run before); the skip rule above is then checked on the final assignment,
so the assignment is a heuristic and the check is the proof.

**Zero-copy** is proven when every reader is internal, finished before the slot
can be written again, and not an op Inductor's later reinplacing could turn into
a write on it.  It is applied only with ``tpfuse.enable(zero_copy=True)``
(experimental, off by default); the op's lowering (compile_ops/inductor_lowering.py)
then keeps Inductor from reusing the result's storage.  Either way the decision
and its reason are recorded.
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass, replace

import torch
from torch.fx import Graph, Node

from ..kernels.barrier import EXIT_FENCE, READS_END_IN_KERNEL, next_slot
from ..kernels.flag import FENCE as FLAG_FENCE
from .graph_facts import WAITS, arg_by_name, functional_collectives, known_true, op_overloads, val

aten = torch.ops.aten

#: The reason recorded for every gather when ``tpfuse.enable(elide_barriers=False)``.
ELISION_OFF = "entry barrier kept: barrier elision disabled (elide_barriers=False)"
ZERO_COPY_NOT_APPLIED = (
    "not applied: zero_copy=False (experimental, off by default; docs/barrier_elision.md §8)"
)


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class BarrierDecision:
    """What the pass decided for one ``tpfuse::all_gather_hidden`` node, and why."""

    gather: str  # the tpfuse node
    group_name: str
    slot: int  # -1: left to the op (elision disabled)
    slot_reason: str
    skip_entry_sync: bool
    reason: str  # why the entry barrier is kept or skipped
    zero_copy: bool
    zero_copy_reason: str
    #: the protocol the op is expected to run (dispatch.planned_backend) and why; the
    #: decision above applies when it runs the barrier protocol (p2p, multimem), and is ignored otherwise
    protocol: str = ""
    protocol_reason: str = ""

    @property
    def saves_a_barrier(self) -> bool:
        """A skipped entry barrier that would otherwise have run (the flag protocol has none to skip)."""
        return self.skip_entry_sync and self.protocol not in ("flag", "gloo", "nccl", "nccl_symmetric")

    def __str__(self) -> str:
        if self.protocol == "flag":
            return (f"{self.gather} group {self.group_name!r}: no barriers, flag protocol ({self.protocol_reason}); "
                    f"should a call take p2p or multimem: slot {self.slot}, entry barrier "
                    f"{'skipped' if self.skip_entry_sync else 'kept'}")
        barrier = ("skipped: " if self.skip_entry_sync else "") + self.reason
        copy = "zero-copy" if self.zero_copy else "copy"
        return (f"{self.gather} group {self.group_name!r} slot {self.slot} ({self.slot_reason}); "
                f"{barrier}; {copy}: {self.zero_copy_reason}")


# --------------------------------------------------------------------------- graph facts


def _tpfuse(name: str):
    packet = getattr(getattr(torch.ops, "tpfuse", None), name, None)
    return getattr(packet, "default", None)


#: c10d collectives whose result on every rank needs every rank's input: a
#: fence (b) on their group.  (broadcast / all_to_all are not: a rank's result
#: need not contain every peer's contribution.)
FENCE_COLLECTIVES = functional_collectives("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor")
#: Ops that read only the *metadata* of their tensor inputs (sizes, dtype,
#: device): Inductor orders nothing after the input's producer for them, so
#: these edges are no data dependency.
METADATA_ONLY = op_overloads(
    "sym_size.int", "sym_size.default", "sym_numel.default", "sym_stride.int", "sym_stride.default",
    "sym_storage_offset.default", "size.default", "size.int", "stride.default", "numel.default",
    "empty_like.default", "zeros_like.default", "ones_like.default", "full_like.default",
    "rand_like.default", "randn_like.default", "randint_like.default", "new_empty.default",
    "new_empty_strided.default", "new_zeros.default", "new_ones.default", "new_full.default",
    "fill.Scalar", "zero.default", "scalar_tensor.default",
)
#: Ops whose output aliases their first input (zero-copy readers are followed through them).
VIEWS = op_overloads(
    "view.default", "_unsafe_view.default", "reshape.default", "alias.default", "permute.default",
    "transpose.int", "t.default", "expand.default", "slice.Tensor", "select.int", "narrow.default",
    "unsqueeze.default", "squeeze.dim", "squeeze.dims", "squeeze.default", "as_strided.default",
    "split.Tensor", "split_with_sizes.default", "unbind.int", "chunk.default", "view_as.default",
    "detach.default", "unflatten.int", "flatten.using_ints", "diagonal.default", "movedim.int",
)


def _is_gather(node: Node) -> bool:
    """A tpfuse push op on a group's workspace: the gather, or the fused linear + gather
    (linear_fusion.py), which uses the same slots and barriers and so is decided alike."""
    return node.op == "call_function" and node.target in (
        _tpfuse("all_gather_hidden"), _tpfuse("linear_all_gather_hidden"))


#: tpfuse ops with a group argument that communicate nothing (they read the rank, no peer).
LOCAL_ONLY = ("hidden_band",)


def _exchanges_inside(node: Node) -> bool:
    """A tpfuse op that exchanges partials through ``tpfuse::all_gather_hidden`` inside itself (the
    reductions of compile_ops/reduce_hidden.py and vocab_parallel_loss.py; any other tpfuse op with a
    group, to be safe): that inner call uses a workspace slot chosen when it runs, which no proof
    here can see, so no gather it may run just before may skip its entry barrier."""
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return False
    if target.namespace != "tpfuse" or _is_gather(node) or target is _tpfuse("reduce_scatter_hidden"):
        return False
    schema = target._schema
    return schema.name.partition("::")[2] not in LOCAL_ONLY and any(a.name == "group_name" for a in schema.arguments)


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _provably_positive(size) -> bool:
    if isinstance(size, int):
        return size > 0
    try:
        return bool(known_true(size >= 1))
    except Exception:  # noqa: BLE001 - an undecidable size is not provably positive
        return False


def _provably_zero(size) -> bool:
    if isinstance(size, int):
        return size == 0
    try:
        return bool(known_true(size == 0))
    except Exception:  # noqa: BLE001
        return False


def _carries_data(value, cache: dict | None = None) -> bool:
    """A tensor value (or tuple of them) that is not statically empty: Inductor drops reads
    of statically empty tensors (``cat`` filters them out), so no order rests on them."""
    tensors = _tensors(value)
    return bool(tensors) and any(not _provably_empty(t, cache) for t in tensors)


def _provably_empty(t: torch.Tensor, cache: dict | None = None) -> bool:
    """Some dim of ``t`` is provably 0 (symbolic dims decided once per expression)."""
    for d in t.shape:
        if isinstance(d, int):
            if d == 0:
                return True
            continue
        key = getattr(getattr(d, "node", None), "expr", None)
        if cache is None or key is None:
            zero = _provably_zero(d)
        else:
            zero = cache.get(key)
            if zero is None:
                zero = cache[key] = _provably_zero(d)
        if zero:
            return True
    return False


def _launches(node: Node, tensor_arg) -> bool:
    """The op really communicates: its tensor has provably at least one row and one column.

    The push launchers (compile_ops/barrier/launcher.py, compile_ops/flag/launcher.py) launch
    nothing when T == 0, and a collective of size 0 may return without any rank waiting
    for any other."""
    value = val(tensor_arg)
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return False
    return all(_provably_positive(s) for s in value.shape)


@dataclass(frozen=True)
class Fence:
    """A node whose completion on any rank implies every rank finished what it depends on."""

    name: str  # node whose data descendants are ordered after the fence (the wait, for c10d)
    entry: str  # node whose data ancestors are ordered before the fence
    kind: str  # "exit barrier of <gather>" / "<collective> on group <g>"


def _device_type(tensor_arg) -> str | None:
    value = val(tensor_arg)
    return value.device.type if isinstance(value, torch.Tensor) else None


def _key_of_gather(node: Node) -> tuple:
    """(group name, device type): gathers share a workspace, and fences order them, per key.

    A collective on the same group but another device (a CPU tensor on a
    ``cpu:gloo,cuda:nccl`` group) is no fence: its completion says where the
    peers' *hosts* are, not how far their GPU streams have run."""
    return str(arg_by_name(node, 2, "group_name")), _device_type(arg_by_name(node, 0, "x"))


def _fence_of(node: Node):
    """(key, Fence) when ``node`` is a fence (a) or (b); else (None, None)."""
    if _is_gather(node):
        group = arg_by_name(node, 2, "group_name")
        x = arg_by_name(node, 0, "x")
        if isinstance(group, str) and _launches(node, x):
            fact = FLAG_FENCE if _protocol_of(node)["protocol"] == "flag" else EXIT_FENCE
            kind = "(a) " + fact.format(gather=node.name)
            return _key_of_gather(node), Fence(node.name, node.name, kind)
        return None, None
    if node.op == "call_function" and node.target is _tpfuse("reduce_scatter_hidden"):
        # Its c10d reduce-scatter is synchronous on the current stream.
        group, grad = arg_by_name(node, 3, "group_name"), arg_by_name(node, 0, "grad")
        if isinstance(group, str) and _launches(node, grad):
            key = (group, _device_type(grad))
            return key, Fence(node.name, node.name, f"(b) collective {node.name} on group {group!r}")
        return None, None
    if node.op == "call_function" and node.target in FENCE_COLLECTIVES:
        group = node.args[-1] if node.args else node.kwargs.get("group_name")
        waits = [u for u in node.users if u.target in WAITS]
        if isinstance(group, str) and len(waits) == 1 and _launches(node, node.args[0]):
            key = (group, _device_type(node.args[0]))
            return key, Fence(waits[0].name, node.name, f"(b) collective {node.name} on group {group!r}")
    return None, None


class _Order:
    """Which nodes are ordered before which, along data edges only, as bitmasks.

    Two sweeps over the graph (forward in graph order, which is topological,
    and backward) give, for every node ``n``:

    - ``gathers_before[n]`` / ``gathers_after[n]``: the gathers that ``n``
      strictly depends on / that strictly depend on ``n``;
    - ``fences_before[n]``: the fences whose *exit* (the gather itself, or the
      collective's wait) ``n`` strictly depends on;
    - ``fences_after[n]``: the fences whose *entry* (the gather, or the
      collective) strictly depends on ``n``.

    So ``x -> F -> g`` for some fence F iff ``fences_after[x] & fences_before[g]``.
    Edges that carry no data (sizes, metadata-only ops, statically empty
    tensors) are left out: the relation under-approximates what any scheduler
    must respect, which only makes proofs harder."""

    def __init__(self, graph: Graph, gathers: list[Node], fences: list[tuple[Node, Node, "Fence"]]) -> None:
        self.gathers, self.fences = gathers, fences
        self.gather_bit = {g: 1 << i for i, g in enumerate(gathers)}
        exit_bits: dict[Node, int] = {}
        entry_bits: dict[Node, int] = {}
        for i, (entry, exit_, _) in enumerate(fences):
            exit_bits[exit_] = exit_bits.get(exit_, 0) | 1 << i
            entry_bits[entry] = entry_bits.get(entry, 0) | 1 << i
        nodes = list(graph.nodes)
        dims: dict = {}  # symbolic dim -> provably 0, decided once per expression
        carries = {n: _carries_data(val(n), dims) for n in nodes}
        sources = {n: self.sources(n, carries) for n in nodes}
        self.gathers_before: dict[Node, int] = {}
        self.fences_before: dict[Node, int] = {}
        for n in nodes:
            g_mask = f_mask = 0
            for src in sources[n]:
                g_mask |= self.gathers_before[src] | self.gather_bit.get(src, 0)
                f_mask |= self.fences_before[src] | exit_bits.get(src, 0)
            self.gathers_before[n], self.fences_before[n] = g_mask, f_mask
        consumers: dict[Node, list[Node]] = {n: [] for n in nodes}
        for n in nodes:
            for src in sources[n]:
                consumers[src].append(n)
        self.gathers_after: dict[Node, int] = {}
        self.fences_after: dict[Node, int] = {}
        for n in reversed(nodes):
            g_mask = f_mask = 0
            for user in consumers[n]:
                g_mask |= self.gathers_after[user] | self.gather_bit.get(user, 0)
                f_mask |= self.fences_after[user] | entry_bits.get(user, 0)
            self.gathers_after[n], self.fences_after[n] = g_mask, f_mask

    @staticmethod
    def sources(node: Node, carries: dict) -> list[Node]:
        """The inputs whose *values* ``node`` reads (so it runs after their producers)."""
        if node.op in ("placeholder", "get_attr") or node.target in METADATA_ONLY:
            return []
        if not carries[node] and _tensors(val(node)):
            return []  # a statically empty result: Inductor may compute nothing
        return [s for s in node.all_input_nodes if carries.get(s, False)]

    def before(self, a: Node, g: Node) -> bool:
        """``a`` (any node) is a data ancestor of the gather ``g``: every schedule runs it first."""
        return bool(self.gathers_after[a] & self.gather_bit[g])

    def fence_between(self, x: Node, g: Node, group_mask: int) -> "Fence | None":
        """A fence F of the group with x -> F -> g, if any."""
        both = self.fences_after[x] & self.fences_before[g] & group_mask
        return self.fences[(both & -both).bit_length() - 1][2] if both else None

    def prior_fences(self, g: Node, group_mask: int) -> list["Fence"]:
        mask = self.fences_before[g] & group_mask
        return [f for i, (_, _, f) in enumerate(self.fences) if mask >> i & 1]


# --------------------------------------------------------------------------- decide


def decide_barriers(graph: Graph, elide: bool = True, zero_copy: bool = False) -> list[BarrierDecision]:
    """One decision per ``tpfuse::all_gather_hidden`` node, in graph order (changes nothing)."""
    gathers = [n for n in graph.nodes if _is_gather(n)]
    if not elide:
        return [BarrierDecision(g.name, str(arg_by_name(g, 2, "group_name")), -1, "left to the op",
                                False, ELISION_OFF, False, "elision disabled")
                for g in gathers]
    by_name = {n.name: n for n in graph.nodes}
    fences, key_masks = [], {}
    for node in graph.nodes:
        key, fence = _fence_of(node)
        if fence is not None:
            key_masks[key] = key_masks.get(key, 0) | 1 << len(fences)
            fences.append((by_name[fence.entry], by_name[fence.name], fence))
    inner = [n for n in graph.nodes if _exchanges_inside(n)]
    order = _Order(graph, gathers + inner, fences)

    decisions = {}
    for key in dict.fromkeys(_key_of_gather(g) for g in gathers):
        on_key = [g for g in gathers if _key_of_gather(g) == key]
        inner_on_key = [n for n in inner if _key_of_gather(n) == key]
        decisions.update(_decide_group(on_key, key_masks.get(key, 0), order, zero_copy, inner_on_key))
    return [replace(decisions[g.name], **_protocol_of(g)) for g in gathers]


def _protocol_of(node: Node) -> dict:
    """What the op is expected to run for this node (for the report only; see BarrierDecision)."""
    if node.target is _tpfuse("linear_all_gather_hidden"):
        return {"protocol": "p2p (fused linear)", "protocol_reason": "the fused linear + push kernel"}
    from ..compile_ops.dispatch import planned_backend

    x, widths = val(arg_by_name(node, 0, "x")), arg_by_name(node, 1, "hidden_widths")
    if not isinstance(x, torch.Tensor) or x.dim() == 0 or not isinstance(widths, (list, tuple)):
        return {"protocol": "per call", "protocol_reason": "the input's shape is unknown here"}
    lead = x.shape[:-1]
    tokens = int(torch.Size(lead).numel()) if all(isinstance(d, int) for d in lead) else None
    name, why = planned_backend(x.device.type, x.dtype, tokens, [int(w) for w in widths])
    return {"protocol": name, "protocol_reason": why}


def _decide_group(gathers: list[Node], fences: int, order: _Order, allow_zero_copy: bool = False,
                  inner: list[Node] = ()) -> dict[str, BarrierDecision]:
    group = str(arg_by_name(gathers[0], 2, "group_name"))
    # The gathers that may run before g with no fence between: g's slot must differ from theirs.
    unfenced = {
        g: [h for h in gathers
            if h is not g and not order.before(g, h) and order.fence_between(h, g, fences) is None]
        for g in gathers
    }
    slot, slot_reason = {}, {}
    for g in gathers:  # graph order is a topological order
        taken = sorted({slot[h] for h in unfenced[g] if h in slot})
        names = ", ".join(h.name for h in unfenced[g] if h in slot)
        if len(taken) == 1:
            slot[g], slot_reason[g] = next_slot(taken[0]), f"other slot than {names}"
        elif not taken:
            slot[g], slot_reason[g] = 0, "no unfenced gather on the group may run before it"
        else:
            slot[g], slot_reason[g] = 0, f"both slots taken by {names}"

    proofs = {g: _prove_skip(g, gathers, unfenced[g], slot, fences, order, group, inner) for g in gathers}
    skip = {g: proofs[g][0] for g in gathers}
    if not any(skip.values()):
        # No skip rests on the slots: leave them to the op (slot=-1), so a graph without
        # elision is exactly what the rewrite produced.  The op's alternation is then
        # unknown here, so zero-copy must treat every later gather as using the same slot.
        slot = {g: -1 for g in gathers}
        slot_reason = {g: "left to the op: no skipped barrier on the group relies on it" for g in gathers}
    out = {}
    for g in gathers:
        zero_copy, zc_reason = _decide_zero_copy(g, gathers, slot, skip, fences, order, allow_zero_copy, inner)
        out[g.name] = BarrierDecision(g.name, group, slot[g], slot_reason[g], skip[g], proofs[g][1],
                                      zero_copy, zc_reason)
    return out


def _prove_skip(g, gathers, unfenced, slot, fences, order, group, inner=()) -> tuple[bool, str]:
    if not READS_END_IN_KERNEL:  # the whole rule below rests on it (kernels/barrier/)
        return False, "entry barrier kept: the barrier protocol's reads of a slot outlive its kernel"
    prior = order.prior_fences(g, fences)
    if not prior:
        silent = [h.name for h in gathers if h is not g and order.before(h, g)]
        why = (f" ({', '.join(silent)} precede{'s' if len(silent) == 1 else ''} it but may launch "
               "nothing: token count not provably > 0)") if silent else ""
        return False, (f"entry barrier kept: no fence on group {group!r} precedes it in the graph{why}, "
                       "so a peer may still be reading the slot for a call before this graph")
    clash = [h for h in unfenced if slot[h] == slot[g]]
    if clash:
        return False, (f"entry barrier kept: {', '.join(h.name for h in clash)} may run before it with "
                       "no fence between, on the same slot")
    hidden = [o.name for o in inner if not order.before(g, o) and order.fence_between(o, g, fences) is None]
    if hidden:
        return False, (f"entry barrier kept: {', '.join(hidden)} may run before it with no fence between, "
                       "and gather(s) inside the op on a slot chosen when it runs")
    used = []
    for h in gathers:
        if h is not g and slot[h] == slot[g] and not order.before(g, h):
            used.append(f"{h.name} by {order.fence_between(h, g, fences).kind}")
    others = [h.name for h in unfenced]
    parts = [f"after {prior[-1].kind}"]
    if used:
        parts.append(f"earlier slot-{slot[g]} users fenced: {'; '.join(used)}")
    if others:
        parts.append(f"{', '.join(others)} may run just before it on slot {next_slot(slot[g])}")
    return True, "; ".join(parts)


# --------------------------------------------------------------------------- zero-copy


def _readers(node: Node) -> tuple[list[Node], bool]:
    """Nodes that read ``node``'s buffer (through views), and whether a view of it escapes."""
    readers, escapes, pending, seen = [], False, [node], set()
    while pending:
        current = pending.pop()
        for user in current.users:
            if user in seen:
                continue
            seen.add(user)
            if user.op == "output":
                escapes = True
            elif user.target in VIEWS or user.target is operator.getitem:
                pending.append(user)
            elif user.target not in METADATA_ONLY:
                readers.append(user)
    return readers, escapes


@functools.lru_cache(maxsize=None)
def _reinplaceable_targets() -> frozenset | None:
    """The ops Inductor's ``reinplace_inplaceable_ops`` (after the custom post-grad pass) may turn
    into in-place writes on their input; None where this torch does not say."""
    try:
        from torch._inductor.fx_passes import reinplace
    except ImportError:  # pragma: no cover
        return None
    names = ("inplaceable_ops", "inplaceable_foreach_ops", "inplaceable_triton_ops")
    if not all(hasattr(reinplace, n) for n in names):  # pragma: no cover - another torch
        return None
    return frozenset(t for n in names for t in getattr(reinplace, n))


def _may_be_reinplaced(node: Node) -> bool:
    targets = _reinplaceable_targets()
    if targets is None:  # cannot tell: assume the worst
        return True
    return node.target in targets or "auto_functionalized" in str(node.target)


def _decide_zero_copy(g, gathers, slot, skip, fences, order, allow=False, inner=()) -> tuple[bool, str]:
    """Could ``g``'s result be a view of its slot?  Every reader must be inside the graph and
    finished on every rank before any peer pushes into the slot again: before each later
    same-slot gather K in stream order when K keeps its entry barrier (reader -> K), behind
    a fence when K skips it (reader -> F -> K).  Gathers of later graphs are covered by
    their own rule 1 (a fence, or the entry barrier, after everything this graph issued)."""
    readers, escapes = _readers(g)
    if escapes:
        return False, "the result (or a view of it) is a graph output"
    writer = next((r for r in readers if _may_be_reinplaced(r)), None)
    if writer is not None:
        return False, (f"reader {writer.name} ({writer.target}) may become an in-place write into the "
                       "slot (Inductor's reinplacing runs after this pass)")
    for k in gathers:
        # slot -1: the op alternates at run time, so any later gather may reuse g's slot
        same_slot = slot[g] < 0 or slot[k] == slot[g]
        if k is g or not same_slot or order.before(k, g):
            continue
        for r in readers:
            if skip[k]:
                if order.fence_between(r, k, fences) is None:
                    return False, (f"no fence orders reader {r.name} before the "
                                   f"barrier-free push of {k.name} into the slot")
            elif not order.before(r, k):
                return False, f"reader {r.name} may run after {k.name} writes the slot"
    for k in inner:  # its inner gather keeps its entry barrier, on a slot chosen when it runs
        late = next((r for r in readers if not order.before(k, g) and not order.before(r, k)), None)
        if late is not None:
            return False, f"reader {late.name} may run after {k.name} gathers inside the op into the slot"
    if not allow:
        return False, f"readers proven done before the slot is rewritten, {ZERO_COPY_NOT_APPLIED}"
    return True, "readers proven done before the slot is rewritten: the result is a view of the slot"


# --------------------------------------------------------------------------- apply


def apply_barrier_decisions(graph: Graph, decisions: list[BarrierDecision]) -> None:
    """Write each decision into its node's ``slot`` / ``skip_entry_sync`` / ``zero_copy``."""
    by_name = {n.name: n for n in graph.nodes}
    for d in decisions:
        node = by_name[d.gather]
        names = [a.name for a in node.target._schema.arguments]
        leading = names[: names.index("slot")]  # the tensors, hidden_widths and group_name
        node.args = tuple(arg_by_name(node, i, n) for i, n in enumerate(leading))
        if d.slot < 0 and not d.skip_entry_sync and not d.zero_copy:
            node.kwargs = {}  # the defaults: the op picks the slot, both barriers, a copy
        else:
            kwargs = {"slot": d.slot, "skip_entry_sync": d.skip_entry_sync}
            if "zero_copy" in names:
                kwargs["zero_copy"] = d.zero_copy
            node.kwargs = kwargs


def attach_to_matches(graph: Graph, matches: list, decisions: list[BarrierDecision]) -> list:
    """The match records with their gather's decision filled in (slot, reason, zero-copy)."""
    by_gather = {d.gather: d for d in decisions}
    by_name = {n.name: n for n in graph.nodes}
    out = []
    for m in matches:
        node = by_name.get(m.replacement) if m.replacement else None
        while node is not None and not _is_gather(node):
            node = node.args[0] if node.args and isinstance(node.args[0], Node) else None
        d = by_gather.get(node.name) if node is not None else None
        if d is None:
            out.append(m)
            continue
        out.append(replace(m, skip_entry_sync=d.skip_entry_sync, reason=d.reason, slot=d.slot,
                           tpfuse_gather=d.gather,
                           zero_copy=d.zero_copy, zero_copy_reason=d.zero_copy_reason))
    return out
