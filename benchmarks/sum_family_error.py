"""The sum family's error: vocab-parallel softmax statistics against the gathered computation.

``tpfuse::cross_entropy_hidden`` and its siblings (tpfuse/compile_ops/vocab_parallel_loss.py)
reorder sums: each rank sums ``exp`` over its own slab and the ranks' partials are merged.
This script measures what that costs in accuracy, for bf16 logits over a vocabulary of
128256 split over W = 2, 4, 8 ranks, against

- the gathered float32 computation (what HF's ``ForCausalLMLoss`` does: ``logits.float()``
  then ``F.cross_entropy``), and
- the gathered float64 computation (the exact answer, up to 1e-16),

and, as the scale to judge by, the gathered float32 computation's own error against float64.

The W slabs are simulated in one process: the script runs the op's own per-slab and merge
functions (``local_partials``, ``merge_partials``, ``local_grad``, ``finish_*``) with the
exchange replaced by ``torch.cat`` of the partials, which is what ``all_gather_hidden``
returns on every rank.  The arithmetic is the distributed op's, bit for bit.

Errors: ``abs`` = max |ours - ref|; ``rel`` = max |ours - ref| / max |ref| (over the rows, or
over the gradient's elements), so a value near 0 does not blow the ratio up.  Gradients
are compared in float32 (before the op's cast to the logits' dtype); the cast to bf16 is
reported apart for the loss's gradient, in bf16 units in the last place (ulp).

    python benchmarks/sum_family_error.py [--rows 128] [--out benchmarks/results/sum_family_error]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

import torch
import torch.nn.functional as F

from tpfuse.compile_ops.vocab_parallel_loss import (
    finish_cross_entropy,
    finish_logprobs,
    local_grad,
    local_partials,
    merge_partials,
)

VOCAB = 128256
WORLD_SIZES = (2, 4, 8)
IGNORE = -100
#: logit distributions: (name, scale, shift); LM-head logits have a std of a few units
DISTRIBUTIONS = (("std 2", 2.0, 0.0), ("std 8", 8.0, 0.0), ("std 2, +1000", 2.0, 1000.0))
QUANTITIES = ("logsumexp", "logprobs", "loss (mean)", "loss (none)", "loss (mean, smoothing 0.1)",
              "entropy", "grad of loss (mean)", "grad of entropy")


class SimulatedStats(torch.autograd.Function):
    """``tpfuse::softmax_stats_hidden`` on W simulated ranks: per-slab partials, ``cat`` as the exchange,
    the merge; backward: each slab's ``local_grad``, concatenated."""

    @staticmethod
    def forward(ctx, x, target, widths, with_logit_sum, with_entropy):
        offsets = [sum(widths[:r]) for r in range(len(widths))]
        slabs = x.split(widths, -1)
        partials = [local_partials(s, target, o, with_logit_sum, with_entropy) for s, o in zip(slabs, offsets)]
        stats = merge_partials(torch.cat(partials, -1), widths, target is not None, with_logit_sum, with_entropy)
        shift, log_sum, _, _, entropy = stats
        ctx.save_for_backward(x, target, shift, log_sum, entropy)
        ctx.widths, ctx.offsets = widths, offsets
        ctx.mark_non_differentiable(shift)
        ctx.set_materialize_grads(False)
        return stats

    @staticmethod
    def backward(ctx, _grad_shift, *grads):
        x, target, shift, log_sum, entropy = ctx.saved_tensors
        parts = [local_grad(*grads, s, target, shift, log_sum, entropy, o)
                 for s, o in zip(x.split(ctx.widths, -1), ctx.offsets)]
        return torch.cat(parts, -1), None, None, None, None


def simulated(x, target, widths):
    """Every quantity of the table from the simulated ranks, composed as the ops compose them;
    x is float32 (the bf16 values upcast, as the op does)."""
    vocab = sum(widths)
    out = {}
    shift, log_sum, *_ = SimulatedStats.apply(x, None, widths, False, False)
    out["logsumexp"] = shift + log_sum
    _, log_sum, tl, _, _ = SimulatedStats.apply(x, target, widths, False, False)
    out["logprobs"] = finish_logprobs(log_sum, tl, target, vocab, IGNORE)
    out["loss (none)"] = finish_cross_entropy(log_sum, tl, None, target, vocab, IGNORE, "none", 0.0)
    leaf = x.detach().requires_grad_()
    _, log_sum, tl, _, _ = SimulatedStats.apply(leaf, target, widths, False, False)
    loss = finish_cross_entropy(log_sum, tl, None, target, vocab, IGNORE, "mean", 0.0)
    loss.backward()
    out["loss (mean)"], out["grad of loss (mean)"] = loss.detach(), leaf.grad
    _, log_sum, tl, ls, _ = SimulatedStats.apply(x, target, widths, True, False)
    out["loss (mean, smoothing 0.1)"] = finish_cross_entropy(log_sum, tl, ls, target, vocab, IGNORE, "mean", 0.1)
    leaf = x.detach().requires_grad_()
    entropy = SimulatedStats.apply(leaf, None, widths, False, True)[4]
    entropy.sum().backward()
    out["entropy"], out["grad of entropy"] = entropy.detach(), leaf.grad
    return out


