"""``tpfuse::linear_all_gather_hidden``: a column linear followed by the hidden-axis all-gather, as one op.

Schema (see docs/op.md, "linear_all_gather_hidden")::

    tpfuse::linear_all_gather_hidden(Tensor x, Tensor weight, Tensor? bias, int[] hidden_widths,
                                     str group_name, int slot=-1, bool skip_entry_sync=False,
                                     bool zero_copy=False) -> Tensor

Every rank passes the same ``x [..., K]`` and its own column band of the
weight, ``weight [w_rank, K]`` (``nn.Linear`` layout) and ``bias [w_rank]``.
The result is ``cat_r(linear(x, W_r, b_r), dim=-1)``, ``[..., sum(hidden_widths)]``,
owned by the caller -- exactly ``all_gather_hidden(linear(x, weight, bias), ...)``.

Backends:
- CPU: the reference composite, ``linear`` then the gloo gather.
- CUDA: when ``dispatch.choose_backend`` picks a push backend (rank-consistent)
  and the cost rule (``linear_cost.decide``, a function of T, K, the widths,
  the dtype and the GPU model every rank agreed on) picks the fused kernel,
  one Triton kernel per rank computes the linear and pushes each output tile into every peer; otherwise cuBLAS
  ``linear`` then ``all_gather_hidden`` with the same permissions.
  ``TPFUSE_LINEAR_PUSH=auto|fused|unfused`` (identical on every rank) forces
  the choice for benchmarks and tests.

``slot``, ``skip_entry_sync`` and ``zero_copy`` are the gather's permissions,
with the same meaning (only a pass that proved them sets them; ``zero_copy``
is honoured by the fused P2P kernel and the gather, and only where the op's
Inductor lowering keeps the result's storage: ``inductor_lowering.py``).

Autograd: when a gradient is needed the op runs as its composite (``linear``,
then ``all_gather_hidden``), so the backward is ``reduce_scatter_hidden`` then
``linear``'s backward; the fused kernel serves calls that need no graph.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import config as settings
from . import inductor_lowering, linear_cost
from . import workspace as workspaces
from .dispatch import Backend, check_device_matches_group, check_dtype, choose_backend
from .groups import Group, group_name_of, resolve_group
from .validation import check_not_scalar, check_one_width_per_rank, check_slot, check_widths, world_size_of

_MODES = ("auto", "fused", "unfused")


def linear_push_mode() -> str:
    """``TPFUSE_LINEAR_PUSH``: ``auto`` (the cost rule), ``fused`` or ``unfused``; same on every rank."""
    return _parse_mode(settings.get("TPFUSE_LINEAR_PUSH"))


@functools.lru_cache(maxsize=None)
def _parse_mode(raw: str) -> str:
    mode = raw.strip().lower()
    if mode not in _MODES:
        raise ValueError(f"tpfuse: TPFUSE_LINEAR_PUSH={mode!r} is not one of {', '.join(_MODES)}")
    return mode


@functools.lru_cache(maxsize=4096)
def fused_decision(tokens: int, k: int, widths: tuple, dtype: torch.dtype,
                   device_name: str) -> linear_cost.LinearFusionDecision:
    """The cost rule for one call shape on one GPU model (cached: the eager hot path)."""
    return linear_cost.decide(tokens, k, widths, str(dtype).removeprefix("torch."), dtype.itemsize,
                              device_name=device_name)


def _agreed_device_name(group: Group) -> str:
    """The GPU model every rank of ``group`` reported ("" when they differ): the fact of the
    workspace that ``choose_backend`` established (on the current device) before it picked a push
    backend, so the rule's input is the same on every rank."""
    ws = workspaces.workspace(group, torch.cuda.current_device(), establish=False)
    return ws.facts.device_name if ws is not None else ""


_validated: set = set()


