"""Adversarial review of the public API and the op contract on gloo: every rank returns the right bytes or
raises a clear error, never one rank raising while its peer waits, never a clean wrong answer.

Real gloo ranks, as tests/test_trust_review.py, on the paths that review left out: the reductions over a
split hidden axis (``argmax_hidden``, ``topk_hidden``, the softmax family ``logsumexp_hidden``,
``cross_entropy_hidden``, ...). Their own checks (a dtype, a k or a class index out of range, a loss
option, a slab narrower than its entry) ran before any exchange, so a call one rank refused stranded its
peer in the exchange (docs/contract.md §4); and their own arguments (k, largest, valid_columns, the target,
ignore_index, even the hidden_widths list of the softmax family) never reached the agreement's signature,
so ranks that passed different ones merged partials computed for other calls and returned a wrong answer
with a clean status. Each case below runs on its own group with a short timeout: a rank left waiting shows
as a gloo timeout here instead of a hang.

Then what the review found correct, kept as tests on W=3: groups of some ranks and two groups in turn, a
destroyed group, a rank outside the group, strided, transposed, expanded and channels_last inputs, ties
and NaN across ranks, T = 0, ranks of width 0, odd ``hidden_widths`` containers, ``torch.func.vmap``,
``torch.compile(dynamic=True)`` on aot_eager and Inductor. Last, the command line: a bad argument to
``tune``, an entry that exits on import and ``--device cuda`` without GPUs each end in one line.

On two GPUs (marked gpu, multigpu) the same refusals with TPFUSE_CHECK=1, where a CUDA call agrees:

    PYTHONPATH=. python -m pytest -q tests/test_contract_review.py -k cuda
"""

import datetime
import math
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from multiproc import run_ranks

import tpfuse

#: a rank left waiting by its peer gives up after this long (seconds): a hang, seen as an error
GIVE_UP_S = 3


def _outcome(fn):
    """(error type, message, seconds) of ``fn()``, or ("ok", the result's repr, seconds): plain text, since a
    tensor sent back from a rank that has exited cannot be unpickled."""
    start = time.monotonic()
    try:
        kind, message = "ok", repr(fn())
    except Exception as err:  # noqa: BLE001 - the test compares what every rank raised
        kind, message = type(err).__name__, str(err)
    return kind, message, round(time.monotonic() - start, 1)


# --------------------------------------------------------------------------- one rank's call differs (W=2)


