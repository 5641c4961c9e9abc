"""The sum family's ops on real gloo ranks, against torch on the gathered logits.

``tpfuse.logsumexp_hidden``, ``target_logprobs_hidden``, ``cross_entropy_hidden`` and
``entropy_hidden`` (tpfuse/compile_ops/vocab_parallel_loss.py): forward and backward,
against ``torch.cat`` of every rank's slab followed by torch's own computation in float32,
within the bound published in docs/passes.md ("Gather elimination: the sum family's error").
One spawned group per world size (W=2 and W=4), many cases per group; the per-rank
functions check each case and return what the tests then assert on.
"""

import math
import re

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from multiproc import run_ranks

import tpfuse

#: docs/passes.md, "Gather elimination: the sum family's error": the largest error, relative to the
#: largest magnitude of the reference (max |ours - ref| / max |ref|), against the gathered float32
#: computation, at vocab 128256 over W = 2, 4, 8 (benchmarks/results/sum_family_error.md)
BOUND = {"logsumexp": 1e-6, "logprobs": 1e-5, "loss": 1e-5, "entropy": 1e-4,
         "grad": 1e-5, "grad of entropy": 5e-4}
#: gradients returned in bf16 / fp16: the float32 gradient's rounding may land on the neighbouring value
LOW_PRECISION_ULPS = 1
IGNORE = -100


# --------------------------------------------------------------------------- inputs and reference

