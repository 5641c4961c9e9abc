"""Column linear + hidden-axis gather: the fused kernel against cuBLAS linear + NCCL / + the tpfuse gather.

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=. \\
        torchrun --nproc-per-node 4 benchmarks/bench_linear_gather.py --out /tmp/bench_linear

Results (4xH200) and the plot: docs/benchmarks.md, "Fused column linear + push".

Shapes (bf16, every rank the same width; ``N_r`` is this rank's output columns):
- ``lm_head_4096``: LM head, hidden 4096, vocab 128256 -> K=4096, N_r=128256/W;
- ``lm_head_7168``: LM head, hidden 7168, vocab 129280 -> K=7168, N_r=129280/W;
- ``eagle3_fc``: EAGLE3 input projection -> K=3*7168=21504, N_r=7168/W;
- ``llama8b_mlp``: Llama-8B MLP up/gate projection -> K=4096, N_r=14336/W.
T in {1, 8, 32, 128} (``--tokens``).  Columns, CUDA-graph replay of 32 calls (``--calls``), µs per
call, slowest rank:
- ``fused``: ``tpfuse::linear_all_gather_hidden``'s fused kernel, both barriers;
- ``fused_elided``: the same, entry barrier elided, ping-pong slots (what a proven pass emits);
- ``cublas_nccl``: ``F.linear`` (cuBLAS) + NCCL gather + rearrange (tpfuse's NCCL backend);
- ``cublas_tpfuse``: ``F.linear`` + the tpfuse P2P gather, both barriers (the baseline);
- ``cublas_only``: ``F.linear`` alone (how close the linear is to its floor);
- ``fused_zero_copy`` / ``cublas_tpfuse_zero_copy``: both sides with zero-copy results (a
  view of the slot, no copy-out: what ``tpfuse.enable(zero_copy=True)`` emits where proven);
- ``floor``: the weight-bandwidth floor ``N_r * K * 2 / HBM peak`` of the card (no linear can be faster).
Also prints the cost rule's prediction for each row, so the measurement can replace it.
Prints the card, torch, NCCL and Triton versions first and a short table last;
writes JSON to ``--out`` on rank 0.
"""

import os

# Never NVLink multicast on the shared hosts (docs/safety.md, "Multicast"); set before torch loads NCCL.
os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
os.environ["NVSHMEM_DISABLE_NVLS"] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gather import quiesce, time_graph, torchrun_group  # noqa: E402

from tpfuse.compile_ops import collective, linear_cost, linear_push  # noqa: E402
from tpfuse.compile_ops.barrier import P2P  # noqa: E402
from tpfuse.kernels.linear_push import launch_config  # noqa: E402

#: name -> (K, full output width N; N_r = N / W)
SHAPES = {
    "lm_head_4096": (4096, 128256),
    "lm_head_7168": (7168, 129280),
    "eagle3_fc": (3 * 7168, 7168),
    "llama8b_mlp": (4096, 14336),
}
METHODS = ("fused", "fused_elided", "cublas_nccl", "cublas_tpfuse", "cublas_only", "fused_zero_copy",
           "cublas_tpfuse_zero_copy")


def make_methods(group, x, weight, widths):
    slot = [0]

    def fused():
        return linear_push.linear_gather_hidden(x, weight, None, widths, group, -1, False)

    def fused_elided():
        slot[0] ^= 1  # an even number of calls per timed unit (see bench_gather.py)
        return linear_push.linear_gather_hidden(x, weight, None, widths, group, slot[0], True)

    def cublas_nccl():
        return collective.gather_hidden(F.linear(x, weight), widths, group)

    def cublas_tpfuse():
        return P2P.gather(F.linear(x, weight), widths, group, -1, False)

    def cublas_only():
        return F.linear(x, weight)

    # zero-copy (opt-in, the pass grants it where proven): the result is the slot, no copy-out;
    # both sides, so that the ratio stays fair
    def fused_zero_copy():
        return linear_push.linear_gather_hidden(x, weight, None, widths, group, -1, False, True)

    def cublas_tpfuse_zero_copy():
        return P2P.gather(F.linear(x, weight), widths, group, -1, False, True)

    return {"fused": fused, "fused_elided": fused_elided, "cublas_nccl": cublas_nccl,
            "cublas_tpfuse": cublas_tpfuse, "cublas_only": cublas_only, "fused_zero_copy": fused_zero_copy,
            "cublas_tpfuse_zero_copy": cublas_tpfuse_zero_copy}


