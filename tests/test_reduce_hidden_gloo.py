"""The exact reductions over a split hidden axis on real gloo ranks: max/min/argmax/argmin/topk
without the gather, bit-exact against torch on the gathered tensor (docs/op.md, "Reductions
without the gather").

One spawned run per world size does every case (process start-up dominates); the ranks return
what they computed and the assertions run here.  The rows are adversarial: NaN in one rank's
band or in several, rows of -inf, equal maxima on different ranks, all-equal rows, signed
zeros, and a padded-vocab slice that leaves the last rank(s) with no column.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.distributed as dist
from multiproc import run_ranks

import tpfuse

NAN, INF = float("nan"), float("inf")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _logits(rows: int, columns: int, seed: int) -> torch.Tensor:
    """The full (gathered) logits every rank builds alike: random rows, then the adversarial ones."""
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(rows, columns, generator=g)
    full[0] = 1.0  # all equal
    full[1] = -INF  # every column -inf
    full[2, columns // 3] = full[2, -2] = 9.0  # equal maxima: rank 0 and the last rank
    full[3, -1], full[3, 1] = NAN, NAN  # NaN on the last and first rank: the first NaN wins
    full[4, -3] = NAN  # a NaN on the last rank only
    full[5] = torch.where(torch.arange(columns) % 2 == 0, 0.0, -0.0)  # signed zeros
    full[6, ::3] = INF  # several +inf
    full[7] = torch.arange(columns, dtype=torch.float32).flip(0) % 5  # repeated values across ranks
    return full


def _cases(world_size: int):
    """(name, leading shape, widths, valid_columns, dtype)."""
    even = [16] * world_size
    uneven = [5 + 7 * r for r in range(world_size)]
    total = sum(uneven)
    cases = []
    for dtype in DTYPES:
        cases.append((f"even-{dtype}", (12,), even, None, dtype))
        cases.append((f"uneven-{dtype}", (12,), uneven, None, dtype))
    cases += [
        # the last rank keeps 0 columns, the one before it a part of its band
        ("padded-last-rank-empty", (12,), uneven, total - uneven[-1] - 3, torch.float32),
        ("padded-only-rank-0", (12,), even, 9, torch.bfloat16),
        ("padded-no-op", (12,), even, 10_000, torch.float32),
        ("3d", (3, 4), uneven, None, torch.float32),
        ("T=1", (1,), even, None, torch.bfloat16),
        ("T=0", (0,), even, None, torch.float32),
    ]
    return cases


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def _full(lead, widths, dtype, seed):
    rows = 1
    for d in lead:
        rows *= d
    base = _logits(max(rows, 8), sum(widths), seed)[:rows] if rows else torch.empty(0, sum(widths))
    return base.to(dtype).reshape(*lead, sum(widths))


def _reductions(x, widths, valid, k):
    """What the ops compute on this rank's slab."""
    return {
        "max": tpfuse.max_hidden(x, hidden_widths=widths, valid_columns=valid),
        "min": tpfuse.min_hidden(x, hidden_widths=widths, valid_columns=valid),
        "argmax": tpfuse.argmax_hidden(x, hidden_widths=widths, valid_columns=valid),
        "argmin": tpfuse.argmin_hidden(x, hidden_widths=widths, valid_columns=valid),
        "topk": tpfuse.topk_hidden(x, k, hidden_widths=widths, valid_columns=valid),
        "bottomk": tpfuse.topk_hidden(x, k, hidden_widths=widths, largest=False, valid_columns=valid),
    }