def _case_calls(rank):
    """name -> the call on a group ``g`` as this rank makes it (rank 1 is the odd one out)."""
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(rank))
    ramp = torch.arange(8.0).view(1, 8)[:, 4 * rank:4 * rank + 4]  # the gathered row is 0..7
    target = torch.tensor([0, 5, 7])
    odd = rank == 1
    ce = tpfuse.cross_entropy_hidden
    return {
        # the comparison reductions: refused on rank 1 alone, before any exchange
        "argmax_grad": lambda g: tpfuse.argmax_hidden(x.clone().requires_grad_(odd), g),
        "argmax_dtype": lambda g: tpfuse.argmax_hidden(x.double() if odd else x, g),
        "argmax_scalar": lambda g: tpfuse.argmax_hidden(torch.tensor(1.0) if odd else x, g),
        "topk_k_out_of_range": lambda g: tpfuse.topk_hidden(x, 9 if odd else 3, g),
        "argmax_valid_columns_zero": lambda g: tpfuse.argmax_hidden(x, g, valid_columns=0 if odd else None),
        # ... and arguments that differ: each rank merged candidates its peer chose by another rule
        "topk_k_differs": lambda g: tpfuse.topk_hidden(x, 2 if odd else 3, g),
        "topk_largest_differs": lambda g: tpfuse.topk_hidden(ramp, 1, g, largest=not odd),
        "argmax_valid_columns_differ": lambda g: tpfuse.argmax_hidden(ramp, g, valid_columns=3 if odd else 8),
        # the softmax family: refused on rank 1 alone, before any exchange
        "ce_reduction": lambda g: ce(x, target, g, reduction="avg" if odd else "mean"),
        "ce_reduction_with_grad": lambda g: ce(x.clone().requires_grad_(odd), target, g,
                                               reduction="avg" if odd else "mean"),
        "ce_label_smoothing": lambda g: ce(x, target, g, label_smoothing=-0.5 if odd else 0.0),
        "ce_target_dtype": lambda g: ce(x, target.float() if odd else target, g),
        "lse_dtype": lambda g: tpfuse.logsumexp_hidden(x.double() if odd else x, g),
        "lse_scalar": lambda g: tpfuse.logsumexp_hidden(torch.tensor(1.0) if odd else x, g),
        "entropy_width": lambda g: tpfuse.entropy_hidden(x[:, :3] if odd else x, g, [4, 4]),
        # ... and arguments that differ: a class index out of range on rank 0 only (rank 1 ignores it)
        "ce_ignore_index_differs": lambda g: ce(x, torch.tensor([0, 9, 1]), g, ignore_index=9 if odd else -100),
        "ce_targets_differ": lambda g: ce(x, torch.tensor([0, 6 if odd else 5, 7]), g),
        "logprobs_widths_lists_differ": lambda g: tpfuse.target_logprobs_hidden(
            torch.ones(3, 5 if odd else 4), torch.tensor([3, 3, 3]), g, [3, 5] if odd else [4, 4]),
        # a width that is not a whole number on rank 1 only: the op's schema (int[]) refused it there, before
        # the op's own check, and the peer waited in that check's exchange
        "gather_float_width": lambda g: tpfuse.all_gather_hidden(x, g, [4, 4.5] if odd else [4, 4]),
        "gather_whole_float_width": lambda g: tpfuse.all_gather_hidden(x, g, [4.0, 4] if odd else [4, 4]),
        "linear_float_width": lambda g: tpfuse.compile_ops.linear_all_gather_hidden(
            x, torch.randn(4, 4, generator=torch.Generator().manual_seed(7 + rank)), None, g,
            [4, 4.0] if odd else [4, 4]),
        "argmax_float_width": lambda g: tpfuse.argmax_hidden(x, g, [4, 4.5] if odd else [4, 4]),
        "lse_float_width": lambda g: tpfuse.logsumexp_hidden(x, g, [float("nan"), 4] if odd else [4, 4]),
        # ... and the other arguments the schemas type: rank 1's dispatcher refused them alone
        "topk_float_k": lambda g: tpfuse.topk_hidden(x, 2.5 if odd else 3, g),
        "argmax_float_valid_columns": lambda g: tpfuse.argmax_hidden(x, g, valid_columns=7.0 if odd else 7),
        "logprobs_list_target": lambda g: tpfuse.target_logprobs_hidden(x, [0, 5, 7] if odd else target, g),
        "ce_float_ignore_index": lambda g: ce(x, target, g, ignore_index=-100.0 if odd else -100),
    }


def _refusals(rank, world_size):
    calls = _case_calls(rank)
    groups = {name: dist.new_group([0, 1], timeout=datetime.timedelta(seconds=GIVE_UP_S)) for name in calls}
    out = {}
    for name, call in calls.items():
        out[name] = _outcome(lambda: call(groups[name]))
        dist.barrier()  # a rank left waiting gives up within GIVE_UP_S; both go on together
    fresh = dist.new_group([0, 1])
    out["after"] = tpfuse.argmax_hidden(torch.arange(4.0).view(1, 4) + 4 * rank, fresh).tolist()
    return out


@pytest.fixture(scope="module")
def refusals():
    return run_ranks(2, _refusals, timeout=240)


