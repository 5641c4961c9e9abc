"""The one place that chooses how a hidden-axis gather moves its bytes, and the one that predicts it.

Each backend is an object (``backend.GatherBackend``) that says whether it runs a
call and runs it; ``BACKENDS`` lists them in the order they are tried.  Rank
consistency (docs/contract.md §2): ``choose`` hands the backends only what every
rank of the group knows identically -- device type, dtype, T, every rank's width,
the group and the configuration (``GatherCall``) -- and the backends add only the
group's agreed facts.  Nothing looks at this rank's pointers or timing, so all ranks
of a group take the same path and no rank waits in a collective its peers skipped.

``planned_backend`` predicts the choice at compile time by asking the same
refusals, with the local device's facts standing in for the group's: the
prediction and the choice cannot drift apart, because there is one rule.
"""

from __future__ import annotations

import collections
import dataclasses
import functools

import torch

from .. import config as settings
from . import launchers, tuned
from .backend import DEPENDS_ON_T, Backend, GatherBackend, GatherCall
from .barrier import MULTIMEM, P2P
from .collective import GLOO, NCCL
from .flag import FLAG
from .groups import Group, GroupFacts
from .nccl_symmetric import NCCL_SYMMETRIC

#: The registered backends, in the order dispatch tries them (the first that does not
#: refuse runs the call): gloo for CPU tensors; on CUDA the flag protocol for small
#: slabs, NVLink multicast where asked for and available, p2p (the barrier push),
#: NCCL's symmetric windows where a tuned config measured them faster than NCCL, and
#: NCCL, which never refuses.  The same on every rank, as long as every rank registers alike.
BACKENDS: list[GatherBackend] = [GLOO, FLAG, MULTIMEM, P2P, NCCL_SYMMETRIC, NCCL]
#: how many calls each backend was chosen for, in this process (tests assert the path that ran)
chosen: collections.Counter = collections.Counter()


def forced_backend() -> str:
    """``TPFUSE_BACKEND=auto`` or a registered backend's name forces that backend (benchmarks, debugging).

    The variable must be set identically on every rank (torchrun passes the
    parent's environment to all of them)."""
    return _parse_forced(settings.get("TPFUSE_BACKEND"))


@functools.lru_cache(maxsize=None)
def _parse_forced(raw: str) -> str:  # the op's hot path reads the variable on every call
    choice = raw.strip().lower()
    choices = ["auto"] + [b.name for b in BACKENDS]
    if choice not in choices:
        raise ValueError(f"tpfuse: TPFUSE_BACKEND={choice!r} is not one of {', '.join(sorted(choices))}")
    return choice


def register_backend(backend: GatherBackend, before: str = "nccl") -> None:
    """Try ``backend`` just before the registered backend named ``before`` (register it alike on every rank)."""
    names = [b.name for b in BACKENDS]
    if backend.name in names:
        raise ValueError(f"tpfuse: a backend named {backend.name!r} is already registered ({names})")
    if before not in names:
        raise ValueError(f"tpfuse: no registered backend named {before!r}; registered are {names}")
    BACKENDS.insert(names.index(before), backend)
    _parse_forced.cache_clear()
    launchers.clear()


def unregister_backend(name: str) -> None:
    BACKENDS[:] = [b for b in BACKENDS if b.name != name]
    _parse_forced.cache_clear()
    launchers.clear()


def _movers(call: GatherCall) -> list[GatherBackend]:
    """The backends that move ``call``'s tensors, in order; an error naming the accepted devices if none."""
    movers = [b for b in BACKENDS if call.device_type in b.devices]
    if not movers:
        devices = sorted({d for b in BACKENDS for d in b.devices})
        accepted = " and ".join(f"{d} ({', '.join(b.name for b in BACKENDS if d in b.devices)})" for d in devices)
        raise ValueError(f"tpfuse: all_gather_hidden has no backend for {call.device_type!r} tensors; "
                         f"accepted devices are {accepted}")
    return movers


