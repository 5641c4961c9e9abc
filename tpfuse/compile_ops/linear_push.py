"""The fused column-linear + push (kernels/linear_push.py) on the host: its one launcher.

The fused kernel runs the barrier protocol: it shares the group's workspace with the
gather (the same slots, signal pads, status word and slot alternation,
barrier/slots.py), so a fused call and a gather on the same group follow one
sequence of slots and barriers on every rank.  The barrier backends
(barrier/backends.py, ``prepare_linear``) are its one entry from the op: they ask
linear_decision.py whether the call fuses, then call ``launcher``; the tests and
benchmarks call ``linear_gather_hidden`` (the same launcher, without the decision).

Here, in this order: the plan a call runs (``plan_for``: its token bucket, then, once
per variant, the kernel module's launch config, source and compiled kernel), the grid,
and the launch.  Like every push launcher it compiles each variant once and launches
it through Triton's compiled launcher.

Correct on 2 and 4 H200s (tests/gpu/test_linear_push.py); where it is faster than
cuBLAS + the gather: docs/benchmarks.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import config as settings
from ..kernels import compiler
from ..kernels import linear_push as kernel
from . import workspace as workspaces
from .barrier.slots import ensure_capacity, take_slot
from .compiled import Compiled, compile_for
from .failures import raise_if_failed

OP = "tpfuse::linear_all_gather_hidden"


# --------------------------------------------------------------------------- the plan a call runs


@dataclass
class LinearPlan:
    compiled: Compiled
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


def token_bucket(tokens):
    """Launch configs depend on T only through BLOCK_M, BLOCK_N and whether T <= MID_TOKENS: bucket T
    so that a dynamic T compiles a handful of variants, not one per value (same on every rank).
    Up to T=128 a bucket's config is each of its T's own; every T > 128 runs the T=256 config
    (the rule never fuses there; tests/test_linear_launch_config.py)."""
    if 16 < tokens <= kernel.MID_TOKENS:
        return kernel.MID_TOKENS
    return min(kernel.next_pow2(max(tokens, 1)), 128) if tokens <= 128 else 256


def plan_for(ws, dtype, k, hidden_widths, tokens, has_bias, skip_entry_sync, multimem, exit_sync, copy_out,
             cap) -> LinearPlan:
    """The compiled variant that runs ``tokens`` rows: one per token bucket and set of options, kept in the
    workspace and built on first use.  ``cap``: the grid's cap (the TMA scratch holds one region per block)."""
    bucket = token_bucket(tokens)
    key = ("linear", dtype, k, tuple(hidden_widths), bucket, has_bias, bool(skip_entry_sync), multimem, exit_sync,
           copy_out)
    plan = ws.plans.get(key)
    if plan is None:
        plan = ws.plans[key] = _build(ws, dtype, k, hidden_widths, bucket, has_bias, skip_entry_sync, multimem,
                                      exit_sync, copy_out, cap)
    return plan


def _build(ws, dtype, k, hidden_widths, bucket, has_bias, skip_entry_sync, multimem, exit_sync, copy_out, cap):
    """The kernel module's launch config for ``bucket`` rows, its source and its compiled kernel, in one step."""
    config = kernel.launch_config(bucket, k, hidden_widths, dtype.itemsize, multimem=multimem)
    offsets = compiler.band_offsets(hidden_widths)
    source = kernel.linear_source(str(dtype).removeprefix("torch."), ws.group.rank, offsets, k, config,
                                  has_bias, skip_entry_sync, multimem=multimem, exit_sync=exit_sync,
                                  copy_out=copy_out)
    compiled = compile_for(ws.device, source, lambda src: compiler.compile_source(
        src, num_warps=config["num_warps"], num_stages=config["num_stages"]))
    binary, scratch = compiled.kernel, None
    per_block = int(getattr(binary.metadata, "global_scratch_size", 0) or 0)
    if per_block:  # the kernel builds its TMA descriptors here: one region per block, kept for CUDA graphs
        scratch = torch.empty(cap * per_block, dtype=torch.uint8, device=ws.device)
    return LinearPlan(compiled, config, multimem, scratch, int(binary.metadata.shared), int(binary.n_regs))


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
        plan.compiled.run(*run_args)
    finally:
        _allocation._allocator.reset(token)