def check_once(methods, group):
    """Before timing: the fused result within the bf16 GEMM tolerance of cuBLAS + gather, ranks agree."""
    fused, ref = methods["fused"](), methods["cublas_tpfuse"]()
    torch.cuda.synchronize()
    ok = bool(((fused.float() - ref.float()).abs() <= 2.0**-6 * (1 + ref.float().abs())).all())
    flag = torch.tensor([int(ok)], device="cuda")
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", default="1,8,32,128")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--out", default=None)
    parser.add_argument("--tag", default="")
    parser.add_argument("--rounds", type=int, default=3, help="timings per method (rotated order; median)")
    parser.add_argument("--calls", type=int, default=32,
                        help="calls per captured CUDA graph (each replay starts with the ranks' host skew, which "
                             "the first barrier absorbs; a decode step's graph pays it once for the whole model)")
    parser.add_argument("--repeats", type=int, default=10, help="graph replays per timing (median)")
    args = parser.parse_args()

    rank, group, card = torchrun_group()
    W = group.world_size
    nccl = ".".join(map(str, torch.cuda.nccl.version()))
    import triton

    if rank == 0:
        print(f"card: {W} x {card} | torch {torch.__version__} | NCCL {nccl} | triton {triton.__version__} "
              f"| HBM peak {linear_cost.hbm_peak(card) / 1e12:.2f} TB/s {args.tag}", flush=True)
    rows = []
    for name in args.shapes.split(","):
        K, N = SHAPES[name]
        n_r = N // W
        widths = [n_r] * W
        weight = torch.randn(n_r, K, device="cuda", dtype=torch.bfloat16) * K**-0.5
        for T in map(int, args.tokens.split(",")):
            x = torch.randn(T, K, device="cuda", dtype=torch.bfloat16)
            methods = make_methods(group, x, weight, widths)
            row = {"shape": name, "T": T, "K": K, "N_r": n_r, "graph": {},
                   "floor": n_r * K * 2 / linear_cost.hbm_peak(card) * 1e6,
                   "config": launch_config(T, K, widths)}
            row["correct"] = check_once(methods, group)
            quiesce()
            # Several rounds in rotated order (the same on every rank): drift on the machine hits
            # every method alike, and one timing's spread (~±3 µs on these rows) shrinks in the median.
            samples = {m: [] for m in METHODS}
            for r in range(args.rounds):
                shift = r % len(METHODS)
                for m in METHODS[shift:] + METHODS[:shift]:
                    samples[m].append(time_graph(methods[m], calls=args.calls, repeats=args.repeats))
            row["graph"] = {m: statistics.median(v) for m, v in samples.items()}
            fused_pred, unfused_pred = linear_cost.predict(T, K, widths)
            row["predicted"] = {"fused": fused_pred, "cublas_tpfuse": unfused_pred}
            row["rule"] = str(linear_cost.decide(T, K, widths, "bfloat16", device_name=card))
            rows.append(row)
            if rank == 0:
                g = row["graph"]
                print(f"{name:13s} T={T:4d} N_r={n_r:6d} K={K:6d} floor {row['floor']:7.1f} | "
                      + " ".join(f"{m}={g[m]:8.1f}" for m in METHODS) + f" | correct={row['correct']}", flush=True)
        del weight
        torch.cuda.empty_cache()
    if rank == 0:
        print()
        print(f"W={W} {card}; graph µs per call (slowest rank, median); "
              "speedup = cublas_tpfuse / fused (target >= 1.2 at T <= 32, W = 4, where the rule fuses)")
        print(f"{'shape':13s} {'T':>4} {'floor':>7} {'fused':>8} {'f.elided':>8} {'cuBLAS+NCCL':>11} "
              f"{'cuBLAS+tpf':>10} {'cuBLAS':>8} {'speedup':>7} {'pred':>5} {'rule':>6} | zero-copy: "
              f"{'fused':>8} {'cuBLAS+tpf':>10} {'speedup':>7}")
        for r in rows:
            g = r["graph"]
            pred = r["predicted"]["cublas_tpfuse"] / r["predicted"]["fused"]
            print(f"{r['shape']:13s} {r['T']:>4} {r['floor']:7.1f} {g['fused']:8.1f} {g['fused_elided']:8.1f} "
                  f"{g['cublas_nccl']:11.1f} {g['cublas_tpfuse']:10.1f} {g['cublas_only']:8.1f} "
                  f"{g['cublas_tpfuse'] / g['fused']:7.2f} {pred:5.2f} {'fuse' if r['rule'].startswith('fused') else '-':>6}"
                  f" | {'':10s} {g['fused_zero_copy']:8.1f} {g['cublas_tpfuse_zero_copy']:10.1f} "
                  f"{g['cublas_tpfuse_zero_copy'] / g['fused_zero_copy']:7.2f}")
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            meta = {"W": W, "card": card, "torch": torch.__version__, "nccl": nccl, "triton": triton.__version__,
                    "tag": args.tag, "model": linear_cost.MODEL, "calls": args.calls, "repeats": args.repeats}
            stem = f"bench_linear_gather_w{W}{('_' + args.tag) if args.tag else ''}"
            with open(os.path.join(args.out, stem + ".json"), "w") as f:
                json.dump({"meta": meta, "rows": rows}, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