def _check_case(rank, world_size, i, case, device="cpu"):
    name, lead, widths, valid, dtype = case
    full = _full(lead, widths, dtype, seed=100 + i).to(device)
    offset = sum(widths[:rank])
    x = full[..., offset:offset + widths[rank]].contiguous()
    ref = full[..., :valid] if valid is not None else full
    k = min(3, ref.shape[-1])
    got = _reductions(x, widths, valid, k)
    want = {
        "max": torch.max(ref, -1) if ref.numel() else None,
        "min": torch.min(ref, -1) if ref.numel() else None,
        "argmax": torch.argmax(ref, -1) if ref.numel() else None,
        "argmin": torch.argmin(ref, -1) if ref.numel() else None,
        "topk": torch.topk(ref, k, -1),
        "bottomk": torch.topk(ref, k, -1, largest=False),
    }
    out = {}
    for what in ("max", "min"):
        g, w = got[what], want[what]
        out[what] = w is None or (torch.equal(_bits(g.values), _bits(w.values)) and torch.equal(g.indices, w.indices))
    for what in ("argmax", "argmin"):
        out[what] = want[what] is None or torch.equal(got[what], want[what])
    for what, largest in (("topk", True), ("bottomk", False)):
        g, w = got[what], want[what]
        # values: torch.topk's (NaN-aware; equal values tie, so -0.0 against 0.0 is allowed)
        same = (g.values == w.values) | (g.values.isnan() & w.values.isnan())
        # the tie rule, exactly: a stable sort's first k (equal values by increasing index)
        s_values, s_indices = torch.sort(ref, dim=-1, descending=largest, stable=True)
        rule = (torch.equal(_bits(g.values), _bits(s_values[..., :k].contiguous()))
                and torch.equal(g.indices, s_indices[..., :k]))
        out[what] = bool(same.all()) and rule
        out[f"{what}-distinct-rows-as-torch"] = _distinct_rows_equal(ref, g.indices, w.indices)
    # plain bytes: tensors would travel to the test process through shared memory that dies with the rank
    out["bits"] = {key: bytes(_bits(v if isinstance(v, torch.Tensor) else torch.cat(
        [_bits(v.values).flatten(), _bits(v.indices).flatten()])).cpu().numpy()) for key, v in got.items()}
    return name, out


def _distinct_rows_equal(ref, ours, theirs) -> bool:
    """Where a row holds no equal values (no tie anywhere), the indices are torch.topk's."""
    if ref.numel() == 0:
        return ours.numel() == theirs.numel() == 0
    rows = ref.reshape(-1, ref.shape[-1])
    distinct = torch.tensor([len(set(r.float().tolist())) == r.numel() and not r.isnan().any() for r in rows],
                            dtype=torch.bool, device=ref.device)
    return torch.equal(ours.reshape(len(rows), -1)[distinct], theirs.reshape(len(rows), -1)[distinct])


def _capture(fn):
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - we return what was raised
        return type(err).__name__, str(err)
    return None


def _errors(rank, world_size):
    name = dist.group.WORLD.group_name
    x = torch.randn(3, 4)
    op, topk = torch.ops.tpfuse.max_hidden.default, torch.ops.tpfuse.topk_hidden.default
    widths = [4] * world_size
    return {
        "valid_zero": _capture(lambda: op(x, widths, name, True, 0)),
        "k_too_large": _capture(lambda: topk(x, 4 * world_size + 1, widths, name)),
        "k_zero": _capture(lambda: topk(x, 0, widths, name)),
        "dtype": _capture(lambda: op(x.double(), widths, name)),
        "int_dtype": _capture(lambda: op(x.to(torch.int32), widths, name)),
        "width_zero": _capture(lambda: op(x, [4, 0] + [4] * (world_size - 2), name)),
        # one rank's slab is narrower than its entry: every rank refuses alike (the agreement check)
        "one_rank_wrong_width": _capture(lambda: op(x[:, :3] if rank == 1 else x, widths, name)),
        "scalar": _capture(lambda: tpfuse.argmax_hidden(torch.tensor(1.0))),
        "requires_grad": _capture(lambda: tpfuse.max_hidden(x.requires_grad_())),
        "band_wrong_local_width": _capture(lambda: torch.ops.tpfuse.hidden_band(torch.ones(9), widths, 5, name)),
    }


def _bands(rank, world_size):
    """hidden_band: this rank's columns of a full-width operand, zero past its end."""
    name, widths = dist.group.WORLD.group_name, [3 + r for r in range(world_size)]
    full = torch.arange(2 * sum(widths), dtype=torch.float32).reshape(2, -1)
    offset = sum(widths[:rank])
    exact = torch.equal(torch.ops.tpfuse.hidden_band(full, widths, widths[rank], name),
                        full[:, offset:offset + widths[rank]])
    short = full[:, : offset + 1]  # narrower than the gathered width: one column of the band, then zeros
    band = torch.ops.tpfuse.hidden_band(short, widths, widths[rank], name)
    expected = torch.zeros(2, widths[rank])
    expected[:, 0] = full[:, offset]
    return exact and torch.equal(band, expected)


def _opcheck(rank, world_size):
    name, widths = dist.group.WORLD.group_name, [6 + r for r in range(world_size)]
    x = torch.randn(3, widths[rank], generator=torch.Generator().manual_seed(rank))
    torch.library.opcheck(torch.ops.tpfuse.max_hidden.default, (x, widths, name))
    torch.library.opcheck(torch.ops.tpfuse.max_hidden.default, (x, widths, name, False, widths[0] + 1))
    torch.library.opcheck(torch.ops.tpfuse.topk_hidden.default, (x, 4, widths, name))
    torch.library.opcheck(torch.ops.tpfuse.hidden_band.default, (torch.randn(2, sum(widths)), widths, widths[rank], name))
    return True


