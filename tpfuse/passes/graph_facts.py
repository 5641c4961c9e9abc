"""Normalised facts about FX nodes: what a node *means*, independent of how it was spelled.

Every matcher reads nodes through this module so that the same meaning is
recognised whatever the spelling:

- views are reshapes (``view``, ``_unsafe_view``, ``reshape`` -> ``"reshape"``),
  as Inductor's ``view_to_reshape`` does;
- ``t``, ``transpose`` and ``permute`` are all permutations (``movedim``
  decomposes to ``permute`` before we ever see it);
- ``split``/``split_with_sizes`` + ``getitem``, ``slice`` and ``narrow`` on a
  dim are all *bands* ``[start, start + length)`` of that dim;
- dims are non-negative;
- sizes are compared symbolically (``statically_known_true``), never by
  guarding, so a pass never adds a guard or specialises a dynamic size.

Shapes come from ``node.meta["val"]`` (the fake tensor every post-grad and AOT
graph carries), never from the literal arguments of the node.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Sequence

import sympy
import torch
from torch.fx import Node

aten = torch.ops.aten

# ``known_true(expr)``: whether a symbolic condition holds for every value the shape
# environment allows, decided without adding a guard (False when it cannot tell).
try:  # torch >= 2.1
    from torch.fx.experimental.symbolic_shapes import statically_known_true as known_true
except ImportError:  # pragma: no cover - very old torch
    def known_true(expr):  # type: ignore[no-redef]
        return bool(expr) if isinstance(expr, bool) else False


def op_overloads(*names: str) -> frozenset:
    """The aten OpOverloads named ``"packet.overload"`` that exist in this torch build
    (feature-detected, never pinned)."""
    found = []
    for name in names:
        packet_name, _, overload = name.partition(".")
        packet = getattr(aten, packet_name, None)
        if packet is not None and hasattr(packet, overload):
            found.append(getattr(packet, overload))
    return frozenset(found)


RESHAPES = op_overloads("reshape.default", "view.default", "_unsafe_view.default")
PERMUTES = op_overloads("permute.default")
TRANSPOSES = op_overloads("transpose.int")
T_OPS = op_overloads("t.default")
CLONES = op_overloads("clone.default", "contiguous.default", "alias.default")
SPLITS = op_overloads("split.Tensor", "split_with_sizes.default", "split.sizes")
SLICES = op_overloads("slice.Tensor")
NARROWS = op_overloads("narrow.default")
CATS = op_overloads("cat.default")
COPIES = op_overloads("copy.default")
FRESH = op_overloads("empty.memory_format", "empty_like.default", "empty_strided.default", "new_empty.default",
                     # filled with a constant: a copy of the same shape overwrites every element all the same
                     # (``[torch.zeros_like(y) for _ in range(W)]`` before ``dist.all_gather``)
                     "zeros_like.default", "ones_like.default", "full_like.default", "zeros.default",
                     "ones.default", "full.default", "new_zeros.default", "new_ones.default", "new_full.default")
MATMULS = op_overloads("mm.default")
ADDMMS = op_overloads("addmm.default")


def functional_collectives(*names: str) -> frozenset:
    """The default overloads of the named functional collectives, under either namespace
    spelling this torch build has (``_c10d_functional``, ``c10d_functional``)."""
    found = []
    for namespace in ("_c10d_functional", "c10d_functional"):
        for name in names:
            packet = getattr(getattr(torch.ops, namespace, None), name, None)
            if packet is not None and hasattr(packet, "default"):
                found.append(packet.default)
    return frozenset(found)


ALL_GATHERS = functional_collectives("all_gather_into_tensor")
ALL_GATHERS_COALESCED = functional_collectives("all_gather_into_tensor_coalesced")
WAITS = functional_collectives("wait_tensor")


# --------------------------------------------------------------------------- values


def val(node: Any) -> Any:
    """The example value of a node (fake tensor, SymInt, ...); plain values pass through."""
    if isinstance(node, Node):
        return node.meta.get("val", node.meta.get("example_value"))
    return node


def shape(node: Node) -> tuple | None:
    v = val(node)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def ndim(node: Node) -> int | None:
    s = shape(node)
    return None if s is None else len(s)


def same_size(a: Any, b: Any) -> bool:
    """``a == b`` for ints, SymInts or SymPy expressions, decided without adding a guard.

    Structural equality of the SymPy expressions answers almost every query
    (``u0 + u0`` and ``2*u0`` are the same expression); only the rest goes to
    ``statically_known_true`` (which knows the shape environment's facts)."""
    a, b = val(a), val(b)
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    ea, eb = _expr(a), _expr(b)
    if ea is not None and eb is not None:
        if ea == eb:
            return True
        try:
            difference = sympy.expand(ea - eb)
            if difference == 0:
                return True
            if getattr(difference, "is_number", False) or isinstance(difference, int):
                return False  # e.g. s0 + 1 vs s0: never equal, no need to ask
        except Exception:  # noqa: BLE001 - fall through to the shape environment
            pass
    if isinstance(a, sympy.Basic) or isinstance(b, sympy.Basic):
        return False  # no shape environment to ask about a bare expression
    try:
        return bool(known_true(a == b))
    except Exception:
        return False


def _expr(x: Any):
    """The SymPy expression of a size (ints stay ints)."""
    if isinstance(x, (int, sympy.Basic)):
        return x
    node = getattr(x, "node", None)
    return getattr(node, "expr", None) if node is not None else None


def same_shape(a: Sequence, b: Sequence) -> bool:
    return len(a) == len(b) and all(same_size(x, y) for x, y in zip(a, b))


def product(sizes: Sequence) -> Any:
    """Product of sizes: an int, or a SymPy expression when any size is symbolic.

    SymPy arithmetic on expressions is ~10x cheaper than SymInt arithmetic
    (which records and logs every operation)."""
    out: Any = 1
    for s in sizes:
        e = _expr(val(s))
        if e is None:
            raise TypeError(f"tpfuse: not a size: {s!r}")
        out = out * e
    return out


def nonneg_dim(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim


def arg(node: Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def arg_by_name(node: Node, index: int, name: str, default: Any = None) -> Any:
    """Like ``arg``, but the position comes from the op's schema where it has one, so one call
    reads an argument of ops that put it at different positions (the fused op has x, weight
    and bias before hidden_widths and group_name); ``index`` serves targets without a schema."""
    schema = getattr(node.target, "_schema", None)
    if schema is not None:
        names = [a.name for a in schema.arguments]
        if name in names:
            index = names.index(name)
    return arg(node, index, name, default)


# --------------------------------------------------------------------------- meanings


def is_reshape(node: Node) -> bool:
    return node.op == "call_function" and node.target in RESHAPES


def is_clone(node: Node) -> bool:
    return node.op == "call_function" and node.target in CLONES


def is_copy_into_fresh(node: Node) -> bool:
    """``copy(empty(...), src)`` of the same shape and dtype: a clone of ``src``.

    AOT graphs of in-place c10d code (``all_gather_into_tensor(out, y)``,
    ``all_gather(list, y)``) write the result into the user's fresh buffer
    this way; Inductor later removes the copy.  The buffer may be empty or
    constant-filled (``zeros_like``, ``full``, ...): the copy overwrites all of it."""
    if node.op != "call_function" or node.target not in COPIES or len(node.args) < 2:
        return False
    dst, src = node.args[0], node.args[1]
    if not (isinstance(dst, Node) and isinstance(src, Node)):
        return False
    if dst.op != "call_function" or dst.target not in FRESH or len(dst.users) != 1:
        return False
    d, s = val(dst), val(src)
    return (
        isinstance(d, torch.Tensor) and isinstance(s, torch.Tensor) and d.dtype == s.dtype
        and same_shape(d.shape, s.shape)
    )


def is_clone_like(node: Node) -> bool:
    """A node whose value equals its (first) tensor input: clone, contiguous, copy into fresh."""
    return is_clone(node) or is_copy_into_fresh(node)


def clone_source(node: Node) -> Node:
    return node.args[1] if is_copy_into_fresh(node) else node.args[0]


def through_clones(node: Node) -> tuple[Node, list[Node]]:
    """Follow single-user chains of clone-like nodes; returns the last node and the skipped ones."""
    skipped = []
    while len(node.users) == 1:
        user = next(iter(node.users))
        if not is_clone_like(user) or clone_source(user) is not node:
            break
        skipped.append(user)
        node = user
    return node, skipped


def unary_pointwise(node: Node) -> bool:
    """A pointwise op whose only tensor input is its first argument (relu, mul by a scalar, ...)."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return False
    tags = node.target.tags
    if torch.Tag.pointwise not in tags or torch.Tag.nondeterministic_seeded in tags:
        return False  # a random op drawn per band is not the same draw on the whole
    first = node.args[0] if node.args else None
    return isinstance(first, Node) and node.all_input_nodes == [first]


def is_cat(node: Node) -> bool:
    return node.op == "call_function" and node.target in CATS


def permutation(node: Node) -> tuple[int, ...] | None:
    """The permutation a ``permute``/``transpose``/``t`` node applies, dims non-negative."""
    if node.op != "call_function":
        return None
    rank = ndim(node)
    if rank is None:
        return None
    if node.target in PERMUTES:
        return tuple(nonneg_dim(d, rank) for d in node.args[1])
    if node.target in TRANSPOSES:
        d0, d1 = (nonneg_dim(d, rank) for d in node.args[1:3])
        perm = list(range(rank))
        perm[d0], perm[d1] = perm[d1], perm[d0]
        return tuple(perm)
    if node.target in T_OPS:
        return (1, 0) if rank == 2 else tuple(range(rank))
    return None


def cat_dim(node: Node) -> int:
    rank = ndim(node)
    return nonneg_dim(arg(node, 1, "dim", 0), rank or 1)


@dataclass(frozen=True)
class Band:
    """``node`` is rows ``[start, start + length)`` of dim ``dim`` of ``source``."""

    node: Node
    source: Node
    dim: int
    start: Any
    length: Any


def bands_of_user(source: Node, user: Node) -> list[Band] | None:
    """The bands of ``source`` that ``user`` (a split, slice or narrow) produces.

    ``None`` when ``user`` is not a banding op; a split yields one band per
    ``getitem`` user of it."""
    if user.op != "call_function":
        return None
    src_shape = shape(source)
    if src_shape is None:
        return None
    rank = len(src_shape)
    if user.target in SPLITS:
        sizes = arg(user, 1, "split_size", None)
        if sizes is None:
            sizes = arg(user, 1, "split_sizes")
        dim = nonneg_dim(arg(user, 2, "dim", 0), rank)
        pieces = val(user)
        if not isinstance(pieces, (list, tuple)):
            return None
        starts, offset = [], 0
        for piece in pieces:
            starts.append(offset)
            offset = offset + _expr(piece.shape[dim])  # SymPy, not SymInt, arithmetic
        out = []
        for item in user.users:
            if item.target is not operator.getitem or not isinstance(item.args[1], int):
                return None
            i = item.args[1]
            out.append(Band(item, source, dim, starts[i], pieces[i].shape[dim]))
        return out
    if user.target in SLICES:
        dim = nonneg_dim(arg(user, 1, "dim", 0), rank)
        step = arg(user, 4, "step", 1)
        if step != 1:
            return None
        start = arg(user, 2, "start", 0)
        start = 0 if start is None else val(start)  # never bool() a SymInt: that guards
        length = val(user).shape[dim]
        return [Band(user, source, dim, start, length)]
    if user.target in NARROWS:
        dim = nonneg_dim(user.args[1], rank)
        return [Band(user, source, dim, val(user.args[2]), val(user.args[3]))]
    return None


def is_contiguous(value: torch.Tensor) -> bool:
    """``value.is_contiguous()`` decided on SymPy expressions (the fake tensor's own
    check on symbolic sizes costs ~0.3 ms)."""
    sizes, strides = tuple(value.shape), value.stride()
    if all(isinstance(x, int) for x in (*sizes, *strides)):
        return value.is_contiguous()
    expected: Any = 1
    for size, stride in reversed(list(zip(sizes, strides))):
        # a size-1 dim may have any stride; a symbolic size counts as not 1 (strict, cheap)
        if not (isinstance(size, int) and size == 1) and not same_size(stride, expected):
            return False
        expected = expected * _expr(size)
    return True


_TARGET_NAMES: dict = {}


def target_name(node: Node) -> str:
    """``mm``, ``split``, ``_c10d_functional.wait_tensor``, ``getitem``: short, cached."""
    name = _TARGET_NAMES.get(node.target)
    if name is None:
        target = node.target
        name = getattr(target, "__name__", None) or str(target)
        if isinstance(target, torch._ops.OpOverload):
            name = str(target.overloadpacket).replace("aten.", "")
        _TARGET_NAMES[target] = name
    return name


def describe(node: Node) -> str:
    """``name = target`` in one short line, for near-miss reasons."""
    if node.op == "output":
        return "the graph output"
    return f"{node.name} ({target_name(node)})"
