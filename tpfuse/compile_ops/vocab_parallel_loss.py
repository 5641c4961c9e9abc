"""Softmax reductions over a vocab split across ranks, without gathering it (the SUM family).

Each rank holds the slab ``x [..., w_r]`` of the logits ``cat_r(x_r, dim=-1)`` (global columns
``[offset_r, offset_r + w_r)``, ``offset_r = sum(hidden_widths[:r])``).  The ops below compute
what torch computes on the gathered ``float32`` logits, but each rank reduces only its own
slab and the ranks exchange a few float32 numbers per row (docs/passes.md, "Gather
elimination: the sum family"):

    tpfuse::logsumexp_hidden(Tensor x, int[] hidden_widths, str group_name) -> Tensor
    tpfuse::target_logprobs_hidden(Tensor x, Tensor target, int[] hidden_widths, str group_name,
                                   int ignore_index=-100) -> Tensor
    tpfuse::cross_entropy_hidden(Tensor x, Tensor target, int[] hidden_widths, str group_name,
                                 int ignore_index=-100, str reduction="mean",
                                 float label_smoothing=0.0) -> Tensor
    tpfuse::entropy_hidden(Tensor x, int[] hidden_widths, str group_name) -> Tensor

The class axis is always the LAST one (``x [..., w_r]``, ``target [...]``): ``cross_entropy_hidden``
is ``F.cross_entropy(cat.float().flatten(0, -2), target.flatten(), ...)`` with the loss of
``reduction="none"`` shaped like ``target``, as HF's ``ForCausalLMLoss`` computes it.

The one primitive is ``tpfuse::softmax_stats_hidden``: per row a shift ``c`` (the row's max),
``log_sum = log sum exp(x - c)``, the target's logit ``x[target] - c``, ``sum (x - c)`` and the
entropy.  Locally each rank computes ``m_r = max``, ``s_r = sum exp(x - m_r)`` (and the other
partials); one ``tpfuse::all_gather_hidden`` of ``[..., k]`` float32 partials, and every rank
merges them in rank order, so every rank holds the same bits: ``c = max m_r``,
``log_sum = log sum_r s_r exp(m_r - c)``, ``logsumexp = c + log_sum``.  The target's logit comes
from the rank whose columns hold it (the others add 0).  The public ops are these statistics
combined by pointwise torch ops (``cross_entropy = log_sum - (x[target] - c)``).

Autograd: the statistics' gradients need nothing from the other ranks (``dlog_sum/dx = softmax``,
``d(x[target] - c)/dx = onehot``, ``d sum(x - c)/dx = 1``, ``dH/dx_j = p_j (-log p_j - H)``; ``c``
is a constant), so the backward is ``tpfuse::softmax_stats_hidden_backward`` on the local slab
alone: no gather, no exchange.  It returns the gradient of the local slab in ``x``'s dtype.
The rank (hence the slab's offset) is read from the group when the op runs, so compiled
graphs stay rank-agnostic.

A rank may hold zero columns (a padded vocabulary sliced ``[..., :V]``): its partials are
neutral (``m = -inf``, ``s = 0``), so ``hidden_widths`` entries may be 0 here, unlike the gather.

On CUDA the local pass, the merge and the backward are one Triton kernel each
(softmax_kernels.py, kernels/vocab_softmax.py); the torch functions below are the CPU path
and the reference the kernels are tested against.  No CUDA call reads a value on the host
(which would wait for the GPU and break graph capture): a class index outside the
vocabulary is refused there only with ``TPFUSE_CHECK=1`` (outside capture); otherwise its
row's result is NaN.
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Sequence

import torch
from torch import Tensor

from .. import config as settings
from . import softmax_kernels
from .all_gather_hidden import refused_alike
from .groups import Group, group_name_of, resolve_group
from .validation import (check_device_matches_group, check_not_scalar, check_one_width_per_rank, whole_widths,
                         world_size_of)

#: the dtypes of x the ops accept: everything is computed in float32, as ``logits.float()`` does
LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: the dtypes of target the ops accept
TARGET_DTYPES = (torch.int64, torch.int32)
REDUCTIONS = ("mean", "sum", "none")

_lib = torch.library.Library("tpfuse", "FRAGMENT")
_lib.define(
    "softmax_stats_hidden(Tensor x, Tensor? target, int[] hidden_widths, str group_name, "
    "int ignore_index=-100, bool with_logit_sum=False, bool with_entropy=False, int? valid_columns=None) "
    "-> (Tensor shift, Tensor log_sum, Tensor target_logit, Tensor logit_sum, Tensor entropy)"
)
_lib.define(
    "softmax_stats_hidden_backward(Tensor? grad_log_sum, Tensor? grad_target_logit, Tensor? grad_logit_sum, "
    "Tensor? grad_entropy, Tensor x, Tensor? target, Tensor shift, Tensor log_sum, Tensor entropy, "
    "int[] hidden_widths, str group_name, int? valid_columns=None) -> Tensor"
)
_lib.define("logsumexp_hidden(Tensor x, int[] hidden_widths, str group_name) -> Tensor")
_lib.define(
    "target_logprobs_hidden(Tensor x, Tensor target, int[] hidden_widths, str group_name, "
    "int ignore_index=-100) -> Tensor"
)
_lib.define(
    "cross_entropy_hidden(Tensor x, Tensor target, int[] hidden_widths, str group_name, "
    "int ignore_index=-100, str reduction=\"mean\", float label_smoothing=0.0) -> Tensor"
)
_lib.define("entropy_hidden(Tensor x, int[] hidden_widths, str group_name) -> Tensor")
_lib.define("sum_grad_over_ranks(Tensor x, str group_name) -> Tensor")
_lib.define("sum_over_ranks(Tensor x, str group_name) -> Tensor")


# --------------------------------------------------------------------------- validation

def _names(dtypes) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def check_vocab_widths(hidden_widths: Sequence[int]) -> None:
    """One width per rank, each >= 0 (a rank may hold no column of a sliced vocabulary), total > 0."""
    if len(hidden_widths) == 0:
        raise ValueError("tpfuse: hidden_widths is empty; give one vocabulary width per rank")
    bad = [w for w in hidden_widths if w < 0]
    if bad:
        raise ValueError(f"tpfuse: hidden_widths={list(hidden_widths)} has width(s) {bad} < 0; "
                         "accepted are widths >= 0 (0: the rank holds no column)")
    if sum(hidden_widths) == 0:
        raise ValueError(f"tpfuse: hidden_widths={list(hidden_widths)} holds no column at all; "
                         "at least one rank must hold a column")


def check_shapes(x: Tensor, target: Tensor | None) -> None:
    """What needs no process group: x's and target's dtypes, and target's shape against x's rows."""
    check_not_scalar(x, "vocabulary")
    if x.dtype not in LOGIT_DTYPES:
        raise TypeError(f"tpfuse: logits of dtype {x.dtype} are not accepted; accepted are "
                        f"{_names(LOGIT_DTYPES)} (computed in float32)")
    if target is None:
        return
    if target.dtype not in TARGET_DTYPES:
        raise TypeError(f"tpfuse: target of dtype {target.dtype} is not accepted; accepted are "
                        f"{_names(TARGET_DTYPES)} class indices")
    if tuple(target.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"tpfuse: target.shape={list(target.shape)} but x.shape={list(x.shape)}; "
                         "target needs x's shape without its last (vocabulary) dim: one class index per row")
    if target.device != x.device:
        raise ValueError(f"tpfuse: target is on {target.device} but x is on {x.device}; accepted: both on one device")


def check_valid_columns(valid_columns: int | None) -> None:
    if valid_columns is not None and valid_columns < 1:
        raise ValueError(f"tpfuse: valid_columns={valid_columns} is not accepted; accepted are None (every column) "
                         "or V >= 1 (the columns [0, V) of the gathered axis count, the rest is padding)")


def valid_widths(hidden_widths: Sequence[int], valid_columns: int | None) -> list[int]:
    """The ranks' widths once the padding ``[V, sum(hidden_widths))`` is dropped: rank r keeps
    ``[0, clamp(V - offset_r, 0, w_r))`` of its slab (a rank may keep none)."""
    if valid_columns is None:
        return list(hidden_widths)
    return [max(0, min(w, valid_columns - _offset(hidden_widths, r))) for r, w in enumerate(hidden_widths)]


def check_loss_options(reduction: str, label_smoothing: float) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"tpfuse: reduction={reduction!r} is not accepted; accepted are {', '.join(REDUCTIONS)}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"tpfuse: label_smoothing={label_smoothing} is not accepted; accepted are values in [0.0, 1.0]")


def _check_on_group(x: Tensor, target: Tensor | None, hidden_widths: Sequence[int], group: Group,
                    ignore_index: int, valid_columns: int | None = None) -> None:
    """Every check, before any communication: a bad call raises on its own rank (docs/contract.md §4)."""
    check_shapes(x, target)
    check_vocab_widths(hidden_widths)
    check_one_width_per_rank(hidden_widths, group)
    expected = hidden_widths[group.rank]
    if x.shape[-1] != expected:
        raise ValueError(f"tpfuse: x.shape[-1]={x.shape[-1]} on rank {group.rank} but hidden_widths[{group.rank}]="
                         f"{expected}; x's last dim must equal this rank's entry in hidden_widths")
    check_valid_columns(valid_columns)
    check_device_matches_group(x.device.type, group)
    if target is not None and (target.device.type == "cpu" or _checking_device_values()):
        # Reading target's values costs a device sync on CUDA, so there it runs only with
        # TPFUSE_CHECK=1 outside graph capture; otherwise an out-of-range class index yields a
        # NaN row (no rank owns it), documented in docs/passes.md.
        _check_target_values(target, sum(valid_widths(hidden_widths, valid_columns)), ignore_index)


#: a public op's own checks (the loss options) that the statistics' agreement runs with its own, on this thread
_public_checks = threading.local()


@contextlib.contextmanager
def _agreed_with_the_statistics(check):
    """Within: ``check`` runs among the statistics' checks, whose verdict the ranks agree on before any
    exchange; raised before them, on one rank only, it would strand the peers in the exchange (docs/contract.md §4)."""
    previous = getattr(_public_checks, "check", None)
    _public_checks.check = check
    try:
        yield
    finally:
        _public_checks.check = previous


def _check_on_group_agreed(x: Tensor, target: Tensor | None, hidden_widths: Sequence[int], group: Group,
                      ignore_index: int, valid_columns: int | None, with_logit_sum: bool, with_entropy: bool) -> None:
    """``_check_on_group`` and the public op's checks, agreed across the ranks where the gather's agreement runs:
    a call one rank refuses (a class index outside the vocabulary, a dtype, a width) is refused by every rank,
    and so is a call whose arguments differ between the ranks (the target, ignore_index, valid_columns, the
    statistics asked for), where each rank would merge partials its peers computed for another call."""
    from . import agreement
    from .all_gather_hidden import agreement_applies  # the gather's own rule of where it checks

    extra = getattr(_public_checks, "check", None)

    def local_check():
        _check_on_group(x, target, hidden_widths, group, ignore_index, valid_columns)
        if extra is not None:
            extra()

    if not agreement_applies(x.device.type, group, settings.raw_dispatch_values()[-1]):
        local_check()
        return
    call = (f"softmax statistics (target {_target_checksum(target)}, ignore_index={ignore_index}, "
            f"valid_columns={valid_columns}, logit sum (label smoothing) {with_logit_sum}, entropy {with_entropy})")
    agreement.check(x, list(hidden_widths), group, local_check, agreement.CallView.of_gather(x, hidden_widths, op=call),
                    widths_rule=check_vocab_widths)


def _target_checksum(target: Tensor | None) -> str:
    """Two words that differ where the ranks' targets differ (the sum, and the sum weighted by position)."""
    if target is None:
        return "none"
    try:
        values = target.detach().reshape(-1).to(torch.int64)
        weights = torch.arange(1, values.numel() + 1, dtype=torch.int64, device=values.device)
        return f"checksum {int(values.sum())}/{int((values * weights).sum())}"
    except Exception as err:  # noqa: BLE001 - a target that cannot be read is refused by the checks, agreed
        return f"unreadable ({type(err).__name__})"


