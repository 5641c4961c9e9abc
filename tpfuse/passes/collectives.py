"""Which nodes of a post-grad graph are collectives, and which of those are gathers.

The report must never pass over a gather in silence: a collective that no
pattern claimed is still listed (docs/passes.md, "What counts as a
collective").  The rule, on the op a node calls (looking inside
``auto_functionalized``, which wraps mutating custom ops):

1. ``aten``, ``prims`` and ``tpfuse`` ops are not: ``aten.gather`` indexes a
   tensor, and tpfuse's own ops are reported by the barrier table.
2. torch's collective namespaces (``_c10d_functional``, ``c10d_functional``,
   ``c10d``, ``_c10d_functional_autograd``) are collectives, except
   ``wait_tensor`` (it waits, it moves nothing); a gather when the op name
   says ``gather``.
3. Any other (custom) op is a gather when its name says ``all_gather`` or
   ``allgather``, or says ``gather`` and its schema takes a group argument;
   another collective when its schema takes a group argument and its name says
   reduce / scatter / broadcast / all_to_all.

Group arguments are those named in ``GROUP_ARGUMENTS``: the names torch,
vLLM, SGLang and TRT-LLM give them.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import torch
from torch.fx import Node

GATHER = "gather"
OTHER = "other"

TORCH_COLLECTIVE_NAMESPACES = frozenset({"_c10d_functional", "c10d_functional", "c10d",
                                         "_c10d_functional_autograd"})
NOT_COLLECTIVE_NAMESPACES = frozenset({"aten", "prims", "tpfuse", "inductor", "quantized"})
GROUP_ARGUMENTS = frozenset({"group", "group_name", "process_group", "pg", "tp_group", "group_size",
                             "world_size", "ranks", "group_id"})
_ALL_GATHER = re.compile(r"all_?gather", re.IGNORECASE)
_OTHER_COLLECTIVE = re.compile(r"reduce|scatter|broadcast|all_?to_?all|send|recv", re.IGNORECASE)


def called_op(node: Node) -> Any:
    """The op a call node runs: its target, or the op inside ``auto_functionalized``."""
    target = node.target
    if "auto_functionalized" in getattr(target, "__name__", "") and node.args:
        return node.args[0]
    return target


def op_label(op: Any) -> str:
    """``namespace::name`` (no overload): how the op is named in near-miss reasons."""
    schema = getattr(op, "_schema", None)
    return schema.name if schema is not None else getattr(op, "__name__", str(op))


@functools.lru_cache(maxsize=None)
def collective_kind(op: Any) -> str | None:
    """``GATHER``, ``OTHER`` (another collective) or ``None`` (not a collective)."""
    schema = getattr(op, "_schema", None)
    if schema is None:
        return None
    namespace, _, name = schema.name.partition("::")
    if namespace in NOT_COLLECTIVE_NAMESPACES:
        return None
    if namespace in TORCH_COLLECTIVE_NAMESPACES:
        if name == "wait_tensor":
            return None
        return GATHER if "gather" in name else OTHER
    takes_group = any(a.name in GROUP_ARGUMENTS for a in schema.arguments)
    if _ALL_GATHER.search(name) or (takes_group and "gather" in name.lower()):
        return GATHER
    if takes_group and _OTHER_COLLECTIVE.search(name):
        return OTHER
    return None


def node_collective_kind(node: Node) -> str | None:
    if node.op != "call_function":
        return None
    op = called_op(node)
    if not isinstance(op, torch._ops.OpOverload):
        return None
    return collective_kind(op)
