"""The launchers of the call shapes the op has seen: a repeated eager call skips the checks and the choice.

The first call of a key is validated and dispatched in full (all_gather_hidden.py);
the chosen backend's launcher (``GatherBackend.prepare``) is then kept under the
key and runs every later call with the same key.  The key holds everything the
checks and the choice read: the group (its name, and the resolved ``Group``
object, checked by identity), the widths, ``x``'s shape, dtype and device, the
pass's permissions (slot, skip_entry_sync, zero_copy) and the raw values of the
variables that steer dispatch (``config.DISPATCH_VARIABLES``).

Why a kept launcher takes the path a full dispatch would (docs/contract.md §2):
- outside CUDA-graph capture the choice is a function of the key and of the
  group workspace's agreed state, and that state only grows (slots and flag
  buffers are made or grown collectively, never shrunk or dropped), so a
  backend that accepted a key accepts it again;
- launchers are kept only from calls made outside capture: under capture a
  workspace not yet set up sends the call to NCCL, and that must not stick to
  the eager calls that follow;
- a destroyed group re-created under the same name resolves to a new ``Group``:
  its calls miss and dispatch against the new group's own workspace;
- registering or removing a backend drops every launcher.
No collective is skipped: the agreement check runs in the op before the lookup,
and a launcher of the gloo or NCCL path runs the same collective as a first
call.  The store is bounded
(``MAX_LAUNCHERS``); when it is full it is emptied and refilled by later calls.
"""

from __future__ import annotations

#: how many (key -> launcher) entries are kept at most
MAX_LAUNCHERS = 4096

_launchers: dict = {}


def find(key, group):
    """The kept (backend name, launcher) of ``key``, or None (also when the group is another one now)."""
    entry = _launchers.get(key)
    if entry is None or entry[0] is not group:
        return None
    return entry[1], entry[2]


def keep(key, group, backend_name: str, launcher) -> None:
    if len(_launchers) >= MAX_LAUNCHERS:
        _launchers.clear()
    _launchers[key] = (group, backend_name, launcher)


def clear() -> None:
    """Drop every launcher (the set of backends changed)."""
    _launchers.clear()