def _checking_device_values() -> bool:
    """Whether a CUDA call reads the target's values (and so waits for the GPU): TPFUSE_CHECK=1, not capturing."""
    return bool(settings.get("TPFUSE_CHECK")) and not torch.cuda.is_current_stream_capturing()


def _check_target_values(target: Tensor, vocab: int, ignore_index: int) -> None:
    bad = target[((target < 0) | (target >= vocab)) & (target != ignore_index)]
    if bad.numel():
        raise ValueError(f"tpfuse: target holds class index {int(bad[0])}, outside the vocabulary of {vocab} "
                         f"columns; accepted are indices in [0, {vocab}) or ignore_index={ignore_index}")


# --------------------------------------------------------------------------- the math of one slab
#
# Every statistic is kept relative to a per-row shift ``c`` (the row's max, or 0 where it is
# infinite, torch.logsumexp's rule): ``log_sum = log sum exp(x - c)``, ``x[target] - c``,
# ``sum (x - c)``.  A loss is then a difference of small numbers (``log_sum - (x[target] - c)``),
# never of two large ones: with logits near 1e6, ``(c + log_sum) - x[target]`` would lose
# ``log_sum`` to float32 rounding, as ``log_softmax`` does not.  ``c`` is a constant to autograd
# (every statistic's value is exact for any c, so its gradient does not depend on it).

