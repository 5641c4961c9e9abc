"""The exact reductions over a split hidden axis on CUDA: Triton kernels instead of the torch composition.

``reduce_hidden.py``'s ops call ``max_hidden`` / ``topk_hidden`` here for CUDA tensors; their torch
composition stays the reference (and the CPU path).  A call is three launches
(docs/op.md, "Reductions without the gather"):

1. the local kernel (``kernels/vocab_reduce.py``) writes this rank's partials, ``[..., 2·S·k]``
   int32 words: for each of S chunks of the row its first best candidate (or its first k) as
   ``[value bits, global index]``;
2. ``tpfuse::all_gather_hidden`` exchanges them (every rank gets every rank's, in rank order);
3. the merge kernel writes the values (x's dtype, the winner's own bits) and int64 indices.

S is planned from rank-invariant facts only (T, the widest rank's valid width, the dtype's size,
k; ``vocab_reduce.chunk_plan``), so every rank sends the same number of words.

Per call: no host synchronisation, every tensor from the caching allocator (CUDA-graph capture
takes them into its pool), each kernel variant compiled once per device and launched through
Triton's compiled launcher (no JIT binder, no argument specialisation per call).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..kernels import vocab_reduce
from .groups import Group
from .program_order import raw_stream

#: the largest k the top-k kernels take; the op keeps the torch composition above it
MAX_TOPK = vocab_reduce.MAX_TOPK

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_INT_OF_SIZE = {2: torch.int16, 4: torch.int32}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_INT_OF_SIZE[t.element_size()])


@dataclass(frozen=True)
class _Kernel:
    """One compiled variant and what its launch needs besides the per-call arguments."""

    run: object
    function: object
    packed_metadata: object
    constexprs: tuple


_kernels: dict = {}


def _compiled(key, source_of, device_index: int) -> _Kernel:
    kernel = _kernels.get((key, device_index))
    if kernel is None:
        source = source_of()
        with torch.cuda.device(device_index):
            compiled = vocab_reduce.compile_source(source)
            run = compiled.run  # loads the module on this device
        names = source.fn.arg_names
        constexprs = tuple(source.constants[(names.index(n),)] for n in names if source.signature[n] == "constexpr")
        kernel = _kernels[(key, device_index)] = _Kernel(run, compiled.function, compiled.packed_metadata,
                                                         constexprs)
    return kernel


def _launch(kernel: _Kernel, grid: tuple[int, int], device_index: int, tensors: tuple, scalars: tuple) -> None:
    """One launch on the current stream: ``tensors`` (their addresses), then ``scalars``, as the kernel lists them."""
    if torch.cuda.current_device() != device_index:  # the function belongs to this device's context
        with torch.cuda.device(device_index):
            return _launch(kernel, grid, device_index, tensors, scalars)
    kernel.run(grid[0], grid[1], 1, raw_stream(device_index), kernel.function, kernel.packed_metadata,
               None, None, None, *(t.data_ptr() for t in tensors), *scalars, *kernel.constexprs)


def local_partials(local: torch.Tensor, offset: int, widest: int, largest: bool,
                   k: int | None = None) -> torch.Tensor:
    """This rank's candidates ``[..., 2·S·k]`` (int32 words) for its valid slab ``local``.

    ``offset``: the global index of ``local``'s column 0; ``widest``: the most valid columns any
    rank holds (the same on every rank); ``k`` None: max/min, else the first k."""
    lead, width = local.shape[:-1], local.shape[-1]
    tokens = math.prod(lead)
    chunks, tiles_per_chunk = vocab_reduce.chunk_plan(tokens, widest, local.element_size(), k or 1)
    partials = torch.empty(*lead, 2 * chunks * (k or 1), dtype=torch.int32, device=local.device)
    if tokens == 0:
        return partials
    rows = local.reshape(tokens, width)
    if width > 1 and rows.stride(1) != 1:
        rows = rows.contiguous()
    # 16-byte loads need an aligned row start; a single row passes stride 0 (nothing to align)
    row_stride = rows.stride(0) if tokens > 1 else 0
    aligned = rows.data_ptr() % 16 == 0 and row_stride % 16 == 0
    name = _DTYPE_NAMES[local.dtype]
    device_index = local.device.index
    kernel = _compiled(("local", name, largest, k, aligned),
                       lambda: vocab_reduce.local_source(name, largest, k, aligned), device_index)
    # the kernels read and write bits: integer views of the same memory
    _launch(kernel, (tokens, chunks), device_index, (_bits(rows), partials.view(torch.int64)),
            (row_stride, width, offset, tiles_per_chunk))
    return partials


def merge(gathered: torch.Tensor, dtype: torch.dtype, largest: bool, k: int | None = None):
    """Every rank's candidates ``[..., W·words]`` (rank order) -> (values ``[...]`` or ``[..., k]``, int64 indices)."""
    lead = gathered.shape[:-1]
    tokens = math.prod(lead)
    shape = lead if k is None else (*lead, k)
    values = torch.empty(shape, dtype=dtype, device=gathered.device)
    indices = torch.empty(shape, dtype=torch.int64, device=gathered.device)
    if tokens == 0:
        return values, indices
    words = gathered.reshape(tokens, gathered.shape[-1])
    if not words.is_contiguous():
        words = words.contiguous()
    name = _DTYPE_NAMES[dtype]
    device_index = gathered.device.index
    kernel = _compiled(("merge", name, largest, k), lambda: vocab_reduce.merge_source(name, largest, k), device_index)
    _launch(kernel, (tokens, 1), device_index, (words.view(torch.int64), _bits(values), indices),
            (words.shape[-1] // 2,))
    return values, indices


def _reduce(local, offset, widest, group: Group, largest, k):
    partials = local_partials(local, offset, widest, largest, k)
    gathered = torch.ops.tpfuse.all_gather_hidden.default(
        partials, [partials.shape[-1]] * group.world_size, group.name)
    return merge(gathered, local.dtype, largest, k)


def max_hidden(local: torch.Tensor, offset: int, widest: int, group: Group, largest: bool):
    """``torch.max`` (``torch.min``) over the gathered valid columns: (values, int64 indices)."""
    return _reduce(local, offset, widest, group, largest, None)


def topk_hidden(local: torch.Tensor, k: int, offset: int, widest: int, group: Group, largest: bool):
    """The first k of the gathered valid columns (torch.topk's values, equal values by index)."""
    return _reduce(local, offset, widest, group, largest, k)