#: case -> what every rank's message says (rank 1's own reason, or both ranks' views of the call)
REFUSED = {
    "argmax_grad": "max_hidden has no gradient",
    "argmax_dtype": "rank 1: dtype float64",
    "argmax_scalar": "rank 1: dtype float32, leading dims []",
    "topk_k_out_of_range": "rank 1: topk_hidden(k=9, largest=True, valid_columns=None)",
    "argmax_valid_columns_zero": "rank 1: max_hidden(largest=True, valid_columns=0)",
    "topk_k_differs": "rank 0: topk_hidden(k=3, largest=True, valid_columns=None)",
    "topk_largest_differs": "rank 1: topk_hidden(k=1, largest=False, valid_columns=None)",
    "argmax_valid_columns_differ": "rank 0: max_hidden(largest=True, valid_columns=8)",
    "ce_reduction": "reduction='avg' is not accepted; accepted are mean, sum, none",
    "ce_reduction_with_grad": "reduction='avg' is not accepted",
    "ce_label_smoothing": "label_smoothing=-0.5 is not accepted",
    "ce_target_dtype": "target of dtype torch.float32 is not accepted",
    "lse_dtype": "rank 1: dtype float64",
    "lse_scalar": "rank 1: dtype float32, leading dims []",
    "entropy_width": "x.shape[-1]=3",
    "ce_ignore_index_differs": "ignore_index=9",
    "ce_targets_differ": "target checksum",
    "logprobs_widths_lists_differ": "rank 1: dtype float32, leading dims [3], hidden_widths [3, 5]",
    "gather_float_width": "holds 4.5 (float); accepted are whole numbers (int)",
    "gather_whole_float_width": "holds 4.0 (float); accepted are whole numbers (int)",
    "linear_float_width": "holds 4.0 (float); accepted are whole numbers (int)",
    "argmax_float_width": "holds 4.5 (float); accepted are whole numbers (int)",
    "lse_float_width": "holds nan (float); accepted are whole numbers (int)",
    "topk_float_k": "Expected a value of type 'int' for argument 'k'",
    "argmax_float_valid_columns": "for argument 'valid_columns'",
    "logprobs_list_target": "Expected a value of type 'Tensor' for argument 'target'",
    "ce_float_ignore_index": "for argument 'ignore_index'",
}

#: the cases where rank 1 refused on its own view: its peer's message names it
NAMED = ("argmax_grad", "ce_reduction", "ce_reduction_with_grad", "ce_label_smoothing", "ce_target_dtype",
         "gather_float_width", "gather_whole_float_width", "linear_float_width", "argmax_float_width",
         "lse_float_width", "topk_float_k", "argmax_float_valid_columns", "logprobs_list_target",
         "ce_float_ignore_index")


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_a_call_one_rank_refuses_or_means_otherwise_is_refused_by_every_rank(refusals, case):
    for rank, (kind, message, seconds) in enumerate(r[case] for r in refusals):
        # Before the fix: rank 0 timed out in the exchange (a gloo error after GIVE_UP_S) while rank 1
        # raised, or, for the arguments that differ, both returned a wrong answer ("ok").
        assert kind in ("ValueError", "TypeError", "RuntimeError") and REFUSED[case] in message, (
            case, rank, kind, message)
        assert seconds < GIVE_UP_S, (case, rank, seconds)


def test_the_peer_names_the_rank_that_refused(refusals):
    for case in NAMED:
        message = refusals[0][case][1]
        assert "rank(s) [1]" in message and "every rank refuses it" in message, (case, message)


def test_the_group_works_after_the_refusals(refusals):
    assert [r["after"] for r in refusals] == [[7], [7]]


def test_ranks_that_mean_other_widths_would_merge_a_wrong_loss():
    """Negative control, one process: what the softmax family returned before its widths were agreed. Rank 0
    holds [4, 4], rank 1 says [3, 5]: both count the target's column as theirs and the loss is wrong."""
    from tpfuse.compile_ops.vocab_parallel_loss import finish_logprobs, local_partials, merge_partials

    slabs, target = [torch.ones(1, 4), torch.ones(1, 5)], torch.tensor([3])
    partials = [local_partials(slabs[0], target, 0, False, False), local_partials(slabs[1], target, 3, False, False)]
    _, log_sum, target_logit, _, _ = merge_partials(torch.cat(partials, -1), [4, 4], True, False, False)
    wrong = finish_logprobs(log_sum, target_logit, target, 8, -100)
    right = torch.log_softmax(torch.cat(slabs, -1), -1)[:, 3]
    assert not torch.allclose(wrong, right, atol=0.5), (wrong, right)


# --------------------------------------------------------------------------- found correct (W=3)


