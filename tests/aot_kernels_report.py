"""Compile the push kernels ahead of time for sm_90 and report what their PTX holds.

Runs without torch (``python tests/aot_kernels_report.py`` prints JSON), so CI
can run it under the GPU machines' Triton as well as the installed one
(``PYTHONPATH=$TPFUSE_TRITON36_PATH``).  Imported by tests/test_kernels_aot.py.
"""

import json
import os
import re
import sys
import types

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (name, elem_size, rank, band_offsets, vec, skip_entry_sync, copy_out)
P2P_CONFIGS = [
    ("bf16_w4_even", 2, 1, (0, 4096, 8192, 12288, 16384), 8, False, True),
    ("bf16_w2_uneven_skip", 2, 0, (0, 1024, 3072), 8, True, True),
    ("fp32_w4_width1001", 4, 3, (0, 1001, 2002, 3003, 4004), 1, False, True),
    ("fp16_w4_width1000", 2, 2, (0, 1000, 2000, 3000, 4000), 8, False, True),
    ("i8_w8_1792", 1, 5, tuple(1792 * i for i in range(9)), 16, False, True),
    ("bf16_w4_zero_copy", 2, 0, (0, 1792, 3584, 5376, 7168), 8, False, False),
    # W=8 (TP=8): uneven widths, entry barrier skipped, the last rank
    ("bf16_w8_uneven_skip", 2, 7, (0, 1024, 2048, 3072, 4096, 5120, 6144, 7168, 8200), 8, True, True),
]
# (name, rank, band_offsets in 32-bit words, skip_entry_sync, copy_out)
MULTIMEM_CONFIGS = [
    ("w4_words", 1, (0, 2048, 4096, 6144, 8192), False, True),
    ("w2_words_skip", 0, (0, 512, 1536), True, True),
    ("w8_words", 6, tuple(2048 * i for i in range(9)), False, True),
]

# Fused linear + push (kernels/linear_push.py):
# (name, dtype, rank, band_offsets, K, tokens, has_bias, skip_entry_sync, multimem, copy_out)
LINEAR_CONFIGS = [
    ("bf16_w4_t1_decode", "bfloat16", 1, (0, 1024, 2048, 3072, 4096), 4096, 1, True, False, False, True),
    ("bf16_w2_t128_bias", "bfloat16", 0, (0, 2048, 4096), 7168, 128, True, False, False, True),
    ("fp16_w4_t32_skip", "float16", 3, (0, 3584, 7168, 10752, 14336), 4096, 32, False, True, False, True),
    ("bf16_w2_uneven_k1000", "bfloat16", 1, (0, 1024, 3072), 1000, 64, False, False, False, True),
    # an LM head band at T=128: 64 x 128 x 64 tiles, 8 warps (the widest tile launch_config picks)
    ("bf16_w4_t128_lm_head", "bfloat16", 2, tuple(32064 * i for i in range(5)), 4096, 128, False, False, False, True),
    ("multimem_bf16_w4_t8", "bfloat16", 2, (0, 1792, 3584, 5376, 7168), 21504, 8, True, False, True, True),
    ("multimem_fp16_w2_t64", "float16", 0, (0, 2048, 4096), 4096, 64, False, True, True, True),
    # the multimem kernel on an LM head band at T=16 (where P2P takes swap-AB and column shares)
    ("multimem_bf16_w4_t16_lm_head", "bfloat16", 1, tuple(32064 * i for i in range(5)), 4096, 16, False, False, True,
     True),
    # an LM head band at T=20: 32-row tiles of 128 columns (T <= MID_TOKENS), swap-AB, round robin
    ("bf16_w4_t20_lm_head", "bfloat16", 3, tuple(32064 * i for i in range(5)), 4096, 20, False, False, False, True),
    # zero-copy: the LM head at T=32 writes its own tiles into its slot, no copy-out
    ("bf16_w4_t32_lm_head_zero_copy", "bfloat16", 1, tuple(32064 * i for i in range(5)), 4096, 32, False, True, False,
     False),
    ("bf16_w8_t8", "bfloat16", 5, tuple(1024 * i for i in range(9)), 4096, 8, False, False, False, True),
    # W=8, wide bands at T=16: 128-column tiles, the even-band copy-out holds 8 x 16 x 128 elements
    ("bf16_w8_t16_wide", "bfloat16", 7, tuple(32768 * i for i in range(9)), 4096, 16, False, False, False, True),
]

