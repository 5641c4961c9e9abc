"""The exact family's CUDA kernels on one GPU (kernels/vocab_reduce.py, compile_ops/reduce_kernels.py).

- compiled kernels on W simulated ranks (an LM head's vocabulary of 128256 over W=4 and 8, a padded
  vocabulary, uneven widths that are not 16-byte multiples; T=1, 8, 4096; adversarial rows), the
  exchange replaced by the concatenation it returns, bit for bit against torch on the full tensor:
  ``torch.max``/``torch.min`` and the first k of a stable ``torch.sort`` in torch.topk's order (of a
  key with one NaN: CUDA's radix sort would put a NaN with its sign bit below -inf), itself checked
  against the CPU's sort;
- the ops on a one-rank NCCL group (as benchmarks/bench_gather_elimination.py runs them) against torch
  on the slab, no host synchronisation in an eager call (``torch.cuda.set_sync_debug_mode("error")``,
  with a control that it catches one), a CUDA graph's replay equal to the eager call.
The ops on 2 and 4 NCCL ranks: tests/gpu/test_reduce_hidden_gpu.py.

    PYTHONPATH=. python -m pytest -q tests/gpu/test_vocab_reduce_gpu.py
"""

import pytest
import torch

from multiproc import run_ranks

pytestmark = pytest.mark.gpu

NAN, INF = float("nan"), float("inf")
INT_OF = {2: torch.int16, 4: torch.int32}


def _bits(t):
    return t.contiguous().view(INT_OF[t.element_size()])


def _same(a, b):
    """Equal bits (values: torch.equal finds a NaN unequal to itself) or equal integers."""
    return torch.equal(_bits(a), _bits(b)) if a.is_floating_point() else torch.equal(a, b)


