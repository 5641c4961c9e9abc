"""Process groups by name: the op takes a ``str group_name`` so that graphs and
fake kernels never hold a ProcessGroup object."""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.distributed_c10d import _resolve_process_group

#: torch's all-gather of one tensor into one tensor: ``all_gather_single`` where torch has it, because its
#: older name, ``all_gather_into_tensor``, warns as deprecated on every call.
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass(frozen=True)
class Group:
    """What every rank of a group knows: its name, size, backend and the caller's rank."""

    pg: dist.ProcessGroup
    name: str
    rank: int
    world_size: int
    backend: str = ""


@dataclass
class GroupFacts:
    """What every rank of a group agreed on, once (workspace.py establishes them collectively).

    The backends' refusals read these and nothing rank-local, so every rank takes the same path
    (docs/contract.md §2).  At compile time the local device's facts stand in (dispatch.planned_backend).
    """

    push_ok: bool
    reason: str  # why push is off ("" when on)
    max_blocks: int = 0  # grid cap: min multiprocessor count, and what the signal pads hold
    device_name: str = ""  # the GPU model, when every rank has the same one ("" otherwise)
    #: the tuned config's selection every rank agreed on (tuned.Selection); None: the default
    selection: object = None


def group_name_of(group: "dist.ProcessGroup | str | None") -> str:
    """The registered name of ``group``; ``None`` means the default group."""
    if isinstance(group, str):
        return group
    if group is None:
        if not dist.is_initialized():
            raise RuntimeError(
                "tpfuse: no process group given and torch.distributed is not "
                "initialised; call dist.init_process_group(...) or pass group=..."
            )
        group = dist.group.WORLD
    if isinstance(group, dist.ProcessGroup):
        return group.group_name
    if type(group) is int and group == getattr(dist.GroupMember, "NON_GROUP_MEMBER", None):
        # what dist.new_group returns on the ranks outside the group: a plain int, not a type mistake
        raise ValueError(
            "tpfuse: this rank is not a member of the group (dist.new_group returned "
            "GroupMember.NON_GROUP_MEMBER here); accepted: call the op on the group's own ranks only"
        )
    raise TypeError(
        f"tpfuse: group must be a ProcessGroup, a group name (str) or None, "
        f"got {type(group).__name__}"
    )


# The op resolves its group on every call: keep what was resolved, and drop it
# when the process group is destroyed (a new one may reuse the name).
_resolved: dict[str, Group] = {}


def _still_registered(pg: dist.ProcessGroup) -> bool:
    world = getattr(dist.distributed_c10d, "_world", None)
    pg_map = getattr(world, "pg_map", None)
    return pg_map is not None and pg in pg_map


def resolve_group(group_name: str) -> Group:
    group = _resolved.get(group_name)
    if group is not None and _still_registered(group.pg):
        return group
    group = _resolve_uncached(group_name)
    _resolved[group_name] = group
    return group


def _resolve_uncached(group_name: str) -> Group:
    if not dist.is_initialized():
        raise RuntimeError(
            f"tpfuse: cannot resolve group {group_name!r}: torch.distributed is "
            "not initialised"
        )
    try:
        pg = _resolve_process_group(group_name)
    except (RuntimeError, ValueError, KeyError) as err:
        raise ValueError(
            f"tpfuse: unknown process group name {group_name!r}; accepted are the "
            "group_name of an initialised ProcessGroup (the default group is "
            f"{dist.group.WORLD.group_name!r}) or a ProcessGroup object"
        ) from err
    return Group(pg, group_name, pg.rank(), pg.size(), str(dist.get_backend(pg)))
