"""The one place that chooses how a hidden-axis gather moves its bytes.

Each backend is an object (``backend.GatherBackend``) that says whether it can
run a call and runs it; ``BACKENDS`` lists them in the order they are tried.
Rank consistency (docs/contract.md §2): ``choose`` hands the backends only what
every rank of the group knows identically -- device type, dtype, the *full*
output shape, the widest slab, the group and the configuration (``GatherCall``).
It never looks at this rank's width, pointers or timing, so all ranks of a
group take the same path and no rank waits in a collective that its peers
skipped.
"""

from __future__ import annotations

import collections
import functools

import torch

from .. import config as settings
from . import launchers
from .backend import Backend, GatherBackend, GatherCall
from .collective import GLOO, NCCL
from .groups import Group
from .workspace import FLAG_MAX_SLAB_BYTES  # noqa: F401  (re-exported: the flag buffers' capacity)
from .push_backends import (  # noqa: F401  (the flag protocol's limits, re-exported for the passes and tools)
    BARRIER_PUSH,
    FLAG,
    FLAG_CROSSOVER,
    MULTIMEM,
    PUSH_MAX_BYTES,
    flag_limit,
)


#: dtypes every backend moves bit-exactly (the push kernels move 1-, 2- and
#: 4-byte elements).  Keeping one list for all backends means a program that
#: runs on the CPU reference also runs on the GPU paths.
SUPPORTED_DTYPES = (
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
)

_FORCED_CHOICES = {"auto", "flag", "p2p", "nccl", "gloo"}


def forced_backend() -> str:
    """``TPFUSE_BACKEND=auto|flag|p2p|nccl|gloo`` forces a backend (benchmarks, debugging).

    The variable must be set identically on every rank (torchrun passes the
    parent's environment to all of them)."""
    return _parse_forced(settings.get("TPFUSE_BACKEND"))


@functools.lru_cache(maxsize=None)
def _parse_forced(raw: str) -> str:  # the op's hot path reads the variable on every call
    choice = raw.strip().lower()
    if choice not in _FORCED_CHOICES:
        raise ValueError(
            f"tpfuse: TPFUSE_BACKEND={choice!r} is not one of {', '.join(sorted(_FORCED_CHOICES))}"
        )
    return choice


def _device_backend_name(device_type: str) -> str:
    return {"cpu": "gloo", "cuda": "nccl"}.get(device_type, "")


def check_device_matches_group(device_type: str, group: Group) -> None:
    """``x`` must live where the group's backend can move it."""
    needed = _device_backend_name(device_type)
    group_backend = group.backend
    if group_backend == "fake":  # torch's testing backend moves nothing; allow it
        return
    if not needed or needed not in group_backend:
        accepted = ", ".join(
            f"{dev} tensors with a {be} group" for dev, be in (("cpu", "gloo"), ("cuda", "nccl"))
        )
        raise ValueError(
            f"tpfuse: x is on {device_type!r} but group {group.name!r} uses the "
            f"{group_backend!r} backend; accepted are {accepted}"
        )


def check_dtype(dtype: torch.dtype) -> None:
    if dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)
        raise TypeError(
            f"tpfuse: all_gather_hidden cannot move dtype {dtype}; accepted dtypes "
            f"are {names}"
        )


# --------------------------------------------------------------------------- the backends, in order

#: The registered backends, in the order dispatch tries them (the first that does not
#: refuse runs the call): gloo for CPU tensors; on CUDA the flag protocol for small
#: slabs, NVLink multicast where asked for and available, the barrier push, and NCCL,
#: which never refuses.  The same on every rank, as long as every rank registers alike.
BACKENDS: list[GatherBackend] = [GLOO, FLAG, MULTIMEM, BARRIER_PUSH, NCCL]
#: how many calls each backend was chosen for, in this process (tests assert the path that ran)
chosen: collections.Counter = collections.Counter()


def register_backend(backend: GatherBackend, before: str = "nccl") -> None:
    """Try ``backend`` just before the registered backend named ``before`` (register it alike on every rank)."""
    names = [b.name for b in BACKENDS]
    if backend.name in names:
        raise ValueError(f"tpfuse: a backend named {backend.name!r} is already registered ({names})")
    if before not in names:
        raise ValueError(f"tpfuse: no registered backend named {before!r}; registered are {names}")
    BACKENDS.insert(names.index(before), backend)
    _FORCED_CHOICES.add(backend.name)
    launchers.clear()


def unregister_backend(name: str) -> None:
    BACKENDS[:] = [b for b in BACKENDS if b.name != name]
    _FORCED_CHOICES.discard(name)
    _parse_forced.cache_clear()
    launchers.clear()


