"""Latency plots from saved bench_linear_gather results (runs on any machine, no GPU).

    python benchmarks/plot_linear_gather.py benchmarks/results/bench_linear_gather_w4_h200.json \
        benchmarks/results/bench_linear_gather_w2_h200.json --out docs/img/bench_linear_gather_h200.png

One row per world size, one panel per shape: µs per call (CUDA-graph replay, slowest
rank) against T for the fused kernel, cuBLAS + the tpfuse gather, cuBLAS + NCCL, and
cuBLAS alone, with the weight floor at the card's HBM peak; a ring marks the T
where the cost rule fuses.
"""

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from tpfuse.compile_ops import linear_cost  # noqa: E402

LINES = (("fused", "C3", "fused linear + push"), ("cublas_tpfuse", "C2", "cuBLAS + tpfuse gather"),
         ("cublas_nccl", "C1", "cuBLAS + NCCL gather"), ("cublas_only", "C7", "cuBLAS alone"))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("results", nargs="+")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    runs = [json.load(open(p)) for p in args.results]
    shapes = list(dict.fromkeys(r["shape"] for r in runs[0]["rows"]))
    fig, axes = plt.subplots(len(runs), len(shapes), figsize=(3.6 * len(shapes), 3.2 * len(runs)), squeeze=False)
    for row_axes, data in zip(axes, runs):
        W, card = data["meta"]["W"], data["meta"]["card"]
        for ax, shape in zip(row_axes, shapes):
            rows = [r for r in data["rows"] if r["shape"] == shape]
            if not rows:  # a run that left this shape out
                ax.set_visible(False)
                continue
            ts = [r["T"] for r in rows]
            for key, color, label in LINES:
                ax.plot(ts, [r["graph"][key] for r in rows], "o-", color=color, ms=3, lw=1, label=label)
            floor = rows[0]["N_r"] * rows[0]["K"] * 2 / linear_cost.hbm_peak(card) * 1e6
            ax.axhline(floor, color="grey", ls="--", lw=0.8, label="weight floor (HBM peak)")
            fused = [(r["T"], r["graph"]["fused"]) for r in rows
                     if linear_cost.decide(r["T"], r["K"], [r["N_r"]] * W, "bfloat16").fuse]
            if fused:
                ax.plot(*zip(*fused), "o", mfc="none", color="C3", ms=9, label="the cost rule fuses")
            ax.set_xscale("log", base=2)
            ax.set_xticks(ts, [str(t) for t in ts])
            ax.set_title(f"{shape}, W={W}", fontsize=9)
            ax.set_xlabel("T")
            ax.set_ylabel("µs per call")
            ax.set_ylim(bottom=0)
            ax.grid(True, alpha=0.3)
        row_axes[0].legend(fontsize=6)
    fig.suptitle(f"column linear + hidden-axis gather, {runs[0]['meta']['card']}, bf16, CUDA-graph replay", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
