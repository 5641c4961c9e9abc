"""Micro-benchmark, one GPU: the LM head with the local reduction fused into its GEMM, against the composition.

    PYTHONPATH=. python benchmarks/bench_lm_head_fusion.py --out benchmarks/results/bench_lm_head_fusion_h200.json

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

Before timing, each row checks the fused result against the composition: on integer data (exact in
fp32 in any summation order) bit for bit (argmax) and exactly / within fp32 rounding (softmax); on
the timing data (random normal) within one bf16 ulp of cuBLAS's logits, with the same index wherever
the maximum is distinct (tests/gpu/test_lm_head_reduce_gpu.py says why).  Each graph's outputs are
filled with NaN (floats) or -1 (integers) after capture and must equal the eager call after one
replay, so a replay that wrote nothing cannot pass.  Prints the card, versions and a table; writes
JSON to ``--out``.

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
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

for _k, _v in {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}.items():
    os.environ[_k] = _v  # never NVLink multicast on the shared hosts (docs/safety.md, "Multicast")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tpfuse.compile_ops import lm_head_kernels as lmk  # noqa: E402
from tpfuse.compile_ops import reduce_kernels as rk  # noqa: E402
from tpfuse.compile_ops import softmax_kernels as sk  # noqa: E402
from tpfuse.kernels import lm_head_reduce, vocab_softmax  # noqa: E402

CONSUMERS = ("argmax", "softmax")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--vocab", default="128256,152064")
    p.add_argument("--world", default="2,4", help="W: the slab is vocab / W columns")
    p.add_argument("--tokens", default="1,8,32,128,1024,4096")
    p.add_argument("--consumers", default=",".join(CONSUMERS))
    p.add_argument("--calls", type=int, default=20, help="calls per graph replay (T >= 1024: a quarter, >= 3)")
    p.add_argument("--repeats", type=int, default=30)
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


def check_exact(consumer, T, width, hidden, dtype):
    """Integer data: every dot product exact in fp32, so cuBLAS's logits and the fused kernel's agree."""
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
    else:
        ok = (torch.equal(ours[0], want[0]) and torch.equal(ours[2], want[2])
              and ((ours[1] - want[1]).abs() <= 1e-6 * want[1].abs()).all().item())
    if not ok:
        raise AssertionError(f"{consumer} T={T} w={width}: the fused result differs from the composition on "
                             "integer data (exact sums)")


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
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / calls)
    del graph, outs
    return statistics.median(samples)


def row(vocab, world, T, consumer, args, plans):
    width = -(-vocab // world)
    dtype = torch.bfloat16
    check_exact(consumer, T, width, args.hidden, dtype)
    g = torch.Generator(device="cuda").manual_seed(vocab + world + T)
    x = torch.randn(T, args.hidden, generator=g, device="cuda").to(dtype)
    weight = (torch.randn(width, args.hidden, generator=g, device="cuda") * args.hidden**-0.5 * 4).to(dtype)
    target = torch.randint(0, width, (T,), generator=g, device="cuda")
    agreement = check_close(consumer, x, weight, target)
    calls = args.calls if T < 1024 else max(3, args.calls // 4)
    weight_bytes = width * args.hidden * weight.element_size()
    out = {"vocab": vocab, "W": world, "w": width, "T": T, "consumer": consumer, "calls": calls,
           "plan": plan_name(lm_head_reduce.tile_plan(T, width)),
           "floor_us": weight_bytes / (args.hbm_tbps * 1e12) * 1e6,
           "logits_saved_bytes": 2 * T * width * weight.element_size(),
           "linear_us": time_graph(lambda: F.linear(x, weight), calls, args.repeats),
           "composition_us": time_graph(composition(consumer, x, weight, target), calls, args.repeats),
           "fused_us": time_graph(fused(consumer, x, weight, target), calls, args.repeats),
           "agreement": agreement}
    out["ratio"] = out["composition_us"] / out["fused_us"]
    out["fused_weight_tbps"] = weight_bytes / out["fused_us"] / 1e6
    out["plans"] = {plan_name(p): time_graph(fused(consumer, x, weight, target, p), calls, args.repeats)
                    for p in plans}
    return out


def main(argv=None):
    args = parse_args(argv)
    import triton

    plans = [parse_plan(p) for p in args.plans.split(",") if p]
    meta = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "hidden": args.hidden, "dtype": "bfloat16", "hbm_tbps": args.hbm_tbps, "repeats": args.repeats}
    print(f"card: {meta['card']} | torch {meta['torch']} | triton {meta['triton']} | hidden {args.hidden}, bf16 "
          f"| floor: W_r bytes at {args.hbm_tbps} TB/s | CUDA-graph replay, median of {args.repeats}")
    extra = "".join(f" {plan_name(p)} µs |" for p in plans)
    print(f"| vocab | W | T | consumer | plan | floor µs | linear µs | composition µs | fused µs | comp/fused "
          f"| linear/fused | fused TB/s |{extra}")
    print("|---" * (12 + len(plans)) + "|")
    rows = []
    for vocab in (int(v) for v in args.vocab.split(",")):
        for world in (int(w) for w in args.world.split(",")):
            for T in (int(t) for t in args.tokens.split(",")):
                for consumer in args.consumers.split(","):
                    r = row(vocab, world, T, consumer, args, plans)
                    rows.append(r)
                    more = "".join(f" {r['plans'][plan_name(p)]:.1f} |" for p in plans)
                    print(f"| {vocab} | {world} | {T} | {consumer} | {r['plan']} | {r['floor_us']:.1f} "
                          f"| {r['linear_us']:.1f} | {r['composition_us']:.1f} | {r['fused_us']:.1f} "
                          f"| {r['ratio']:.3f}x | {r['linear_us'] / r['fused_us']:.3f}x "
                          f"| {r['fused_weight_tbps']:.2f} |{more}", flush=True)
                    torch.cuda.empty_cache()
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({**meta, "rows": rows}, f, indent=1)
        print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
