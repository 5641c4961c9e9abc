"""The op contract's checks, all of them: what ``tpfuse::all_gather_hidden``, ``tpfuse::linear_all_gather_hidden``
and ``tpfuse::reduce_scatter_hidden`` accept, each refusal saying what would be accepted.

The ops take the same ``hidden_widths``, ``group_name`` and ``slot``, so they accept and
reject them alike, with one message.  Every check runs before any communication, so a
bad call raises on its own rank and never strands a peer (docs/contract.md §4).  What
a backend cannot run is not an error of the call: it is that backend's refusal, and
dispatch takes another (backend.py).
"""

from __future__ import annotations

import numbers
from typing import Sequence

import torch

from .groups import Group, resolve_group

#: dtypes every backend moves bit-exactly (the push kernels move 1-, 2- and 4-byte elements).  One
#: list for every backend: a program that runs on the CPU reference also runs on the GPU paths.
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

#: the workspace slots a call may name: one of the two ping-pong slots, or -1 (the op alternates)
SLOTS = (-1, 0, 1)

#: the device types the ops take, with the group backend that moves them
_GROUP_BACKEND_OF_DEVICE = {"cpu": "gloo", "cuda": "nccl"}

#: argument signatures that passed ``check_gather_args`` / ``check_linear_args`` (the eager hot path
#: validates each distinct call shape once)
_validated: set = set()


def check_not_scalar(x: torch.Tensor, last_dim: str = "hidden") -> None:
    """``x`` needs a last dimension: a scalar (0-d) input is refused with a ValueError.

    Called by the public wrappers (before they read ``x.shape[-1]``), the op
    implementations and the fake kernels, so eager calls, compiled calls and
    calls with or without ``hidden_widths`` all say the same."""
    if x.dim() == 0:
        raise ValueError(f"tpfuse: x is a scalar (0-d); it needs a last ({last_dim}) dimension, e.g. shape [T, w]")


def check_widths(hidden_widths: Sequence[int]) -> None:
    """One positive width per rank (no group needed: the fake kernels call it too)."""
    if len(hidden_widths) == 0:
        raise ValueError("tpfuse: hidden_widths is empty; give one width per rank")
    bad = [w for w in hidden_widths if w <= 0]
    if bad:
        raise ValueError(
            f"tpfuse: hidden_widths={list(hidden_widths)} has width(s) {bad} <= 0; "
            "every rank must contribute a positive number of columns"
        )


def whole_widths(hidden_widths: Sequence) -> list[int]:
    """A ``hidden_widths`` the caller gave, as ints: an entry that is not a whole number (3.7, even 4.0) is
    refused, never rounded (the ops' schemas take ``int[]``)."""
    widths = []
    for w in hidden_widths:
        whole = isinstance(w, (numbers.Integral, torch.SymInt)) or (
            isinstance(w, torch.Tensor) and w.numel() == 1 and not (w.is_floating_point() or w.is_complex()))
        if not whole:
            raise TypeError(f"tpfuse: hidden_widths={list(hidden_widths)} holds {w!r} ({type(w).__name__}); "
                            "accepted are whole numbers (int), one width per rank")
        widths.append(w if type(w) is int or isinstance(w, torch.SymInt) else int(w))  # a SymInt stays symbolic
    return widths


def check_one_width_per_rank(hidden_widths: Sequence[int], group: Group) -> None:
    if len(hidden_widths) != group.world_size:
        raise ValueError(
            f"tpfuse: len(hidden_widths)={len(hidden_widths)} but group "
            f"{group.name!r} has {group.world_size} ranks; give exactly one width per rank"
        )


def check_slot(slot: int) -> None:
    if slot not in SLOTS:
        raise ValueError(f"tpfuse: slot={slot} is not one of {SLOTS} (-1 lets the op choose)")


def check_dtype(dtype: torch.dtype) -> None:
    if dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)
        raise TypeError(f"tpfuse: all_gather_hidden cannot move dtype {dtype}; accepted dtypes are {names}")


def check_device_matches_group(device_type: str, group: Group) -> None:
    """``x`` must live where the group's backend can move it."""
    needed = _GROUP_BACKEND_OF_DEVICE.get(device_type, "")
    if group.backend == "fake":  # torch's testing backend moves nothing; allow it
        return
    if not needed or needed not in group.backend:
        accepted = ", ".join(f"{dev} tensors with a {be} group" for dev, be in _GROUP_BACKEND_OF_DEVICE.items())
        raise ValueError(
            f"tpfuse: x is on {device_type!r} but group {group.name!r} uses the "
            f"{group.backend!r} backend; accepted are {accepted}"
        )