def gathered(x, target):
    """The same quantities computed by torch on the gathered logits ``x`` (float32 or float64)."""
    out = {"logsumexp": torch.logsumexp(x, -1)}
    logp = torch.log_softmax(x, -1)
    picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    out["logprobs"] = torch.where(target == IGNORE, 0.0, picked)
    leaf = x.detach().requires_grad_()
    loss = F.cross_entropy(leaf, target, ignore_index=IGNORE)
    loss.backward()
    out["loss (mean)"], out["grad of loss (mean)"] = loss.detach(), leaf.grad
    out["loss (none)"] = F.cross_entropy(x, target, ignore_index=IGNORE, reduction="none")
    out["loss (mean, smoothing 0.1)"] = F.cross_entropy(x, target, ignore_index=IGNORE, label_smoothing=0.1)
    leaf = x.detach().requires_grad_()
    logp = torch.log_softmax(leaf, -1)
    entropy = -(logp.exp() * logp).sum(-1)
    entropy.sum().backward()
    out["entropy"], out["grad of entropy"] = entropy.detach(), leaf.grad
    return out


def errors(ours, ref) -> tuple[float, float]:
    """(max abs error, max abs error / max |ref|), in float64."""
    diff = (ours.double() - ref.double()).abs().max().item()
    return diff, diff / max(ref.double().abs().max().item(), 1e-30)


def bf16_ulps(ours_fp32, ref_fp32) -> int:
    """The largest difference, in bf16 ulps, between the two gradients once cast to bf16 (as returned)."""
    a = ours_fp32.to(torch.bfloat16).view(torch.int16).int()
    b = ref_fp32.to(torch.bfloat16).view(torch.int16).int()
    same_sign = (a < 0) == (b < 0)
    return int(torch.where(same_sign, (a - b).abs(), (a & 0x7FFF) + (b & 0x7FFF)).max())


def inputs(rows: int, scale: float, shift: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, VOCAB, generator=g) * scale + shift).to(torch.bfloat16)
    target = torch.randint(0, VOCAB, (rows,), generator=g)
    target[::8] = IGNORE  # one row in eight ignored, as padding is
    return x, target


def measure(rows: int) -> list[dict]:
    results = []
    for d, (dist_name, scale, shift) in enumerate(DISTRIBUTIONS):
        x, target = inputs(rows, scale, shift, seed=d)
        ref32, ref64 = gathered(x.float(), target), gathered(x.double(), target)
        for world_size in WORLD_SIZES:
            widths = [VOCAB // world_size] * world_size
            ours = simulated(x.float(), target, widths)
            for q in QUANTITIES:
                row = {"distribution": dist_name, "W": world_size, "quantity": q,
                       "vs_fp32": errors(ours[q], ref32[q]), "vs_fp64": errors(ours[q], ref64[q]),
                       "fp32_vs_fp64": errors(ref32[q], ref64[q])}
                if q == "grad of loss (mean)":  # (the entropy's gradient has entries near 0, where ulps say nothing)
                    row["bf16_ulps"] = bf16_ulps(ours[q], ref32[q])
                results.append(row)
    return results


def worst(results: list[dict]) -> list[dict]:
    """Per (W, quantity): the largest error over the distributions."""
    table = {}
    for r in results:
        key = (r["W"], r["quantity"])
        t = table.setdefault(key, {"W": r["W"], "quantity": r["quantity"]})
        for field in ("vs_fp32", "vs_fp64", "fp32_vs_fp64"):
            old = t.get(field, (0.0, 0.0))
            t[field] = (max(old[0], r[field][0]), max(old[1], r[field][1]))
        if "bf16_ulps" in r:
            t["bf16_ulps"] = max(t.get("bf16_ulps", 0), r["bf16_ulps"])
    return [table[k] for k in sorted(table, key=lambda k: (k[0], QUANTITIES.index(k[1])))]


def markdown(rows: list[dict]) -> str:
    lines = ["| W | quantity | vs fp32 gathered: abs | rel | vs fp64: abs | rel | fp32 gathered vs fp64: abs | rel "
             "| as bf16: ulps vs fp32 gathered |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        cells = [f"{v:.1e}" for f in ("vs_fp32", "vs_fp64", "fp32_vs_fp64") for v in r[f]]
        ulps = str(r["bf16_ulps"]) if "bf16_ulps" in r else ""
        lines.append(f"| {r['W']} | {r['quantity']} | " + " | ".join(cells) + f" | {ulps} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--out", default=None, help="write <out>.json and <out>.md")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    results = measure(args.rows)
    table = worst(results)
    header = (f"# sum family error: bf16 logits, vocab {VOCAB}, {args.rows} rows per distribution "
              f"({', '.join(d[0] for d in DISTRIBUTIONS)}), one row in 8 ignored; worst over the distributions\n"
              f"# torch {torch.__version__}, {platform.machine()}, python {sys.version.split()[0]}")
    text = f"{header}\n\n{markdown(table)}\n"
    print(text)
    if args.out:
        with open(f"{args.out}.md", "w") as f:
            f.write(text)
        with open(f"{args.out}.json", "w") as f:
            json.dump({"vocab": VOCAB, "rows": args.rows, "torch": torch.__version__,
                       "distributions": DISTRIBUTIONS, "results": results, "worst": table}, f, indent=1)


if __name__ == "__main__":
    main()
