"""The sum family's CUDA kernels on one GPU (kernels/vocab_softmax.py, compile_ops/softmax_kernels.py).

- compiled kernels on W simulated ranks (an LM head's vocabulary of 128256 over W=4 and 8, T=1, 8, 4096,
  bf16 and fp32, adversarial rows) against the torch composition on the same GPU, within the bound
  docs/passes.md publishes, and the merge deterministic (every rank merges the same bits);
- the ops on a one-rank NCCL group: forward and backward against torch on the slab (as
  benchmarks/bench_gather_elimination.py checks them), no host synchronisation in an eager
  forward + backward (``torch.cuda.set_sync_debug_mode("error")``, with a control that it catches
  one), a CUDA graph's replay equal to the eager call, an out-of-range class index NaN by default
  and refused with ``TPFUSE_CHECK=1``.

    PYTHONPATH=. python -m pytest -q tests/gpu/test_vocab_softmax_gpu.py
"""

import math
import os
import time

import pytest
import torch
import torch.nn.functional as F

from multiproc import run_ranks

pytestmark = pytest.mark.gpu

#: the published bound (tests/test_vocab_softmax_kernels.py says where each comes from)
BOUND = {"shift": 0.0, "log_sum": 1e-6, "target_logit": 0.0, "logit_sum": 1e-5, "entropy": 1e-4}
GRAD_BOUND = {"grad": 1e-5, "grad of entropy": 5e-4}
IGNORE = -100


def _rel_error(ours, ref):
    """max |ours - ref| / max |ref| over the finite entries; the non-finite ones must agree exactly."""
    ours, ref = ours.double(), ref.double()
    finite = torch.isfinite(ref)
    if not (torch.equal(torch.isnan(ours), torch.isnan(ref))
            and torch.equal(ours[~finite & ~torch.isnan(ref)], ref[~finite & ~torch.isnan(ref)])):
        return math.inf
    if not finite.any():
        return 0.0
    return float((ours - ref)[finite].abs().max() / ref[finite].abs().max().clamp(min=1e-30))


def _ulps(a, b):
    ia, ib = a.view(torch.int16).int(), b.view(torch.int16).int()
    ia = torch.where(ia < 0, -(ia & 0x7FFF), ia)
    ib = torch.where(ib < 0, -(ib & 0x7FFF), ib)
    finite = torch.isfinite(b.float())
    return int((ia - ib)[finite].abs().max()) if finite.any() else 0


def _smoothing_floor(target, upstream, reduction, smoothing, vocab):
    """Per row, the label-smoothing term of the gradient, ``smoothing * |w| / vocab`` (``w``: the row's weight
    in the loss; 0 for an ignored row).  Where the softmax ``p`` is near ``smoothing / vocab`` the gradient
    ``w (p - smoothing / vocab)`` is a difference of two float32 numbers of about this size, so it carries an
    error of a few float32 ulps of it, in ANY summation order (torch's own float32 gradient is up to ~2e4
    bf16 ulps from float64's there): docs/passes.md, the sum family's bound."""
    counted = (target != IGNORE).double()
    if reduction == "none":
        weight = upstream.double()
    elif reduction == "sum":
        weight = upstream.double().expand(target.shape)
    else:
        weight = upstream.double() / counted.sum()
    return (smoothing * weight.abs() * counted / vocab)[:, None]


def _within_ulp_or_floor(ours, ref, floor):
    """Every element at most 1 ulp of ``ours.dtype`` from ``ref``, or at most 1 ulp of ``floor`` (a magnitude
    per row, ``_smoothing_floor``) away from it; the non-finite ones equal."""
    finite = torch.isfinite(ref.float())
    if not torch.equal(ours[~finite].view(torch.int16), ref[~finite].view(torch.int16)):
        return False
    a, b = ours.view(torch.int16).int(), ref.view(torch.int16).int()
    a = torch.where(a < 0, -(a & 0x7FFF), a)
    b = torch.where(b < 0, -(b & 0x7FFF), b)
    near_bits = (a - b).abs() <= 1
    mantissa, exponent = torch.frexp(floor.expand_as(ref))
    floor_ulp = torch.where(mantissa == 0, 0.0, torch.ldexp(torch.ones_like(mantissa), exponent - 8))  # bf16: 7 bits
    near_floor = (ours.double() - ref.double()).abs() <= floor_ulp
    return bool((near_bits | near_floor)[finite].all())