def _logits(lead, vocab, dtype, seed, kind="normal"):
    """The gathered logits [*lead, vocab], in ``dtype``; ``kind`` picks the adversarial rows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, vocab, generator=g) * 3
    flat = x.view(-1, vocab)
    if kind == "neg_inf" and flat.shape[0] >= 4:
        flat[0, ::3] = -math.inf           # scattered -inf
        flat[1, : vocab // 2] = -math.inf  # the first half -inf: whole slabs of low ranks hold only -inf
        flat[2, 1] = -math.inf             # -inf at a target (set below): loss +inf
        flat[3, :] = flat[3, 0]            # all equal
    if kind == "pos_inf" and flat.shape[0] >= 4:
        flat[0, -1] = math.inf             # +inf on the last rank, in an ignored row: its loss is 0
        flat[1, 0] = math.inf              # +inf on the first rank, the target elsewhere: NaN, as torch
        flat[2, 1] = math.inf              # +inf at the target (set below): NaN
        flat[3, :2] = math.inf             # two +inf
    if kind == "large":
        x = x + 3e4 if dtype == torch.float16 else x * 1000 + 1e6
    return x.to(dtype)


def _targets(lead, vocab, seed, ignore_index=IGNORE, kind="normal"):
    g = torch.Generator().manual_seed(seed + 17)
    t = torch.randint(0, vocab, lead, generator=g)
    flat = t.view(-1)
    flat[::4] = ignore_index  # a quarter of the rows ignored
    if kind in ("neg_inf", "pos_inf") and flat.numel() >= 4:
        flat[2] = 1
    return t


def _band(full, widths, rank):
    offset = sum(widths[:rank])
    return full[..., offset: offset + widths[rank]]


def _reference(name, logits, target, ignore_index=IGNORE, reduction="mean", label_smoothing=0.0):
    """torch's computation on the gathered logits in float32, as HF's ForCausalLMLoss does it."""
    x = logits.float()
    if name == "logsumexp":
        return torch.logsumexp(x, -1)
    if name == "logprobs":
        picked = torch.log_softmax(x, -1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return torch.where(target == ignore_index, 0.0, picked)
    if name == "entropy":
        # -(p log p).sum with 0 log 0 = 0, written so that its gradient is finite where p = 0 too
        p, logp = torch.softmax(x, -1), torch.log_softmax(x, -1)
        return -(p * torch.where(p == 0, 0.0, logp)).sum(-1)
    loss = F.cross_entropy(x.flatten(0, -2), target.flatten(), ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)
    return loss.reshape(target.shape) if reduction == "none" else loss


def _ours(name, x, target, widths, ignore_index=IGNORE, reduction="mean", label_smoothing=0.0):
    if name == "logsumexp":
        return tpfuse.logsumexp_hidden(x, hidden_widths=widths)
    if name == "logprobs":
        return tpfuse.target_logprobs_hidden(x, target, hidden_widths=widths, ignore_index=ignore_index)
    if name == "entropy":
        return tpfuse.entropy_hidden(x, hidden_widths=widths)
    return tpfuse.cross_entropy_hidden(x, target, hidden_widths=widths, ignore_index=ignore_index,
                                       reduction=reduction, label_smoothing=label_smoothing)


def _rel_error(ours, ref):
    """max |ours - ref| / max |ref| over the finite entries; the non-finite ones must agree exactly."""
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    finite = torch.isfinite(ref)
    same_nonfinite = torch.equal(torch.isnan(ours), torch.isnan(ref)) and torch.equal(
        ours[~finite & ~torch.isnan(ref)], ref[~finite & ~torch.isnan(ref)])
    if not same_nonfinite:
        return math.inf
    if not finite.any():
        return 0.0
    diff = (ours.double() - ref.double())[finite].abs().max().item()
    return diff / max(ref.double()[finite].abs().max().item(), 1e-30)


def _ulps(a, b):
    """The largest distance in units in the last place between two bf16/fp16 tensors (finite entries)."""
    ia, ib = a.view(torch.int16).int(), b.view(torch.int16).int()
    ia = torch.where(ia < 0, -(ia & 0x7FFF), ia)  # sign-magnitude to a monotone integer line
    ib = torch.where(ib < 0, -(ib & 0x7FFF), ib)
    return int((ia - ib).abs().max()) if a.numel() else 0


def _check_grad(case, ours, ref, bound):
    if ours.dtype == torch.float32:
        err = _rel_error(ours, ref)
        assert err <= bound, f"{case}: gradient error {err:.2e} > {bound:.0e}"
    else:
        ulps = _ulps(ours, ref.to(ours.dtype))
        assert ulps <= LOW_PRECISION_ULPS, f"{case}: gradient {ulps} ulps from the reference"


# --------------------------------------------------------------------------- per-rank checks

def _forward_backward_cases(world_size):
    """(case name, op name, lead, widths, dtype, kind, options) at this world size."""
    even, uneven = [24] * world_size, [7 + 9 * r for r in range(world_size)]
    cases = []
    for name in ("logsumexp", "logprobs", "entropy", "mean", "sum", "none"):
        cases.append((f"{name}-fp32-even", name, (7,), even, torch.float32, "normal", {}))
        cases.append((f"{name}-bf16-uneven-3d", name, (2, 3), uneven, torch.bfloat16, "normal", {}))
    for reduction in ("mean", "sum", "none"):
        cases.append((f"{reduction}-smoothing", reduction, (6,), uneven, torch.float32, "normal",
                      {"label_smoothing": 0.1}))
        cases.append((f"{reduction}-ignore-in-vocab", reduction, (8,), even, torch.float32, "normal",
                      {"ignore_index": 3}))
    for name in ("logsumexp", "logprobs", "mean", "none", "entropy"):
        cases.append((f"{name}-neg-inf", name, (6,), uneven, torch.float32, "neg_inf", {}))
        cases.append((f"{name}-large", name, (5,), even, torch.float32, "large", {}))
    for name in ("logsumexp", "logprobs", "mean", "none", "entropy"):  # torch: NaN across a row with +inf
        cases.append((f"{name}-pos-inf", name, (6,), uneven, torch.float32, "pos_inf", {}))
    cases.append(("none-pos-inf-smoothing", "none", (6,), uneven, torch.float32, "pos_inf", {"label_smoothing": 0.1}))
    cases += [
        ("mean-fp16-large", "mean", (5,), uneven, torch.float16, "large", {}),
        ("none-T=1", "none", (1,), uneven, torch.bfloat16, "normal", {}),
        ("none-T=0", "none", (0,), even, torch.float32, "normal", {}),
        ("sum-T=0", "sum", (0,), even, torch.float32, "normal", {}),
        ("mean-all-ignored", "mean", (1,), even, torch.float32, "normal", {}),  # one row, ignored: NaN as torch
    ]
    return cases


def _run_case(rank, case, name, lead, widths, dtype, kind, options, seed):
    vocab = sum(widths)
    full = _logits(lead, vocab, dtype, seed, kind)
    target = _targets(lead, vocab, seed, options.get("ignore_index", IGNORE), kind)
    reduction = name if name in ("mean", "sum", "none") else "mean"
    loss_name = "loss" if name in ("mean", "sum", "none") else name
    kw = dict(ignore_index=options.get("ignore_index", IGNORE), reduction=reduction,
              label_smoothing=options.get("label_smoothing", 0.0))
    gathered = full.clone().requires_grad_()
    ref = _reference(loss_name, gathered, target, **kw)
    x = _band(full, widths, rank).clone().requires_grad_()
    ours = _ours(loss_name, x, target, widths, **kw)
    assert ours.dtype == torch.float32, case
    err = _rel_error(ours.detach(), ref.detach())
    assert err <= BOUND[loss_name], f"{case}: {loss_name} error {err:.2e} > {BOUND[loss_name]:.0e}"
    # backward with an upstream gradient of the output's shape (1 for a scalar)
    g = torch.Generator().manual_seed(seed + 5)
    upstream = torch.randn(ref.shape, generator=g)
    grad_bound = BOUND["grad of entropy"] if loss_name == "entropy" else BOUND["grad"]
    if torch.isfinite(ref).all() and ours.numel():
        (ref * upstream).sum().backward()
        (ours * upstream).sum().backward()
        assert x.grad.dtype == dtype and x.grad.shape == x.shape, case
        _check_grad(case, x.grad, _band(gathered.grad, widths, rank), grad_bound)
    return ours.detach()


def _check_forward_backward(rank, world_size):
    """Every case; returns {case: output bits} so the test can check that every rank got the same bits."""
    out = {}
    for i, (case, *spec) in enumerate(_forward_backward_cases(world_size)):
        if case == "mean-all-ignored":
            full = _logits((1,), sum(spec[2]), torch.float32, i)
            loss = tpfuse.cross_entropy_hidden(_band(full, spec[2], rank), torch.tensor([IGNORE]),
                                               hidden_widths=spec[2])
            assert torch.isnan(loss) and torch.isnan(F.cross_entropy(full, torch.tensor([IGNORE]))), case
            out[case] = loss.view(torch.int32).tolist()
            continue
        ours = _run_case(rank, case, *spec, seed=100 * i)
        out[case] = ours.contiguous().view(torch.int32).flatten().tolist()
    return out


def _check_padded_vocab(rank, world_size):
    """A padded vocabulary sliced to V: rank r keeps [0, clamp(V - offset_r, 0, w_r)); the last rank(s)
    hold zero columns.  Forward and backward against torch on the sliced, gathered logits."""
    padded = 16
    vocab = padded * world_size - padded - 3  # the last rank holds none, the one before 13 of 16
    widths = [max(0, min(padded, vocab - padded * r)) for r in range(world_size)]
    assert widths[-1] == 0
    full = _logits((6,), padded * world_size, torch.float32, seed=5)
    sliced = full[..., :vocab]
    target = _targets((6,), vocab, seed=5)
    checked = []
    for name in ("logsumexp", "logprobs", "none", "mean", "entropy"):
        loss_name = "loss" if name in ("mean", "none") else name
        reduction = name if name in ("mean", "none") else "mean"
        gathered = sliced.clone().requires_grad_()
        ref = _reference(loss_name, gathered, target, reduction=reduction)
        x = _band(sliced, widths, rank).clone().requires_grad_()
        ours = _ours(loss_name, x, target, widths, reduction=reduction)
        assert _rel_error(ours.detach(), ref.detach()) <= BOUND[loss_name], name
        ours.sum().backward()
        ref.sum().backward()
        assert x.grad.shape == (6, widths[rank])
        _check_grad(f"padded-{name}", x.grad, _band(gathered.grad, widths, rank),
                    BOUND["grad of entropy" if name == "entropy" else "grad"])
        checked.append(name)
    # The op the pass emits for logits[..., :V]: every rank's whole padded slab, valid_columns=V.
    padded_widths = [padded] * world_size
    x = _band(full, padded_widths, rank).clone().requires_grad_()
    shift, log_sum, target_logit, _, _ = torch.ops.tpfuse.softmax_stats_hidden(
        x, target.clamp(min=0), padded_widths, dist.group.WORLD.group_name, IGNORE, False, False, vocab)
    gathered = sliced.clone().requires_grad_()
    ref = torch.logsumexp(gathered, -1)
    assert _rel_error((shift + log_sum).detach(), ref.detach()) <= BOUND["logsumexp"]
    ref_logprobs = torch.log_softmax(sliced, -1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    assert _rel_error((target_logit - log_sum).detach(), ref_logprobs) <= BOUND["logprobs"]
    (shift + log_sum).sum().backward()
    ref.sum().backward()
    padded_grad = torch.cat([gathered.grad, torch.zeros(6, padded * world_size - vocab)], -1)
    _check_grad("padded-valid_columns", x.grad, _band(padded_grad, padded_widths, rank), BOUND["grad"])
    assert not x.grad[:, widths[rank]:].any()  # the padding's gradient is exactly 0
    checked.append("valid_columns")
    return widths, checked


def _check_compile(rank, world_size):
    """fullgraph, aot_eager and Inductor, with the backward: the loss and the gradient as in eager."""
    torch._dynamo.reset()
    widths = [11 + 2 * r for r in range(world_size)]
    full = _logits((2, 5), sum(widths), torch.float32, seed=3)
    target = _targets((2, 5), sum(widths), seed=3)

    def step(x, t):
        return tpfuse.cross_entropy_hidden(x, t, hidden_widths=widths, label_smoothing=0.05)

    x = _band(full, widths, rank).clone().requires_grad_()
    eager = step(x, target)
    eager.backward()
    results = {}
    for backend in ("aot_eager", "inductor"):
        xc = _band(full, widths, rank).clone().requires_grad_()
        loss = torch.compile(step, fullgraph=True, backend=backend)(xc, target)
        loss.backward()
        results[backend] = (torch.allclose(loss, eager, rtol=1e-6, atol=0)
                            and torch.allclose(xc.grad, x.grad, rtol=1e-5, atol=1e-7))
        with torch.no_grad():
            results[backend + " no_grad"] = torch.allclose(
                torch.compile(step, fullgraph=True, backend=backend, dynamic=True)(xc, target), eager,
                rtol=1e-6, atol=0)
    return results


def _check_gather_gradient_convention(rank, world_size):
    """``sum_grad_over_ranks(cross_entropy_hidden(...))`` has the gradient of the gather then the loss
    (the gather's backward sums every rank's gradient), even when the ranks' upstream gradients differ."""
    widths = [6 + r for r in range(world_size)]
    full = _logits((4,), sum(widths), torch.float32, seed=21)
    target = _targets((4,), sum(widths), seed=21)
    x = _band(full, widths, rank).clone().requires_grad_()
    scale = float(rank + 1)  # each rank's own upstream gradient
    loss = torch.ops.tpfuse.sum_grad_over_ranks(tpfuse.cross_entropy_hidden(x, target, hidden_widths=widths,
                                                                            reduction="none"), "0")
    (loss * scale).sum().backward()
    y = _band(full, widths, rank).clone().requires_grad_()
    ref = F.cross_entropy(tpfuse.all_gather_hidden(y, hidden_widths=widths), target, reduction="none")
    (ref * scale).sum().backward()
    return _rel_error(x.grad, y.grad)


