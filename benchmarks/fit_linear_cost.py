"""Fit the fused-linear cost rule (tpfuse/compile_ops/linear_cost.py) to saved benchmark results.

    PYTHONPATH=. python benchmarks/fit_linear_cost.py            # the committed H200 results
    PYTHONPATH=. python benchmarks/fit_linear_cost.py a.json b.json

Runs anywhere (no GPU). Rows: the wide bands (``kernels.linear_push.wide_band``, the only
ones the rule may fuse) at T <= ``MAX_TOKENS`` from ``bench_linear_gather.py`` JSON files.
Three least-squares fits, one per term of the model (see linear_cost.py):

- cuBLAS alone:   ``cublas_only = floor / CUBLAS_EFFICIENCY + CUBLAS_FIXED_US``;
- the gather:     ``cublas_tpfuse - cublas_only = GATHER_LATENCY_US[W] + egress / GATHER_BYTES_PER_S``;
- fused:          ``fused = floor / (FUSED_EFFICIENCY * fill) + FUSED_FIXED_US + egress / FUSED_TAIL_BYTES_PER_S``
  (on these rows the weight stream is the larger term of the model's ``max``).

Prints the card and W each constant came from (the results files' ``meta.card`` and
``meta.W``; ``linear_cost.MEASURED`` must name the same), the constants, then every row's
measured and predicted speedup under the fitted constants and under the ones linear_cost.py
holds now.  The files must come from one card: the constants describe one card's HBM, SMs
and links, so each card is fitted on its own.
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tpfuse.compile_ops import linear_cost  # noqa: E402
from tpfuse.kernels.linear_push import launch_config, wide_band  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
#: the results the committed constants are fitted to (4xH200, the kernel with the split entry barrier and the
#: fifth sweep's launch configs, CUDA graphs of 32 calls, 2026-11-27): four W=4 runs on two hosts (the
#: second host's two are the out-of-sample check of the rule fitted to the first's) and W=2
DEFAULT_FILES = [os.path.join(RESULTS, f) for f in (
    "bench_linear_gather_w4_h200_c32.json", "bench_linear_gather_w4_h200_c32_lm.json",
    "bench_linear_gather_w4_h200_c32_check_a.json", "bench_linear_gather_w4_h200_c32_check_b.json",
    "bench_linear_gather_w2_h200_c32.json")]
#: held out of the fit: a third host (two W=4 runs, LM heads at T = 8..32), measured after the rule was
#: committed; tests/test_linear_cost_fit.py checks the target on these too
HELD_OUT_FILES = [os.path.join(RESULTS, f) for f in (
    "bench_linear_gather_w4_h200_c32_held_out_a.json", "bench_linear_gather_w4_h200_c32_held_out_b.json")]


def load_rows(paths):
    """(W, row) for the wide-band rows at T <= MAX_TOKENS of each results file."""
    out = []
    for path in paths:
        data = json.load(open(path))
        W = data["meta"]["W"]
        for row in data["rows"]:
            if row["T"] <= linear_cost.MAX_TOKENS and wide_band(row["T"], [row["N_r"]] * W):
                out.append((W, row))
    return out


def measured_on(paths):
    """{(card, W): [file names]}: where the results in ``paths`` were measured."""
    out = {}
    for path in paths:
        meta = json.load(open(path))["meta"]
        out.setdefault((meta["card"], meta["W"]), []).append(os.path.basename(path))
    return out


def sources(paths):
    """{constant: "card at W=..."}: which measurements each fitted constant came from.
    Raises ValueError when the files come from more than one card."""
    where = measured_on(paths)
    cards = sorted({card for card, _ in where})
    if len(cards) != 1:
        raise ValueError(f"results from {len(cards)} cards ({', '.join(cards) or 'none'}): fit each card on its own")
    worlds = sorted(W for _, W in where)
    every = f"{cards[0]} at W={', '.join(map(str, worlds))}"
    out = {name: every for name in ("CUBLAS_EFFICIENCY", "CUBLAS_FIXED_US", "GATHER_BYTES_PER_S",
                                    "FUSED_EFFICIENCY", "FUSED_FIXED_US", "FUSED_TAIL_BYTES_PER_S")}
    # one latency per W, each from that W's runs only (the fit's indicator columns)
    out.update({f"GATHER_LATENCY_US[{W}]": f"{cards[0]} at W={W}" for W in worlds})
    return out


def _lstsq(columns, target):
    a = torch.tensor(columns, dtype=torch.float64).T
    b = torch.tensor(target, dtype=torch.float64)[:, None]
    return torch.linalg.lstsq(a, b).solution[:, 0].tolist()


def fit(rows):
    """The model's constants, fitted to ``rows`` (as load_rows returns them)."""
    floor = [linear_cost.weight_floor_us(r["K"], r["N_r"]) for _, r in rows]
    egress = [r["T"] * r["N_r"] * 2 * (W - 1) / 1e6 for W, r in rows]  # MB: / (B/s) * 1e6 -> us
    fill = [min(1.0, launch_config(r["T"], r["K"], [r["N_r"]] * W)["tiles"] / linear_cost.SMS) for W, r in rows]
    slope, fixed = _lstsq([floor, [1.0] * len(rows)], [r["graph"]["cublas_only"] for _, r in rows])
    worlds = sorted({W for W, _ in rows})
    gather = _lstsq([[1.0 if W == w else 0.0 for W, _ in rows] for w in worlds] + [egress],
                    [r["graph"]["cublas_tpfuse"] - r["graph"]["cublas_only"] for _, r in rows])
    f_slope, f_fixed, f_tail = _lstsq([[f / c for f, c in zip(floor, fill)], [1.0] * len(rows), egress],
                                      [r["graph"]["fused"] for _, r in rows])
    return {"CUBLAS_EFFICIENCY": 1 / slope, "CUBLAS_FIXED_US": fixed,
            "GATHER_LATENCY_US": dict(zip(worlds, gather[:-1])), "GATHER_BYTES_PER_S": 1e6 / gather[-1] * 1e6,
            "FUSED_EFFICIENCY": 1 / f_slope, "FUSED_FIXED_US": f_fixed, "FUSED_TAIL_BYTES_PER_S": 1e6 / f_tail * 1e6}