# The flag protocol (kernels/flag/gather.py):
# (name, elem_size, rank, band_offsets, block_u)
FLAG_CONFIGS = [
    ("bf16_w4_4096", 2, 1, (0, 4096, 8192, 12288, 16384), 256),
    ("fp32_w2_uneven_1001", 4, 0, (0, 1001, 3003), 256),
    ("i8_w4_odd_widths", 1, 3, (0, 7, 14, 21, 30), 64),
    ("bf16_w8_1024", 2, 6, tuple(1024 * i for i in range(9)), 256),
]


# The sum family's kernels (kernels/vocab_softmax.py), as compile_ops/softmax_kernels.py launches them:
# (name, kind, the arguments of its *_source function, warps)
SOFTMAX_CONFIGS = [
    # cross-entropy on a 16-byte aligned bf16 band: 4096-column tiles (one row per program) and 2048 (split rows)
    ("local_bf16_ce_aligned_4096", "local", ("bf16", "i64", True, False, False, 4096, True), 8),
    ("local_bf16_ce_aligned_2048", "local", ("bf16", "i64", True, False, False, 2048, True), 4),
    ("local_fp32_every_statistic_unaligned", "local", ("fp32", "i32", True, True, True, 2048, False), 4),
    ("local_fp16_logsumexp_narrow", "local", ("fp16", "i64", False, False, False, 128, False), 4),
    ("merge_w4_ce", "merge", ((32064,) * 4, True, False, False), 4),
    ("merge_w8_every_statistic", "merge", ((16032,) * 7 + (16000,), True, True, True), 4),
    ("grad_bf16_ce_aligned", "grad", ("bf16", "i64", True, True, False, False, 2048, True), 4),
    ("grad_fp32_ce_aligned", "grad", ("fp32", "i64", True, True, False, False, 2048, True), 4),
    ("grad_fp16_every_statistic_unaligned", "grad", ("fp16", "i32", True, True, True, True, 2048, False), 4),
    ("finish_mean", "finish", ("i64", 2, False), 4),
    ("finish_none_smoothing", "finish", ("i32", 0, True), 4),
    ("finish_logprobs", "finish", ("i64", 3, False), 4),
    ("cross_entropy_grad_bf16_mean_aligned", "cross_entropy_grad", ("bf16", "i64", 2, False, 2048, True), 4),
    ("cross_entropy_grad_fp32_mean_aligned", "cross_entropy_grad", ("fp32", "i64", 2, False, 2048, True), 4),
    ("cross_entropy_grad_fp16_none_smoothing", "cross_entropy_grad", ("fp16", "i32", 0, True, 2048, False), 4),
]


# The exact reductions (kernels/vocab_reduce.py), as compile_ops/reduce_kernels.py compiles them:
# (name, kernel, dtype, largest, k, aligned); k None: max/min; aligned: 16-byte row starts (local kernels)
VOCAB_REDUCE_CONFIGS = [
    ("local_best_bf16_aligned", "local", "bfloat16", True, None, True),
    ("local_best_fp16_min_unaligned", "local", "float16", False, None, False),
    ("local_best_fp32_aligned", "local", "float32", True, None, True),
    ("local_topk8_bf16_aligned", "local", "bfloat16", True, 8, True),
    ("local_topk64_fp32_smallest_unaligned", "local", "float32", False, 64, False),
    ("merge_best_bf16", "merge", "bfloat16", True, None, None),
    ("merge_best_fp32_min", "merge", "float32", False, None, None),
    ("merge_topk8_bf16", "merge", "bfloat16", True, 8, None),
    ("merge_topk64_fp16_smallest", "merge", "float16", False, 64, None),
]


def _options(tma=False, swap_ab=False, balanced=False):
    return {"TMA": tma, "SWAP_AB": swap_ab, "BALANCED": balanced}