# --------------------------------------------------------------------------- launching


def launcher(ws, x, weight, bias, hidden_widths, multimem=False, slot=-1, skip_entry_sync=False, zero_copy=False,
             exit_sync=True):
    """The launcher ``launch(x, weight, bias) -> result`` of the fused kernel for calls shaped like these.

    ``cat_r(linear(x, W_r, b_r))`` along the last axis, in one kernel per rank: a fresh tensor the
    caller owns, or, with ``zero_copy`` (P2P; granted only by the barrier-elision pass,
    docs/barrier_elision.md §8), a view of the workspace slot, valid until the next call that
    uses the same slot.  ``exit_sync=False`` is for the floor diagnostics only (racy)."""
    total, lead, k = sum(hidden_widths), tuple(x.shape[:-1]), x.shape[-1]
    tokens, device_index, order = x.numel() // k if k else 0, x.device.index, ws.order
    if tokens == 0:  # identical on every rank: every rank skips
        return lambda x, weight, bias: torch.empty(*lead, total, dtype=x.dtype, device=x.device)
    copy_out = multimem or not zero_copy  # the multicast kernel always copies out
    cap = grid_cap(ws)
    plan = plan_for(ws, x.dtype, k, hidden_widths, tokens, bias is not None, skip_entry_sync, multimem, exit_sync,
                    copy_out, cap)
    slots = ensure_capacity(ws, tokens * total * x.element_size())
    # Grid: the widest band's tiles (a pure function of T, K, the widths), capped by agreed facts.
    block_m, block_n = plan.config["BLOCK_M"], plan.config["BLOCK_N"]
    tiles = -(-tokens // block_m) * -(-max(hidden_widths) // block_n)
    head = (max(1, min(cap, tiles)), 1, 1)
    middle = (plan.compiled.function, plan.compiled.packed_metadata, None, None, None)

    def launch(x, weight, bias):
        if ws.status_view[0]:
            raise_if_failed(ws, OP)
        # The kernel reads 16-byte vectors of rows: strided or misaligned operands are copied first
        # (a local fact; the grid and the config do not change).
        x, weight = x.reshape(tokens, k).contiguous(), weight.contiguous()
        if x.data_ptr() % 16:
            x = x.clone()
        if weight.data_ptr() % 16:
            weight = weight.clone()
        bias_ptr = 0
        if bias is not None:
            bias = bias.contiguous()
            bias_ptr = bias.data_ptr()
        with order.lock:  # this call's place in the group's host order, its slot and its launch are one step
            stream, call = order.next_call(device_index)
            chosen_slot = take_slot(slots, slot)
            elems = slots.slot_bytes // x.element_size()
            if copy_out:
                out = torch.empty(*lead, total, dtype=x.dtype, device=x.device)
            else:  # zero-copy: our tiles and the peers' land in the slot, which is the result
                out = slots.buffer.view(x.dtype)[chosen_slot * elems: chosen_slot * elems + tokens * total]
                out = out.view(*lead, total)
            args = (x.data_ptr(), weight.data_ptr(), bias_ptr, out.data_ptr(), chosen_slot * elems, ws.status_ptr,
                    tokens, ws.timeout_ns, call)
            if multimem:
                args += (slots.multicast_ptr,)
            run_args = (*head, stream, *middle, *args, *slots.pointer_args, *plan.compiled.constexprs)
            if plan.scratch is None:
                plan.compiled.run(*run_args)
            else:
                _launch_with_scratch(plan, run_args)
        return out

    return launch


def linear_gather_hidden(x, weight, bias, hidden_widths, group, slot=-1, skip_entry_sync=False, zero_copy=False,
                         multimem=False, exit_sync=True):
    """The fused kernel run directly (tests, benchmarks): the op's launcher, without asking linear_decision.py."""
    ws = workspaces.usable_workspace(group, x.device.index, OP)
    return launcher(ws, x, weight, bias, hidden_widths, multimem, slot, skip_entry_sync, zero_copy,
                    exit_sync)(x, weight, bias)