def _check_opcheck(rank, world_size):
    widths = [8 + r for r in range(world_size)]
    name = dist.group.WORLD.group_name
    full = _logits((3,), sum(widths), torch.float32, seed=11)
    target = _targets((3,), sum(widths), seed=11)
    x = _band(full, widths, rank).clone().requires_grad_()
    ops = torch.ops.tpfuse
    calls = [
        (ops.softmax_stats_hidden.default, (x, target, widths, name, IGNORE, True, True)),
        (ops.softmax_stats_hidden.default, (x, target.clamp(max=sum(widths) - 4), widths, name, IGNORE, True, True,
                                            sum(widths) - 3)),
        (ops.logsumexp_hidden.default, (x, widths, name)),
        (ops.target_logprobs_hidden.default, (x, target, widths, name, IGNORE)),
        (ops.cross_entropy_hidden.default, (x, target, widths, name, IGNORE, "mean", 0.1)),
        (ops.cross_entropy_hidden.default, (x, target, widths, name, IGNORE, "none", 0.0)),
        (ops.entropy_hidden.default, (x, widths, name)),
        # a loss: the same shape on every rank (its gradient is summed over them)
        (ops.sum_grad_over_ranks.default, (full[:, :4].clone().requires_grad_(), name)),
        (ops.sum_over_ranks.default, (full[:, :4].clone(), name)),
    ]
    for op, args in calls:
        torch.library.opcheck(op, args)
    return len(calls)


