"""The one place that chooses how a hidden-axis gather moves its bytes.

Rank consistency (docs/contract.md §2): ``choose_backend`` looks only at what every
rank of the group knows identically -- device type, dtype, the *full* output
shape, the group and the configuration.  It never looks at this rank's width,
pointers or timing, so all ranks of a group take the same path and no rank
waits in a collective that its peers skipped.
"""

from __future__ import annotations

import enum
import functools
import os

import torch

from .groups import Group


class Backend(str, enum.Enum):
    GLOO = "gloo"  # CPU tensors: c10d gather through gloo (the reference)
    NCCL = "nccl"  # CUDA tensors: gather on dim 0, then rearrange
    P2P = "p2p"  # CUDA: Triton push into peers' symmetric memory, entry and exit barriers
    FLAG = "flag"  # CUDA: Triton push with a flag in every 8 bytes, no barriers (small messages)
    MULTIMEM = "multimem"  # CUDA: NVLink multicast push (compile-verified only)


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

_FORCED_CHOICES = ("auto", "flag", "p2p", "nccl", "gloo")


def forced_backend() -> str:
    """``TPFUSE_BACKEND=auto|flag|p2p|nccl|gloo`` forces a backend (benchmarks, debugging).

    The variable must be set identically on every rank (torchrun passes the
    parent's environment to all of them)."""
    return _parse_forced(os.environ.get("TPFUSE_BACKEND", "auto"))