_LM_HEAD_W4 = tuple(32064 * i for i in range(5))
#: the config options the sweeps compared, on launch_config's tiles (launch_config picks some per T, see there):
#: weight tiles through TMA, swap-AB (the weight tile on the MMA's M side), even column shares, and the
#: round-robin mma.sync path (the default before the third sweep)
LINEAR_VARIANT_CONFIGS = [
    ("bf16_w4_t8_lm_head_round_robin", "bfloat16", 1, _LM_HEAD_W4, 4096, 8, _options()),
    ("bf16_w4_t32_lm_head_tma", "bfloat16", 1, _LM_HEAD_W4, 4096, 32, _options(tma=True)),
    ("bf16_w4_t32_lm_head_tma_swap_ab", "bfloat16", 3, _LM_HEAD_W4, 4096, 32, _options(tma=True, swap_ab=True)),
    ("bf16_w4_t32_lm_head_balanced_swap_ab", "bfloat16", 2, _LM_HEAD_W4, 4096, 32,
     _options(swap_ab=True, balanced=True)),
    ("bf16_w2_t16_uneven_balanced", "bfloat16", 0, (0, 40000, 64064), 4096, 16, _options(balanced=True)),
]

_INSTRUCTIONS = re.compile(r"\b((?:st|ld|red|atom|fence|membar|multimem|mma|wgmma|cp\.async\.bulk\.tensor)\.[\w.:]+)")
_LABEL = re.compile(r"^\s*(\$L__BB\w+):")
_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L__BB\w+)\s*;")
_VOLATILE_LOAD = re.compile(r"\b(ld\.volatile\.global[\w.]*)")


def poll_loads(ptx):
    """The volatile global loads that poll: those in the innermost loops that read %globaltimer.

    A flag wait is a loop bounded by %globaltimer that re-reads memory with volatile loads; the
    other volatile loads (the epoch slot, the status word) sit outside it. A loop is found by its
    back edge (a branch to a label above it) and spans label to branch: LLVM lays a loop's blocks
    out together. Keyed on instructions, not on line numbers, so edits elsewhere in the kernel
    leave it alone.
    """
    lines = ptx.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := _LABEL.match(line))}
    ends = {}  # loop header line -> its last back edge
    for i, line in enumerate(lines):
        m = _BRANCH.search(line)
        if m and labels.get(m.group(1), i) < i:
            ends[labels[m.group(1)]] = i
    waits = [(a, b) for a, b in ends.items()
             if any("%globaltimer" in line for line in lines[a:b + 1])
             and any(_VOLATILE_LOAD.search(line) for line in lines[a:b + 1])]
    innermost = [(a, b) for a, b in waits if not any((c, d) != (a, b) and a <= c and d <= b for c, d in waits)]
    return sorted({m.group(1) for a, b in innermost for line in lines[a:b + 1] for m in _VOLATILE_LOAD.finditer(line)})


def _poll_controls():
    """Test-only kernels for the poll check: a bounded wait on int64 units (data in the low half, the flag
    in the high half, as in kernels/flag/device.py), read whole (SPLIT=False) or as two int32 halves
    (SPLIT=True: flag and data could then come from different stores, the split the check must reject)."""
    import triton
    import triton.language as tl
    from triton.compiler import ASTSource
    from triton.language.extra.cuda import globaltimer

    @triton.jit
    def poll_units(units_ptr, out_ptr, epoch, timeout_ns, BLOCK: tl.constexpr, SPLIT: tl.constexpr):
        u = tl.arange(0, BLOCK)
        start = globaltimer()
        spent = start - start
        pending = 1
        while (pending > 0) & (spent < timeout_ns):  # carries scalars only, as Triton 3.6 needs
            if SPLIT:
                halves = units_ptr.to(tl.pointer_type(tl.int32))
                low = tl.load(halves + 2 * u, volatile=True)
                high = tl.load(halves + 2 * u + 1, volatile=True)
            else:
                unit = tl.load(units_ptr + u, volatile=True)
                low = unit.to(tl.int32)
                high = (unit >> 32).to(tl.int32)
            pending = tl.sum((high != epoch).to(tl.int32), axis=0)
            if pending == 0:
                tl.store(out_ptr + u, low)
            spent = globaltimer() - start

    signature = {"units_ptr": "*i64", "out_ptr": "*i32", "epoch": "i32", "timeout_ns": "i64",
                 "BLOCK": "constexpr", "SPLIT": "constexpr"}
    return {f"poll_control_{kind}": ASTSource(poll_units, signature, {"BLOCK": 256, "SPLIT": split})
            for kind, split in (("whole", False), ("split", True))}