def _capture(fn):
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - we return what was raised
        return type(err).__name__, str(err)
    return None


def _error_cases(rank, world_size):
    widths = [4] * world_size
    x = torch.randn(3, 4)
    t = torch.tensor([0, 1, 2])
    ce = tpfuse.cross_entropy_hidden
    return {
        "reduction": _capture(lambda: ce(x, t, reduction="avg")),
        "label_smoothing": _capture(lambda: ce(x, t, label_smoothing=1.5)),
        "target_shape": _capture(lambda: ce(x, t[:2])),
        "target_dtype": _capture(lambda: ce(x, t.float())),
        "x_dtype": _capture(lambda: ce(x.double(), t)),
        "scalar": _capture(lambda: ce(torch.tensor(1.0), t)),
        "width_negative": _capture(lambda: ce(x, t, hidden_widths=[4, -1] + [4] * (world_size - 2))),
        "no_columns": _capture(lambda: ce(x[:, :0], t, hidden_widths=[0] * world_size)),
        "width_count": _capture(lambda: ce(x, t, hidden_widths=widths + [4])),
        "width_mismatch": _capture(lambda: ce(x[:, :3], t, hidden_widths=widths)),
        "target_range": _capture(lambda: ce(x, torch.tensor([0, 4 * world_size, 1]))),
        "target_negative": _capture(lambda: tpfuse.target_logprobs_hidden(x, torch.tensor([0, -3, 1]))),
    }


