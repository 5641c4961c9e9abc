"""The Triton kernels of the exact vocab-parallel reductions on the CPU (kernels/vocab_reduce.py):
in Triton's interpreter against reduce_hidden's torch composition and torch itself, with a
negative control; the rank-invariant chunk plan; the facts the kernels share with reduce_hidden.
The same kernels on a GPU: tests/gpu/test_vocab_reduce.py; compiled for sm_90:
tests/test_kernels_aot.py."""

import json
import os
import subprocess
import sys

import pytest
import torch

import interpreter_support
from tpfuse.compile_ops import reduce_hidden as rh
from tpfuse.kernels import vocab_reduce as vr

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _interpret(*flags):
    reason = interpreter_support.skip_reason()
    if reason:
        pytest.skip(reason)
    script = os.path.join(os.path.dirname(__file__), "interpret_vocab_reduce.py")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, script, *flags], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


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
