"""Micro-benchmark, one GPU: the LM head with the local reduction fused into its GEMM, against the composition.

    PYTHONPATH=. python benchmarks/bench_lm_head_fusion.py --out benchmarks/results/bench_lm_head_fusion_h200.json

The default grid (T = 1, 8, 32, 128, 1024; W = 2, 4; vocab 128256 and 152064; both consumers: 40 rows)
is sized for one run of about five minutes on one H200, most of it compiling; T >= 1024 replays fewer
calls and fewer times (``--calls`` / 4, ``--repeats`` / 3).

One rank's step of gather elimination at an LM head (docs/passes.md, "Gather elimination"), no exchange:
rank 0's weight slab ``W_r [w, H]`` with ``w = vocab / W``, random bf16 ``x [T, H]`` and ``W_r``; per
(vocab, W, T, consumer), under CUDA-graph replay (``--calls`` calls per replay, median of ``--repeats``):

- ``linear``: ``F.linear(x, W_r)`` alone (cuBLAS): what the fused kernel's GEMM competes with;
- ``composition``: ``F.linear`` then tpfuse's existing local kernel on the logits slab
  (argmax: ``reduce_kernels.local_partials``; softmax: ``softmax_kernels.local_launch`` with a target);
- ``fused``: ``lm_head_kernels.argmax_partials`` / ``softmax_partials`` (kernels/lm_head_reduce.py:
  the GEMM with the reduction in its epilogue, then the per-row combine; no logits written);
- ``floor``: W_r's bytes at ``--hbm-tbps`` (4.8 TB/s, the H200's datasheet figure), the bound at decode;
- ``--plans``: the fused kernel with other tile plans too (``BMxBNxBKxWARPSxSTAGES[xswap]``).

Before timing, each row checks the fused result against the composition: on integer data (logits
exact in fp32 in any summation order) argmax bit for bit, softmax's shift and target logit exactly
and its log_sum within fp32 rounding of the sum of exps (``log_sum_error``: the sum is added in
another order, so it agrees to rounding, not bit for bit); on the timing data (random normal) within
one bf16 ulp of cuBLAS's logits, with the same index wherever the maximum is distinct
(tests/gpu/test_lm_head_reduce_gpu.py says why).  A row whose check fails (or that raises) is
recorded as failed, with the reason, and the run goes on to the next row; the exit status is 1
if any row failed.  The JSON is rewritten after every row, so a run cut short keeps what it measured.
Each graph's outputs are filled with NaN (floats) or -1 (integers) after capture and must equal the
eager call after one replay, so a replay that wrote nothing cannot pass.  Prints the card, versions
and a table; writes JSON to ``--out``.

Prediction (written before the first GPU run; the floor is in kernels/lm_head_reduce.py's docstring):
- T <= 32: bound by W_r's bytes.  The fused GEMM streams like kernels/linear_push.py's GEMM alone
  (3.98-4.0 TB/s at T = 8, W = 4, against cuBLAS's ~3.9; benchmarks/NOTES.md, "Fourth sweep"), and
  saves the local kernel (~2-4 µs with its launch): composition / fused ≈ 1.03-1.08x (W = 4), a
  little less at W = 2 where the stream is twice as long.  Below 1.0x would mean the fused GEMM
  streams slower than cuBLAS, not that fusing costs.
- T = 128: ≈ 1.0-1.1x (16-33 MB of logits saved, the local kernel ~5-8 µs).
- T = 1024 and 4096: compute bound; a plain (not warp-specialised, not persistent) Triton GEMM runs
  at ~75-90 % of cuBLAS on Hopper, and the saving is ≤ ~10 % (the local kernel's ~100 µs of
  1.1-2.6 ms): ≈ 0.85-1.05x, more likely below 1.0x.

Measured (one H200, vocab 128256 at W = 2 only; benchmarks/results/bench_lm_head_fusion_h200_2026-12-04_first.log):
1.02-1.04x at T = 1 and 8, 0.96-1.0x at T = 32, 0.75x at T = 128 (argmax).  The decision rule that
follows is in kernels/lm_head_reduce.py's docstring.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

for _k, _v in {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}.items():
    os.environ[_k] = _v  # never NVLink multicast on the shared hosts (docs/safety.md, "Multicast")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tpfuse.compile_ops import lm_head_kernels as lmk  # noqa: E402
from tpfuse.compile_ops import reduce_kernels as rk  # noqa: E402
from tpfuse.compile_ops import softmax_kernels as sk  # noqa: E402
from tpfuse.kernels import lm_head_reduce, vocab_softmax  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tests load this file by its path
import compiled_tp_bench as cb  # noqa: E402

CONSUMERS = ("argmax", "softmax")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--vocab", default="128256,152064")
    p.add_argument("--world", default="2,4", help="W: the slab is vocab / W columns")
    p.add_argument("--tokens", default="1,8,32,128,1024")
    p.add_argument("--consumers", default=",".join(CONSUMERS))
    p.add_argument("--calls", type=int, default=20, help="calls per graph replay (T >= 1024: a quarter, >= 3)")
    p.add_argument("--repeats", type=int, default=30, help="replays timed (T >= 1024: a third, >= 10)")
    p.add_argument("--hbm-tbps", type=float, default=4.8)
    p.add_argument("--plans", default="", help="more fused tile plans, e.g. 16x64x128x4x6xswap,128x256x64x8x3")
    p.add_argument("--out", default="")
    return p.parse_args(argv)


def parse_plan(text: str) -> dict:
    """``BMxBNxBKxWARPSxSTAGES[xswap]`` -> a tile plan (lm_head_reduce.check_plan says what is accepted)."""
    parts = text.split("x")
    swap = parts[-1] == "swap"
    numbers = parts[:-1] if swap else parts
    if len(numbers) != 5 or not all(n.isdigit() for n in numbers):
        raise ValueError(f"a plan is BMxBNxBKxWARPSxSTAGES with an optional xswap, e.g. 16x128x128x8x4xswap; "
                         f"got {text!r}")
    bm, bn, bk, warps, stages = (int(n) for n in numbers)
    plan = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SWAP_AB": swap, "num_warps": warps, "num_stages": stages}
    lm_head_reduce.check_plan(plan)
    return plan


def plan_name(plan: dict) -> str:
    swap = "xswap" if plan["SWAP_AB"] else ""
    return f"{plan['BLOCK_M']}x{plan['BLOCK_N']}x{plan['BLOCK_K']}x{plan['num_warps']}x{plan['num_stages']}{swap}"


# --------------------------------------------------------------------------- the steps


def composition(consumer, x, weight, target):
    width = weight.shape[0]
    if consumer == "argmax":
        return lambda: rk.local_partials(F.linear(x, weight), 0, width, True)
    splits, chunk = vocab_softmax.split_plan(x.shape[0], width)

    def step():
        launch, partials = sk.local_launch(F.linear(x, weight), target, 0, False, False, splits, chunk)
        sk.run(launch, x.device)
        return partials
    return step


def fused(consumer, x, weight, target, plan=None):
    if consumer == "argmax":
        return lambda: lmk.argmax_partials(x, weight, 0, plan)
    return lambda: lmk.softmax_partials(x, weight, 0, target, plan)


def merged(consumer, partials, x, weight, target, splits=1, chunk=None):
    """The merge of this one rank's partials: (values, indices) or (shift, log_sum, target_logit)."""
    if consumer == "argmax":
        return rk.merge(partials, x.dtype, True)
    launch, stats = sk.merge_launch(partials, [weight.shape[0]], splits, chunk or weight.shape[0], True, False, False)
    sk.run(launch, x.device)
    return stats[:3]


