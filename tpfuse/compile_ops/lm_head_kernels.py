"""Host launcher of the fused LM head + local reduction (kernels/lm_head_reduce.py).

Each rank holds ``x [..., H]`` and its weight slab ``W_r [w, H]`` (nn.Linear's layout), whose
logits ``x @ W_r^T`` are the global columns ``[offset, offset + w)``.  Where gather elimination
would run the linear, then the local kernel of the reduction on the logits slab, these return the
same partials from one GEMM whose epilogue reduces (two launches: the tiles, then a per-row
combine), and the logits are never written:

- ``argmax_partials``: ``[..., 2]`` int32, one candidate per row (value bits, global index), the
  format of reduce_kernels.local_partials with S = 1; every rank's, concatenated in rank order,
  go to ``reduce_kernels.merge(gathered, x.dtype, largest=True)``;
- ``softmax_partials``: ``[..., K]`` float32 (``m``, ``s``, the target's logit), the format of
  softmax_kernels.local_launch with ``splits = 1``; they go to
  ``softmax_kernels.merge_launch(gathered, widths, 1, max(widths), has_target, False, False)``.

Not wired into any pass: a measurement decides (benchmarks/bench_lm_head_fusion.py).

Per call, as softmax_kernels.py: nothing reads the device (no host synchronisation, capture-safe once
compiled), each variant compiled once per device and launched through Triton's compiled launcher.
What a launch needs is built by ``*_launch`` functions as a ``Launch``, which
tests/interpret_lm_head_reduce.py runs in Triton's interpreter, so the host's arithmetic (tiles,
strides, alignment) is tested on the CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..kernels import lm_head_reduce as kernels
from .compiled import Compiled, compile_for
from .program_order import raw_stream

DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}
TARGET_TYPE_NAMES = {torch.int64: "i64", torch.int32: "i32"}
#: the partials carry int32 global indices
MAX_INDEX = 2**31 - 1

_KERNELS = {"tiles": kernels.lm_head_tiles_kernel, "combine_best": kernels.combine_best_kernel,
            "combine_stats": kernels.combine_stats_kernel}


def _tiles_source(dtype_name, target_type, mode, has_target, plan_items, even_k, aligned):
    return kernels.tiles_source(dtype_name, target_type, mode, has_target, dict(plan_items), even_k, aligned)


_SOURCES = {"tiles": _tiles_source, "combine_best": kernels.combine_best_source,
            "combine_stats": kernels.combine_stats_source}


@dataclass(frozen=True)
class Launch:
    """One kernel call: ``kind``, the arguments of its ``*_source`` function (the variant), the grid,
    the runtime arguments in the kernel's order (tensors where it takes pointers), its constexprs,
    warps and stages."""

    kind: str
    variant: tuple
    grid: tuple
    args: tuple
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 3

    @property
    def kernel(self):
        return _KERNELS[self.kind]


#: compiled variants: (kind, variant, warps, stages, device index) -> Compiled
_compiled: dict = {}


def _compile(launch: Launch, device_index: int) -> Compiled:
    def compile_variant(source):
        return kernels.compile_source(source, num_warps=launch.num_warps, num_stages=launch.num_stages)

    return compile_for(device_index, _SOURCES[launch.kind](*launch.variant), compile_variant)


def run(launch: Launch | None, device: torch.device) -> None:
    """Launch on the current stream of ``device`` (no synchronisation; capture-safe once compiled)."""
    if launch is None:
        return
    key = (launch.kind, launch.variant, launch.num_warps, launch.num_stages, device.index)
    compiled = _compiled.get(key)
    if compiled is None:
        compiled = _compiled[key] = _compile(launch, device.index)
    if torch.cuda.current_device() != device.index:  # the function belongs to that device's context
        with torch.cuda.device(device.index):
            return run(launch, device)
    args = [a.data_ptr() if isinstance(a, Tensor) else a for a in launch.args]
    compiled.run(*launch.grid, raw_stream(device.index), compiled.function, compiled.packed_metadata, None, None,
                 None, *args, *compiled.constexprs)


# --------------------------------------------------------------------------- validation


def _describe(t) -> str:
    return f"{tuple(t.shape)} {t.dtype} on {t.device}" if isinstance(t, Tensor) else type(t).__name__


def check_inputs(x, weight, offset, target=None, plan=None, need_cuda: bool = True) -> None:
    """Raise with what was wrong and what is accepted; reads no device memory."""
    if not isinstance(x, Tensor) or not isinstance(weight, Tensor):
        raise TypeError(f"x and weight must be tensors; got x {_describe(x)}, weight {_describe(weight)}")
    if x.dtype not in DTYPE_NAMES or weight.dtype != x.dtype:
        raise TypeError(f"the fused LM head takes x and weight of one dtype, torch.bfloat16 or torch.float16; "
                        f"got x {x.dtype}, weight {weight.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be this rank's 2-D slab [vocab columns, hidden] (nn.Linear's layout); "
                         f"got shape {tuple(weight.shape)}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x's last dimension (hidden) must equal weight's second, {weight.shape[1]}; "
                         f"got x of shape {tuple(x.shape)} and weight of shape {tuple(weight.shape)}")
    if weight.shape[1] > 1 and weight.stride(1) != 1:
        raise ValueError(f"weight must be contiguous along hidden (stride 1, as nn.Linear stores it), so that "
                         f"it streams once and is not copied per call; got strides {tuple(weight.stride())}")
    if need_cuda and (x.device.type != "cuda" or weight.device != x.device):
        raise ValueError(f"x and weight must be CUDA tensors on one device; got x on {x.device}, "
                         f"weight on {weight.device}")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset (the global index of the slab's first column) must be an int >= 0; "
                         f"got {offset!r}")
    if offset + weight.shape[0] > MAX_INDEX or weight.shape[1] > MAX_INDEX:
        raise ValueError(f"offset + the slab's columns must be at most 2**31 - 1 (the partials carry int32 "
                         f"global indices) and hidden below 2**31; got offset {offset}, weight "
                         f"{tuple(weight.shape)}")
    if target is not None:
        if (not isinstance(target, Tensor) or target.dtype not in TARGET_TYPE_NAMES
                or tuple(target.shape) != tuple(x.shape[:-1]) or target.device != x.device):
            raise ValueError(f"target must hold one class index per row of x: shape {tuple(x.shape[:-1])}, "
                             f"int64 or int32, on {x.device}; got {_describe(target)}")
    if plan is not None:
        kernels.check_plan(plan)


# --------------------------------------------------------------------------- the launches' arguments


def _rows(x: Tensor) -> tuple[Tensor, int]:
    """``x [..., H]`` as ``[rows, H]`` with unit column stride, and its row stride (one row: H, whatever
    its stride, since only offset 0 is read: keeps it aligned)."""
    rows = math.prod(x.shape[:-1])
    flat = x.reshape(rows, x.shape[-1])
    if x.shape[-1] > 1 and flat.stride(-1) != 1:
        flat = flat.contiguous()
    return flat, (flat.stride(0) if rows > 1 else x.shape[-1])


def _weight_stride(weight: Tensor) -> int:
    return weight.stride(0) if weight.shape[0] > 1 else weight.shape[1]


def _aligned(*pointers_and_counts) -> bool:
    """16-byte aligned tensors and counts (strides, hidden) that are multiples of 16 elements."""
    return all(v.data_ptr() % 16 == 0 if isinstance(v, Tensor) else v % 16 == 0 for v in pointers_and_counts)


def tiles_launch(x: Tensor, weight: Tensor, offset: int, mode: int, target: Tensor | None = None,
                 plan: dict | None = None) -> tuple[Launch | None, Tensor, int]:
    """The GEMM with the reduction in its epilogue: ``(launch, tile partials, n_tiles)``; tile partials
    ``[rows, n_tiles]`` int64 (ARGMAX) or ``[rows, n_tiles, K]`` float32 (SOFTMAX)."""
    flat, x_stride = _rows(x)
    tokens, hidden = flat.shape
    width = weight.shape[0]
    plan = plan or kernels.tile_plan(tokens, width)
    has_target = mode == kernels.SOFTMAX and target is not None
    words = kernels.partial_words(mode, has_target)
    m_tiles, n_tiles = kernels.cdiv(tokens, plan["BLOCK_M"]), kernels.cdiv(width, plan["BLOCK_N"])
    shape = (tokens, n_tiles) if mode == kernels.ARGMAX else (tokens, n_tiles, words)
    tiles = torch.empty(shape, dtype=torch.int64 if mode == kernels.ARGMAX else torch.float32, device=x.device)
    if tokens == 0 or n_tiles == 0:
        return None, tiles, n_tiles
    targets = target.reshape(-1).contiguous() if has_target else flat  # a stand-in the kernel never reads
    target_type = kernels.TARGET_TYPES[0] if not has_target else TARGET_TYPE_NAMES[target.dtype]
    w_stride = _weight_stride(weight)
    even_k = hidden % plan["BLOCK_K"] == 0
    aligned = _aligned(flat, weight, x_stride, w_stride, hidden)
    name = DTYPE_NAMES[x.dtype]
    plan_items = tuple(sorted((k, plan[k]) for k in kernels.PLAN_KEYS))
    variant = (name, target_type, mode, has_target, plan_items, even_k, aligned)
    args = (flat, weight, targets, tiles, tokens, width, hidden, x_stride, w_stride, offset, m_tiles, n_tiles)
    return Launch("tiles", variant, (m_tiles * n_tiles, 1, 1), args,
                  kernels.tiles_constexprs(name, mode, has_target, plan, even_k), plan["num_warps"],
                  plan["num_stages"]), tiles, n_tiles


def combine_launch(tiles: Tensor, n_tiles: int, mode: int, dtype: torch.dtype, has_target: bool,
                   lead: tuple) -> tuple[Launch | None, Tensor]:
    """The per-row combine of the tile partials: ``(launch, partials)``, ``[*lead, 2]`` int32 (ARGMAX: one
    int64 candidate word per row) or ``[*lead, K]`` float32 (SOFTMAX)."""
    tokens = math.prod(lead)
    if mode == kernels.ARGMAX:
        partials = torch.empty(*lead, 2, dtype=torch.int32, device=tiles.device)
        if tokens == 0:
            return None, partials
        name = DTYPE_NAMES[dtype]
        return Launch("combine_best", (name,), (tokens, 1, 1), (tiles, partials.view(torch.int64), n_tiles),
                      kernels.combine_best_constexprs(name)), partials
    partials = torch.empty(*lead, kernels.partial_words(mode, has_target), dtype=torch.float32, device=tiles.device)
    if tokens == 0:
        return None, partials
    return Launch("combine_stats", (has_target,), (tokens, 1, 1), (tiles, partials, n_tiles),
                  kernels.combine_stats_constexprs(has_target)), partials


def launches(x: Tensor, weight: Tensor, offset: int, mode: int, target: Tensor | None = None,
             plan: dict | None = None) -> tuple[list, Tensor]:
    """Both launches of one call, in order, and the partials the second writes."""
    tile_launch, tiles, n_tiles = tiles_launch(x, weight, offset, mode, target, plan)
    has_target = mode == kernels.SOFTMAX and target is not None
    combine, partials = combine_launch(tiles, n_tiles, mode, x.dtype, has_target, tuple(x.shape[:-1]))
    return [tile_launch, combine], partials


# --------------------------------------------------------------------------- the calls


def argmax_partials(x: Tensor, weight: Tensor, offset: int = 0, plan: dict | None = None) -> Tensor:
    """This rank's argmax partial of ``x @ weight^T`` (logits in x's dtype): ``[..., 2]`` int32, the first
    maximal element of each row (the first NaN before any number) as ``[value bits, global index]``
    (a 16-bit value sign-extended), exactly what reduce_kernels.local_partials writes with S = 1.
    ``offset``: the global index of ``weight``'s row 0 (the slab's first logit column); ``plan``: a
    tile plan to use instead of ``lm_head_reduce.tile_plan``'s (benchmarks)."""
    check_inputs(x, weight, offset, None, plan)
    steps, partials = launches(x, weight, offset, kernels.ARGMAX, None, plan)
    for launch in steps:
        run(launch, x.device)
    return partials


def softmax_partials(x: Tensor, weight: Tensor, offset: int = 0, target: Tensor | None = None,
                     plan: dict | None = None) -> Tensor:
    """This rank's softmax partial of ``x @ weight^T``: ``[..., K]`` float32, ``m`` (the row's max; NaN
    where it holds a NaN), ``s = sum exp(x - shift(m))`` and, with ``target`` (global class indices,
    shape ``x.shape[:-1]``), the target's logit where this slab holds it, else 0: the words of
    softmax_kernels.local_launch with ``splits = 1`` (no logit sum, no entropy)."""
    check_inputs(x, weight, offset, target, plan)
    steps, partials = launches(x, weight, offset, kernels.SOFTMAX, target, plan)
    for launch in steps:
        run(launch, x.device)
    return partials
