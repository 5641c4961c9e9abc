"""Run the sum family's kernels (kernels/vocab_softmax.py) in Triton's interpreter, W ranks simulated in one process.

Each case splits gathered logits into W slabs and runs, per rank, the launches that the op's
CUDA path builds (compile_ops/softmax_kernels.py: ``local_launch``, ``merge_launch``,
``grad_launch``; the same grids, strides, splits and constexprs), the exchange being
``torch.cat`` of the ranks' partials, which is what ``all_gather_hidden`` returns on every
rank.  The reference is the CPU composition of compile_ops/vocab_parallel_loss.py
(``local_partials``, ``merge_partials``, ``local_grad``) on the same slabs.

Per case it reports the largest error of each statistic and of the gradient, relative to
the largest finite magnitude of the reference (the measure of docs/passes.md's error
table), whether NaN and infinities sit where the reference has them, and, for the
gradient in bf16/fp16, the largest distance in units in the last place.  The negative
control merges with one split too few: the check must fail.

Prints one JSON line (tests/test_vocab_softmax_kernels.py runs it in a subprocess, because
the interpreter is chosen when Triton is imported).
"""

import json
import math
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from tpfuse.compile_ops import softmax_kernels as sk  # noqa: E402
from tpfuse.compile_ops import vocab_parallel_loss as vpl  # noqa: E402
from tpfuse.kernels import vocab_softmax  # noqa: E402

IGNORE = -100
STATS = ("shift", "log_sum", "target_logit", "logit_sum", "entropy")


def interpret(launch):
    if launch is not None:
        launch.kernel[launch.grid](*launch.args, **launch.constexprs)


