"""Latency plots from saved bench_linear_gather results (runs on any machine, no GPU).

    python benchmarks/plot_linear_gather.py benchmarks/results/bench_linear_gather_w4_h200_c32.json \
        benchmarks/results/bench_linear_gather_w2_h200_c32.json --out docs/img/bench_linear_gather_h200.png
    python benchmarks/plot_linear_gather.py benchmarks/results/bench_linear_gather_w4_h200_c32*.json \
        --speedup docs/img/bench_linear_gather_speedup_h200.png

One row per results file, one panel per shape: µs per call (CUDA-graph replay, slowest
rank) against T for the fused kernel, cuBLAS + the tpfuse gather, cuBLAS + NCCL, and
cuBLAS alone, with the weight floor at the card's HBM peak; a ring marks the T
where the cost rule fuses.  ``--speedup``: instead, one panel per LM head, the fused
kernel's speedup over cuBLAS + the tpfuse gather in every given run against T, with the
target (1.2x) and the rows the rule fuses.
"""

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from tpfuse.compile_ops import linear_cost  # noqa: E402

LINES = (("fused", "C3", "fused linear + push"), ("cublas_tpfuse", "C2", "cuBLAS + tpfuse gather"),
         ("cublas_nccl", "C1", "cuBLAS + NCCL gather"), ("cublas_only", "C7", "cuBLAS alone"))


def speedup_plot(runs, out):
    shapes = [s for s in dict.fromkeys(r["shape"] for run in runs for r in run["rows"]) if s.startswith("lm_head")]
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.6 * len(shapes), 3.4), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        for i, run in enumerate(runs):
            W = run["meta"]["W"]
            rows = [r for r in run["rows"] if r["shape"] == shape and r["T"] <= linear_cost.MAX_TOKENS]
            ts = [r["T"] for r in rows]
            ax.plot(ts, [r["graph"]["cublas_tpfuse"] / r["graph"]["fused"] for r in rows], "o-", ms=3, lw=0.8,
                    color=f"C{i}", label=f"W={W} {run['meta'].get('tag') or 'run'} {i + 1}")
            fused = [(r["T"], r["graph"]["cublas_tpfuse"] / r["graph"]["fused"]) for r in rows
                     if linear_cost.decide(r["T"], r["K"], [r["N_r"]] * W, "bfloat16",
                                           device_name=run["meta"]["card"]).fuse]
            if fused:
                ax.plot(*zip(*fused), "o", mfc="none", color="C3", ms=9,
                        label="the cost rule fuses" if i == 0 else None)
        ax.axhline(linear_cost.TARGET_SPEEDUP, color="grey", ls="--", lw=0.8, label="target")
        ax.axhline(1.0, color="black", lw=0.5)
        ax.set_title(f"{shape}: cuBLAS + tpfuse gather / fused", fontsize=9)
        ax.set_xlabel("T")
        ax.set_ylabel("speedup")
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=6)
    fig.suptitle(f"fused linear + push, {runs[0]['meta']['card']}, bf16, CUDA graphs of "
                 f"{runs[0]['meta'].get('calls', 4)} calls", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("results", nargs="+")
    parser.add_argument("--out", help="the latency plot")
    parser.add_argument("--speedup", help="the speedup plot (LM heads, every run)")
    args = parser.parse_args()
    runs = [json.load(open(p)) for p in args.results]
    if args.speedup:
        speedup_plot(runs, args.speedup)
    if not args.out:
        return
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
                     if linear_cost.decide(r["T"], r["K"], [r["N_r"]] * W, "bfloat16", device_name=card).fuse]
            if fused:
                ax.plot(*zip(*fused), "o", mfc="none", color="C3", ms=9, label="the cost rule fuses")
            ax.set_xscale("log", base=2)
            ax.set_xticks(ts, [str(t) if t & (t - 1) == 0 else "" for t in ts])  # label the powers of two
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