def _all(rank, world_size):
    return {
        "forward_backward": _check_forward_backward(rank, world_size),
        "padded": _check_padded_vocab(rank, world_size),
        "errors": _error_cases(rank, world_size),
        "opcheck": _check_opcheck(rank, world_size) if world_size == 2 else None,
        "gradient_convention": _check_gather_gradient_convention(rank, world_size),
        "compile": _check_compile(rank, world_size) if world_size == 2 else None,
    }


@pytest.fixture(scope="module", params=[2, 4], ids=["W=2", "W=4"])
def ranks(request):
    return request.param, run_ranks(request.param, _all)


# --------------------------------------------------------------------------- the tests

def test_forward_and_backward_within_the_published_bound(ranks):
    world_size, results = ranks
    names = [case for case, *_ in _forward_backward_cases(world_size)]
    for r in results:
        assert list(r["forward_backward"]) == names


def test_every_rank_gets_the_same_bits(ranks):
    _, results = ranks
    first = results[0]["forward_backward"]
    for r in results[1:]:
        assert r["forward_backward"] == first


def test_padded_vocabulary_with_a_rank_of_zero_columns(ranks):
    world_size, results = ranks
    for r in results:
        widths, checked = r["padded"]
        assert widths[-1] == 0 and checked == ["logsumexp", "logprobs", "none", "mean", "entropy", "valid_columns"]


def test_sum_grad_over_ranks_gives_the_gathers_gradient(ranks):
    for r in ranks[1]:
        assert r["gradient_convention"] <= BOUND["grad"]


def test_opcheck(ranks):
    world_size, results = ranks
    if world_size != 2:
        pytest.skip("opcheck runs on the W=2 group")
    assert [r["opcheck"] for r in results] == [9, 9]