def _run(rank, world_size, with_extras):
    results = dict(_check_case(rank, world_size, i, case) for i, case in enumerate(_cases(world_size)))
    if with_extras:
        results["_errors"] = _errors(rank, world_size)
        results["_bands"] = _bands(rank, world_size)
        results["_opcheck"] = _opcheck(rank, world_size)
    return results


@pytest.fixture(scope="module")
def w2():
    return run_ranks(2, _run, True)


@pytest.fixture(scope="module")
def w4():
    return run_ranks(4, _run, False)


def _assert_exact(per_rank, world_size):
    names = [c[0] for c in _cases(world_size)]
    for rank, results in enumerate(per_rank):
        for name in names:
            failed = [k for k, ok in results[name].items() if k != "bits" and not ok]
            assert not failed, f"rank {rank} {name}: {failed}"
    for name in names:  # every rank holds the same bits
        first = per_rank[0][name]["bits"]
        for rank, results in enumerate(per_rank[1:], 1):
            for key, bits in results[name]["bits"].items():
                assert bits == first[key], (rank, name, key)


def test_exact_against_torch_on_the_gathered_tensor_w2(w2):
    _assert_exact(w2, 2)


def test_exact_against_torch_on_the_gathered_tensor_w4(w4):
    _assert_exact(w4, 4)


def test_negative_control_a_wrong_tie_rule_is_caught():
    """The comparisons above can fail: argmax that takes the LAST maximum differs on the
    adversarial rows (equal maxima on two ranks, all-equal rows)."""
    full = _logits(12, 32, seed=100)
    last = full.shape[-1] - 1 - full.flip(-1).argmax(-1)
    assert not torch.equal(last, full.argmax(-1))


ERRORS = {
    "valid_zero": ("ValueError", r"valid_columns=0 keeps no column; accepted are 1 to sum\(hidden_widths\)"),
    "k_too_large": ("ValueError", r"topk_hidden k=\d+ is out of range; accepted are 1 to the number of columns"),
    "k_zero": ("ValueError", r"topk_hidden k=0 is out of range"),
    "dtype": ("TypeError", r"dtype torch.float64 is not supported; accepted dtypes are float32, bfloat16, float16"),
    "int_dtype": ("TypeError", r"dtype torch.int32 is not supported"),
    "width_zero": ("ValueError", r"has width\(s\) \[0\] <= 0"),
    "one_rank_wrong_width": ("ValueError", r"the ranks disagree on the gather: rank 0: .*x.shape\[-1\]=4; rank 1: "
                                           r".*x.shape\[-1\]=3"),
    "scalar": ("ValueError", r"x is a scalar \(0-d\)"),
    "requires_grad": ("ValueError", r"max_hidden has no gradient; accepted are inputs that do not require grad"),
    "band_wrong_local_width": ("ValueError", r"hidden_band on rank \d: local_width=5 but hidden_widths\[\d\]=4"),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_error_messages(w2, case):
    kind, pattern = ERRORS[case]
    for results in w2:
        got = results["_errors"][case]
        assert got is not None, f"{case}: no error raised"
        assert got[0] == kind and re.search(pattern, got[1]), got


def test_hidden_band_and_opcheck(w2):
    assert all(r["_bands"] for r in w2)
    assert all(r["_opcheck"] for r in w2)


def test_fake_kernels_without_process_group():
    """Shapes only, with a symbolic leading dim, and no process group at all."""
    from torch.fx.experimental.proxy_tensor import make_fx

    assert not dist.is_initialized()

    def reductions(x, bias):
        values, indices = torch.ops.tpfuse.max_hidden(x, [8, 8], "never-registered", True, 11)
        top_values, top_indices = torch.ops.tpfuse.topk_hidden(x, 3, [8, 8], "never-registered")
        band = torch.ops.tpfuse.hidden_band(bias, [8, 8], 8, "never-registered")
        return values, indices, top_values, top_indices, band

    traced = make_fx(reductions, tracing_mode="symbolic")(torch.empty(5, 8, dtype=torch.bfloat16), torch.empty(16))
    out = [n.meta["val"] for n in next(n for n in traced.graph.nodes if n.op == "output").args[0]]
    rows = out[0].shape[0]
    assert isinstance(rows, torch.SymInt)
    assert [tuple(t.shape) for t in out] == [(rows,), (rows,), (rows, 3), (rows, 3), (8,)]
    assert [t.dtype for t in out] == [torch.bfloat16, torch.int64, torch.bfloat16, torch.int64, torch.float32]
