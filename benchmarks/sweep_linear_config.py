"""Launch-config sweep of the fused linear+push kernel: which tile shape streams the weight fastest?

    PYTHONPATH=. torchrun --nproc-per-node 4 benchmarks/sweep_linear_config.py --out /tmp/sweep

The first measurement (docs/benchmarks.md, "Fused linear + push") found the
fused kernel at 0.29-0.93x of cuBLAS + the tpfuse gather: its GEMM streams
the weight at ~2.6 TB/s where cuBLAS reaches ~3.9 TB/s (H200).  This times
the fused kernel (both barriers, CUDA-graph replay, slowest rank) under
alternative ``launch_config`` results, next to cuBLAS alone, for decode
shapes.  Configs are (BLOCK_N, BLOCK_K, num_warps, num_stages); BLOCK_M
stays ``launch_config``'s (T rounded up, 16..64).  The grid is one block
per SM (``grid_cap``): every block must stay resident for the barriers; the
``xsm2`` option doubles it, and is skipped where the compiled kernel does not
fit an SM twice.  Configs beyond ``--budget-kib`` of pipeline buffers are
skipped, and ones that do not compile (shared memory) are reported and skipped.

``--diag`` times ``launch_config``'s config with parts of the kernel left out
(the pushes to the peers, the copy-out of their bands, either barrier):
where the time beyond the weight stream goes.  ``--gemm-only`` adds, for each
config, a run with all of them left out (the weight stream alone).  Racy
variants, timings only.
"""

import os

os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
os.environ["NVSHMEM_DISABLE_NVLS"] = "1"

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gather import quiesce, time_graph, torchrun_group  # noqa: E402
from bench_linear_gather import SHAPES  # noqa: E402

from tpfuse.compile_ops import linear_push, workspace  # noqa: E402
from tpfuse.kernels import linear_push as kernels  # noqa: E402

#: --diag: what each floor diagnostic leaves out of the kernel (label, constexprs, exit barrier)
DIAGNOSTICS = [("full", {}, True), ("no copy-out", {"COPY_OUT": False}, True),
               ("no push", {"PUSH": False}, True), ("no push, no copy-out", {"PUSH": False, "COPY_OUT": False}, True),
               ("GEMM + entry barrier only", {"PUSH": False, "COPY_OUT": False}, False),
               ("no entry barrier", {"SKIP_ENTRY_SYNC": True}, True),
               ("no entry barrier, no copy-out", {"SKIP_ENTRY_SYNC": True, "COPY_OUT": False}, True),
               ("GEMM + exit barrier only", {"SKIP_ENTRY_SYNC": True, "PUSH": False, "COPY_OUT": False}, True),
               ("GEMM only", {"SKIP_ENTRY_SYNC": True, "PUSH": False, "COPY_OUT": False}, False)]
#: --gemm-only: no entry barrier, no pushes, no copy-out, no exit barrier: the weight stream alone
GEMM_ONLY = DIAGNOSTICS[-1][1]
CONFIGS = [(32, 256, 4, 4), (64, 128, 4, 4), (64, 256, 4, 3), (128, 128, 4, 3), (128, 64, 8, 4),
           (32, 512, 4, 3), (16, 512, 4, 4)]


