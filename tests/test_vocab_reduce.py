"""The Triton kernels of the exact vocab-parallel reductions on the CPU (kernels/vocab_reduce.py):
in Triton's interpreter against reduce_hidden's torch composition and torch itself, with a
negative control; the rank-invariant chunk plan; the facts the kernels share with reduce_hidden.
The same kernels on a GPU: tests/gpu/test_vocab_reduce.py; compiled for sm_90:
tests/test_kernels_aot.py."""

import pytest
import torch

import interpreter_support
from tpfuse.compile_ops import reduce_hidden as rh
from tpfuse.kernels import vocab_reduce as vr

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _interpret(*flags):
    return interpreter_support.interpret("interpret_vocab_reduce.py", *flags)


@pytest.fixture(scope="module")
def interpreted():
    pytest.importorskip("triton")
    return _interpret()["cases"]


def test_kernels_give_the_composition_bits_in_the_interpreter(interpreted):
    wrong = [c for c in interpreted if not (c["as_composition"] and c["as_torch"])]
    assert not wrong, wrong
    # what the cases covered: every dtype, both directions, max and top-k, several chunks per row,
    # several tiles per chunk, one rank and four, and a slice that leaves ranks without columns
    assert {c["dtype"] for c in interpreted} == set(DTYPES)
    assert {c["largest"] for c in interpreted} == {True, False}
    assert {c["k"] for c in interpreted} >= {None, 1, 3, 8}
    assert max(c["chunks"] for c in interpreted) >= 4 and max(c["tiles_per_chunk"] for c in interpreted) > 1
    assert {len(c["widths"]) for c in interpreted} >= {1, 2, 4}
    assert any(c["valid_columns"] == 9 for c in interpreted)


def test_interpreter_negative_control_reverse_rank_order():
    """Candidates merged in reverse rank order: the tie rows must catch it (the check can fail)."""
    pytest.importorskip("triton")
    control = _interpret("--control")["control"]
    assert control and not any(c["as_torch"] or c["as_composition"] for c in control), control


def test_host_path_shapes_and_views_in_the_interpreter():
    """reduce_kernels.py's host code (3-D and 1-D x, T=0, valid slices) with launches interpreted."""
    pytest.importorskip("triton")
    host = _interpret("--host")["host"]
    assert host and all(h["shapes"] and h["as_torch"] for h in host), host
    assert {tuple(h["lead"]) for h in host} >= {(3, 4), (), (0,), (2, 0)}


def test_composition_keeps_a_bfloat16_nan_payload():
    """The reference returns the winner's own bits; torch's CPU gather of bfloat16 would return 0xFFFF."""
    row = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.bfloat16)
    row.view(torch.int16)[0, 1] = 0x7FC5
    values, indices = rh._local_best(row, 10, True)
    assert values.view(torch.int16).item() == 0x7FC5 and indices.item() == 11


def test_chunk_plan_covers_the_widest_band():
    for tokens in (0, 1, 2, 7, 8, 131, 132, 263, 264, 4096, 100_000):
        for widest in (1, 5, 2047, 2048, 2049, 32064, 64128, 152064, 2**31 - 2):
            for elem_size, k in ((2, 1), (4, 1), (2, 8), (2, 64), (4, 33)):
                case = (tokens, widest, elem_size, k)
                chunks, tiles_per_chunk = vr.chunk_plan(tokens, widest, elem_size, k)
                block = vr.block_elements(elem_size)
                assert chunks >= 1 and 1 <= tiles_per_chunk <= vr.MAX_TILES_PER_CHUNK, case
                assert chunks * tiles_per_chunk * block >= widest, case  # every valid column in a chunk
                assert (chunks - 1) * tiles_per_chunk * block < widest, case  # none empty on the widest rank
                if tiles_per_chunk < vr.MAX_TILES_PER_CHUNK:
                    assert k == 1 or chunks * k <= vr.MAX_TOPK_CANDIDATES, case
                    if tokens >= 2 * vr.SMS_GUESS:
                        assert chunks == 1, case  # enough rows to fill the GPU: one block per row


def test_chunk_plan_at_the_lm_head_band():
    """Vocab 128256 over 4 ranks, bf16: 16 chunks of one tile at T=1, one chunk per row from T=264."""
    assert vr.chunk_plan(1, 32064, 2) == (16, 1)
    assert vr.chunk_plan(128, 32064, 2) == (3, 6)
    assert vr.chunk_plan(4096, 32064, 2) == (1, 16)
    assert vr.chunk_plan(1, 32064, 2, k=64) == (4, 4)