def _import_kernels():
    # Import tpfuse.kernels without running tpfuse/__init__.py, which imports torch.
    if "tpfuse" not in sys.modules:
        package = types.ModuleType("tpfuse")
        package.__path__ = [os.path.join(REPO, "tpfuse")]
        sys.modules["tpfuse"] = package
    from tpfuse.kernels import compiler, linear_push
    from tpfuse.kernels.barrier import push_gather
    from tpfuse.kernels.flag import gather as flag_gather

    return compiler, push_gather, linear_push, flag_gather


def report():
    import triton
    from triton.backends.compiler import GPUTarget

    compiler, push_gather, linear_push, flag_gather = _import_kernels()
    target = GPUTarget("cuda", 90, 32)
    out = {"triton": triton.__version__, "torch_imported": "torch" in sys.modules and sys.modules["torch"] is not None, "kernels": {}}

    def record(name, source, compile=None):
        kernel = (compile or compiler.compile_source)(source, target=target)
        ptx = kernel.asm["ptx"]
        out["kernels"][name] = {
            "instructions": sorted(set(_INSTRUCTIONS.findall(ptx))),
            "poll_loads": poll_loads(ptx),
            "globaltimer": "%globaltimer" in ptx,
            "cubin_bytes": len(kernel.asm["cubin"]),
            "shared_bytes": int(getattr(kernel.metadata, "shared", 0)),
            "global_scratch_bytes": int(getattr(kernel.metadata, "global_scratch_size", 0) or 0),
        }

    for name, elem, rank, offsets, vec, skip, copy_out in P2P_CONFIGS:
        record("p2p_" + name, push_gather.p2p_source(elem, rank, offsets, vec, 512, skip, copy_out))
    for name, rank, offsets, skip, copy_out in MULTIMEM_CONFIGS:
        record("multimem_" + name, push_gather.multimem_source(rank, offsets, 512, skip, copy_out))
    for name, dtype, rank, offsets, k, tokens, bias, skip, multimem, copy_out in LINEAR_CONFIGS:
        widths = [offsets[i + 1] - offsets[i] for i in range(len(offsets) - 1)]
        config = linear_push.launch_config(tokens, k, widths, multimem=multimem)
        source = linear_push.linear_source(dtype, rank, offsets, k, config, bias, skip, multimem=multimem,
                                           copy_out=copy_out)
        record("linear_" + name, source, lambda src, target, config=config: compiler.compile_source(
            src, target=target, num_warps=config["num_warps"], num_stages=config["num_stages"]))
        out["kernels"]["linear_" + name]["config"] = config
    for name, dtype, rank, offsets, k, tokens, options in LINEAR_VARIANT_CONFIGS:
        widths = [offsets[i + 1] - offsets[i] for i in range(len(offsets) - 1)]
        config = {**linear_push.launch_config(tokens, k, widths), **options}
        source = linear_push.linear_source(dtype, rank, offsets, k, config, False, False)
        record("linear_" + name, source, lambda src, target, config=config: compiler.compile_source(
            src, target=target, num_warps=config["num_warps"], num_stages=config["num_stages"]))
        out["kernels"]["linear_" + name]["config"] = config
    for name, elem, rank, offsets, block_u in FLAG_CONFIGS:
        record("flag_" + name, flag_gather.flag_source(elem, rank, offsets, block_u))
    for name, source in _poll_controls().items():
        record(name, source)
    from tpfuse.kernels import vocab_softmax

    for name, kind, variant, warps in SOFTMAX_CONFIGS:
        source = {"local": vocab_softmax.local_stats_source, "merge": vocab_softmax.merge_source,
                  "grad": vocab_softmax.local_grad_source, "finish": vocab_softmax.finish_source,
                  "cross_entropy_grad": vocab_softmax.cross_entropy_grad_source}[kind](*variant)
        record("softmax_" + name, source, lambda src, target, warps=warps: compiler.compile_source(
            src, target=target, num_warps=warps))
    from tpfuse.kernels import vocab_reduce

    for name, kernel, dtype, largest, k, aligned in VOCAB_REDUCE_CONFIGS:
        source = (vocab_reduce.local_source(dtype, largest, k, aligned) if kernel == "local"
                  else vocab_reduce.merge_source(dtype, largest, k))
        record("vocab_" + name, source, vocab_reduce.compile_source)
    return out


if __name__ == "__main__":
    if "--no-torch" in sys.argv:
        sys.modules["torch"] = None  # prove the kernels compile without torch
    print(json.dumps(report()))