def blocks_per_sm(plan) -> int:
    """How many blocks of the plan's compiled kernel one multiprocessor holds at once (shared
    memory, registers, threads; 1 where the device does not report them)."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    threads = 32 * plan.config["num_warps"]
    smem = getattr(props, "shared_memory_per_multiprocessor", 0)
    regs = getattr(props, "regs_per_multiprocessor", 0)
    if not smem or not regs:
        return 1
    by_smem = smem // (plan.shared_bytes + 1024)  # the driver reserves 1 KiB per block
    by_regs = regs // (-(-max(plan.registers, 1) // 8) * 8 * threads)
    by_threads = props.max_threads_per_multi_processor // threads
    return max(1, min(by_smem, by_regs, by_threads))


def parse_config(text):
    """``BNxBKxWARPSxSTAGES[xtma][xswap][xbal][xsm2]`` -> (BN, BK, warps, stages, {option: on})."""
    parts = text.split("x")
    flags = set(parts[4:])
    if len(parts) < 4 or not flags <= {"tma", "swap", "bal", "sm2"}:
        raise SystemExit(f"bad config {text!r}: expected BNxBKxWARPSxSTAGES, optionally followed by "
                         f"xtma / xswap / xbal / xsm2")
    return (*(int(v) for v in parts[:4]), {"TMA": "tma" in flags, "SWAP_AB": "swap" in flags,
                                           "BALANCED": "bal" in flags, "SM2": "sm2" in flags})


def option_labels(options):
    """' SWAP_AB BALANCED' for the options that are on."""
    return "".join(f" {o}" for o, on in options.items() if on)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default="lm_head_4096:1,lm_head_4096:32,llama8b_mlp:1,llama8b_mlp:32")
    parser.add_argument("--configs", default=None,
                        help="BNxBKxWARPSxSTAGES[xtma][xswap][xbal][xsm2],... (default: the first "
                             "sweep's CONFIGS); 'tma' loads the weight tiles through a TMA descriptor, 'swap' puts "
                             "the weight tile on the MMA's M side (wgmma for few tokens), 'bal' gives each block an "
                             "even column share, 'sm2' two blocks per SM")
    parser.add_argument("--budget-kib", type=int, default=kernels.PIPELINE_BYTES >> 10,
                        help="skip configs whose pipeline buffers (stages - 1 of them) exceed this")
    parser.add_argument("--diag", action="store_true",
                        help="instead of configs: launch_config's config without the pushes, the copy-out, "
                             "either barrier (DIAGNOSTICS; racy floor diagnostics, timings only)")
    parser.add_argument("--gemm-only", action="store_true",
                        help="also time each config without its barriers, pushes and copy-out (the weight "
                             "stream alone; racy, timings only)")
    parser.add_argument("--calls", type=int, default=32, help="calls per captured CUDA graph (see bench_linear_gather.py)")
    parser.add_argument("--repeats", type=int, default=10, help="graph replays; the median is reported")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.diag:
        variants = [(f"diag {label}", None, diag, exit_sync) for label, diag, exit_sync in DIAGNOSTICS]
    else:
        configs = [(*c, {}) for c in CONFIGS]
        if args.configs:
            configs = [parse_config(c) for c in args.configs.split(",")]
        variants = [(f"BN={c[0]:4d} BK={c[1]:4d} warps={c[2]} stages={c[3]}{option_labels(c[4])}", c, {}, True)
                    for c in configs]
        if args.gemm_only:
            variants += [(label + " GEMM only", c, GEMM_ONLY, False) for label, c, _, _ in variants]
    rank, group, card = torchrun_group()
    W = group.world_size
    original, original_source = kernels.launch_config, kernels.linear_source
    original_cap = linear_push.grid_cap
    rows = []
    for case in args.cases.split(","):
        name, T = case.split(":")
        T = int(T)
        K, N = SHAPES[name]
        widths = [N // W] * W
        weight = torch.randn(N // W, K, device="cuda", dtype=torch.bfloat16) * K**-0.5
        x = torch.randn(T, K, device="cuda", dtype=torch.bfloat16)
        cublas = time_graph(lambda: F.linear(x, weight), calls=args.calls, repeats=args.repeats)
        ref = F.linear(x, weight)
        bm = original(T, K, widths)["BLOCK_M"]
        for label, cfg, diag, exit_sync in variants:
            kernels.launch_config, linear_push.grid_cap = original, original_cap
            two_per_sm = False
            if cfg is not None:
                bn, bk, warps, stages, options = cfg
                if (bm + bn) * bk * 2 * (stages - 1) > args.budget_kib << 10:
                    continue  # beyond the pipeline budget (default: the rule's, kernels.linear_push.PIPELINE_BYTES)

                kernel_options = {o: on for o, on in options.items() if o != "SM2"}

                def config(tokens, k, ws_, elem_size=2, multimem=False, bn=bn, bk=bk, warps=warps, stages=stages,
                           options=kernel_options):
                    c = original(tokens, k, ws_, elem_size, multimem)
                    m_tiles = -(-max(int(tokens), 1) // c["BLOCK_M"])
                    return {**c, "BLOCK_N": bn, "BLOCK_K": min(bk, max(64, k)), "num_warps": warps,
                            "num_stages": stages, "tiles": m_tiles * -(-max(ws_) // bn), **options}

                kernels.launch_config = config
                two_per_sm = options["SM2"]
            kernels.linear_source = functools.partial(original_source, diagnostic=diag)
            workspace.workspace(group, rank).plans.clear()

            def fused():
                return linear_push.linear_gather_hidden(x, weight, None, widths, group, exit_sync=exit_sync)

            try:
                out = fused()
                torch.cuda.synchronize()
            except Exception as err:  # e.g. Triton's OutOfResources: the same on every rank
                if rank == 0:
                    print(f"{case:16s} {label} | skipped: {type(err).__name__}: {str(err)[:80]}", flush=True)
                continue
            plan = next(iter(workspace.workspace(group, rank).plans.values()))
            if two_per_sm:
                # sm2: two blocks per SM (the workspace's signal pads hold them), only where both stay resident
                # (the first call above ran one block per SM and built the plan).
                if blocks_per_sm(plan) < 2:
                    if rank == 0:
                        print(f"{case:16s} {label} | skipped: {plan.shared_bytes} B shared, {plan.registers} "
                              f"registers: one block per SM", flush=True)
                    continue
                linear_push.grid_cap = lambda ws_: 2 * original_cap(ws_)
                out = fused()
                torch.cuda.synchronize()
            mine = out[:, rank * widths[0]:(rank + 1) * widths[0]]
            ok = bool(((mine.float() - ref.float()).abs() <= 2.0**-6 * (1 + ref.float().abs())).all())
            quiesce()
            us = time_graph(fused, calls=args.calls, repeats=args.repeats)
            gbs = widths[0] * K * 2 / (us * 1e-6) / 1e9
            c = kernels.launch_config(T, K, widths)
            rows.append({"case": case, "variant": label, "diagnostic": {**diag, "EXIT_SYNC": exit_sync},
                         "grid": linear_push.grid_cap(workspace.workspace(group, rank)),
                         "shared_bytes": plan.shared_bytes, "registers": plan.registers,
                         "config": [c["BLOCK_N"], c["BLOCK_K"], c["num_warps"], c["num_stages"]],
                         "tma": bool(c.get("TMA")), "swap_ab": bool(c.get("SWAP_AB")),
                         "balanced": bool(c.get("BALANCED")), "fused_us": us,
                         "cublas_us": cublas, "weight_GBps": gbs, "correct": ok})
            if rank == 0:
                print(f"{case:16s} {label} | grid {rows[-1]['grid']} | fused {us:7.1f} us ({gbs:6.0f} GB/s of weight) | "
                      f"cuBLAS alone {cublas:7.1f} us | own band correct {ok}", flush=True)
        kernels.launch_config, kernels.linear_source = original, original_source
        linear_push.grid_cap = original_cap
        torch.cuda.empty_cache()
    if rank == 0 and args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"sweep_linear_w{W}.json"), "w") as f:
            json.dump({"card": card, "W": W, "torch": torch.__version__, "rows": rows}, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
