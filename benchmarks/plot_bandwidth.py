"""Bandwidth chart from saved bench_gather results (runs on any machine, no GPU).

    python benchmarks/plot_bandwidth.py benchmarks/results/bench_gather_w4_h100.json \
        benchmarks/results/bench_gather_w2_h100.json --out docs/img/bandwidth_h100.png

Per GPU egress (bytes each GPU sends, ``T * w * 2 * (W - 1)``) over the CUDA-graph
time, against the message size, for NCCL + rearrange and tpfuse (both barriers).
"""

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("results", nargs="+")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    fig, axes = plt.subplots(1, len(args.results), figsize=(5.5 * len(args.results), 4), squeeze=False)
    for ax, path in zip(axes[0], args.results):
        with open(path) as f:
            data = json.load(f)
        W, card = data["meta"]["W"], data["meta"]["card"]
        rows = sorted(data["rows"], key=lambda r: r["T"] * r["width"])
        sizes = [r["T"] * r["width"] * 2 * (W - 1) / 1e6 for r in rows]
        for method, color in (("nccl_rearrange", "C1"), ("tpfuse_both", "C2"), ("tpfuse_elided", "C3")):
            ax.plot(sizes, [r["egress_GBps"][method] for r in rows], "o", color=color, ms=4, label=method)
        ax.axhline(450, color="grey", ls="--", lw=0.8, label="NVLink egress, datasheet (450 GB/s)")
        ax.axhline(400, color="red", ls=":", lw=0.8, label="target at T=512, w=32064 (400 GB/s)")
        ax.set_xscale("log")
        ax.set_xlabel("egress per GPU per call (MB)")
        ax.set_ylabel("GB/s per GPU (CUDA-graph replay)")
        ax.set_title(f"W={W}, {card}, bf16")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