def composition_merged(consumer, x, weight, target):
    splits, chunk = vocab_softmax.split_plan(x.shape[0], weight.shape[0])
    return merged(consumer, composition(consumer, x, weight, target)(), x, weight, target, splits, chunk)


# --------------------------------------------------------------------------- the checks


def integer_data(T, width, hidden, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randint(-2, 3, (T, hidden), generator=g, device="cuda").to(dtype)
    weight = torch.randint(-2, 3, (width, hidden), generator=g, device="cuda").to(dtype)
    return x, weight, torch.randint(0, width, (T,), generator=g, device="cuda")


#: how far the fused log_sum may be from the composition's on integer data, as a relative error of the
#: sum of exps S (``log_sum_error``): the same logits, their exps added in another order (tiles of
#: BLOCK_N, then the combine; against splits of the row) and rescaled by other factors.  Measured in
#: Triton's interpreter (T = 128, w = 64128, H = 4096, plan 64x128x64x8x3): 1.2e-7, one fp32 ulp of
#: an S near 1, the composition being as far from float64 on the other side
SUM_TOLERANCE = 1e-6


def log_sum_error(ours, want):
    """The largest ``|ours - want| / (1 + |want|)`` over rows (0.0 for no finite row; inf where the rows'
    NaN or infinities differ).

    ``log_sum = log S``, so an absolute difference of log_sum is a relative difference of S
    (d log S = dS / S), which is what the order of a float32 sum moves; ``+ |want|`` allows log's own
    rounding where |log_sum| > 1.  Not relative to log_sum itself: where the row's maximum leads by a
    few units, S = 1 + e^-gap + ... and log_sum ~ 1e-6; one ulp of S (1.2e-7) is then several percent
    of log_sum, so a relative bound on log_sum would ask S to be exact below float32's resolution.
    (That bound stopped the first H200 run at softmax T=128 w=64128, on a correct result:
    benchmarks/results/bench_lm_head_fusion_h200_2026-12-04_first.log.)"""
    ours, want = ours.double(), want.double()
    if not (torch.equal(ours.isnan(), want.isnan())
            and torch.equal(torch.where(ours.isinf(), ours, 0.0), torch.where(want.isinf(), want, 0.0))):
        return math.inf
    finite = want.isfinite()
    if not finite.any():
        return 0.0
    return float(((ours - want).abs() / (1 + want.abs()))[finite].max())


def softmax_agrees(ours, want) -> bool:
    """(shift, log_sum, target_logit) of the fused and the composition on integer data: shift and the
    target's logit are a max and a pick of the same logits, exact; log_sum within ``SUM_TOLERANCE``."""
    return (_same_values(ours[0], want[0]) and _same_values(ours[2], want[2])
            and log_sum_error(ours[1], want[1]) <= SUM_TOLERANCE)


def _same_values(a, b) -> bool:
    """Equal values, NaN where the other is NaN."""
    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and torch.equal(torch.where(nan, 0.0, a), torch.where(nan, 0.0, b))


def check_exact(consumer, T, width, hidden, dtype):
    """Integer data: every dot product exact in fp32, so cuBLAS's logits and the fused kernel's agree;
    argmax bit for bit, softmax as ``softmax_agrees``."""
    matmul = torch.backends.cuda.matmul
    saved = matmul.allow_bf16_reduced_precision_reduction  # cuBLAS's split-K in bf16 would round the sums
    matmul.allow_bf16_reduced_precision_reduction = False
    try:
        x, weight, target = integer_data(T, width, hidden, dtype, seed=T)
        ours = merged(consumer, fused(consumer, x, weight, target)(), x, weight, target)
        want = composition_merged(consumer, x, weight, target)
    finally:
        matmul.allow_bf16_reduced_precision_reduction = saved
    if consumer == "argmax":
        ok = torch.equal(ours[0].view(torch.int16), want[0].view(torch.int16)) and torch.equal(ours[1], want[1])
        detail = ""
    else:
        ok = softmax_agrees(ours, want)
        detail = f" (log_sum error {log_sum_error(ours[1], want[1]):.3g}, bound {SUM_TOLERANCE:g})"
    if not ok:
        raise AssertionError(f"{consumer} T={T} w={width}: the fused result differs from the composition on "
                             f"integer data{detail}")


def check_close(consumer, x, weight, target):
    """Random data: within one bf16 ulp of cuBLAS's logits; the same index where the maximum is distinct.
    Returns the rows whose indices agree (argmax) or the largest |difference| of logsumexp in ulps."""
    ours = merged(consumer, fused(consumer, x, weight, target)(), x, weight, target)
    want = composition_merged(consumer, x, weight, target)
    logits = F.linear(x, weight).float()
    eps = torch.finfo(x.dtype).eps
    if consumer == "argmax":
        ulp = eps * want[0].float().abs()
        top2 = logits.topk(2, -1).values
        distinct = (top2[:, 0] - top2[:, 1]) > 2 * ulp
        ok = (((ours[0].float() - want[0].float()).abs() <= ulp).all()
              and torch.equal(ours[1][distinct], want[1][distinct]))
        agree = int((ours[1] == want[1]).sum())
    else:
        ulp = eps * logits.abs().amax(-1)
        gap = ((ours[0] + ours[1]) - (want[0] + want[1])).abs()
        ok = (gap <= ulp + 1e-5 * (want[0] + want[1]).abs()).all()
        agree = float((gap / ulp).max())
    if not bool(ok):
        raise AssertionError(f"{consumer} T={x.shape[0]} w={weight.shape[0]}: the fused result is more than one "
                             "bf16 ulp from the composition's on random data")
    return agree


# --------------------------------------------------------------------------- timing


def _poison(out):
    for t in (out if isinstance(out, (tuple, list)) else (out,)):
        t.fill_(float("nan") if t.is_floating_point() else -1)


def _same(a, b):
    return torch.equal(torch.nan_to_num(a), torch.nan_to_num(b)) if a.is_floating_point() else torch.equal(a, b)


def time_graph(step, calls, repeats):
    """Median µs per call over ``repeats`` replays of a graph of ``calls`` calls; each output of the graph
    filled with NaN / -1 after capture must equal the eager call after one replay."""
    want = step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [step() for _ in range(calls)]
    for out in outs:
        _poison(out)
    graph.replay()
    torch.cuda.synchronize()
    if not all(_same(out, want) for out in outs):
        raise AssertionError("a graph replay left an output unwritten or wrong")
    for _ in range(3):
        graph.replay()
    samples = cb.replay_us(graph, calls, repeats)
    del graph, outs
    return statistics.median(samples)


#: T from which a GEMM is compute bound and a call takes ~1 ms: fewer calls per replay, fewer replays
LARGE_TOKENS = 1024
#: what names a row of the grid (the JSON keys of its first four fields)
CELL_KEYS = ("vocab", "W", "T", "consumer")


def replays(T, args) -> tuple[int, int]:
    """(calls per replay, replays timed): fewer of both for T >= LARGE_TOKENS, where each call is long."""
    if T < LARGE_TOKENS:
        return args.calls, args.repeats
    return max(3, args.calls // 4), max(10, args.repeats // 3)


def row(vocab, world, T, consumer, args, plans):
    width = -(-vocab // world)
    dtype = torch.bfloat16
    check_exact(consumer, T, width, args.hidden, dtype)
    g = torch.Generator(device="cuda").manual_seed(vocab + world + T)
    x = torch.randn(T, args.hidden, generator=g, device="cuda").to(dtype)
    weight = (torch.randn(width, args.hidden, generator=g, device="cuda") * args.hidden**-0.5 * 4).to(dtype)
    target = torch.randint(0, width, (T,), generator=g, device="cuda")
    agreement = check_close(consumer, x, weight, target)
    calls, repeats = replays(T, args)
    weight_bytes = width * args.hidden * weight.element_size()
    out = {"vocab": vocab, "W": world, "w": width, "T": T, "consumer": consumer, "calls": calls, "repeats": repeats,
           "plan": plan_name(lm_head_reduce.tile_plan(T, width)),
           "floor_us": weight_bytes / (args.hbm_tbps * 1e12) * 1e6,
           "logits_saved_bytes": 2 * T * width * weight.element_size(),
           "linear_us": time_graph(lambda: F.linear(x, weight), calls, repeats),
           "composition_us": time_graph(composition(consumer, x, weight, target), calls, repeats),
           "fused_us": time_graph(fused(consumer, x, weight, target), calls, repeats),
           "agreement": agreement}
    out["ratio"] = out["composition_us"] / out["fused_us"]
    out["fused_weight_tbps"] = weight_bytes / out["fused_us"] / 1e6
    out["plans"] = {plan_name(p): time_graph(fused(consumer, x, weight, target, p), calls, repeats)
                    for p in plans}
    return out


# --------------------------------------------------------------------------- the grid


def grid(args) -> list[tuple]:
    return [(int(vocab), int(world), int(T), consumer) for vocab in args.vocab.split(",")
            for world in args.world.split(",") for T in args.tokens.split(",")
            for consumer in args.consumers.split(",")]


def measure_all(cells, measure, emit) -> list[dict]:
    """``measure(*cell)`` for each cell in turn.  A cell whose check fails, or that raises anything else,
    becomes a failed row (``failed``: the exception's type and message) and the next cell runs: one
    wrong row must not hide the others' numbers.  ``emit(row, rows so far)`` after each row."""
    rows = []
    for cell in cells:
        start = time.perf_counter()
        try:
            r = measure(*cell)
        except Exception as error:  # noqa: BLE001 -- recorded as the row's result and reported at the end
            r = {**dict(zip(CELL_KEYS, cell)), "failed": f"{type(error).__name__}: {error}"}
        r["seconds"] = round(time.perf_counter() - start, 2)
        rows.append(r)
        emit(r, rows)
    return rows


def failed_rows(rows) -> list[dict]:
    return [r for r in rows if "failed" in r]


def table_line(r, plans) -> str:
    head = f"| {r['vocab']} | {r['W']} | {r['T']} | {r['consumer']} |"
    if "failed" in r:
        return f"{head} FAILED: {r['failed']} |"
    more = "".join(f" {r['plans'][plan_name(p)]:.1f} |" for p in plans)
    return (f"{head} {r['plan']} | {r['floor_us']:.1f} | {r['linear_us']:.1f} | {r['composition_us']:.1f} "
            f"| {r['fused_us']:.1f} | {r['ratio']:.3f}x | {r['linear_us'] / r['fused_us']:.3f}x "
            f"| {r['fused_weight_tbps']:.2f} |{more}")


def write_json(path, meta, rows) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({**meta, "rows": rows}, f, indent=1)


def main(argv=None) -> int:
    """Measures the grid; 1 if any row failed (each named at the end), else 0."""
    args = parse_args(argv)
    import triton

    plans = [parse_plan(p) for p in args.plans.split(",") if p]
    meta = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "hidden": args.hidden, "dtype": "bfloat16", "hbm_tbps": args.hbm_tbps, "repeats": args.repeats,
            "calls": args.calls}
    print(f"card: {meta['card']} | torch {meta['torch']} | triton {meta['triton']} | hidden {args.hidden}, bf16 "
          f"| floor: W_r bytes at {args.hbm_tbps} TB/s | CUDA-graph replay, median of {args.repeats} "
          f"(T >= {LARGE_TOKENS}: {replays(LARGE_TOKENS, args)[1]})")
    extra = "".join(f" {plan_name(p)} µs |" for p in plans)
    print(f"| vocab | W | T | consumer | plan | floor µs | linear µs | composition µs | fused µs | comp/fused "
          f"| linear/fused | fused TB/s |{extra}")
    print("|---" * (12 + len(plans)) + "|")

    def emit(r, rows):
        print(table_line(r, plans), flush=True)
        torch.cuda.empty_cache()
        if args.out:
            write_json(args.out, meta, rows)

    began = time.perf_counter()
    rows = measure_all(grid(args), lambda *cell: row(*cell, args, plans), emit)
    failed = failed_rows(rows)
    print(f"{len(rows)} rows in {time.perf_counter() - began:.0f} s; {len(failed)} failed")
    for r in failed:
        print(f"FAILED vocab {r['vocab']} W {r['W']} T {r['T']} {r['consumer']}: {r['failed']}")
    if args.out:
        print(f"wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