def speedups(rows, constants=None):
    """(W, row, measured, predicted) speedups of fused over cuBLAS + the gather, with ``constants`` in place."""
    saved = {k: getattr(linear_cost, k) for k in (constants or {})}
    try:
        for k, v in (constants or {}).items():
            setattr(linear_cost, k, v)
        out = []
        for W, r in rows:
            fused, unfused = linear_cost.predict(r["T"], r["K"], [r["N_r"]] * W)
            out.append((W, r, r["graph"]["cublas_tpfuse"] / r["graph"]["fused"], unfused / fused))
        return out
    finally:
        for k, v in saved.items():
            setattr(linear_cost, k, v)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("results", nargs="*", default=DEFAULT_FILES)
    args = parser.parse_args()
    rows = load_rows(args.results)
    constants, origin = fit(rows), sources(args.results)
    print(f"{len(rows)} wide-band rows at T <= {linear_cost.MAX_TOKENS} from {len(args.results)} files")
    for (card, W), names in sorted(measured_on(args.results).items()):
        known = "in linear_cost.MEASURED" if (card, W) in linear_cost.MEASURED else "NOT in linear_cost.MEASURED"
        print(f"  measured on {card} at W={W} ({known}): {', '.join(names)}")
    for k, v in constants.items():
        if isinstance(v, dict):
            for w, x in v.items():
                print(f"  {k}[{w}] = {round(x, 1)}   (linear_cost.py: {linear_cost.GATHER_LATENCY_US.get(w)}; "
                      f"from {origin[f'{k}[{w}]']})")
        else:
            print(f"  {k} = {round(v, 3)}   (linear_cost.py: {getattr(linear_cost, k)}; from {origin[k]})")
    print(f"{'shape':13s} {'W':>2} {'T':>3} {'measured':>9} {'fitted':>7} {'now':>6}")
    fitted, now = speedups(rows, constants), speedups(rows)
    for (W, r, m, p), (*_, q) in zip(fitted, now):
        print(f"{r['shape']:13s} {W:>2} {r['T']:>3} {m:9.2f} {p:7.2f} {q:6.2f}")
    print(f"worst |error|: fitted {max(abs(m - p) for *_, m, p in fitted):.3f}, "
          f"linear_cost.py now {max(abs(m - q) for *_, m, q in now):.3f}")


if __name__ == "__main__":
    main()
