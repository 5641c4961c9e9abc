"""The fused LM head + local reduction (kernels/lm_head_reduce.py) compiled ahead of time for sm_90, no GPU needed.

Under the installed Triton and the GPU machines' Triton 3.6 (``TPFUSE_TRITON36_PATH``, as
tests/test_kernels_aot.py): every plan ``tile_plan`` picks for the benchmark's shapes compiles, its
GEMM runs on Hopper's warpgroup MMA with the operands streamed by 16-byte asynchronous copies where
aligned, fits one block per SM, and nothing in any of the kernels communicates (no atomic, no memory
fence):
each partial is written by one program, so the combine and the merges read the same bits every call.
"""

import pytest

import aot_lm_head_report as aot
import interpreter_support

pytest.importorskip("triton")


def _check(report):
    kernels = report["kernels"]
    tiles = {n: k for n, k in kernels.items() if n.startswith("tiles_")}
    assert len(tiles) == 12 and len(kernels) == 16, sorted(kernels)
    for name, k in kernels.items():
        ins = set(k["instructions"])
        assert k["cubin_bytes"] > 0 and k["shared_bytes"] <= 227 * 1024, (name, k["shared_bytes"])
        # (``fence.proxy.async`` orders a CTA's own shared-memory writes before its wgmma reads them: no peer)
        talks = [i for i in ins if i.startswith(("atom", "red.", "fence", "membar", "multimem"))
                 and not i.startswith("fence.proxy.async")]
        assert not talks, (name, talks)
        assert k["global_scratch_bytes"] == 0, name  # the launcher passes no scratch buffer
    for name, k in tiles.items():
        ins = set(k["instructions"])
        assert any(i.startswith("wgmma.mma_async") for i in ins), (name, ins)
        assert not any(i.startswith("mma.") for i in ins), (name, ins)
        if "unaligned" not in name:
            assert k["async_copies_16b"] > 0, name  # x and W tiles in 16-byte cp.async, pipelined
    # the plans the report compiled are tile_plan's: decode swapped, the 16-row plan narrowed where the
    # 128-column tiles leave the last wave a quarter full (w = 38016), prefill not swapped
    assert tiles["tiles_argmax_bf16_t1_w32064"]["plan"]["BLOCK_N"] == 128
    assert tiles["tiles_argmax_bf16_t1_w38016"]["plan"]["BLOCK_N"] == 64
    assert tiles["tiles_argmax_bf16_t32_w32064"]["plan"]["SWAP_AB"]
    assert not tiles["tiles_argmax_bf16_t4096_w32064"]["plan"]["SWAP_AB"]


def test_lm_head_kernels_compile_for_sm90_with_installed_triton():
    _check(aot.report())


def test_lm_head_kernels_compile_for_sm90_with_triton_36():
    _check(interpreter_support.triton36_report("aot_lm_head_report.py"))