def _groups(rank):
    """Argmax and gathers on two overlapping pairs in turn, cross-entropy on a pair, a rank outside it."""
    out = {}
    row = torch.tensor([[1.0, 5.0, 2.0, 5.0, 0.0, 5.0]])  # ties at 1, 3 and 5: the first wins

    def slab(members):
        i = members.index(rank)
        return row[:, 3 * i:3 * i + 3]

    first, second, ends = dist.new_group([0, 1]), dist.new_group([1, 2]), dist.new_group([0, 2])
    seen = []
    for _ in range(2):
        if rank in (0, 1):
            seen.append((tpfuse.argmax_hidden(slab([0, 1]), first).tolist(),
                         torch.equal(tpfuse.all_gather_hidden(slab([0, 1]), first.group_name), row)))
        if rank in (1, 2):
            seen.append((tpfuse.argmax_hidden(slab([1, 2]), second.group_name).tolist(),
                         tpfuse.topk_hidden(slab([1, 2]), 2, second).indices.tolist()))
    out["alternate"] = seen
    if rank == 1:
        # What dist.new_group returns outside the group is an int: named as such, not as a type mistake.
        out["outside"] = _outcome(lambda: tpfuse.argmax_hidden(row[:, :3], ends))[:2]
    else:
        out["ends"] = float(tpfuse.cross_entropy_hidden(slab([0, 2]), torch.tensor([4]), ends))
    gone = dist.new_group([0, 1, 2])
    name = gone.group_name
    dist.destroy_process_group(gone)
    out["destroyed"] = [_outcome(lambda: tpfuse.all_gather_hidden(torch.ones(2, 3), gone))[:2],
                        _outcome(lambda: tpfuse.argmax_hidden(torch.ones(2, 3), name))[:2]]
    return out


def _layouts(rank, world_size):
    def every(make):
        return [make(r) for r in range(world_size)]

    def grid(r):
        return torch.arange(120.0).view(2, 3, 4, 5) + 1000 * r

    def column(r):
        return torch.arange(3.0).view(3, 1).expand(3, 4) + r

    def tall(r):
        return (torch.arange(20.0).view(4, 5) + 100 * r).t()

    out = {
        "channels_last": torch.equal(tpfuse.all_gather_hidden(grid(rank).to(memory_format=torch.channels_last)),
                                     torch.cat(every(grid), -1)),
        "expanded": torch.equal(tpfuse.all_gather_hidden(column(rank)), torch.cat(every(column), -1)),
        "transposed": torch.equal(tpfuse.all_gather_hidden(tall(rank)), torch.cat(every(tall), -1)),
    }
    logits = torch.randn(6, 8 * world_size, generator=torch.Generator().manual_seed(5))

    def strided(r):
        return logits[:, 8 * r:8 * r + 8][:, ::2]

    cat = torch.cat(every(strided), -1)
    target = torch.randint(0, cat.shape[-1], (6,), generator=torch.Generator().manual_seed(6))
    top = tpfuse.topk_hidden(strided(rank).t().contiguous().t(), 3)
    out["argmax_strided"] = torch.equal(tpfuse.argmax_hidden(strided(rank)), cat.argmax(-1))
    out["topk_column_major"] = torch.equal(top.values, cat.topk(3, -1).values) and torch.equal(
        top.indices, cat.topk(3, -1).indices)
    out["ce_strided"] = float((tpfuse.cross_entropy_hidden(strided(rank), target) - F.cross_entropy(cat, target)).abs())
    return out