def logits(T, vocab, dtype, seed, kind):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, vocab, generator=g) * 3
    if kind == "adversarial":
        x[0, ::3] = -math.inf  # scattered -inf
        x[1, : vocab // 2] = -math.inf  # whole slabs of the low ranks hold only -inf
        x[2, 1] = -math.inf  # -inf at the target (set below): loss +inf
        x[3, :] = x[3, 0]  # all equal
        x[4, vocab // 3] = math.nan  # a NaN in one slab: the whole row is NaN
        x[5] = x[5] * 1000 + 1e6  # large: the statistics stay relative to the max
        x[6, :] = -math.inf  # a row of -inf only: neutral partials everywhere, log_sum -inf
    return x.to(dtype)


def targets(T, vocab, seed, kind, dtype):
    g = torch.Generator().manual_seed(seed + 1)
    t = torch.randint(0, vocab, (T,), generator=g)
    t[::4] = IGNORE
    if kind == "adversarial":
        t[2] = 1
    return t.to(dtype)


def slabs_of(x, widths, padding):
    """Each rank's slab: its valid columns, followed by ``padding`` columns (the padded vocab),
    so that the kernels read rows whose stride is wider than their width."""
    out, offset = [], 0
    for w in widths:
        slab = torch.cat([x[..., offset: offset + w], torch.full((*x.shape[:-1], padding), 7.0, dtype=x.dtype)], -1)
        out.append(slab)
        offset += w
    return out


def reference(slabs, widths, target, flags):
    offsets = [sum(widths[:r]) for r in range(len(widths))]
    parts = [vpl.local_partials(s[..., :w], target, o, *flags) for s, w, o in zip(slabs, widths, offsets)]
    return vpl.merge_partials(torch.cat(parts, -1), widths, target is not None, *flags)


def kernels(slabs, widths, target, flags, merge_splits_off=0):
    """The CUDA path's launches, interpreted; every rank merges the same exchanged partials."""
    T = math.prod(slabs[0].shape[:-1])
    splits, chunk = vocab_softmax.split_plan(T, max(widths))
    offsets = [sum(widths[:r]) for r in range(len(widths))]
    parts, aligned = [], set()
    for slab, w, o in zip(slabs, widths, offsets):
        launch, partials = sk.local_launch(slab[..., :w], target, o, *flags, splits, chunk)
        interpret(launch)
        parts.append(partials)
        aligned.add(launch.variant[-1])
    gathered = torch.cat(parts, -1)
    launch, stats = sk.merge_launch(gathered, widths, splits - merge_splits_off, chunk, target is not None, *flags)
    interpret(launch)
    return stats, splits, aligned


def error(ours, ref):
    """(max |ours - ref| / max |ref| over finite references, do NaN and infinities match)."""
    ours, ref = ours.double(), ref.double()
    same_specials = bool(torch.equal(torch.isnan(ours), torch.isnan(ref))
                         and torch.equal(torch.where(torch.isinf(ref), ref, 0), torch.where(torch.isinf(ref), ours, 0)))
    finite = torch.isfinite(ref)
    if not finite.any():
        return 0.0, same_specials
    scale = ref[finite].abs().max().clamp(min=1e-30)
    diff = (ours[finite] - ref[finite]).abs()
    return float(diff.max() / scale) if torch.isfinite(diff).all() else math.inf, same_specials


def ulps(ours, ref):
    """Largest distance in units in the last place of the gradient's dtype (finite entries)."""
    if ours.dtype == torch.float32:
        return 0
    finite = torch.isfinite(ref.float())
    bits = {torch.bfloat16: torch.int16, torch.float16: torch.int16}[ours.dtype]
    a, b = ours[finite].view(bits).int(), ref[finite].view(bits).int()
    # same sign: the difference of the bit patterns; across zero: the sum of both distances to 0
    a = torch.where(a < 0, -(a & 0x7FFF), a)
    b = torch.where(b < 0, -(b & 0x7FFF), b)
    return int((a - b).abs().max()) if a.numel() else 0


def grads(slabs, widths, target, stats, flags, seed):
    """Every rank's gradient from the kernel and from the composition, for random upstream gradients."""
    g = torch.Generator().manual_seed(seed + 2)
    lead = slabs[0].shape[:-1]
    shift, log_sum, _, _, entropy = stats
    # the first as the gradient of a mean arrives: one number expanded over the rows (stride 0)
    upstream = [torch.randn((), generator=g).expand(lead),
                torch.randn(lead, generator=g) if target is not None else None,
                torch.randn(lead, generator=g) if flags[0] else None, torch.randn(lead, generator=g) if flags[1] else None]
    results = []
    for r, (slab, w) in enumerate(zip(slabs, widths)):
        offset = sum(widths[:r])
        launch, ours = sk.grad_launch(*upstream, slab, target, shift, log_sum, entropy, w, offset)
        interpret(launch)
        ref = vpl.local_grad(*upstream, slab[..., :w], target, shift, log_sum, entropy, offset)
        ref = torch.cat([ref, torch.zeros(*lead, slab.shape[-1] - w, dtype=ref.dtype)], -1)
        results.append((ours, ref))
    return results


CASES = [
    # (name, widths, T, dtype, target dtype, kind, (with_logit_sum, with_entropy), padding)
    ("bf16 two ranks, one row split", (5000, 4100), 1, torch.bfloat16, torch.int64, "normal", (False, False), 0),
    ("bf16 every statistic, T=7", (5000, 4100), 7, torch.bfloat16, torch.int64, "normal", (True, True), 0),
    ("fp32 rows of two tiles, one split", (5000, 4100), 300, torch.float32, torch.int32, "normal", (True, False), 0),
    ("fp32 adversarial rows, padded slabs", (3000, 2500, 3100), 7, torch.float32, torch.int64, "adversarial",
     (True, True), 24),
    ("bf16 adversarial rows, a rank of zero columns", (4100, 0, 2600), 7, torch.bfloat16, torch.int64, "adversarial",
     (True, True), 8),
    ("fp16 narrow, unaligned widths", (1001, 77, 600), 5, torch.float16, torch.int32, "normal", (True, True), 3),
    ("bf16 16-byte aligned rows, padded", (4096, 4096, 2048), 3, torch.bfloat16, torch.int64, "normal", (True, False),
     16),
    ("fp32 logsumexp only (no target)", (2100, 2100), 3, torch.float32, None, "normal", (False, True), 0),
]


def run_case(name, widths, T, dtype, target_dtype, kind, flags, padding, seed=0):
    vocab = sum(widths)
    x = logits(T, vocab, dtype, seed, kind)
    target = targets(T, vocab, seed, kind, target_dtype) if target_dtype is not None else None
    slabs = slabs_of(x, widths, padding)
    ref = reference(slabs, widths, target, flags)
    ours, splits, aligned = kernels(slabs, widths, target, flags)
    stats = {n: error(o, r) for n, o, r in zip(STATS, ours, ref)}
    wrong = kernels(slabs, widths, target, flags, merge_splits_off=1)[0] if splits > 1 else None
    grad = [(error(o.float(), r.float()), ulps(o, r)) for o, r in grads(slabs, widths, target, ref, flags, seed)]
    result = {"name": name, "splits": splits, "aligned": sorted(aligned), "stats": stats,
              "grad_error": max(e for (e, _), _ in grad), "grad_specials": all(s for (_, s), _ in grad),
              "grad_ulps": max(u for _, u in grad)}
    if wrong is not None:
        result["control_log_sum_error"] = error(wrong[1], ref[1])[0]
    return result


def three_dimensional():
    """x [2, 3, w] with target [2, 3]: the launches flatten the leading dims (and give them back)."""
    widths, flags = (2300, 2200), (False, False)
    x = logits(6, sum(widths), torch.bfloat16, 5, "normal").view(2, 3, -1)
    target = targets(6, sum(widths), 5, "normal", torch.int64).view(2, 3)
    slabs = slabs_of(x, widths, 0)
    ours = kernels(slabs, widths, target, flags)[0]
    ref = reference(slabs, widths, target, flags)
    return {"shapes": [list(o.shape) for o in ours], "errors": [error(o, r)[0] for o, r in zip(ours, ref)]}


def finishes():
    """The loss and the log-probabilities from merged statistics, against ``finish_cross_entropy`` and
    ``finish_logprobs``: every reduction, with and without label smoothing; targets ignored, out of the
    vocabulary (NaN), an ignore_index inside it; rows past one tile; no row; every row ignored (mean NaN)."""
    results = []
    for rows, ignore_index in ((7, IGNORE), (2500, IGNORE), (9, 3), (0, IGNORE), (4, "all")):
        g = torch.Generator().manual_seed(rows)
        vocab = 50
        log_sum, target_logit = torch.rand(rows, generator=g) * 5 + 3, -torch.rand(rows, generator=g) * 4
        logit_sum = torch.randn(rows, generator=g) * 40
        target = torch.randint(0, vocab, (rows,), generator=g)
        if ignore_index == "all":
            ignore_index, target = IGNORE, torch.full((rows,), IGNORE)
        elif rows:
            target[::3] = ignore_index
            if rows < vocab:  # the long case keeps every row finite, so that its sums are compared as numbers
                target[1] = vocab + 2  # outside the vocabulary: NaN
        for mode in ("none", "sum", "mean", "logprobs"):
            for smoothing in ((0.0,) if mode == "logprobs" else (0.0, 0.1)):
                launch, ours = sk.finish_launch(log_sum, target_logit, logit_sum, target, vocab, ignore_index, mode,
                                                smoothing)
                interpret(launch)
                if mode == "logprobs":
                    ref = vpl.finish_logprobs(log_sum, target_logit, target, vocab, ignore_index)
                else:
                    ref = vpl.finish_cross_entropy(log_sum, target_logit, logit_sum, target, vocab, ignore_index,
                                                   mode, smoothing)
                results.append({"rows": rows, "ignore_index": ignore_index, "mode": mode, "smoothing": smoothing,
                                "shape": list(ours.shape) == list(ref.shape), "error": error(ours, ref)})
    return results


def cross_entropy_grads():
    """The eager CUDA cross-entropy's backward kernel (the loss's per-row weights computed in it) against
    autograd through the composition (``finish_cross_entropy``, then ``local_grad`` of the statistics'
    gradients): every reduction, with and without label smoothing, ignored rows, an index outside the
    vocabulary, and a mean over no row (weights 0/0 that the masks must keep out of the gradient)."""
    results = []
    for dtype, widths, T, all_ignored in ((torch.float32, (3000, 2100), 9, False), (torch.bfloat16, (2500, 0, 900), 5, False),
                                          (torch.float32, (700, 700), 3, True)):
        vocab = sum(widths)
        x = logits(T, vocab, dtype, T, "normal")
        target = targets(T, vocab, T, "normal", torch.int64)
        target[2] = vocab + 1  # outside the vocabulary: its row's loss is NaN, its gradient 0
        if all_ignored:
            target[:] = IGNORE
        slabs = slabs_of(x, widths, 0)
        for reduction in ("none", "sum", "mean"):
            for smoothing in (0.0, 0.1):
                flags = (smoothing > 0, False)
                stats = [t.requires_grad_() for t in reference(slabs, widths, target, flags)]
                shift, log_sum, target_logit, logit_sum, entropy = stats
                loss = vpl.finish_cross_entropy(log_sum, target_logit, logit_sum, target, vocab, IGNORE, reduction,
                                                smoothing)
                g = torch.Generator().manual_seed(T)
                upstream = torch.randn(loss.shape, generator=g)
                upstream_grads = torch.autograd.grad(loss, (log_sum, target_logit, logit_sum), upstream,
                                                     allow_unused=True)
                count = torch.empty(())
                interpret(sk.finish_launch(log_sum.detach(), target_logit.detach(), logit_sum.detach(), target, vocab,
                                           IGNORE, reduction, smoothing, count)[0])
                worst, worst_ulps, specials = 0.0, 0, True
                for r, (slab, w) in enumerate(zip(slabs, widths)):
                    offset = sum(widths[:r])
                    launch, ours = sk.cross_entropy_grad_launch(upstream, slab, target, shift.detach(),
                                                                log_sum.detach(), count, offset, vocab, IGNORE,
                                                                reduction, smoothing)
                    interpret(launch)
                    ref = vpl.local_grad(*upstream_grads, None, slab, target, shift.detach(), log_sum.detach(),
                                         entropy.detach(), offset)
                    e, same = error(ours.float(), ref.float())
                    worst, specials = max(worst, e), specials and same
                    worst_ulps = max(worst_ulps, ulps(ours, ref))
                result = {"dtype": str(dtype), "all_ignored": all_ignored, "reduction": reduction,
                          "smoothing": smoothing, "error": worst, "specials": specials, "ulps": worst_ulps}
                if reduction == "mean" and not all_ignored:
                    # negative control: the mean's gradient taken as the sum's (the divisor forgotten)
                    launch, wrong = sk.cross_entropy_grad_launch(upstream, slabs[0], target, shift.detach(),
                                                                 log_sum.detach(), count, 0, vocab, IGNORE, "sum",
                                                                 smoothing)
                    interpret(launch)
                    ref = vpl.local_grad(*upstream_grads, None, slabs[0], target, shift.detach(), log_sum.detach(),
                                         entropy.detach(), 0)
                    result["control_error"] = error(wrong.float(), ref.float())[0]
                results.append(result)
    return results


def through_the_exchange():
    """``softmax_kernels.softmax_stats`` whole, on a one-rank gloo group (its launches interpreted): the
    partials of every split go through ``tpfuse::all_gather_hidden`` and come back merged."""
    import torch.distributed as dist

    from multiproc import free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1")
    dist.init_process_group("gloo")
    sk.run = lambda launch, device: interpret(launch)  # the compiled launcher needs a GPU
    try:
        widths, flags, results = [6000], (True, True), []
        for T in (1, 2, 300):
            x = logits(T, widths[0], torch.bfloat16, T, "normal")
            target = targets(T, widths[0], T, "normal", torch.int64)
            ours = sk.softmax_stats(x, target, 0, widths, dist.group.WORLD.group_name, *flags)
            ref = reference([x], widths, target, flags)
            results.append({"T": T, "splits": vocab_softmax.split_plan(T, widths[0])[0],
                            "errors": [error(o, r)[0] for o, r in zip(ours, ref)]})
        return results
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    print(json.dumps({"cases": [run_case(*case) for case in CASES], "three_dimensional": three_dimensional(),
                      "finishes": finishes(), "cross_entropy_grads": cross_entropy_grads(),
                      "through_the_exchange": through_the_exchange()}))
