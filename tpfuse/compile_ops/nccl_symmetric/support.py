"""What NCCL symmetric windows need from this process, each check answering "" or why not.

torch reaches NCCL's symmetric kernels through ProcessGroupNCCL: a ``torch.cuda.MemPool`` on the group's
NCCL allocator (``mem_allocator``, which is ``ncclMemAlloc``), registered with
``register_mem_pool(pool, symm=True)`` (``ncclCommWindowRegister`` with ``NCCL_WIN_COLL_SYMMETRIC``).
torch's other route, the ``"NCCL"`` backend of ``torch.distributed._symmetric_memory``, is a process-wide
choice that tpfuse's push protocols (which allocate through its ``"CUDA"`` backend) cannot share, so it is
not used.

Each check reads this process only; the windows' set-up (windows.py) exchanges every rank's answer, so every
rank refuses alike.  At compile time (no group yet) this process's answer stands in for the group's.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ... import config as settings

#: the first NCCL release with symmetric kernels
MIN_NCCL = (2, 27)


def nccl_version() -> tuple[int, ...] | None:
    """The NCCL this torch runs, ``(major, minor, patch)``; None where this torch has none (a CPU build)."""
    try:
        return tuple(int(v) for v in torch.cuda.nccl.version()[:3])
    except Exception:  # noqa: BLE001 - a build without NCCL raises on the first call
        return None


def nccl_refusal(version: tuple[int, ...] | None) -> str:
    if version is None:
        return "this torch has no NCCL"
    if version[:2] < MIN_NCCL:
        return f"NCCL {version[0]}.{version[1]} has no symmetric kernels ({MIN_NCCL[0]}.{MIN_NCCL[1]} or later)"
    return ""


def torch_refusal() -> str:
    """Why this torch cannot register a memory pool as symmetric windows ("" when it can)."""
    cannot = f"this torch cannot register symmetric windows (torch {torch.__version__}"
    if not (hasattr(torch.cuda, "MemPool") and hasattr(torch.cuda, "use_mem_pool")):
        return f"{cannot} has no torch.cuda.MemPool)"
    register = getattr(getattr(dist, "ProcessGroupNCCL", None), "register_mem_pool", None)
    if register is None:
        return f"{cannot}: no ProcessGroupNCCL.register_mem_pool)"
    # pybind writes the signature into the docstring; a torch that builds without signatures is asked at
    # registration instead (a TypeError there refuses alike on every rank, windows.py)
    doc = register.__doc__ or ""
    if doc and "symm" not in doc:
        return f"{cannot}: ProcessGroupNCCL.register_mem_pool takes no symm)"
    return ""


def nvls_refusal() -> str:
    """The windows are made only where NCCL's NVLink SHARP is off (docs/safety.md, "NCCL symmetric windows")."""
    if settings.nccl_nvls_off():
        return ""
    return ("NCCL_NVLS_ENABLE is not 0: NCCL could bind the windows to NVLink multicast, and this backend runs "
            "only with it off (docs/safety.md, \"NCCL symmetric windows\")")


def software_refusal() -> str:
    """Why this process cannot have windows ("" when it can): its NCCL, its torch, NVLS."""
    return nccl_refusal(nccl_version()) or torch_refusal() or nvls_refusal()


def group_refusal(group) -> str:
    """Windows register on a ProcessGroupNCCL: a group with another backend has none."""
    if "nccl" in group.backend:
        return ""
    return (f"not a CUDA group (group {group.name!r} runs {group.backend or 'an unknown backend'}; NCCL windows "
            "register on a ProcessGroupNCCL)")


def nccl_backend(group, device: torch.device):
    """The group's ProcessGroupNCCL on ``device`` (its communicator exists: the workspace ran collectives on it)."""
    return group.pg._get_backend(device)