def _ties_and_edges(rank, world_size):
    out = {}
    tie = torch.tensor([[3.0, 1.0, 3.0]])  # every rank holds the maximum twice: global index 0 must win
    out["ties"] = (tpfuse.argmax_hidden(tie).tolist(), tpfuse.argmin_hidden(-tie).tolist(),
                   tpfuse.topk_hidden(tie, 4).indices.tolist())

    def nan_row(r):
        return torch.tensor([[0.0, math.nan if r >= 1 else 1.0, 2.0]])

    cat = torch.cat([nan_row(r) for r in range(world_size)], -1)
    out["first_nan"] = (tpfuse.argmax_hidden(nan_row(rank)).tolist(), cat.argmax(-1).tolist())
    signed = tpfuse.max_hidden(torch.tensor([[-0.0 if rank == 0 else 0.0]]))
    out["signed_zero"] = (signed.indices.tolist(), signed.values.view(torch.int32).tolist())
    empty = torch.ones(0, 4)
    out["T=0"] = [tuple(tpfuse.argmax_hidden(empty).shape), tuple(tpfuse.topk_hidden(empty, 2).values.shape),
                  tuple(tpfuse.logsumexp_hidden(empty).shape), tuple(tpfuse.entropy_hidden(empty).shape),
                  math.isnan(float(tpfuse.cross_entropy_hidden(empty, torch.ones(0, dtype=torch.long))))]
    widths = [4, 0, 3]
    g = torch.Generator().manual_seed(11)
    slabs = [torch.randn(5, w, generator=g) for w in widths]
    target = torch.randint(0, sum(widths), (5,), generator=g)
    full = torch.cat(slabs, -1)
    out["width_0_softmax"] = max(
        float((tpfuse.cross_entropy_hidden(slabs[rank], target, None, widths) - F.cross_entropy(full, target)).abs()),
        float((tpfuse.logsumexp_hidden(slabs[rank], None, widths) - full.logsumexp(-1)).abs().max()))
    out["width_0_argmax"] = _outcome(lambda: tpfuse.argmax_hidden(slabs[rank], None, widths))[:2]
    x = torch.full((2, 3), float(rank))
    out["widths_containers"] = [tuple(tpfuse.all_gather_hidden(x, None, torch.tensor([3] * world_size)).shape),
                                tuple(tpfuse.all_gather_hidden(x, None, (3,) * world_size).shape)]
    out["widths_huge"] = _outcome(lambda: tpfuse.all_gather_hidden(x, None, [2**62] * world_size))[:2]
    out["widths_float"] = [_outcome(lambda: tpfuse.argmax_hidden(x, None, [3.7] * world_size))[:2],
                           _outcome(lambda: tpfuse.logsumexp_hidden(x, None, [3.0] * world_size))[:2]]
    return out


def _transforms(rank, world_size):
    """torch.func.vmap runs the ops once per batch element (torch's fallback): correct. torch.func.grad is
    refused by torch alike on every rank. torch.compile(dynamic=True): the same as eager at three T."""
    out = {}
    every = torch.randn(world_size, 3, 4, 5, generator=torch.Generator().manual_seed(3))
    mine, cat = every[rank], torch.cat(list(every), -1)
    target = torch.randint(0, cat.shape[-1], (3, 4), generator=torch.Generator().manual_seed(4))
    vmap = torch.func.vmap
    reference = F.cross_entropy(cat.flatten(0, 1), target.flatten(), reduction="none").view(3, 4)
    out["vmap"] = [torch.equal(vmap(tpfuse.all_gather_hidden)(mine), cat),
                   torch.equal(vmap(tpfuse.all_gather_hidden, in_dims=1)(mine.transpose(0, 1).contiguous()), cat),
                   torch.equal(vmap(tpfuse.argmax_hidden)(mine), cat.argmax(-1)),
                   torch.equal(vmap(lambda t: tpfuse.topk_hidden(t, 3).indices)(mine), cat.topk(3, -1).indices),
                   float((vmap(lambda t, y: tpfuse.cross_entropy_hidden(t, y, reduction="none"))(mine, target)
                          - reference).abs().max())]
    out["func_grad"] = _outcome(lambda: torch.func.grad(lambda t: tpfuse.all_gather_hidden(t).sum())(mine[0]))[:2]

    def step(x, y):
        return (tpfuse.all_gather_hidden(x), tpfuse.argmax_hidden(x), tpfuse.topk_hidden(x, 2).values,
                tpfuse.logsumexp_hidden(x), tpfuse.cross_entropy_hidden(x, y), tpfuse.entropy_hidden(x))

    for backend in ("aot_eager", "inductor"):
        torch._dynamo.reset()
        compiled = torch.compile(step, backend=backend, dynamic=True)
        gaps = []
        for tokens in (3, 7, 1):
            g = torch.Generator().manual_seed(tokens)
            x = torch.randn(world_size, tokens, 5, generator=g)[rank]
            y = torch.randint(0, 5 * world_size, (tokens,), generator=g)
            got, want = compiled(x, y), step(x, y)
            gaps.append([not torch.equal(a, b) for a, b in zip(got[:3], want[:3])]
                        + [float((a - b).abs().max()) for a, b in zip(got[3:], want[3:])])
        out[backend] = gaps
    return out