@pytest.mark.parametrize("name", sorted(DTYPES))
@pytest.mark.parametrize("largest", [True, False])
def test_neutral_candidate_is_the_compositions(name, largest):
    neutral = torch.tensor([rh._neutral(largest)], dtype=DTYPES[name])
    assert vr.neutral_bits(name, largest) == rh._value_bits(neutral).item()
    assert vr.NEVER == rh._NEVER


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_nan_is_a_magnitude_above_infinity(name):
    """The kernels find NaN by its bits: magnitude (sign masked off) above +inf's."""
    dtype = DTYPES[name]
    consts = vr.constexprs(name, True)
    values = torch.tensor([float("inf"), float("nan"), -float("nan"), 1.0, -0.0], dtype=dtype)
    magnitude = rh._value_bits(values) & consts["MAG_MASK"]
    assert (magnitude > consts["INF_BITS"]).tolist() == [False, True, True, False, False]
    assert magnitude[0].item() == consts["INF_BITS"]


def test_topk_k_out_of_range_is_refused():
    with pytest.raises(ValueError, match="top-k kernels take k from 1 to 64, not 65"):
        vr.constexprs("bfloat16", True, 65)


# --------------------------------------------------------------------------- a sort that orders bits
# torch.sort on CUDA is a radix sort of the values' bits for rows of more than 128 elements: a NaN
# with its sign bit set lands below -inf, and NaN payloads order among themselves.  torch.topk (and
# the CPU sort) put every NaN above every number.  These tests run the composition on the CPU with
# torch.sort and argsort replaced by such a sort, so what CUDA would do is checked without a GPU.

_torch_sort, _tensor_argsort = torch.sort, torch.Tensor.argsort
_UNSIGNED_INT_OF = {torch.float32: (torch.int32, 32), torch.bfloat16: (torch.int16, 16), torch.float16: (torch.int16, 16)}


def _radix_sort(x, dim=-1, descending=False, stable=False):
    """A stable sort of floats by their bits, as CUDA's radix sort orders them (-0.0 ties 0.0, no NaN rule)."""
    if not x.is_floating_point():
        return _torch_sort(x, dim=dim, descending=descending, stable=stable)
    int_type, width = _UNSIGNED_INT_OF[x.dtype]
    sign = 1 << (width - 1)
    bits = x.contiguous().view(int_type).to(torch.int64) & ((1 << width) - 1)
    bits = torch.where(bits == sign, 0, bits)
    # negative: every bit flipped (larger magnitude lower); otherwise the sign bit set (above every negative)
    key = torch.where(bits & sign != 0, bits ^ ((1 << width) - 1), bits | sign)
    order = _torch_sort(key, dim=dim, descending=descending, stable=True).indices
    return x.gather(dim, order), order


def _radix_argsort(x, dim=-1, descending=False, stable=False):
    if not x.is_floating_point():
        return _tensor_argsort(x, dim=dim, descending=descending, stable=stable)
    return _radix_sort(x, dim, descending, stable)[1]


def _rows_with_signed_nans(dtype):
    """Three rows over 40 columns: NaN with a payload on the first rank and NaN with its sign bit on the
    last; signed zeros; random."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(3, 40, generator=g).to(dtype)
    ints = x.view(torch.int16 if x.element_size() == 2 else torch.int32)
    x[0, 1], x[0, 39] = float("nan"), float("nan")
    ints[0, 1] |= 0x3
    ints[0, 39] |= -(1 << (8 * x.element_size() - 1))
    x[1] = torch.where(torch.arange(40) % 2 == 0, 0.0, -0.0).to(dtype)
    return x


def _composition_topk(x, widths, largest, k):
    offsets = [sum(widths[:r]) for r in range(len(widths))]
    parts = [rh._local_topk(x[:, o:o + w], k, o, largest) for o, w in zip(offsets, widths)]
    bits = torch.cat([rh._value_bits(v) for v, _ in parts], -1)
    values, indices = rh._merge_topk(bits, torch.cat([i for _, i in parts], -1), k, x.dtype, largest)
    return rh._value_bits(values), indices


def _torch_order(x, largest, k):
    values, indices = _torch_sort(x, dim=-1, descending=largest, stable=True)
    return rh._value_bits(values[:, :k]), indices[:, :k]


@pytest.mark.parametrize("name", sorted(DTYPES))
@pytest.mark.parametrize("largest", [True, False])
def test_composition_keeps_torch_order_under_a_radix_sort(name, largest, monkeypatch):
    """A NaN with its sign bit is still the largest value when the sorts order bits (as on CUDA)."""
    x = _rows_with_signed_nans(DTYPES[name])
    want_bits, want_indices = _torch_order(x, largest, 8)
    monkeypatch.setattr(torch, "sort", _radix_sort)
    monkeypatch.setattr(torch.Tensor, "argsort", _radix_argsort)
    bits, indices = _composition_topk(x, [7, 13, 20], largest, 8)
    assert torch.equal(indices, want_indices), (indices, want_indices)
    assert torch.equal(bits, want_bits)


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_radix_sort_negative_control_misplaces_a_negative_nan(name):
    """The emulated sort on the raw values does put the NaN with its sign bit below -inf (the hazard is real)."""
    x = _rows_with_signed_nans(DTYPES[name])
    for largest in (True, False):
        order = _radix_sort(x, descending=largest)[1][:, :8]
        assert not torch.equal(order, _torch_order(x, largest, 8)[1])
