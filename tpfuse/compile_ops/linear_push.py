"""Host launcher of the fused column-linear + push kernel (kernels/linear_push.py).

Shares the group's workspace with the gather (same symmetric slots, signal
pads, status word and slot alternation), so a fused call and a gather on the
same group follow one sequence of slots and barriers on every rank.  Like
push.py it compiles each variant once and launches it through Triton's
compiled launcher.

Correct on 2 and 4 H200s (tests/gpu/test_linear_push.py); where it is faster than
cuBLAS + the gather: docs/benchmarks.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import config as settings
from . import workspace as workspaces
from .backend import Backend
from .groups import Group
from .failures import raise_if_failed

OP = "tpfuse::linear_all_gather_hidden"


@dataclass
class LinearPlan:
    run: object
    function: object
    packed_metadata: object
    constexpr_values: tuple
    config: dict
    multimem: bool
    scratch: torch.Tensor | None = None  # TMA descriptors, one per block (TMA configs only)
    shared_bytes: int = 0  # the compiled kernel's shared memory per block (for the config sweep's occupancy)
    registers: int = 0  # its registers per thread


def grid_cap(ws) -> int:
    """Blocks of the fused kernel: at most one per multiprocessor, so that every block is resident.

    The workspace's agreed cap holds ``TPFUSE_PUSH_BLOCKS_PER_SM`` blocks per
    SM (for the light gather kernel); a GEMM block with ~100 KB of shared
    memory may not fit twice, and a block that waits for its peers must never
    wait for a block that is not resident.  Agreed facts only: rank-invariant."""
    per_sm = settings.get("TPFUSE_PUSH_BLOCKS_PER_SM")
    return max(1, ws.facts.max_blocks // per_sm)


def _build(ws, dtype, k, hidden_widths, tokens, has_bias, skip_entry_sync, multimem, exit_sync, copy_out):
    from ..kernels import linear_push

    offsets = [0]
    for w in hidden_widths:
        offsets.append(offsets[-1] + w)
    config = linear_push.launch_config(tokens, k, hidden_widths, dtype.itemsize, multimem=multimem)
    source = linear_push.linear_source(str(dtype).removeprefix("torch."), ws.group.rank, tuple(offsets), k,
                                       config, has_bias, skip_entry_sync, multimem=multimem, exit_sync=exit_sync,
                                       copy_out=copy_out)
    with torch.cuda.device(ws.device):
        kernel = linear_push.compile_linear(source, config)
        run = kernel.run
    names = source.fn.arg_names
    constexprs = tuple(source.constants[(names.index(n),)] for n in names if source.signature[n] == "constexpr")
    scratch = None
    per_block = int(getattr(kernel.metadata, "global_scratch_size", 0) or 0)
    if per_block:  # the kernel builds its TMA descriptors here: one region per block, kept for CUDA graphs
        scratch = torch.empty(grid_cap(ws) * per_block, dtype=torch.uint8, device=ws.device)
    return LinearPlan(run, kernel.function, kernel.packed_metadata, constexprs, config, multimem, scratch,
                      int(kernel.metadata.shared), int(kernel.n_regs))


def _launch_with_scratch(plan, run_args):
    """Run ``launch`` with Triton's scratch allocator answering with the plan's own buffer.

    The launcher asks for ``blocks * per-block`` bytes at every launch; a fresh
    allocation would be freed right after (and, under CUDA-graph capture, reused
    by a later node of the graph), so the plan keeps one for its lifetime."""
    from triton.runtime import _allocation

    # TMA weight loads are a sweep option only (measured no faster; launch_config never picks
    # them), and the one user of this private Triton hook: fail clearly where it is missing.
    if not hasattr(getattr(_allocation, "_allocator", None), "set"):
        raise RuntimeError(f"{OP}: TMA weight loads (a sweep option) need Triton's scratch-allocator hook "
                           "(triton.runtime._allocation._allocator), which this Triton does not have")

    def allocator(size, align, stream):
        if size > plan.scratch.numel() or plan.scratch.data_ptr() % max(int(align), 1):
            raise RuntimeError(f"{OP}: TMA scratch of {size} bytes ({align}-byte aligned) requested; the plan "
                               f"keeps {plan.scratch.numel()} bytes at address {plan.scratch.data_ptr():#x}")
        return plan.scratch

    token = _allocation._allocator.set(allocator)
    try:
        plan.run(*run_args)
    finally:
        _allocation._allocator.reset(token)


def _config_key(tokens):
    """Launch configs depend on T only through BLOCK_M, BLOCK_N and whether T <= MID_TOKENS: bucket T
    so that a dynamic T compiles a handful of variants, not one per value (same on every rank).
    Up to T=128 a bucket's config is each of its T's own; every T > 128 runs the T=256 config
    (the rule never fuses there; tests/test_linear_launch_config.py)."""
    from ..kernels.linear_push import MID_TOKENS, next_pow2

    if 16 < tokens <= MID_TOKENS:
        return MID_TOKENS
    return min(next_pow2(max(tokens, 1)), 128) if tokens <= 128 else 256


def _aligned(t: torch.Tensor) -> torch.Tensor:
    if not t.is_contiguous():
        t = t.contiguous()
    return t.clone() if t.data_ptr() % 16 else t


def linear_gather_hidden(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    hidden_widths: list[int],
    group: Group,
    backend: Backend,
    slot: int = -1,
    skip_entry_sync: bool = False,
    zero_copy: bool = False,
    _exit_sync: bool = True,
) -> torch.Tensor:
    """``cat_r(linear(x, W_r, b_r))`` along the last axis, in one kernel per rank.

    Returns a fresh tensor the caller owns, or, with ``zero_copy`` (P2P; granted
    only by the barrier-elision pass, docs/barrier_elision.md §8), a view of the
    workspace slot, valid until the next call that uses the same slot."""
    device_index = x.device.index
    ws = workspaces.workspace(group, device_index)
    if not ws.facts.push_ok:
        raise RuntimeError(f"{OP}: the push path is unavailable on group {group.name!r}: {ws.facts.reason}")
    raise_if_failed(ws, OP)
    total = sum(hidden_widths)
    lead = x.shape[:-1]
    k = x.shape[-1]
    tokens = x.numel() // k if k else 0
    if tokens == 0:  # identical on every rank: every rank skips
        return torch.empty(*lead, total, dtype=x.dtype, device=x.device)
    multimem = backend == Backend.MULTIMEM
    copy_out = multimem or not zero_copy
    bucket = _config_key(tokens)
    key = ("linear", x.dtype, k, tuple(hidden_widths), bucket, bias is not None, bool(skip_entry_sync), multimem,
           _exit_sync, copy_out)
    plan = ws.plans.get(key)
    if plan is None:
        plan = ws.plans[key] = _build(ws, x.dtype, k, hidden_widths, bucket, bias is not None, skip_entry_sync,
                                      multimem, _exit_sync, copy_out)
    workspaces.ensure_capacity(ws, tokens * total * x.element_size())
    # The kernel reads 16-byte vectors of rows: strided or misaligned operands are copied first
    # (a local fact; the grid and the config do not change).
    x, weight = _aligned(x.reshape(tokens, k)), _aligned(weight)
    bias_ptr = 0
    if bias is not None:
        bias = bias.contiguous()
        bias_ptr = bias.data_ptr()
    # Grid: the widest band's tiles (a pure function of T, K, the widths), capped by agreed facts.
    block_m, block_n = plan.config["BLOCK_M"], plan.config["BLOCK_N"]
    tiles = -(-tokens // block_m) * -(-max(hidden_widths) // block_n)
    nblocks = max(1, min(grid_cap(ws), tiles))
    with ws.order.lock:  # this call's place in the group's host order, its slot and its launch are one step
        stream, call = ws.order.next_call(device_index)
        slot = workspaces.take_slot(ws, slot)
        elems = ws.slot_bytes // x.element_size()
        if copy_out:
            out = torch.empty(*lead, total, dtype=x.dtype, device=x.device)
        else:  # zero-copy: our tiles and the peers' land in the slot, which is the result
            out = ws.buffer.view(x.dtype)[slot * elems: slot * elems + tokens * total].view(*lead, total)
        args = (x.data_ptr(), weight.data_ptr(), bias_ptr, out.data_ptr(), slot * elems, ws.status_ptr, tokens,
                ws.timeout_ns, call)
        if multimem:
            args += (ws.multicast_ptr,)
        run_args = (nblocks, 1, 1, stream, plan.function, plan.packed_metadata, None, None, None,
                    *args, *ws.pointer_args, *plan.constexpr_values)
        if plan.scratch is None:
            plan.run(*run_args)
        else:
            _launch_with_scratch(plan, run_args)
    return out