def _logits(T, vocab, dtype, seed, adversarial):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(T, vocab, device="cuda", generator=g) * 3
    if adversarial:
        x[0, ::3] = -math.inf
        x[1, : vocab // 2] = -math.inf
        x[2, :] = x[2, 0]
        x[3, vocab // 3] = math.nan
        x[4] = x[4] * 1000 + 1e6
        x[5, :] = -math.inf
    return x.to(dtype)


def _simulated(x, target, widths, flags):
    """(kernels' stats, composition's stats, kernels' grads, composition's grads) on W simulated ranks."""
    from tpfuse.compile_ops import softmax_kernels as sk
    from tpfuse.compile_ops import vocab_parallel_loss as vpl
    from tpfuse.kernels import vocab_softmax

    offsets = [sum(widths[:r]) for r in range(len(widths))]
    slabs = [x[:, o: o + w] for o, w in zip(offsets, widths)]  # views: rows strided by the full vocabulary
    splits, chunk = vocab_softmax.split_plan(x.shape[0], max(widths))
    parts = []
    for slab, o in zip(slabs, offsets):
        launch, partials = sk.local_launch(slab, target, o, *flags, splits, chunk)
        sk.run(launch, x.device)
        parts.append(partials)
    gathered = torch.cat(parts, -1)
    merged = []
    for _ in range(2):  # twice: the merge must give the same bits again (every rank runs it alike)
        launch, stats = sk.merge_launch(gathered, widths, splits, chunk, target is not None, *flags)
        sk.run(launch, x.device)
        merged.append(stats)
    ref_parts = [vpl.local_partials(s, target, o, *flags) for s, o in zip(slabs, offsets)]
    ref = vpl.merge_partials(torch.cat(ref_parts, -1), widths, target is not None, *flags)
    g = torch.Generator(device="cuda").manual_seed(7)
    rows = x.shape[0]
    upstream = [torch.randn(rows, device="cuda", generator=g), torch.randn(rows, device="cuda", generator=g),
                torch.randn(rows, device="cuda", generator=g) if flags[0] else None,
                torch.randn(rows, device="cuda", generator=g) if flags[1] else None]
    shift, log_sum, _, _, entropy = ref
    ours_grads = [sk.local_grad(*upstream, s, target, shift, log_sum, entropy, w, o)
                  for s, w, o in zip(slabs, widths, offsets)]
    ref_grads = [vpl.local_grad(*upstream, s, target, shift, log_sum, entropy, o) for s, o in zip(slabs, offsets)]
    same_bits = all(torch.equal(a.view(torch.int32), b.view(torch.int32)) for a, b in zip(*merged))
    return merged[0], ref, ours_grads, ref_grads, same_bits


@pytest.mark.parametrize("W", [4, 8])
@pytest.mark.parametrize("T,dtype,flags,adversarial", [
    (1, torch.bfloat16, (False, False), False),
    (8, torch.bfloat16, (True, True), True),
    (8, torch.float32, (True, True), True),
    (4096, torch.bfloat16, (False, False), False),
    (4096, torch.float32, (True, False), False),
])
def test_kernels_match_the_composition_on_an_lm_head_vocabulary(W, T, dtype, flags, adversarial):
    vocab = 128256
    width = -(-vocab // W)
    widths = [min(width, max(0, vocab - r * width)) for r in range(W)]
    x = _logits(T, vocab, dtype, seed=T + W, adversarial=adversarial)
    g = torch.Generator(device="cuda").manual_seed(T)
    target = torch.randint(0, vocab, (T,), device="cuda", generator=g)
    target[::4] = IGNORE
    ours, ref, ours_grads, ref_grads, same_bits = _simulated(x, target, widths, flags)
    assert same_bits
    for name, o, r in zip(BOUND, ours, ref):
        err = _rel_error(o, r)
        assert err <= BOUND[name], (name, err)
    for o, r in zip(ours_grads, ref_grads):
        if dtype == torch.float32:
            assert _rel_error(o, r) <= GRAD_BOUND["grad of entropy" if flags[1] else "grad"]
        else:
            assert _ulps(o, r) <= 1


# --------------------------------------------------------------------------- the ops on a one-rank NCCL group


def _eager_checks(rank, world_size):
    import tpfuse

    group, results = None, {}
    vocab = 32064
    for T in (1, 8, 1000):
        for dtype in (torch.bfloat16, torch.float32):
            g = torch.Generator(device="cuda").manual_seed(T)
            slab = torch.randn(T, vocab, device="cuda", generator=g).to(dtype)
            target = torch.randint(0, vocab, (T,), device="cuda", generator=g)
            target[::5] = IGNORE
            for reduction in ("mean", "sum", "none"):
                for smoothing in (0.0, 0.1):
                    x, ref_x = slab.clone().requires_grad_(), slab.clone().requires_grad_()
                    loss = tpfuse.cross_entropy_hidden(x.float(), target, group, reduction=reduction,
                                                       label_smoothing=smoothing)
                    ref = F.cross_entropy(ref_x.float(), target, reduction=reduction, label_smoothing=smoothing)
                    upstream = torch.rand_like(ref) + 0.5
                    (loss * upstream).sum().backward()
                    (ref * upstream).sum().backward()
                    # bf16: 1 ulp, or 1 ulp of the smoothing term where the gradient cancels (0 without smoothing)
                    floor = _smoothing_floor(target, upstream, reduction, smoothing, vocab)
                    grad_ok = (_rel_error(x.grad, ref_x.grad) <= GRAD_BOUND["grad"] if dtype == torch.float32
                               else _within_ulp_or_floor(x.grad, ref_x.grad, floor))
                    # eager: the one-kernel backward (vocab_parallel_loss._CrossEntropyOnDevice)
                    eager_path = "CrossEntropyOnDevice" in type(loss.grad_fn).__name__
                    results[f"ce T={T} {dtype} {reduction} smoothing={smoothing}"] = (
                        _rel_error(loss, ref) <= 1e-5, grad_ok, eager_path)
                    if dtype == torch.bfloat16 and smoothing > 0 and bool((target != IGNORE).any()):
                        # control: the gradient without its smoothing term (w eps / V) must fail the check
                        # (where some row counts: at T=1 the only row is ignored, its term is 0)
                        dropped = (ref_x.grad.double() + floor).to(dtype)
                        results[f"control: ce T={T} {reduction} smoothing term dropped is caught"] = (
                            not _within_ulp_or_floor(dropped, ref_x.grad, floor),)
            with torch.no_grad():  # the op itself, whose finish is one kernel (softmax_kernels.finish)
                for reduction in ("none", "sum", "mean"):
                    for smoothing in (0.0, 0.1):
                        loss = tpfuse.cross_entropy_hidden(slab, target, group, reduction=reduction,
                                                           label_smoothing=smoothing)
                        ref = F.cross_entropy(slab.float(), target, reduction=reduction, label_smoothing=smoothing)
                        results[f"no-grad ce T={T} {dtype} {reduction} {smoothing}"] = (
                            loss.shape == ref.shape, _rel_error(loss, ref) <= 1e-5)
                logprobs = tpfuse.target_logprobs_hidden(slab, target, group)
                picked = torch.log_softmax(slab.float(), -1).gather(-1, target.clamp(min=0)[:, None])[:, 0]
                results[f"no-grad logprobs T={T} {dtype}"] = (
                    True, _rel_error(logprobs, torch.where(target == IGNORE, 0.0, picked)) <= 1e-5)
            x = slab.clone().requires_grad_()
            lse = tpfuse.logsumexp_hidden(x, group)
            ent = tpfuse.entropy_hidden(x, group)
            xf = slab.float()
            p, logp = torch.softmax(xf, -1), torch.log_softmax(xf, -1)
            results[f"lse/entropy T={T} {dtype}"] = (_rel_error(lse, torch.logsumexp(xf, -1)) <= 1e-6,
                                                     _rel_error(ent, -(p * logp).sum(-1)) <= 1e-4)
    # rows that hold +inf: torch's log_softmax is NaN across such a row, so are the loss and the log-probability,
    # also where the target's logit is finite (the finish kernel's rule); an ignored row stays 0
    slab = torch.randn(4, vocab, device="cuda", generator=torch.Generator(device="cuda").manual_seed(11))
    slab[0, 5], slab[1, 7], slab[3, 9] = math.inf, math.inf, math.inf
    target = torch.tensor([5, 3, 2, IGNORE], device="cuda")
    with torch.no_grad():
        for reduction in ("none", "sum"):
            loss = tpfuse.cross_entropy_hidden(slab, target, group, reduction=reduction)
            ref = F.cross_entropy(slab, target, reduction=reduction)
            results[f"+inf rows ce {reduction}"] = (bool(torch.isnan(loss).any()), _rel_error(loss, ref) <= 1e-5)
        logprobs = tpfuse.target_logprobs_hidden(slab, target, group)
        picked = torch.log_softmax(slab, -1).gather(-1, target.clamp(min=0)[:, None])[:, 0]
        results["+inf rows logprobs"] = (_rel_error(logprobs, torch.where(target == IGNORE, 0.0, picked)) <= 1e-5,)
    return results


def _no_sync_and_graphs(rank, world_size):
    import tpfuse

    T, vocab = 8, 32064
    g = torch.Generator(device="cuda").manual_seed(3)
    slab = torch.randn(T, vocab, device="cuda", generator=g).to(torch.bfloat16)
    target = torch.randint(0, vocab, (T,), device="cuda", generator=g)

    def step():
        x = slab.detach().requires_grad_()
        tpfuse.cross_entropy_hidden(x.float(), target).backward()
        return x.grad

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    out = {}
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        out["no_sync"] = True
    except RuntimeError as err:
        out["no_sync"] = str(err)
    try:  # control: the mode does catch a host read
        slab.float().sum().item()
        out["control_caught"] = False
    except RuntimeError:
        out["control_caught"] = True
    finally:
        torch.cuda.set_sync_debug_mode(0)
    # host time of an eager forward + backward (the record; benchmarks/NOTES.md has the prediction)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(50):
        step()
    out["host_us_per_eager_fwd_bwd"] = (time.perf_counter() - start) / 50 * 1e6
    torch.cuda.synchronize()
    # a captured forward replays to the eager value
    eager = tpfuse.cross_entropy_hidden(slab.float(), target)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = tpfuse.cross_entropy_hidden(slab.float(), target)
    graph.replay()
    torch.cuda.synchronize()
    out["graph_equal"] = bool(torch.equal(captured, eager))
    # an out-of-range class index: NaN by default (no host read), refused with TPFUSE_CHECK=1
    bad = target.clone()
    bad[1] = vocab + 5
    losses = tpfuse.cross_entropy_hidden(slab.float(), bad, reduction="none")
    out["out_of_range_nan"] = bool(torch.isnan(losses[1])) and bool(torch.isfinite(losses[0]))
    os.environ["TPFUSE_CHECK"] = "1"
    try:
        tpfuse.cross_entropy_hidden(slab.float(), bad)
        out["checked_refused"] = False
    except ValueError as err:
        out["checked_refused"] = "outside the vocabulary" in str(err)
    finally:
        del os.environ["TPFUSE_CHECK"]
    return out


def test_the_ops_on_one_rank_against_torch():
    results = run_ranks(1, _eager_checks, backend="nccl", timeout=600)[0]
    bad = {case: ok for case, ok in results.items() if not all(ok)}
    assert not bad, bad


def test_an_eager_step_does_not_synchronise_and_a_graph_replays_it():
    out = run_ranks(1, _no_sync_and_graphs, backend="nccl", timeout=600)[0]
    print(f"host time of an eager forward + backward at T=8: {out['host_us_per_eager_fwd_bwd']:.0f} us")
    assert out["control_caught"], out
    assert out["no_sync"] is True, out
    assert out["graph_equal"] and out["out_of_range_nan"] and out["checked_refused"], out