def check_gather_args(x: torch.Tensor, hidden_widths: Sequence[int], group: Group, slot: int) -> None:
    """Every check of the gather's eager path, with what would be accepted."""
    check_not_scalar(x)
    key = (group, tuple(hidden_widths), x.shape[-1], x.dtype, x.device.type, slot)
    if key in _validated:
        return
    check_widths(hidden_widths)
    check_one_width_per_rank(hidden_widths, group)
    expected = hidden_widths[group.rank]
    if x.shape[-1] != expected:
        raise ValueError(
            f"tpfuse: x.shape[-1]={x.shape[-1]} on rank {group.rank} but "
            f"hidden_widths[{group.rank}]={expected}; x's last dim must equal "
            "this rank's entry in hidden_widths"
        )
    check_dtype(x.dtype)
    check_device_matches_group(x.device.type, group)
    check_slot(slot)
    _validated.add(key)


def check_linear_args(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      hidden_widths: Sequence[int], group: Group, slot: int) -> None:
    """Every check of the fused linear's eager path, with what would be accepted."""
    key = ("linear", group, tuple(hidden_widths), tuple(x.shape[-1:]), tuple(weight.shape),
           None if bias is None else tuple(bias.shape), x.dtype, weight.dtype,
           None if bias is None else bias.dtype, x.device.type, slot)
    if key in _validated:
        return
    check_not_scalar(x, "input feature")
    check_widths(hidden_widths)
    check_one_width_per_rank(hidden_widths, group)
    width = hidden_widths[group.rank]
    if weight.dim() != 2 or weight.shape[0] != width or weight.shape[1] != x.shape[-1]:
        raise ValueError(
            f"tpfuse: weight.shape={list(weight.shape)} on rank {group.rank}; expected "
            f"[hidden_widths[{group.rank}]={width}, x.shape[-1]={x.shape[-1]}] (nn.Linear layout: out, in)")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != width):
        raise ValueError(f"tpfuse: bias.shape={list(bias.shape)} on rank {group.rank}; expected [{width}] or None")
    dtypes = {x.dtype, weight.dtype} | ({bias.dtype} if bias is not None else set())
    if len(dtypes) != 1:
        raise TypeError(f"tpfuse: x, weight and bias must share one dtype, got {sorted(map(str, dtypes))}")
    check_dtype(x.dtype)
    if not x.dtype.is_floating_point:
        raise TypeError(f"tpfuse: linear_all_gather_hidden needs a floating dtype, got {x.dtype}")
    devices = {x.device, weight.device} | ({bias.device} if bias is not None else set())
    if len(devices) != 1:
        raise ValueError(f"tpfuse: x, weight and bias must be on one device, got {sorted(map(str, devices))}")
    check_device_matches_group(x.device.type, group)
    check_slot(slot)
    _validated.add(key)


def check_reduce_scatter_args(grad: torch.Tensor, hidden_widths: Sequence[int], local_width: int,
                              group: Group) -> None:
    """The gather's backward: this rank's width and the gradient's width must match ``hidden_widths``."""
    check_widths(hidden_widths)
    if len(hidden_widths) != group.world_size or hidden_widths[group.rank] != local_width:
        raise ValueError(
            f"tpfuse: reduce_scatter_hidden on rank {group.rank} of {group.world_size}: "
            f"local_width={local_width} does not match hidden_widths={hidden_widths}"
        )
    if grad.shape[-1] != sum(hidden_widths):
        raise ValueError(
            f"tpfuse: reduce_scatter_hidden got grad.shape[-1]={grad.shape[-1]}, "
            f"expected sum(hidden_widths)={sum(hidden_widths)}"
        )
    check_device_matches_group(grad.device.type, group)


def check_gather_shapes(x: torch.Tensor, hidden_widths: Sequence[int]) -> None:
    """What the gather's fake kernel can check: no process group, symbolic leading dims allowed."""
    check_widths(hidden_widths)
    check_dtype(x.dtype)
    check_not_scalar(x)


def check_linear_shapes(x: torch.Tensor, weight: torch.Tensor, hidden_widths: Sequence[int]) -> None:
    """What the fused linear's fake kernel can check (symbolic sizes through ``torch._check``)."""
    check_widths(hidden_widths)
    check_dtype(x.dtype)
    check_not_scalar(x, "input feature")
    torch._check(weight.dim() == 2, lambda: f"tpfuse: weight must be 2-D, got {weight.dim()}-D")
    torch._check(weight.shape[1] == x.shape[-1],
                 lambda: f"tpfuse: weight.shape[1]={weight.shape[1]} != x.shape[-1]={x.shape[-1]}")
    torch._check(x.dtype == weight.dtype, lambda: f"tpfuse: x is {x.dtype} but weight is {weight.dtype}")


@torch._dynamo.assume_constant_result
def world_size_of(group_name: str) -> int:
    """The number of ranks of the named group: the default ``hidden_widths`` has one entry per rank."""
    # A group's size never changes, so Dynamo may bake it into the graph
    # instead of tracing into the C++ group registry.
    return resolve_group(group_name).world_size