def _shift(m: Tensor) -> Tensor:
    return torch.where(torch.isinf(m), 0.0, m)


def local_partials(x: Tensor, target: Tensor | None, offset: int,
                   with_logit_sum: bool, with_entropy: bool) -> Tensor:
    """``[..., k]`` float32 partials of the slab ``x`` (global columns from ``offset``).

    Columns: ``m`` (max), ``s = sum e`` with ``e = exp(x - shift(m))``; then, if asked, the
    target's logit (0 where this slab does not hold the target), ``sum (x - shift(m))`` and
    ``sum e * (x - shift(m))``.  A row of -inf (or an empty slab) gives ``m = -inf, s = 0``:
    neutral in the merge.
    """
    lead, width = x.shape[:-1], x.shape[-1]
    if width == 0:  # the neutral partial: a max that never wins, empty sums
        zero = x.new_zeros(lead, dtype=torch.float32)
        extra = int(target is not None) + int(with_logit_sum) + int(with_entropy)
        return torch.stack([torch.full_like(zero, -math.inf), zero] + [zero] * extra, -1)
    xf = x.float()
    m = xf.amax(-1)
    shifted = xf - _shift(m).unsqueeze(-1)
    e = torch.exp(shifted)
    columns = [m, e.sum(-1)]
    if target is not None:
        local = target - offset
        owned = (local >= 0) & (local < width)
        picked = xf.gather(-1, local.clamp(0, width - 1).unsqueeze(-1).long()).squeeze(-1)
        columns.append(torch.where(owned, picked, 0.0))
    if with_logit_sum:
        columns.append(shifted.sum(-1))
    if with_entropy:
        # e * (x - shift) -> 0 as x -> -inf: count 0 * (-inf) as 0, not NaN
        columns.append(torch.where(e == 0, 0.0, e * shifted).sum(-1))
    return torch.stack(columns, -1)