def test_compile_with_backward(ranks):
    world_size, results = ranks
    if world_size != 2:
        pytest.skip("compile runs on the W=2 group")
    for r in results:
        assert r["compile"] == {"aot_eager": True, "aot_eager no_grad": True,
                                "inductor": True, "inductor no_grad": True}


ERRORS = {
    "reduction": ("ValueError", r"reduction='avg' is not accepted; accepted are mean, sum, none"),
    "label_smoothing": ("ValueError", r"label_smoothing=1.5 is not accepted; accepted are values in \[0.0, 1.0\]"),
    "target_shape": ("ValueError", r"target.shape=\[2\] but x.shape=\[3, 4\]; target needs x's shape without its last"),
    "target_dtype": ("TypeError", r"target of dtype torch.float32 is not accepted; accepted are int64, int32"),
    "x_dtype": ("TypeError", r"logits of dtype torch.float64 are not accepted; accepted are float32, bfloat16, float16"),
    "scalar": ("ValueError", r"x is a scalar \(0-d\); it needs a last \(vocabulary\) dimension"),
    "width_negative": ("ValueError", r"has width\(s\) \[-1\] < 0; accepted are widths >= 0"),
    "no_columns": ("ValueError", r"holds no column at all; at least one rank must hold a column"),
    "width_count": ("ValueError", r"len\(hidden_widths\)=\d but group '0' has \d ranks"),
    "width_mismatch": ("ValueError", r"x.shape\[-1\]=3 on rank \d but hidden_widths\[\d\]=4"),
    "target_range": ("ValueError", r"target holds class index \d+, outside the vocabulary of \d+ columns; "
                                   r"accepted are indices in \[0, \d+\) or ignore_index=-100"),
    "target_negative": ("ValueError", r"target holds class index -3"),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_error_message(ranks, case):
    kind, pattern = ERRORS[case]
    for r in ranks[1]:
        got = r["errors"][case]
        assert got is not None, f"{case}: no error raised"
        assert got[0] == kind and re.search(pattern, got[1]), got


def test_the_bound_would_catch_a_wrong_merge():
    """Negative control, one process: merging the ranks' sums without rescaling by exp(m_r - M)
    (the classic vocab-parallel bug) is far outside the bound, so the checks above can fail."""
    from tpfuse.compile_ops.vocab_parallel_loss import local_partials, merge_partials

    widths = [24, 24]
    full = _logits((7,), 48, torch.float32, seed=1) + torch.arange(48.0) / 4  # slabs with different maxima
    partials = [local_partials(_band(full, widths, r), None, sum(widths[:r]), False, False) for r in range(2)]
    gathered = torch.cat(partials, -1)
    shift, log_sum, *_ = merge_partials(gathered, widths, False, False, False)
    right = shift + log_sum
    m, s = gathered.unflatten(-1, (2, 2))[..., 0], gathered.unflatten(-1, (2, 2))[..., 1]
    wrong = m.amax(-1) + torch.log(s.sum(-1))
    ref = torch.logsumexp(full, -1)
    assert _rel_error(right, ref) <= BOUND["logsumexp"]
    assert _rel_error(wrong, ref) > 100 * BOUND["logsumexp"]


def test_fake_kernels_without_a_process_group():
    """Shapes only, symbolic rows included; no process group exists in this process."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    assert not dist.is_initialized()
    real = torch.empty(5, 8, dtype=torch.bfloat16)  # made outside the mode: a tensor made inside is fake already
    with FakeTensorMode(shape_env=ShapeEnv()) as mode:
        dynamic = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC, DimDynamic.STATIC])
        x = mode.from_tensor(real, symbolic_context=dynamic)
        t = torch.empty(x.shape[0], dtype=torch.int64)
        ops = torch.ops.tpfuse
        assert ops.cross_entropy_hidden(x, t, [8, 0], "never-registered").shape == ()
        none = ops.cross_entropy_hidden(x, t, [8, 0], "never-registered", IGNORE, "none")
        assert isinstance(none.shape[0], torch.SymInt) and none.dtype == torch.float32
        assert ops.logsumexp_hidden(x, [8, 8], "never-registered").shape == none.shape
        assert len(ops.softmax_stats_hidden(x, t, [8, 8], "never-registered")) == 5