def _logits(T, vocab, dtype, seed):
    """Random rows; from T >= 8 on, the hard ones too (equal extremes on the first and last rank, NaN
    with two payloads and signs, rows of -inf and +inf, signed zeros, all equal, ascending)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(T, vocab, device="cuda", generator=g).to(dtype)
    if T >= 8:
        x[0] = 1.0
        x[1] = -INF
        x[2] = INF
        x[3, 5], x[3, vocab - 2] = 9.0, 9.0
        x[4, vocab - 1], x[4, 1] = NAN, NAN
        bits = x.view(INT_OF[x.element_size()])
        bits[4, 1] |= 0x3  # another payload
        bits[4, vocab - 1] |= -(1 << (8 * x.element_size() - 1))  # a negative NaN
        x[5] = torch.where(torch.arange(vocab, device="cuda") % 2 == 0, 0.0, -0.0).to(dtype)
        x[6] = (torch.arange(vocab, device="cuda") % 7).to(dtype)
        x[7] = torch.arange(vocab, device="cuda").to(dtype)  # ascending: each tile brings new top-k
    return x


def _simulated(x, widths, valid_columns, largest, k):
    """Each simulated rank's local kernel on its band (a view: rows strided by the full width), the
    partials concatenated in rank order, the merge kernel."""
    from tpfuse.compile_ops import reduce_hidden as rh
    from tpfuse.compile_ops import reduce_kernels as rk

    offsets = [sum(widths[:r]) for r in range(len(widths))]
    valid = [rh.valid_width(widths, r, valid_columns) for r in range(len(widths))]
    parts = [rk.local_partials(x[:, o:o + w][:, :v], o, max(valid), largest, k)
             for o, w, v in zip(offsets, widths, valid)]
    return rk.merge(torch.cat(parts, -1), x.dtype, largest, k)


def _torch_order_key(x):
    """Every NaN one positive NaN, -0.0 as 0.0.  torch.sort on CUDA is a radix sort of the bits for rows
    of more than 128 elements: a NaN with its sign bit (row 4's last column) would sort below -inf,
    where torch.topk and the CPU's torch.sort put every NaN above every number.  On this key both agree."""
    key = x.masked_fill(x.isnan(), NAN)
    return key.masked_fill(key == 0, 0.0)


def _reference(x, valid_columns, largest, k):
    """torch.max/torch.min, or the first k of a stable sort in torch.topk's order (the elements' own bits)."""
    cut = x[:, :valid_columns] if valid_columns else x
    if k is None:
        return torch.max(cut, -1) if largest else torch.min(cut, -1)
    indices = torch.sort(_torch_order_key(cut), dim=-1, descending=largest, stable=True).indices[:, :k]
    return _bits(cut).gather(-1, indices).view(cut.dtype), indices


def test_reference_is_the_cpu_order():
    """The reference on CUDA gives the CPU's stable sort (NaN of either sign first) on the adversarial rows,
    at a row length on each of CUDA's sort paths (bitonic/warp ones up to 128, block radix up to 4096,
    segmented radix above)."""
    for vocab in (100, 4099, 32064):
        for dtype in (torch.bfloat16, torch.float32, torch.float16):
            x = _logits(8, vocab, dtype, seed=vocab)
            for largest in (True, False):
                values, indices = _reference(x, None, largest, 8)
                cpu = torch.sort(x.cpu(), dim=-1, descending=largest, stable=True)
                case = (vocab, dtype, largest)
                assert torch.equal(indices.cpu(), cpu.indices[:, :8]), case
                assert torch.equal(_bits(values).cpu(), _bits(cpu.values[:, :8])), case
                raw = torch.sort(x, dim=-1, descending=largest, stable=True).indices[:, :8].cpu()
                agrees = "agrees" if torch.equal(raw, cpu.indices[:, :8]) else "DIFFERS"
                print(f"vocab {vocab} {dtype} largest={largest}: CUDA torch.sort of the raw values {agrees}")


LM_HEAD = {"W=4": ([32064] * 4, None), "W=8": ([16032] * 8, None),
           "padded": ([32768] * 4, 128256),  # 131072 columns, the last rank's band partly valid
           "padded_empty_rank": ([32768] * 4, 97000),  # the last rank holds no valid column
           "uneven_unaligned": ([1001, 1003, 999], None)}
CASES = [(layout, T, dtype, largest, k)
         for layout in ("W=4", "W=8", "padded", "padded_empty_rank", "uneven_unaligned")
         for T in (1, 8)
         for dtype in (torch.bfloat16, torch.float32, torch.float16)
         for largest, k in ((True, None), (False, None), (True, 8), (False, 8), (True, 64))]
CASES += [(layout, 4096, torch.bfloat16, True, k) for layout in ("W=4", "padded") for k in (None, 8)]


@pytest.mark.parametrize("layout, T, dtype, largest, k", CASES)
def test_kernels_match_torch_bit_for_bit(layout, T, dtype, largest, k):
    widths, valid = LM_HEAD[layout]
    x = _logits(T, sum(widths), dtype, seed=T + len(widths))
    values, indices = _simulated(x, widths, valid, largest, k)
    want_values, want_indices = _reference(x, valid, largest, k)
    assert torch.equal(indices, want_indices), (indices != want_indices).nonzero()[:8]
    assert torch.equal(_bits(values), _bits(want_values))


def _one_rank_checks(rank, world_size):
    import tpfuse

    results = {}
    for T, vocab, dtype in ((1, 32064, torch.bfloat16), (8, 32064, torch.float32), (300, 4099, torch.float16)):
        slab = _logits(T, vocab, dtype, seed=T)
        for name, ours, theirs in (
                ("argmax", tpfuse.argmax_hidden(slab), slab.argmax(-1)),
                ("argmin", tpfuse.argmin_hidden(slab), slab.argmin(-1)),
                ("max", tpfuse.max_hidden(slab), torch.max(slab, -1)),
                ("min", tpfuse.min_hidden(slab), torch.min(slab, -1)),
                ("topk8", tpfuse.topk_hidden(slab, 8), _reference(slab, None, True, 8)),
                ("bottom3", tpfuse.topk_hidden(slab, 3, largest=False), _reference(slab, None, False, 3)),
                ("topk65 (torch composition)", tpfuse.topk_hidden(slab, 65), _reference(slab, None, True, 65)),
                ("argmax of [..., :V]", tpfuse.argmax_hidden(slab, valid_columns=vocab - 7),
                 slab[:, :vocab - 7].argmax(-1))):
            pairs = zip(ours, theirs) if isinstance(theirs, tuple) else [(ours, theirs)]
            results[f"{name} T={T} {dtype}"] = all(_same(a, b) for a, b in pairs)
    x = _logits(24, 1000, torch.bfloat16, seed=5).view(2, 3, 4, 1000)
    results["3-D max"] = all(_same(a, b) for a, b in zip(tpfuse.max_hidden(x), torch.max(x, -1)))  # row 4: NaN
    empty = torch.empty(0, 1000, device="cuda", dtype=torch.bfloat16)
    results["T=0 topk"] = tpfuse.topk_hidden(empty, 4).values.shape == (0, 4)
    return results


def test_the_ops_on_one_rank_against_torch():
    results = run_ranks(1, _one_rank_checks, backend="nccl", timeout=600)[0]
    assert results and all(results.values()), {k: v for k, v in results.items() if not v}


def _no_sync_and_graphs(rank, world_size):
    import tpfuse

    slab = _logits(8, 32064, torch.bfloat16, seed=3)

    def step():
        return tpfuse.argmax_hidden(slab), tpfuse.topk_hidden(slab, 8)

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
    eager = step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    slab.copy_(_logits(8, 32064, torch.bfloat16, seed=4))  # the graph reads the slab at replay
    graph.replay()
    torch.cuda.synchronize()
    fresh = step()
    out["graph_follows_input"] = torch.equal(captured[0], fresh[0]) and torch.equal(captured[1][1], fresh[1][1])
    out["graph_differs_from_old"] = not torch.equal(captured[1][1], eager[1][1])  # the replay did run
    return out


def test_an_eager_call_does_not_synchronise_and_a_graph_replays_it():
    out = run_ranks(1, _no_sync_and_graphs, backend="nccl", timeout=600)[0]
    assert out["control_caught"], out
    assert out["no_sync"] is True, out
    assert out["graph_follows_input"] and out["graph_differs_from_old"], out