def merge_partials(gathered: Tensor, hidden_widths: Sequence[int], has_target: bool, with_logit_sum: bool,
                   with_entropy: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(shift, log_sum, target_logit, logit_sum, entropy)`` from the ``[..., k * W]`` partials in rank order.

    ``target_logit`` and ``logit_sum`` are relative to ``shift`` (``x[target] - shift``,
    ``sum (x - shift)``).  The same arithmetic in the same order on every rank, so every rank
    gets the same bits.  Statistics not asked for are zeros."""
    world_size = len(hidden_widths)
    k = gathered.shape[-1] // world_size
    parts = gathered.unflatten(-1, (world_size, k))
    m, s = parts[..., 0], parts[..., 1]
    shift = _shift(m.amax(-1))  # NaN propagates, as in torch.logsumexp
    rank_shift = _shift(m)  # what each rank shifted its slab by
    # exp(rank_shift - shift) rescales rank r's sum; a rank with nothing (s = 0) adds exactly 0 even
    # where the factor overflows
    scale = torch.exp(rank_shift - shift.unsqueeze(-1))
    total = torch.where(s == 0, 0.0, s * scale).sum(-1)
    log_sum = torch.log(total)
    column = 2
    # statistics not asked for: zeros, each its own tensor (outputs of an op must not alias)
    target_logit, logit_sum, entropy = (torch.zeros_like(shift) for _ in range(3))
    if has_target:
        target_logit = parts[..., column].sum(-1) - shift  # one rank holds it, the others add 0: exact
        column += 1
    if with_logit_sum:
        # sum (x - shift) over rank r's slab; in rank order, a Python loop: the widths are constants
        # (no host-to-device copy, so CUDA graph capture is fine) and W is small
        for r, width in enumerate(hidden_widths):
            if width:
                logit_sum = logit_sum + (parts[..., r, column] + width * (rank_shift[..., r] - shift))
        column += 1
    if with_entropy:
        # sum_j exp(x_j - shift) (x_j - shift), then H = log_sum - that / total
        moved = scale * (parts[..., column] + (rank_shift - shift.unsqueeze(-1)) * s)
        entropy = log_sum - torch.where(s == 0, 0.0, moved).sum(-1) / total
    return shift, log_sum, target_logit, logit_sum, entropy


def local_grad(grad_log_sum, grad_target_logit, grad_logit_sum, grad_entropy,
               x: Tensor, target: Tensor | None, shift: Tensor, log_sum: Tensor, entropy: Tensor,
               offset: int) -> Tensor:
    """The gradient of the slab ``x`` from the statistics' gradients: local arithmetic only.

    d log_sum/dx = softmax, d target_logit/dx = onehot, d logit_sum/dx = 1,
    d entropy/dx_j = p_j (-log p_j - entropy)."""
    xf = x.float()
    grad = torch.zeros_like(xf)
    if x.shape[-1] == 0:
        return grad.to(x.dtype)
    logp = None
    if grad_log_sum is not None or grad_entropy is not None:
        logp = (xf - shift.unsqueeze(-1)) - log_sum.unsqueeze(-1)  # this slab's share of log_softmax
        p = torch.exp(logp)
    if grad_log_sum is not None:
        grad = grad + grad_log_sum.unsqueeze(-1) * p
    if grad_logit_sum is not None:
        grad = grad + grad_logit_sum.unsqueeze(-1)
    if grad_entropy is not None:
        step = torch.where(p == 0, 0.0, p * (-logp - entropy.unsqueeze(-1)))  # 0 where x_j = -inf
        grad = grad + grad_entropy.unsqueeze(-1) * step
    if grad_target_logit is not None and target is not None:
        width = x.shape[-1]
        local = target - offset
        owned = (local >= 0) & (local < width)
        onehot = torch.where(owned, grad_target_logit, 0.0).unsqueeze(-1)
        grad = grad.scatter_add(-1, local.clamp(0, width - 1).unsqueeze(-1).long(), onehot)
    return grad.to(x.dtype)


def _offset(hidden_widths: Sequence[int], rank: int) -> int:
    return sum(hidden_widths[:rank])


# --------------------------------------------------------------------------- the ops' kernels

def _stats_impl(x, target, hidden_widths, group_name, ignore_index=-100, with_logit_sum=False, with_entropy=False,
                valid_columns=None):
    group = resolve_group(group_name)
    _check_on_group_agreed(x, target, hidden_widths, group, ignore_index, valid_columns, with_logit_sum, with_entropy)
    hidden_widths = valid_widths(hidden_widths, valid_columns)
    x = x[..., :hidden_widths[group.rank]]  # this rank's columns below V
    if x.is_cuda:  # one kernel per step and no host sync (softmax_kernels.py); the CPU keeps the composition
        return softmax_kernels.softmax_stats(x, target, _offset(hidden_widths, group.rank), hidden_widths,
                                             group_name, with_logit_sum, with_entropy)
    partials = local_partials(x, target, _offset(hidden_widths, group.rank), with_logit_sum, with_entropy)
    k = partials.shape[-1]
    # k float32 numbers per row travel, not the slab: any backend of the gather serves
    gathered = torch.ops.tpfuse.all_gather_hidden.default(partials.contiguous(), [k] * group.world_size, group_name)
    return merge_partials(gathered, hidden_widths, target is not None, with_logit_sum, with_entropy)


def _stats_backward_impl(grad_log_sum, grad_target_logit, grad_logit_sum, grad_entropy,
                         x, target, shift, log_sum, entropy, hidden_widths, group_name, valid_columns=None):
    rank = resolve_group(group_name).rank
    widths = valid_widths(hidden_widths, valid_columns)
    if x.is_cuda:  # one pass over the slab, which also writes the padding's zeros (softmax_kernels.py)
        return softmax_kernels.local_grad(grad_log_sum, grad_target_logit, grad_logit_sum, grad_entropy, x, target,
                                          shift, log_sum, entropy, widths[rank], _offset(widths, rank))
    grad = local_grad(grad_log_sum, grad_target_logit, grad_logit_sum, grad_entropy,
                      x[..., :widths[rank]], target, shift, log_sum, entropy, _offset(widths, rank))
    padding = x.shape[-1] - widths[rank]
    if padding:  # the padding columns do not reach any statistic: their gradient is 0
        grad = torch.cat([grad, grad.new_zeros(*grad.shape[:-1], padding)], -1)
    return grad


# The public ops are the statistics combined pointwise.  The same functions serve the device
# kernels (plain tensors) and the autograd path (tensors with a graph), so both compute alike.

def finish_logprobs(log_sum: Tensor, target_logit: Tensor, target: Tensor, vocab: int, ignore_index: int) -> Tensor:
    """log_softmax[target] = (x[target] - shift) - log_sum: 0 where target == ignore_index; NaN for
    an index outside [0, vocab), and NaN for a row that holds +inf (``log_sum = +inf``): torch's
    log_softmax is NaN across such a row, even where the target's logit is finite."""
    valid = (target >= 0) & (target < vocab) & (log_sum != math.inf)
    logprobs = torch.where(valid, target_logit - log_sum, math.nan)
    return torch.where(target == ignore_index, 0.0, logprobs)


def finish_cross_entropy(log_sum: Tensor, target_logit: Tensor, logit_sum: Tensor | None, target: Tensor,
                         vocab: int, ignore_index: int, reduction: str, label_smoothing: float) -> Tensor:
    """F.cross_entropy's arithmetic on the statistics (its label smoothing: (1-eps) nll + eps mean_c(-logp_c))."""
    loss = -finish_logprobs(log_sum, target_logit, target, vocab, ignore_index)
    ignored = target == ignore_index
    if label_smoothing > 0:
        smooth = torch.where(ignored, 0.0, log_sum - logit_sum / vocab)  # -mean over classes of log_softmax
        loss = (1 - label_smoothing) * loss + label_smoothing * smooth
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (~ignored).sum()  # over the rows not ignored; 0/0 = NaN as in torch


def _logsumexp_impl(x, hidden_widths, group_name):
    shift, log_sum, *_ = _stats_impl(x, None, hidden_widths, group_name)
    return shift + log_sum


def _target_logprobs_impl(x, target, hidden_widths, group_name, ignore_index=-100):
    _, log_sum, target_logit, _, _ = _stats_impl(x, target, hidden_widths, group_name, ignore_index)
    if x.is_cuda:  # one launch for the pointwise steps (softmax_kernels.py)
        return softmax_kernels.finish(log_sum, target_logit, None, target, sum(hidden_widths), ignore_index,
                                      "logprobs", 0.0)
    return finish_logprobs(log_sum, target_logit, target, sum(hidden_widths), ignore_index)


def _cross_entropy_impl(x, target, hidden_widths, group_name, ignore_index=-100, reduction="mean",
                        label_smoothing=0.0):
    with _agreed_with_the_statistics(lambda: check_loss_options(reduction, label_smoothing)):
        _, log_sum, target_logit, logit_sum, _ = _stats_impl(x, target, hidden_widths, group_name, ignore_index,
                                                             with_logit_sum=label_smoothing > 0)
    if x.is_cuda:  # one launch for the pointwise steps and the reduction (softmax_kernels.py)
        return softmax_kernels.finish(log_sum, target_logit, logit_sum, target, sum(hidden_widths), ignore_index,
                                      reduction, label_smoothing)
    return finish_cross_entropy(log_sum, target_logit, logit_sum, target, sum(hidden_widths), ignore_index,
                                reduction, label_smoothing)


def _entropy_impl(x, hidden_widths, group_name):
    return _stats_impl(x, None, hidden_widths, group_name, with_entropy=True)[4]


for _device in ("CPU", "CUDA"):
    _lib.impl("softmax_stats_hidden", _stats_impl, _device)
    _lib.impl("softmax_stats_hidden_backward", _stats_backward_impl, _device)
    _lib.impl("logsumexp_hidden", _logsumexp_impl, _device)
    _lib.impl("target_logprobs_hidden", _target_logprobs_impl, _device)
    _lib.impl("cross_entropy_hidden", _cross_entropy_impl, _device)
    _lib.impl("entropy_hidden", _entropy_impl, _device)


# --------------------------------------------------------------------------- fake kernels (shapes only)

def _rows(x: Tensor) -> Tensor:
    return x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.register_fake("tpfuse::softmax_stats_hidden", lib=_lib)
def _(x, target, hidden_widths, group_name, ignore_index=-100, with_logit_sum=False, with_entropy=False,
      valid_columns=None):
    check_shapes(x, target)
    check_vocab_widths(hidden_widths)
    check_valid_columns(valid_columns)
    return tuple(_rows(x) for _ in range(5))


@torch.library.register_fake("tpfuse::softmax_stats_hidden_backward", lib=_lib)
def _(grad_log_sum, grad_target_logit, grad_logit_sum, grad_entropy, x, target, shift, log_sum, entropy,
      hidden_widths, group_name, valid_columns=None):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("tpfuse::logsumexp_hidden", lib=_lib)
def _(x, hidden_widths, group_name):
    check_shapes(x, None)
    check_vocab_widths(hidden_widths)
    return _rows(x)


@torch.library.register_fake("tpfuse::target_logprobs_hidden", lib=_lib)
def _(x, target, hidden_widths, group_name, ignore_index=-100):
    check_shapes(x, target)
    check_vocab_widths(hidden_widths)
    return _rows(x)


@torch.library.register_fake("tpfuse::cross_entropy_hidden", lib=_lib)
def _(x, target, hidden_widths, group_name, ignore_index=-100, reduction="mean", label_smoothing=0.0):
    check_shapes(x, target)
    check_vocab_widths(hidden_widths)
    check_loss_options(reduction, label_smoothing)
    return _rows(x) if reduction == "none" else x.new_empty((), dtype=torch.float32)


@torch.library.register_fake("tpfuse::entropy_hidden", lib=_lib)
def _(x, hidden_widths, group_name):
    check_shapes(x, None)
    check_vocab_widths(hidden_widths)
    return _rows(x)


# --------------------------------------------------------------------------- autograd

class _SoftmaxStats(torch.autograd.Function):
    """Forward: the statistics (one exchange).  Backward: the local slab's gradient, no exchange."""

    @staticmethod
    def forward(ctx, x, target, hidden_widths, group_name, ignore_index, with_logit_sum, with_entropy, valid_columns):
        with torch._C._AutoDispatchBelowAutograd():
            stats = torch.ops.tpfuse.softmax_stats_hidden.default(
                x, target, hidden_widths, group_name, ignore_index, with_logit_sum, with_entropy, valid_columns)
        shift, log_sum, _, _, entropy = stats
        ctx.save_for_backward(x, target, shift, log_sum, entropy)
        ctx.hidden_widths, ctx.group_name, ctx.valid_columns = hidden_widths, group_name, valid_columns
        ctx.mark_non_differentiable(shift)  # a constant of every statistic's value (see above)
        ctx.set_materialize_grads(False)  # an unused statistic costs no pass over the slab
        return stats

    @staticmethod
    def backward(ctx, _grad_shift, grad_log_sum, grad_target_logit, grad_logit_sum, grad_entropy):
        x, target, shift, log_sum, entropy = ctx.saved_tensors
        grad_x = torch.ops.tpfuse.softmax_stats_hidden_backward.default(
            grad_log_sum, grad_target_logit, grad_logit_sum, grad_entropy, x, target, shift, log_sum, entropy,
            ctx.hidden_widths, ctx.group_name, ctx.valid_columns)
        return grad_x, None, None, None, None, None, None, None


def _needs_grad(x: Tensor) -> bool:
    return x.requires_grad and torch.is_grad_enabled()


def _stats_autograd(x, target, hidden_widths, group_name, ignore_index=-100, with_logit_sum=False,
                    with_entropy=False, valid_columns=None):
    if _needs_grad(x):
        return _SoftmaxStats.apply(x, target, hidden_widths, group_name, ignore_index, with_logit_sum, with_entropy,
                                   valid_columns)
    with torch._C._AutoDispatchBelowAutograd():
        return torch.ops.tpfuse.softmax_stats_hidden.default(
            x, target, hidden_widths, group_name, ignore_index, with_logit_sum, with_entropy, valid_columns)


def _stats(x, target, hidden_widths, group_name, ignore_index=-100, with_logit_sum=False, with_entropy=False):
    """The statistics through the dispatcher, with autograd (the public ops' differentiable path)."""
    return torch.ops.tpfuse.softmax_stats_hidden.default(
        x, target, hidden_widths, group_name, ignore_index, with_logit_sum, with_entropy)


def _below_autograd(op, *args):
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


# A call that needs no gradient runs the op itself (one node in a compiled graph); one that needs
# a gradient runs the composition, whose only collective is the statistics' exchange and whose
# backward is the statistics' local backward (plus pointwise ops per row).

def _logsumexp_autograd(x, hidden_widths, group_name):
    if not _needs_grad(x):
        return _below_autograd(torch.ops.tpfuse.logsumexp_hidden.default, x, hidden_widths, group_name)
    shift, log_sum, *_ = _stats(x, None, hidden_widths, group_name)
    return shift + log_sum


def _target_logprobs_autograd(x, target, hidden_widths, group_name, ignore_index=-100):
    if not _needs_grad(x):
        return _below_autograd(torch.ops.tpfuse.target_logprobs_hidden.default,
                               x, target, hidden_widths, group_name, ignore_index)
    _, log_sum, target_logit, _, _ = _stats(x, target, hidden_widths, group_name, ignore_index)
    return finish_logprobs(log_sum, target_logit, target, sum(hidden_widths), ignore_index)


class _CrossEntropyOnDevice(torch.autograd.Function):
    """An eager CUDA cross-entropy with autograd in a few launches: forward = the statistics' kernels and
    exchange + the finish kernel; backward = one kernel that computes the per-row weights the composition's
    pointwise steps would carry and writes the slab's gradient (softmax_kernels.py).  Taken only by
    plain eager calls (``softmax_kernels.plain``); a traced call runs the composition below, which is
    what AOTAutograd can see and Inductor fuses."""

    @staticmethod
    def forward(ctx, x, target, hidden_widths, group_name, ignore_index, reduction, label_smoothing):
        shift, log_sum, target_logit, logit_sum, _ = _stats_impl(x, target, hidden_widths, group_name,
                                                                 ignore_index, with_logit_sum=label_smoothing > 0)
        loss, count = softmax_kernels.finish_and_count(log_sum, target_logit, logit_sum, target, sum(hidden_widths),
                                                       ignore_index, reduction, label_smoothing)
        ctx.save_for_backward(x, target, shift, log_sum, count)
        ctx.options = (hidden_widths, group_name, ignore_index, reduction, label_smoothing)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        x, target, shift, log_sum, count = ctx.saved_tensors
        hidden_widths, group_name, ignore_index, reduction, label_smoothing = ctx.options
        offset = _offset(hidden_widths, resolve_group(group_name).rank)
        grad_x = softmax_kernels.cross_entropy_grad(grad_loss, x, target, shift, log_sum, count, offset,
                                                    sum(hidden_widths), ignore_index, reduction, label_smoothing)
        return grad_x, None, None, None, None, None, None


def _cross_entropy_autograd(x, target, hidden_widths, group_name, ignore_index=-100, reduction="mean",
                            label_smoothing=0.0):
    if not _needs_grad(x):
        return _below_autograd(torch.ops.tpfuse.cross_entropy_hidden.default,
                               x, target, hidden_widths, group_name, ignore_index, reduction, label_smoothing)
    options = lambda: check_loss_options(reduction, label_smoothing)  # noqa: E731
    if not softmax_kernels.plain(x, target):
        options()  # traced: the statistics below are not run here, and tracing is rank-local anyway
    with _agreed_with_the_statistics(options):  # eager: raised before the exchange, one rank would strand its peers
        if x.is_cuda and softmax_kernels.plain(x, target):  # eager: ~20 fewer ops per step (docs in the class)
            return _CrossEntropyOnDevice.apply(x, target, hidden_widths, group_name, ignore_index, reduction,
                                               label_smoothing)
        _, log_sum, target_logit, logit_sum, _ = _stats(x, target, hidden_widths, group_name, ignore_index,
                                                        with_logit_sum=label_smoothing > 0)
    return finish_cross_entropy(log_sum, target_logit, logit_sum, target, sum(hidden_widths), ignore_index,
                                reduction, label_smoothing)


def _entropy_autograd(x, hidden_widths, group_name):
    if not _needs_grad(x):
        return _below_autograd(torch.ops.tpfuse.entropy_hidden.default, x, hidden_widths, group_name)
    return _stats(x, None, hidden_widths, group_name, with_entropy=True)[4]


_lib.impl("softmax_stats_hidden", _stats_autograd, "Autograd")
_lib.impl("logsumexp_hidden", _logsumexp_autograd, "Autograd")
_lib.impl("target_logprobs_hidden", _target_logprobs_autograd, "Autograd")
_lib.impl("cross_entropy_hidden", _cross_entropy_autograd, "Autograd")
_lib.impl("entropy_hidden", _entropy_autograd, "Autograd")


# --------------------------------------------------------------------------- the gather's gradient convention
#
# The ops above return each rank the gradient of ITS OWN loss (the vocab-parallel convention).
# A gather's backward is a reduce-scatter: rank r receives the sum over ranks of every rank's
# gradient of its band.  A rewrite that replaces "gather, then loss" keeps that meaning with
# ``sum_grad_over_ranks(loss)``: the identity, whose backward sums the loss's (per-row)
# gradient over the ranks; the slab's gradient is linear in it, so summing it first gives the
# reduce-scatter's sum, and only a few numbers per row travel.

def _sum_over_ranks_impl(x, group_name):
    group = resolve_group(group_name)
    rows = x.reshape(-1, 1).contiguous()
    gathered = torch.ops.tpfuse.all_gather_hidden.default(rows, [1] * group.world_size, group_name)
    return gathered.sum(-1).reshape(x.shape)  # in rank order: the same bits on every rank


def _sum_grad_over_ranks_impl(x, group_name):
    return x.clone()


for _device in ("CPU", "CUDA"):
    _lib.impl("sum_over_ranks", _sum_over_ranks_impl, _device)
    _lib.impl("sum_grad_over_ranks", _sum_grad_over_ranks_impl, _device)


@torch.library.register_fake("tpfuse::sum_over_ranks", lib=_lib)
def _(x, group_name):
    return torch.empty_like(x)


@torch.library.register_fake("tpfuse::sum_grad_over_ranks", lib=_lib)
def _(x, group_name):
    return torch.empty_like(x)


class _SumGradOverRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group_name):
        ctx.group_name = group_name
        with torch._C._AutoDispatchBelowAutograd():
            return torch.ops.tpfuse.sum_grad_over_ranks.default(x, group_name)

    @staticmethod
    def backward(ctx, grad):
        return torch.ops.tpfuse.sum_over_ranks.default(grad, ctx.group_name), None


