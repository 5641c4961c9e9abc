"""Compile the fused LM head + local reduction (kernels/lm_head_reduce.py) ahead of time for sm_90 and report its PTX.

Runs without torch (``python tests/aot_lm_head_report.py --no-torch`` prints JSON), so that
tests/test_lm_head_aot.py can run it under the GPU machines' Triton 3.6 as well as the installed one.
The variants are the ones compile_ops/lm_head_kernels.py compiles for the benchmark's shapes: every
plan ``tile_plan`` picks (decode's swapped tiles, both widths; prefill's), both modes, a target of
either type, bf16 and fp16, aligned or not, a hidden size that is not a multiple of BLOCK_K.
"""

import json
import os
import re
import sys
import types

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: the memory and MMA instructions the checks read (as tests/aot_kernels_report.py collects them)
_INSTRUCTIONS = re.compile(r"\b((?:st|ld|red|atom|fence|membar|multimem|mma|wgmma|cp\.async\.bulk\.tensor)\.[\w.:]+)")
#: a 16-byte asynchronous copy from global to shared memory (the software pipeline's operand loads)
_ASYNC_COPY_16B = re.compile(r"cp\.async\.cg\.shared\.global[\w.:]*\s[^;]*,\s*0x10\b")


def _import_kernels():
    """kernels/lm_head_reduce.py without running tpfuse/__init__.py, which imports torch."""
    if "tpfuse" not in sys.modules:
        package = types.ModuleType("tpfuse")
        package.__path__ = [os.path.join(REPO, "tpfuse")]
        sys.modules["tpfuse"] = package
    from tpfuse.kernels import lm_head_reduce

    return lm_head_reduce


def _plans(lm):
    return {f"t{tokens}_w{width}": (tokens, width, lm.tile_plan(tokens, width))
            for tokens, width in ((1, 32064), (1, 38016), (32, 32064), (128, 64128), (4096, 32064))}


def report():
    import triton
    from triton.backends.compiler import GPUTarget

    lm = _import_kernels()

    target = GPUTarget("cuda", 90, 32)
    out = {"triton": triton.__version__, "torch_imported": sys.modules.get("torch") is not None, "kernels": {}}

    def record(name, source, num_warps=4, num_stages=3, plan=None):
        kernel = lm.compile_source(source, target=target, num_warps=num_warps, num_stages=num_stages)
        ptx = kernel.asm["ptx"]
        out["kernels"][name] = {"instructions": sorted(set(_INSTRUCTIONS.findall(ptx))),
                                "async_copies_16b": len(_ASYNC_COPY_16B.findall(ptx)),
                                "cubin_bytes": len(kernel.asm["cubin"]),
                                "shared_bytes": int(getattr(kernel.metadata, "shared", 0)),
                                "global_scratch_bytes": int(getattr(kernel.metadata, "global_scratch_size", 0) or 0),
                                "plan": plan}

    for label, (tokens, width, plan) in _plans(lm).items():
        for mode_name, mode in lm.MODES.items():
            has_target = mode == lm.SOFTMAX
            source = lm.tiles_source("bfloat16", "i64", mode, has_target, plan, True, True)
            record(f"tiles_{mode_name}_bf16_{label}", source, plan["num_warps"], plan["num_stages"], plan)
    decode = lm.tile_plan(8, 32064)
    record("tiles_argmax_fp16_unaligned_odd_hidden", lm.tiles_source("float16", "i64", lm.ARGMAX, False, decode,
                                                                     False, False), decode["num_warps"],
           decode["num_stages"], decode)
    record("tiles_softmax_fp16_i32_no_target", lm.tiles_source("float16", "i32", lm.SOFTMAX, False, decode, True,
                                                               True), decode["num_warps"], decode["num_stages"], decode)
    record("combine_best_bf16", lm.combine_best_source("bfloat16"))
    record("combine_best_fp16", lm.combine_best_source("float16"))
    record("combine_stats_target", lm.combine_stats_source(True))
    record("combine_stats_no_target", lm.combine_stats_source(False))
    return out


if __name__ == "__main__":
    if "--no-torch" in sys.argv:
        sys.modules["torch"] = None  # prove the kernels compile without torch
    print(json.dumps(report()))