def _forced(call: GatherCall, movers: list[GatherBackend]) -> GatherBackend | None:
    """The backend ``TPFUSE_BACKEND`` forces on ``call``, or None (``auto``).

    A backend that takes no fused linear call (the flag protocol) is not forced on one: the fused op
    then chooses as under ``auto``, and its gather, where it runs one, is forced."""
    if call.forced == "auto":
        return None
    forced = next((b for b in movers if b.name == call.forced), None)
    if forced is None:
        names = ", ".join(b.name for b in movers)
        raise ValueError(f"tpfuse: TPFUSE_BACKEND={call.forced} cannot move {call.device_type} tensors; "
                         f"{call.device_type} tensors use {names}")
    return None if call.fused_linear and not forced.takes_fused_linear else forced


def choose(call: GatherCall) -> GatherBackend:
    """The backend that runs ``call``: the first in ``BACKENDS`` that moves its device and does not refuse.

    With ``TPFUSE_BACKEND`` set, only that backend is asked, and its refusal is an error.
    """
    movers = _movers(call)
    forced = _forced(call, movers)
    if forced is not None:
        why = forced.refusal(call)
        if why:
            raise RuntimeError(f"tpfuse: TPFUSE_BACKEND={call.forced} but that path is unavailable: {why}")
        chosen[forced.name] += 1
        return forced
    if call.forced != "auto":  # a forced backend that takes no fused linear call: choose as under auto
        call = dataclasses.replace(call, forced="auto")
    for backend in movers:
        if (backend.takes_fused_linear or not call.fused_linear) and not backend.refusal(call):
            chosen[backend.name] += 1
            return backend
    raise RuntimeError(f"tpfuse: every backend for {call.device_type} tensors refused the call")  # pragma: no cover


def choose_backend(device_type: str, dtype: torch.dtype, hidden_widths, group: Group, tokens: int = 1,
                   fused_linear: bool = False) -> Backend | str:
    """The name of the backend ``choose`` picks for a call of ``tokens`` rows (tests, benchmarks)."""
    call = GatherCall(device_type, dtype, tokens, tuple(hidden_widths), group, forced_backend(), fused_linear)
    name = choose(call).name
    return Backend(name) if name in Backend._value2member_map_ else name


# --------------------------------------------------------------------------- what a compiler can know


def local_device_name() -> str:
    """This process's GPU model: at compile time it stands in for the one the group's ranks will agree on."""
    try:
        return torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    except Exception:  # noqa: BLE001 - no driver: nothing measured applies
        return ""


def planned_backend(device_type: str, dtype: torch.dtype, tokens: int | None, hidden_widths) -> tuple[str, str]:
    """The backend a gather of this shape will run, as far as compile time can tell: (name, why).

    ``tokens`` is None when T is symbolic.  The names are the backends' own (``gloo``,
    ``nccl``, ``nccl_symmetric``, ``flag``, ``multimem``, ``p2p``), or ``per call`` where the choice depends on
    T, or ``none`` where the call would raise.  Derived from the backends' own refusals
    (the order of ``choose``, the same forcing), with the local GPU model standing in for
    the group's agreed facts, the tuned config this process finds
    (``tuned.local_selection``) for the one the group will agree on, and every group
    assumed able to push: a prediction for the reports.  The op decides at run time from the
    group's agreed facts, and the passes
    never make a correctness decision from it.
    """
    name = local_device_name()
    # the tuned config this process finds stands in for the one the group will agree on (docs/tuning.md)
    selection = tuned.local_selection(len(hidden_widths), name) if device_type == "cuda" else None
    facts = GroupFacts(True, "", 0, name, selection)
    call = GatherCall(device_type, dtype, tokens, tuple(hidden_widths), None, forced_backend(), planned_facts=facts)
    try:
        movers = _movers(call)
        forced = _forced(call, movers)
    except ValueError as err:
        return "none", str(err).removeprefix("tpfuse: ")
    refused = []
    for backend in [forced] if forced is not None else movers:
        why = backend.refusal(call)
        if why == DEPENDS_ON_T:
            return "per call", (f"T is symbolic: whether {backend.name} takes a call depends on its size "
                                "(T is the same on every rank)")
        if not why:
            if forced is not None:
                return backend.name, f"TPFUSE_BACKEND={backend.name}"
            taken = backend.why_taken(call)
            return backend.name, "; ".join(refused + ([taken] if taken else []))
        refused.append(f"{backend.name} refuses: {why}")
    return "none", f"TPFUSE_BACKEND={call.forced}, which refuses this call ({refused[-1]}): the call raises"