def _sum_grad_over_ranks_autograd(x, group_name):
    if _needs_grad(x):
        return _SumGradOverRanks.apply(x, group_name)
    return _below_autograd(torch.ops.tpfuse.sum_grad_over_ranks.default, x, group_name)


_lib.impl("sum_grad_over_ranks", _sum_grad_over_ranks_autograd, "Autograd")


# --------------------------------------------------------------------------- public wrappers

def _widths(x: Tensor, group_name: str, hidden_widths: Sequence[int] | None) -> list[int]:
    if torch.compiler.is_compiling():  # tracing is rank-local: refuse here, where the message reaches the user
        check_not_scalar(x, "vocabulary")
    if hidden_widths is None:
        # Eager, a scalar gets widths of -1 and the op refuses it after the ranks agree (as the gather's
        # wrapper does): raised here, on one rank only, it would strand its peers in the exchange.
        return [x.shape[-1] if x.dim() else -1] * world_size_of(group_name)
    return whole_widths(hidden_widths)


def logsumexp_hidden(x: Tensor, group=None, hidden_widths: Sequence[int] | None = None) -> Tensor:
    """``torch.logsumexp(cat_r(x_r).float(), -1)`` without gathering: float32 ``[...]``.

    ``group``: a ProcessGroup, its name, or None for the default group.  ``hidden_widths``:
    every rank's width (a rank may hold 0 columns); by default all ranks hold ``x.shape[-1]``."""
    name = group_name_of(group)
    def call():
        return torch.ops.tpfuse.logsumexp_hidden.default(x, _widths(x, name, hidden_widths), name)
    return call() if torch.compiler.is_compiling() else refused_alike(x, name, call)