def _gradient_on_one_rank(rank, world_size):
    """The softmax family's backward is local to each slab: a gradient wanted on rank 0 only is fine (unlike
    the gather's, whose backward is a collective), and it is the band of torch's gradient."""
    full = torch.randn(4, 5 * world_size, generator=torch.Generator().manual_seed(8))
    target = torch.randint(0, full.shape[-1], (4,), generator=torch.Generator().manual_seed(9))
    x = full[:, 5 * rank:5 * rank + 5].clone().requires_grad_(rank == 0)
    loss = tpfuse.cross_entropy_hidden(x, target)
    reference = full.clone().requires_grad_()
    F.cross_entropy(reference, target).backward()
    gap = None
    if rank == 0:
        loss.backward()
        gap = float((x.grad - reference.grad[:, :5]).abs().max())
    return float((loss - F.cross_entropy(full, target)).abs()), gap


def _found_correct(rank, world_size):
    return {"groups": _groups(rank), "layouts": _layouts(rank, world_size),
            "edges": _ties_and_edges(rank, world_size), "transforms": _transforms(rank, world_size),
            "one_gradient": _gradient_on_one_rank(rank, world_size)}


@pytest.fixture(scope="module")
def w3():
    return run_ranks(3, _found_correct, timeout=240)


def test_groups_of_some_ranks_in_turn_destroyed_and_outside(w3):
    assert w3[0]["groups"]["alternate"] == [([1], True)] * 2
    assert w3[1]["groups"]["alternate"] == [([1], True), ([1], [[1, 3]])] * 2
    assert w3[2]["groups"]["alternate"] == [([1], [[1, 3]])] * 2
    expected = float(F.cross_entropy(torch.tensor([[1.0, 5.0, 2.0, 5.0, 0.0, 5.0]]), torch.tensor([4])))
    assert w3[0]["groups"]["ends"] == w3[2]["groups"]["ends"] == pytest.approx(expected, abs=1e-6)
    kind, message = w3[1]["groups"]["outside"]
    # before: TypeError "group must be a ProcessGroup, a group name (str) or None, got int"
    assert kind == "ValueError" and "this rank is not a member of the group" in message, message
    for r in w3:
        for kind, message in r["groups"]["destroyed"]:
            assert kind == "ValueError" and "unknown process group name" in message, message


def test_layouts_give_torch_s_answer(w3):
    for r in w3:
        layouts = r["layouts"]
        assert layouts.pop("ce_strided") < 1e-5, layouts
        assert all(layouts.values()), layouts


def test_ties_nan_signed_zero_empty_rows_and_width_0(w3):
    for r in w3:
        edges = r["edges"]
        assert edges["ties"] == ([0], [0], [[0, 2, 3, 5]]), edges
        assert edges["first_nan"] == ([4], [4]), edges
        assert edges["signed_zero"] == ([0], [-2**31]), edges  # -0.0 at index 0: its own bits
        assert edges["T=0"] == [(0,), (0, 2), (0,), (0,), True], edges
        assert edges["width_0_softmax"] < 1e-5, edges
        kind, message = edges["width_0_argmax"]  # the comparison family needs a column on every rank
        assert kind == "ValueError" and "has width(s) [0] <= 0" in message, edges


def test_odd_widths_containers_and_values(w3):
    for r in w3:
        edges = r["edges"]
        assert edges["widths_containers"] == [(2, 9), (2, 9)], edges
        kind, message = edges["widths_huge"]  # before: "Overflow when unpacking long long", naming nothing
        assert kind == "ValueError" and "x.shape[-1]=3 on rank" in message and "4611686018427387904" in message, edges
        for kind, message in edges["widths_float"]:  # before: argmax_hidden rounded 3.7 down to 3
            assert kind == "TypeError" and "accepted are whole numbers" in message, edges


def test_vmap_is_correct_and_func_grad_is_refused_alike(w3):
    for r in w3:
        *equal, gap = r["transforms"]["vmap"]
        assert all(equal) and gap < 1e-5, r["transforms"]["vmap"]
    refusals = {r["transforms"]["func_grad"] for r in w3}
    assert len(refusals) == 1 and next(iter(refusals))[0] == "RuntimeError", refusals


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_dynamic_is_the_eager_answer(w3, backend):
    for r in w3:
        for gaps in r["transforms"][backend]:
            assert not any(gaps[:3]) and max(gaps[3:]) < 1e-5, (backend, r["transforms"][backend])


