"""Host launcher of the sum family's CUDA kernels (kernels/vocab_softmax.py).

``tpfuse::softmax_stats_hidden`` on CUDA tensors runs three kernels where the CPU runs the
torch composition of vocab_parallel_loss.py (the reference they are tested against):
the local pass over the slab (one read of it), the exchange of its float32 partials
through ``tpfuse::all_gather_hidden``, and the merge; its backward is one gradient kernel
(one read of the slab, one write of the gradient).

Per call the host does little, because an eager training step calls it every step:
- each variant (dtypes, statistics asked for, tile, alignment) is compiled once per
  device and launched through Triton's compiled launcher directly, as the push protocols' launchers do (compile_ops/barrier/launcher.py);
- nothing reads the device: no ``.item()``, no boolean indexing, no validation of the
  target's values (an index outside the vocabulary gives NaN, vocab_parallel_loss.py), so
  a call neither waits for the GPU nor breaks CUDA-graph capture;
- the number of partials per rank is a function of T and the widest band only
  (``vocab_softmax.split_plan``): every rank sends and merges the same words.

What a launch needs is built by ``*_launch`` functions as a ``Launch`` (grid, runtime
arguments, constexprs); tests/interpret_vocab_softmax.py runs the same ``Launch`` in
Triton's interpreter, so the host's arithmetic (splits, strides, widths) is tested on CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..kernels import vocab_softmax as kernels
from .compiled import Compiled, compile_for
from .program_order import raw_stream

#: Triton's type names of the dtypes the kernels read and write
TYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
              torch.int64: "i64", torch.int32: "i32"}

_SOURCES = {"local": kernels.local_stats_source, "merge": kernels.merge_source, "grad": kernels.local_grad_source,
            "finish": kernels.finish_source, "cross_entropy_grad": kernels.cross_entropy_grad_source}
_KERNELS = {"local": kernels.local_stats_kernel, "merge": kernels.merge_kernel, "grad": kernels.local_grad_kernel,
            "finish": kernels.finish_kernel, "cross_entropy_grad": kernels.cross_entropy_grad_kernel}


@dataclass(frozen=True)
class Launch:
    """One kernel call: ``kind`` ("local", "merge", "grad"), the arguments of its ``*_source``
    function (the variant), the grid, the runtime arguments in the kernel's order (tensors
    where it takes pointers), its constexprs and warps."""

    kind: str
    variant: tuple
    grid: tuple
    args: tuple
    constexprs: dict
    num_warps: int

    @property
    def kernel(self):
        return _KERNELS[self.kind]


#: compiled variants: (kind, variant, warps, device index) -> Compiled
_plans: dict = {}


def _compile(launch: Launch, device_index: int) -> Compiled:
    from ..kernels.compiler import compile_source  # one compiler for every kernel

    return compile_for(device_index, _SOURCES[launch.kind](*launch.variant),
                       lambda src: compile_source(src, num_warps=launch.num_warps))


def run(launch: Launch, device: torch.device) -> None:
    """Launch on the current stream of ``device`` (no synchronisation; capture-safe once compiled)."""
    key = (launch.kind, launch.variant, launch.num_warps, device.index)
    plan = _plans.get(key)
    if plan is None:
        plan = _plans[key] = _compile(launch, device.index)
    args = [a.data_ptr() if isinstance(a, Tensor) else a for a in launch.args]
    plan.run(*launch.grid, raw_stream(device.index), plan.function, plan.packed_metadata, None, None, None,
             *args, *plan.constexprs)


# --------------------------------------------------------------------------- the calls' arguments

def _rows(x: Tensor) -> tuple[Tensor, int]:
    """``x [..., w]`` as ``[rows, w]`` with unit column stride (a view where possible), and its row stride."""
    rows = math.prod(x.shape[:-1])
    flat = x.reshape(rows, x.shape[-1])
    if x.shape[-1] and flat.stride(-1) != 1:
        flat = flat.contiguous()
    # one row (or none) is read at offset 0 whatever its stride: call it the width, which keeps alignment
    return flat, (flat.stride(0) if rows > 1 and x.shape[-1] else x.shape[-1])


def _aligned(x: Tensor, *counts: int) -> bool:
    """16-byte aligned start, and every count (row stride, widths) a multiple of 16 elements."""
    return x.data_ptr() % 16 == 0 and all(c % 16 == 0 for c in counts)


def _target_rows(target: Tensor | None, like: Tensor) -> tuple[Tensor, str]:
    """The target as ``[rows]``; without a target, a stand-in the kernel never reads."""
    if target is None:
        return like, "i64"
    return target.reshape(-1).contiguous(), TYPE_NAMES[target.dtype]  # an expanded target has stride 0


def local_launch(x: Tensor, target: Tensor | None, offset: int, with_logit_sum: bool, with_entropy: bool,
                 splits: int, chunk: int) -> tuple[Launch | None, Tensor]:
    """The local pass over ``x [..., w]`` (this rank's valid columns): ``(launch, partials [..., splits * K])``."""
    flat, row_stride = _rows(x)
    rows, width = flat.shape
    has_target = target is not None
    k = kernels.partial_words(has_target, with_logit_sum, with_entropy)
    partials = torch.empty(*x.shape[:-1], splits * k, dtype=torch.float32, device=x.device)
    if rows == 0:
        return None, partials
    targets, target_type = _target_rows(target, flat)
    block = kernels.local_block(chunk)
    variant = (TYPE_NAMES[x.dtype], target_type, has_target, with_logit_sum, with_entropy, block,
               _aligned(flat, row_stride, width))
    return Launch("local", variant, (rows, splits, 1), (flat, targets, partials, width, row_stride, offset, chunk),
                  kernels.local_stats_constexprs(has_target, with_logit_sum, with_entropy, block),
                  kernels.warps_for(block)), partials


def merge_launch(gathered: Tensor, widths, splits: int, chunk: int, has_target: bool, with_logit_sum: bool,
                 with_entropy: bool) -> tuple[Launch | None, tuple[Tensor, ...]]:
    """The merge of the exchanged ``[..., W * splits * K]`` partials: ``(launch, (shift, log_sum,
    target_logit, logit_sum, entropy))``, each ``[...]`` float32 (zeros for a statistic not asked for)."""
    lead = gathered.shape[:-1]
    stats = tuple(torch.empty(lead, dtype=torch.float32, device=gathered.device) for _ in range(5))
    rows = math.prod(lead)
    if rows == 0:
        return None, stats
    # the widths select code only for the logit sum (merge_constexprs): one variant for every band otherwise
    widths = tuple(int(w) for w in widths) if with_logit_sum else (0,) * len(widths)
    constexprs = kernels.merge_constexprs(widths, has_target, with_logit_sum, with_entropy)
    grid = (kernels.cdiv(rows, constexprs["BLOCK_T"]), 1, 1)
    return Launch("merge", (widths, has_target, with_logit_sum, with_entropy), grid,
                  (gathered.contiguous(), *stats, rows, splits, chunk), constexprs, 4), stats


def grad_launch(grad_log_sum, grad_target_logit, grad_logit_sum, grad_entropy, x: Tensor, target: Tensor | None,
                shift: Tensor, log_sum: Tensor, entropy: Tensor, width: int, offset: int) -> tuple[Launch | None, Tensor]:
    """The gradient of ``x [..., full width]`` whose first ``width`` columns are this rank's valid
    ones (the rest get 0): ``(launch, grad)``, grad contiguous in x's dtype."""
    flat, row_stride = _rows(x)
    rows, full_width = flat.shape
    grad = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if rows == 0 or full_width == 0:
        return None, grad
    with_target_logit = grad_target_logit is not None and target is not None
    targets, target_type = _target_rows(target if with_target_logit else None, flat)
    wanted = [g is not None for g in (grad_log_sum, grad_target_logit, grad_logit_sum, grad_entropy)]
    wanted[1] = with_target_logit
    # one float32 per row, contiguous (the gradient of a sum arrives expanded, with stride 0)
    upstream = [g.reshape(-1).float().contiguous() if used else flat
                for g, used in zip((grad_log_sum, grad_target_logit, grad_logit_sum, grad_entropy), wanted)]
    block = kernels.grad_block(full_width)
    variant = (TYPE_NAMES[x.dtype], target_type, *wanted, block, _aligned(flat, row_stride, width, full_width))
    stats = [t.reshape(-1).contiguous() for t in (shift, log_sum, entropy)]
    args = (flat, targets, *stats, *upstream, grad,
            width, full_width, row_stride, offset)
    return Launch("grad", variant, (rows, kernels.cdiv(full_width, block), 1), args,
                  kernels.local_grad_constexprs(*wanted, block), kernels.warps_for(block)), grad


def finish_launch(log_sum: Tensor, target_logit: Tensor, logit_sum: Tensor | None, target: Tensor, vocab: int,
                  ignore_index: int, mode: str, label_smoothing: float,
                  count: Tensor | None = None) -> tuple[Launch | None, Tensor]:
    """The loss (``mode``: a reduction of vocab_parallel_loss.REDUCTIONS) or the target's log-probabilities
    (``mode="logprobs"``) from the merged statistics, as ``finish_cross_entropy`` / ``finish_logprobs``
    compute them: ``(launch, result)``, result float32 shaped like ``target`` (a scalar for sum and mean).
    ``count`` (a float32 scalar): where the mean writes the number of rows not ignored."""
    code = kernels.LOGPROBS if mode == "logprobs" else kernels.REDUCTIONS[mode]
    per_row = code in (kernels.NONE, kernels.LOGPROBS)
    out = torch.empty(target.shape if per_row else (), dtype=torch.float32, device=target.device)
    targets, target_type = _target_rows(target, log_sum)
    rows = targets.numel()
    if per_row and rows == 0:
        return None, out
    smooth = code != kernels.LOGPROBS and label_smoothing > 0
    grid = (kernels.cdiv(rows, kernels.FINISH_BLOCK) if per_row else 1, 1, 1)
    sums = logit_sum.reshape(-1).contiguous() if smooth else log_sum
    if count is None:  # the mean writes its divisor somewhere: never over its result
        count = torch.empty((), dtype=torch.float32, device=out.device) if code == kernels.MEAN else out
    args = (log_sum.reshape(-1).contiguous(), target_logit.reshape(-1).contiguous(), sums, targets, out, count,
            rows, vocab, ignore_index, 1.0 - label_smoothing, float(label_smoothing))
    return Launch("finish", (target_type, code, smooth), grid, args, kernels.finish_constexprs(code, smooth), 4), out


def cross_entropy_grad_launch(grad_loss: Tensor, x: Tensor, target: Tensor, shift: Tensor, log_sum: Tensor,
                              count: Tensor | None, offset: int, vocab: int, ignore_index: int, reduction: str,
                              label_smoothing: float) -> tuple[Launch | None, Tensor]:
    """The gradient of the cross-entropy ``finish_launch`` computed, with respect to the slab ``x``
    (global columns from ``offset``): ``(launch, grad)``, grad contiguous in x's dtype.  ``grad_loss``
    is the loss's gradient ([rows] for ``reduction="none"``, a scalar otherwise); ``count`` the
    mean's divisor that the forward wrote."""
    flat, row_stride = _rows(x)
    rows, width = flat.shape
    grad = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if rows == 0 or width == 0:
        return None, grad
    code = kernels.REDUCTIONS[reduction]
    smooth = label_smoothing > 0
    targets, target_type = _target_rows(target, flat)
    upstream = grad_loss.reshape(-1).float().contiguous()  # [rows] or [1]; an expanded one has stride 0
    block = kernels.grad_block(width)
    variant = (TYPE_NAMES[x.dtype], target_type, code, smooth, block, _aligned(flat, row_stride, width))
    args = (flat, targets, shift.reshape(-1).contiguous(), log_sum.reshape(-1).contiguous(), upstream,
            upstream if count is None else count, grad, width, row_stride, offset, vocab, ignore_index,
            1.0 - label_smoothing, float(label_smoothing))
    return Launch("cross_entropy_grad", variant, (rows, kernels.cdiv(width, block), 1), args,
                  kernels.cross_entropy_grad_constexprs(code, smooth, block), kernels.warps_for(block)), grad


# --------------------------------------------------------------------------- the op's CUDA path


#: dispatch keys below Autograd whose kernels must see a call (functionalization, Python subclasses)
_BELOW_AUTOGRAD = torch._C.DispatchKeySet(torch._C.DispatchKey.Functionalize).add(
    torch._C.DispatchKey.Python).raw_repr()


def plain(*tensors: Tensor) -> bool:
    """No mode, subclass or functionalization would see the tensors' calls below Autograd: an eager
    call, which may run kernels directly (as all_gather_hidden.py's Autograd kernel decides too); a
    traced one (torch.compile, opcheck's fake tensors) must go through the ops."""
    return not torch._C._len_torch_dispatch_stack() and all(
        type(t) is Tensor and not torch._C._dispatch_keys(t).raw_repr() & _BELOW_AUTOGRAD for t in tensors)

def softmax_stats(x: Tensor, target: Tensor | None, offset: int, hidden_widths, group_name: str,
                  with_logit_sum: bool, with_entropy: bool) -> tuple[Tensor, ...]:
    """``tpfuse::softmax_stats_hidden``'s statistics for the slab ``x`` (this rank's valid columns,
    global columns from ``offset``; ``hidden_widths``: every rank's valid width)."""
    splits, chunk = kernels.split_plan(math.prod(x.shape[:-1]), max(hidden_widths))
    launch, partials = local_launch(x, target, offset, with_logit_sum, with_entropy, splits, chunk)
    if launch is not None:
        run(launch, x.device)
    words = partials.shape[-1]
    gathered = torch.ops.tpfuse.all_gather_hidden.default(partials, [words] * len(hidden_widths), group_name)
    launch, stats = merge_launch(gathered, hidden_widths, splits, chunk, target is not None, with_logit_sum,
                                 with_entropy)
    if launch is not None:
        run(launch, x.device)
    return stats


def local_grad(grad_log_sum, grad_target_logit, grad_logit_sum, grad_entropy, x, target, shift, log_sum, entropy,
               width: int, offset: int) -> Tensor:
    """``tpfuse::softmax_stats_hidden_backward`` for ``x`` (full width; its first ``width`` columns valid)."""
    launch, grad = grad_launch(grad_log_sum, grad_target_logit, grad_logit_sum, grad_entropy, x, target, shift,
                               log_sum, entropy, width, offset)
    if launch is not None:
        run(launch, x.device)
    return grad


def finish(log_sum, target_logit, logit_sum, target, vocab: int, ignore_index: int, mode: str,
           label_smoothing: float) -> Tensor:
    """One launch for what the composition does in about a dozen pointwise steps (``finish_launch``)."""
    launch, out = finish_launch(log_sum, target_logit, logit_sum, target, vocab, ignore_index, mode, label_smoothing)
    if launch is not None:
        run(launch, target.device)
    return out


def finish_and_count(log_sum, target_logit, logit_sum, target, vocab: int, ignore_index: int, reduction: str,
                     label_smoothing: float) -> tuple[Tensor, Tensor]:
    """The loss (one launch) and the mean's divisor, which its backward needs."""
    count = torch.empty((), dtype=torch.float32, device=target.device)
    launch, out = finish_launch(log_sum, target_logit, logit_sum, target, vocab, ignore_index, reduction,
                                label_smoothing, count)
    if launch is not None:
        run(launch, target.device)
    return out, count


def cross_entropy_grad(grad_loss, x, target, shift, log_sum, count, offset: int, vocab: int, ignore_index: int,
                       reduction: str, label_smoothing: float) -> Tensor:
    """The slab's gradient of the cross-entropy in one pass (``cross_entropy_grad_launch``)."""
    launch, grad = cross_entropy_grad_launch(grad_loss, x, target, shift, log_sum, count, offset, vocab, ignore_index,
                                             reduction, label_smoothing)
    if launch is not None:
        run(launch, x.device)
    return grad