@functools.lru_cache(maxsize=None)
def _parse_forced(raw: str) -> str:  # the op's hot path reads the variable on every call
    choice = raw.strip().lower()
    if choice not in _FORCED_CHOICES:
        raise ValueError(
            f"tpfuse: TPFUSE_BACKEND={choice!r} is not one of {', '.join(_FORCED_CHOICES)}"
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


def choose_backend(
    device_type: str,
    dtype: torch.dtype,
    out_numel: int,
    group: Group,
    max_slab_numel: int | None = None,
) -> Backend:
    """Pick the backend from rank-invariant facts only (see module docstring).

    ``max_slab_numel`` (T times the widest rank's width) lets a plain gather
    take the flag protocol; callers that cannot run it (the fused linear +
    push) leave it out.
    """
    forced = forced_backend()
    if device_type == "cpu":
        if forced not in ("auto", "gloo"):
            raise ValueError(
                f"tpfuse: TPFUSE_BACKEND={forced} cannot move CPU tensors; CPU "
                "tensors use the gloo backend"
            )
        return Backend.GLOO
    if device_type == "cuda":
        if forced == "gloo":
            raise ValueError("tpfuse: TPFUSE_BACKEND=gloo cannot move CUDA tensors")
        push = _choose_push(dtype, out_numel, group, forced, max_slab_numel)
        return push if push is not None else Backend.NCCL
    raise ValueError(
        f"tpfuse: all_gather_hidden has no backend for {device_type!r} tensors; "
        "accepted devices are cpu (gloo) and cuda (nccl / symmetric-memory push)"
    )


#: above this many bytes of output, ``auto`` leaves the gather to NCCL (the
#: workspace holds two slots of this size); ``TPFUSE_PUSH_MAX_BYTES`` overrides.
PUSH_MAX_BYTES = 256 << 20


def _choose_push(dtype, out_numel, group, forced, max_slab_numel=None):
    """The symmetric-memory push backends (GPU data path); ``None`` means NCCL.

    Every input is identical on every rank: dtype, the full output size, the
    group, the environment, and the workspace's agreed facts and capacity
    (which grow at the same call everywhere).  The first call on a group
    establishes those facts collectively, so it must run eagerly; under
    CUDA-graph capture an unestablished group, or one whose buffers would have
    to grow, takes NCCL (all ranks capture the same calls).
    """
    if forced == "nccl":
        return None
    from . import workspace as workspaces

    def refuse(reason):
        if forced in ("p2p", "flag"):
            raise RuntimeError(f"tpfuse: TPFUSE_BACKEND={forced} but that path is unavailable: {reason}")
        return None

    nbytes = out_numel * dtype.itemsize
    if out_numel >= 2**31:
        return refuse(f"{out_numel} output elements exceed the kernels' 32-bit indexing")
    if forced == "auto" and nbytes > int(os.environ.get("TPFUSE_PUSH_MAX_BYTES", PUSH_MAX_BYTES)):
        return None
    device_index = torch.cuda.current_device()
    capturing = torch.cuda.is_current_stream_capturing()
    ws = workspaces.workspace(group, device_index, establish=False)
    if ws is None:
        # Setting up is collective and cannot be captured in a graph.
        if capturing:
            return refuse("the group's workspace must be set up by an eager call before graph capture")
        ws = workspaces.workspace(group, device_index)
    if not ws.facts.push_ok:
        return refuse(ws.facts.reason)
    multimem_asked = os.environ.get("TPFUSE_ENABLE_MULTIMEM") == "1"
    if max_slab_numel is not None and not multimem_asked and _flag_serves(
            ws, max_slab_numel * dtype.itemsize, forced, refuse):
        return Backend.FLAG
    if nbytes > ws.slot_bytes:
        # Growing is collective too.
        if capturing:
            return refuse(f"the group's slots must be grown to {nbytes} bytes by an eager call before graph capture")
        workspaces.ensure_capacity(ws, nbytes)  # every rank grows at this call
    # Multicast only where every rank has an address and the user asked for it:
    # never on the shared hosts (docs/safety.md), where the address is always 0.
    if ws.multicast_ptr and multimem_asked:
        return Backend.MULTIMEM
    return Backend.P2P


# --------------------------------------------------------------------------- the flag protocol's share

#: the largest slab (bytes per rank) the flag buffers hold: T=32 of a 4096-wide bf16 band
FLAG_MAX_SLAB_BYTES = 256 << 10

#: the measured crossover: per (device name, W), the largest slab (bytes per
#: rank) at which the flag protocol beat the barrier push in
#: benchmarks/bench_gather.py (docs/benchmarks.md, "Flag protocol").  A
#: (device, W) that is not here was never measured, and ``auto`` keeps the
#: barrier push there.
FLAG_CROSSOVER: dict[tuple[str, int], int] = {}


def flag_limit(device_name: str, world_size: int) -> tuple[int, str]:
    """The largest slab (bytes) ``auto`` sends through the flag protocol, and where that number comes from.

    ``TPFUSE_FLAG_MAX_BYTES`` overrides the measured table (benchmarks, tuning);
    it must be set alike on every rank.
    """
    override = os.environ.get("TPFUSE_FLAG_MAX_BYTES")
    if override is not None:
        return min(int(override), FLAG_MAX_SLAB_BYTES), "TPFUSE_FLAG_MAX_BYTES"
    measured = FLAG_CROSSOVER.get((device_name, world_size))
    if measured is None:
        return 0, f"flag protocol not measured on {device_name or 'this device'} at W={world_size}"
    return min(measured, FLAG_MAX_SLAB_BYTES), f"measured crossover on {device_name} at W={world_size}"


def _flag_serves(ws, slab_bytes, forced, refuse) -> bool:
    """Whether this call takes the flag protocol (every input is rank-invariant, see ``_choose_push``)."""
    from . import workspace as workspaces

    if forced == "p2p" or slab_bytes > FLAG_MAX_SLAB_BYTES:
        if forced == "flag":
            refuse(f"a slab of {slab_bytes} bytes exceeds the flag buffers' {FLAG_MAX_SLAB_BYTES}")
        return False
    if forced != "flag" and slab_bytes > flag_limit(ws.facts.device_name, ws.group.world_size)[0]:
        return False
    if ws.flags is None:
        # Making the buffers is collective and cannot be captured in a graph
        # (every rank captures the same calls, so every rank falls back alike).
        if torch.cuda.is_current_stream_capturing():
            if forced == "flag":
                refuse("the flag buffers must be set up by an eager call before graph capture")
            return False
        workspaces.ensure_flag_buffers(ws, FLAG_MAX_SLAB_BYTES)
    return True


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
    correctness decision from it.
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