def target_logprobs_hidden(x: Tensor, target: Tensor, group=None, hidden_widths: Sequence[int] | None = None,
                           ignore_index: int = -100) -> Tensor:
    """``log_softmax(cat_r(x_r).float(), -1).gather(-1, target)``, 0 where ``target == ignore_index``."""
    name = group_name_of(group)
    def call():
        return torch.ops.tpfuse.target_logprobs_hidden.default(x, target, _widths(x, name, hidden_widths), name,
                                                               ignore_index)
    return call() if torch.compiler.is_compiling() else refused_alike(x, name, call)


def cross_entropy_hidden(x: Tensor, target: Tensor, group=None, hidden_widths: Sequence[int] | None = None,
                         ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0) -> Tensor:
    """``F.cross_entropy(cat_r(x_r).float().flatten(0, -2), target.flatten(), ...)`` without gathering.

    The class axis is x's last; ``reduction="none"`` returns ``target``'s shape.  Differentiable:
    the gradient of each rank's slab is computed on that rank alone."""
    name = group_name_of(group)
    def call():
        return torch.ops.tpfuse.cross_entropy_hidden.default(x, target, _widths(x, name, hidden_widths), name,
                                                             ignore_index, reduction, float(label_smoothing))
    return call() if torch.compiler.is_compiling() else refused_alike(x, name, call)


def entropy_hidden(x: Tensor, group=None, hidden_widths: Sequence[int] | None = None) -> Tensor:
    """The softmax entropy ``-(p * log p).sum(-1)`` of ``cat_r(x_r).float()`` per row (0·log 0 = 0)."""
    name = group_name_of(group)
    def call():
        return torch.ops.tpfuse.entropy_hidden.default(x, _widths(x, name, hidden_widths), name)
    return call() if torch.compiler.is_compiling() else refused_alike(x, name, call)
