"""Plot per-token latency against batch size from bench_hf_decode.py's JSON (one line per mode and variant).

    python benchmarks/plot_hf_decode.py benchmarks/results/hf_decode_w2_h200_quick.json docs/img/hf_decode_w2_h200.png
"""

import json
import sys


def main(src, dst):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.load(open(src))
    series = {}
    for batch in data["batches"]:
        for row in batch["rows"]:
            if row["layers"] != data["model"]["num_hidden_layers"]:
                continue  # the 0-layer probe of the full-depth arithmetic
            stats = row["ms_per_token"]
            series.setdefault((row["mode"], row["variant"]), []).append(
                (row["B"], stats["median"], stats["min"], stats["max"]))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for (mode, variant), points in sorted(series.items()):
        points.sort()
        b, med, lo, hi = zip(*points)
        ax.errorbar(b, med, yerr=[[m - x for m, x in zip(med, lo)], [x - m for m, x in zip(med, hi)]],
                    marker="o" if variant == "off" else "s", linestyle="-" if variant == "off" else "--",
                    capsize=3, label=f"{mode}, tpfuse {variant}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size B")
    ax.set_ylabel("ms per decoded token (median, min-max)")
    layers = data["model"]["num_hidden_layers"]
    ax.set_title(f"HF Llama ({layers} of 32 layers, hidden {data['model']['hidden_size']}), "
                 f"W={data['W']}, {data['card']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(dst, dpi=120)


if __name__ == "__main__":
    main(*sys.argv[1:3])