def _check_linear_args(x: Tensor, weight: Tensor, bias: Tensor | None, hidden_widths: Sequence[int],
                       group: Group, slot: int) -> None:
    """Every check of the eager path, in one place, with what would be accepted."""
    key = (group, tuple(hidden_widths), tuple(x.shape[-1:]), tuple(weight.shape),
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


_lib = torch.library.Library("tpfuse", "FRAGMENT")
_lib.define(
    "linear_all_gather_hidden(Tensor x, Tensor weight, Tensor? bias, int[] hidden_widths, str group_name, "
    "int slot=-1, bool skip_entry_sync=False, bool zero_copy=False) -> Tensor"
)


def _use_fused(backend: Backend, tokens: int, k: int, widths: list[int], dtype: torch.dtype,
               group: Group) -> bool:
    """Rank-consistent: the backend (agreed), T, K, the widths, the dtype and the group's agreed GPU model."""
    if backend not in (Backend.P2P, Backend.MULTIMEM):
        return False
    mode = linear_push_mode()
    if mode == "unfused":
        return False
    decision = fused_decision(tokens, k, tuple(widths), dtype, _agreed_device_name(group))
    if mode == "fused":
        if decision.rule == "unsupported":
            raise RuntimeError(f"tpfuse: TPFUSE_LINEAR_PUSH=fused but the fused kernel cannot run: {decision.reason}")
        return True
    return decision.fuse


def _linear_all_gather_hidden_impl(x, weight, bias, hidden_widths, group_name, slot=-1, skip_entry_sync=False,
                                   zero_copy=False):
    group = resolve_group(group_name)
    _check_linear_args(x, weight, bias, hidden_widths, group, slot)
    if x.device.type == "cuda":
        k = x.shape[-1]
        tokens = x.numel() // k if k else 0
        backend = choose_backend("cuda", x.dtype, tokens * sum(hidden_widths), group)
        if tokens > 0 and _use_fused(backend, tokens, k, hidden_widths, x.dtype, group):
            from . import linear_push  # the GPU data path; imported only when chosen

            return linear_push.linear_gather_hidden(x, weight, bias, hidden_widths, group, backend, slot,
                                                    skip_entry_sync, zero_copy and inductor_lowering.is_registered())
    # The reference composite (CPU), and CUDA when the fused kernel is not chosen (the gather
    # applies its own zero-copy guard).
    y = F.linear(x, weight, bias)
    return torch.ops.tpfuse.all_gather_hidden.default(y, hidden_widths, group_name, slot, skip_entry_sync,
                                                      zero_copy)


for _device in ("CPU", "CUDA"):
    _lib.impl("linear_all_gather_hidden", _linear_all_gather_hidden_impl, _device)


@torch.library.register_fake("tpfuse::linear_all_gather_hidden", lib=_lib)
def _(x, weight, bias, hidden_widths, group_name, slot=-1, skip_entry_sync=False, zero_copy=False):
    # Shape only: never touches a process group; symbolic leading dims are fine.
    check_widths(hidden_widths)
    check_dtype(x.dtype)
    check_not_scalar(x, "input feature")
    torch._check(weight.dim() == 2, lambda: f"tpfuse: weight must be 2-D, got {weight.dim()}-D")
    torch._check(weight.shape[1] == x.shape[-1],
                 lambda: f"tpfuse: weight.shape[1]={weight.shape[1]} != x.shape[-1]={x.shape[-1]}")
    torch._check(x.dtype == weight.dtype, lambda: f"tpfuse: x is {x.dtype} but weight is {weight.dtype}")
    return x.new_empty(*x.shape[:-1], sum(hidden_widths))


def _linear_all_gather_hidden_autograd(x, weight, bias, hidden_widths, group_name, slot=-1,
                                       skip_entry_sync=False, zero_copy=False):
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
    if needs_grad:
        # The composite, under autograd: linear's backward after the gather's (reduce_scatter_hidden).
        y = F.linear(x, weight, bias)
        return torch.ops.tpfuse.all_gather_hidden.default(y, hidden_widths, group_name, slot, skip_entry_sync,
                                                          zero_copy)
    with torch._C._AutoDispatchBelowAutograd():
        return torch.ops.tpfuse.linear_all_gather_hidden.default(
            x, weight, bias, hidden_widths, group_name, slot, skip_entry_sync, zero_copy)


_lib.impl("linear_all_gather_hidden", _linear_all_gather_hidden_autograd, "Autograd")


def linear_all_gather_hidden(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    group: "torch.distributed.ProcessGroup | str | None" = None,
    hidden_widths: Sequence[int] | None = None,
) -> Tensor:
    """``cat_r(F.linear(x, W_r, b_r), dim=-1)``: this rank's column band of a linear, gathered.

    ``weight`` is this rank's ``[w_rank, K]`` band; ``hidden_widths`` lists
    every rank's ``w_r`` (by default all equal to ``weight.shape[0]``)."""
    name = group_name_of(group)
    if hidden_widths is None:
        hidden_widths = [weight.shape[0]] * world_size_of(name)
    return torch.ops.tpfuse.linear_all_gather_hidden(x, weight, bias, list(hidden_widths), name)