def test_a_gradient_on_one_rank_only_is_fine_for_the_softmax_family(w3):
    for rank, (loss_gap, grad_gap) in enumerate(r["one_gradient"] for r in w3):
        assert loss_gap < 1e-5
        assert (grad_gap is None) == (rank != 0) and (grad_gap or 0.0) < 1e-6


# --------------------------------------------------------------------------- the command line


def _one_line(capsys, code):
    out, err = capsys.readouterr()
    assert code == 2 and not out, (code, out, err)
    assert len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize("argv, says", [
    (["tune", "--tokens", "x"], "argument --tokens: 'x': expected comma-separated positive integers"),
    (["tune", "--bogus"], "unrecognized arguments: --bogus; accepted: --help, --nproc"),
    (["tune", "--nproc", "two"], "argument --nproc: invalid int value: 'two'"),
])
def test_a_bad_tune_argument_is_one_line(argv, says, capsys):
    from tpfuse.cli import main, tuner

    if tuner() is None:
        pytest.skip("this checkout has no tuner")
    # before: argparse's usage (several lines) and then its error, through SystemExit
    err = _one_line(capsys, main(argv))
    assert err.startswith("python -m tpfuse tune: error: ") and says in err, err


def test_an_entry_that_exits_on_import_is_one_line(tmp_path, capsys):
    from tpfuse.cli import main

    entry = tmp_path / "exits_on_import.py"
    entry.write_text("import sys\nsys.exit(3)\n")
    err = _one_line(capsys, main(["explain", f"{entry}:step"]))  # before: SystemExit(3), not a word
    assert "python -m tpfuse explain: error: SystemExit: 3" in err, err


def test_explain_on_missing_gpus_is_refused_before_spawning(tmp_path, capsys):
    from tpfuse.cli import main

    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has the GPUs: explain would run")
    entry = tmp_path / "entry.py"
    entry.write_text("def step():\n    return None\n")
    started = time.monotonic()
    err = _one_line(capsys, main(["explain", f"{entry}:step", "--device", "cuda"]))
    # before: two ranks spawned, each failing to select its GPU with torch's own AttributeError
    assert "--device cuda --nproc 2 needs 2 GPUs, found" in err and "--device cpu" in err, err
    assert time.monotonic() - started < 5


# --------------------------------------------------------------------------- the same on CUDA (TPFUSE_CHECK=1)


def _refusals_on_gpus(rank, world_size):
    """With TPFUSE_CHECK=1 a CUDA call agrees as a gloo call does: the reductions' own checks and arguments too.
    Each case on a group of its own with a short NCCL timeout, so a rank left waiting shows as an error."""
    import os

    os.environ["TPFUSE_CHECK"] = "1"
    x = torch.randn(3, 4, device="cuda", generator=torch.Generator(device="cuda").manual_seed(rank))
    target, odd = torch.tensor([0, 5, 7], device="cuda"), rank == 1
    calls = {
        "topk_k_out_of_range": lambda g: tpfuse.topk_hidden(x, 9 if odd else 3, g),
        "ce_reduction": lambda g: tpfuse.cross_entropy_hidden(x, target, g, reduction="avg" if odd else "mean"),
        "ce_targets_differ": lambda g: tpfuse.cross_entropy_hidden(x, target + int(odd), g),
        "gather_float_width": lambda g: tpfuse.all_gather_hidden(x, g, [4, 4.5] if odd else [4, 4]),
    }
    groups = {name: dist.new_group([0, 1], timeout=datetime.timedelta(seconds=20)) for name in calls}
    out = {name: _outcome(lambda: call(groups[name]))[:2] for name, call in calls.items()}
    torch.cuda.synchronize()
    return out


@pytest.mark.gpu
@pytest.mark.multigpu
def test_a_cuda_call_one_rank_refuses_is_refused_by_every_rank_with_the_check():
    results = run_ranks(2, _refusals_on_gpus, backend="nccl", timeout=300)
    says = {"topk_k_out_of_range": "topk_hidden(k=9", "ce_reduction": "reduction='avg' is not accepted",
            "ce_targets_differ": "target checksum", "gather_float_width": "accepted are whole numbers (int)"}
    for r in results:
        for case, text in says.items():
            kind, message = r[case]
            assert kind == ("TypeError" if case == "gather_float_width" else "ValueError") and text in message, (
                case, r[case])