def choose(call: GatherCall) -> GatherBackend:
    """The backend that runs ``call``: the first in ``BACKENDS`` that moves its device and does not refuse.

    With ``TPFUSE_BACKEND`` set, only that backend is asked, and its refusal is an error.
    """
    movers = [b for b in BACKENDS if call.device_type in b.devices]
    if not movers:
        devices = sorted({d for b in BACKENDS for d in b.devices})
        accepted = " and ".join(f"{d} ({', '.join(b.name for b in BACKENDS if d in b.devices)})" for d in devices)
        raise ValueError(
            f"tpfuse: all_gather_hidden has no backend for {call.device_type!r} tensors; "
            f"accepted devices are {accepted}"
        )
    if call.forced != "auto":
        forced = next((b for b in movers if b.name == call.forced), None)
        if forced is None:
            names = ", ".join(b.name for b in movers)
            raise ValueError(f"tpfuse: TPFUSE_BACKEND={call.forced} cannot move {call.device_type} tensors; "
                             f"{call.device_type} tensors use {names}")
        why = forced.refusal(call)
        if why:
            raise RuntimeError(f"tpfuse: TPFUSE_BACKEND={call.forced} but that path is unavailable: {why}")
        chosen[forced.name] += 1
        return forced
    for backend in movers:
        if not backend.refusal(call):
            chosen[backend.name] += 1
            return backend
    raise RuntimeError(f"tpfuse: every backend for {call.device_type} tensors refused the call")  # pragma: no cover


def choose_backend(
    device_type: str,
    dtype: torch.dtype,
    out_numel: int,
    group: Group,
    max_slab_numel: int | None = None,
) -> Backend:
    """The name of the backend ``choose`` picks, from rank-invariant facts only (see module docstring).

    ``max_slab_numel`` (T times the widest rank's width) lets a plain gather
    take the flag protocol; callers that cannot run it (the fused linear +
    push) leave it out.
    """
    forced = forced_backend()
    if max_slab_numel is None and forced == FLAG.name:
        # TPFUSE_BACKEND=flag forces the flag protocol on plain gathers; a caller that can
        # use only the slot-based protocols (the fused linear + push) chooses as usual.
        forced = "auto"
    name = choose(GatherCall(device_type, dtype, out_numel, group, max_slab_numel, forced)).name
    return Backend(name) if name in Backend._value2member_map_ else name


# --------------------------------------------------------------------------- what a compiler can know


def _local_device_name() -> str:
    try:
        return torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    except Exception:  # noqa: BLE001 - no driver: nothing measured applies
        return ""


def planned_backend(device_type: str, dtype: torch.dtype, tokens: int | None, hidden_widths) -> tuple[str, str]:
    """The protocol a gather of this shape will run, as far as compile time can tell: (name, why).

    ``tokens`` is None when T is symbolic.  Names: ``gloo``, ``nccl``,
    ``flag``, ``barrier push`` and ``per call``.  This is a prediction for
    reports: the op decides at run time from the group's agreed facts (a
    group that cannot push takes NCCL; ranks with different GPU models never
    take the flag protocol by default), and the passes never make a
    correctness decision from it.  Without ``TPFUSE_BACKEND=flag`` the flag
    protocol is predicted only where ``flag_limit`` allows it: on a GPU model
    and W with a measured crossover and a committed passing multi-GPU suite
    log (docs/flag_protocol.md, "Choosing it: on evidence"); the reason says
    which of the two is missing.
    """
    forced = forced_backend()
    if device_type == "cpu":
        return "gloo", "CPU tensors go through gloo"
    if device_type != "cuda":
        return "none", f"no backend moves {device_type!r} tensors"
    if forced == "nccl":
        return "nccl", "TPFUSE_BACKEND=nccl"
    if tokens is None:
        return "per call", ("T is symbolic: each call takes the flag protocol or the barrier push by its own "
                            "slab size (T is the same on every rank)")
    slab = tokens * max(hidden_widths) * dtype.itemsize
    if forced == "p2p":
        return "barrier push", "TPFUSE_BACKEND=p2p"
    if forced == "flag" and slab <= FLAG_MAX_SLAB_BYTES:
        return "flag", "TPFUSE_BACKEND=flag"
    limit, why = flag_limit(_local_device_name(), len(hidden_widths))
    if slab <= limit:
        return "flag", f"a {slab}-byte slab, within the flag protocol's {limit} bytes ({why})"
    if limit == 0:
        return "barrier push", why
    return "barrier push", f"a {slab}-byte slab, above the flag protocol's {limit} bytes ({why})"
