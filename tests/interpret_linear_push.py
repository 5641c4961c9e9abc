"""Run the fused linear + push kernel in Triton's interpreter on the CPU, W ranks simulated in one process.

``TRITON_INTERPRET=1`` executes the kernel's Python body with numpy on CPU
memory, and raw addresses work as pointers, so the peers' symmetric buffers
are plain CPU tensors whose addresses go in ``buf0..7``.  The barriers cannot
run here (``%globaltimer`` is inline PTX), so the ranks run with
SKIP_ENTRY_SYNC and EXIT_SYNC off, in two passes: the first fills every
rank's buffer with its band, the second recomputes and copies the now
complete peer bands out.  What this checks is everything but the
synchronisation: tile indexing, uneven bands, bias, masking of T and K, a
block taking several tiles, the push into every peer's band and the copy-out.
``--one-pass`` is the negative control: the copy-out runs before the later
ranks pushed, so those ranks' bands are missing (NaN poison) in early ranks'
results.  ``--zero-copy`` runs the zero-copy variant (``COPY_OUT`` off, the
result is the rank's slot): one pass fills every slot; its negative control is
rank 0's slot read right after rank 0 ran, before the others pushed.
``--tma`` loads the weight tiles through a TMA descriptor where the config allows
(the interpreter fills the box past the band with zeros, as the hardware does).
``--swap-ab`` computes the transposed tiles (the weight tile on the MMA's M side);
``--balanced`` gives each block an even column share; ``--shares`` prints the shares
``_column_range`` gives each block for a few (width, blocks) instead.

Prints one JSON line (tests/test_kernels_aot.py runs it in a subprocess,
because the interpreter is chosen when Triton is imported).
"""

import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from interpreter_support import addressed  # noqa: E402
from tpfuse.kernels import linear_push  # noqa: E402

#: (T, K, widths, dtype, has_bias, max blocks): small grids make every block take several tiles.
#: fp16 only: Triton 3.9's interpreter gets bf16 dot products wrong (numpy has no bf16; a plain
#: 16x16 bf16 tl.dot is off by 1e10 there), and the kernel's code does not depend on the dtype.
CASES = [
    (1, 64, [32, 32], torch.float16, True, 8),
    (5, 96, [16, 48, 32], torch.float16, False, 2),
    (40, 40, [64, 32, 32, 96], torch.float16, True, 3),
    (70, 128, [32, 64], torch.float16, True, 7),
    (3, 64, [8, 24], torch.float16, False, 4),
    (9, 64, [64, 64, 64, 64], torch.float16, True, 3),  # even bands: the copy-out takes all peers at once
    (20, 64, [384] * 4, torch.float16, True, 5),  # even bands, several (and an odd number of) tile positions per block
    (3, 32, [32] * 8, torch.float16, False, 2),  # W=8, even bands
    # wide bands: launch_config's 128-column tiles (16 and 64 rows)
    (2, 64, [16384, 16384], torch.float16, True, 16),
    (65, 64, [8192, 8192], torch.float16, False, 16),
]
TOL = 2.0**-6  # the GPU tests' bf16 GEMM tolerance (fp16 is well within it at these K)
#: (band width, blocks) for --shares: LM-head bands at W=4 and 8 on 132 SMs, fewer columns than
#: blocks, widths that are not multiples of 8
SHARES = [(32064, 132), (16032, 132), (64, 16), (40, 3), (1003, 7), (7, 3)]


@triton.jit
def _shares_kernel(out, WIDTH: tl.constexpr):
    pid = tl.program_id(0)
    c0, c1 = linear_push._column_range(pid, tl.num_programs(0), WIDTH)
    tl.store(out + 2 * pid, c0)
    tl.store(out + 2 * pid + 1, c1)


def shares(width, nblocks):
    out = torch.full((2 * nblocks,), -1, dtype=torch.int32)
    _shares_kernel[(nblocks,)](out, WIDTH=width)
    return {"width": width, "nblocks": nblocks, "ranges": out.view(nblocks, 2).tolist()}


def simulate(T, K, widths, dtype, has_bias, max_blocks, passes=2, seed=0, zero_copy=False, tma=False,
             swap_ab=False, balanced=False):
    W = len(widths)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, K, generator=g).to(dtype)
    weights = [(torch.randn(w, K, generator=g) * K**-0.5).to(dtype) for w in widths]
    biases = [torch.randn(w, generator=g).to(dtype) if has_bias else torch.zeros(1, dtype=dtype) for w in widths]
    total = sum(widths)
    offsets = [0]
    for w in widths:
        offsets.append(offsets[-1] + w)
    slot_elems = -(-(T * total) // 64) * 64
    # addresses above 4 GiB, so that the interpreter types them as 64-bit values (interpreter_support.py)
    buffers = [addressed(2 * slot_elems, dtype, float("nan")) for _ in range(W)]
    pads = [addressed(1024, torch.int32) for _ in range(W)]
    status = torch.zeros(2, dtype=torch.int32)
    config = linear_push.launch_config(T, K, widths)
    tma = tma and linear_push.tma_weight_ok(K, config)
    tiles = -(-T // config["BLOCK_M"]) * -(-max(widths) // config["BLOCK_N"])
    nblocks = max(1, min(tiles, max_blocks))
    slot = 1
    if zero_copy:  # the result is the rank's slot
        outs = [b[slot * slot_elems: slot * slot_elems + T * total].view(T, total) for b in buffers]
    else:
        outs = [torch.full((T, total), float("nan"), dtype=dtype) for _ in range(W)]
    buf_args = [b.data_ptr() for b in buffers] + [0] * (8 - W)
    pad_args = [p.data_ptr() for p in pads] + [0] * (8 - W)
    ref = torch.cat([F.linear(x.float(), w.float(), b.float() if has_bias else None)
                     for w, b in zip(weights, biases)], -1)

    def close(o):
        return bool(((o.float() - ref).abs() <= TOL * (1 + ref.abs())).all())

    first_alone = None
    for _ in range(passes):
        for r in range(W):
            linear_push.p2p_linear_push_kernel[(nblocks,)](
                x, weights[r], biases[r], outs[r], slot * slot_elems, status, T, 10**9, 1, *buf_args, *pad_args,
                RANK=r, W=W, WP=max(2, 1 << (W - 1).bit_length()), BAND_OFFSETS=tuple(offsets), K=K,
                HAS_BIAS=has_bias, BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], BLOCK_K=config["BLOCK_K"],
                SKIP_ENTRY_SYNC=True, EVEN_BANDS=linear_push.even_bands(offsets, config), EXIT_SYNC=False,
                COPY_OUT=not zero_copy, TMA_WEIGHT=tma, SWAP_AB=swap_ab, BALANCED=balanced)
            if first_alone is None:
                first_alone = close(outs[0])  # rank 0's result before any peer ran: must be incomplete
    within = all(close(o) for o in outs)
    agree = all(torch.equal(o.view(torch.int16), outs[0].view(torch.int16)) for o in outs)
    return {"T": T, "K": K, "widths": widths, "dtype": str(dtype), "bias": has_bias, "nblocks": nblocks,
            "even_bands": linear_push.even_bands(offsets, config),
            "tiles": tiles, "within_tolerance": within, "ranks_agree": agree, "first_alone_complete": first_alone,
            "tma": tma, "swap_ab": swap_ab, "balanced": balanced}


if __name__ == "__main__":
    if "--shares" in sys.argv:
        print(json.dumps([shares(*case) for case in SHARES]))
        sys.exit(0)
    zero_copy = "--zero-copy" in sys.argv
    passes = 1 if "--one-pass" in sys.argv or zero_copy else 2
    print(json.dumps([simulate(*case, passes=passes, zero_copy=zero_copy, tma="--tma" in sys.argv,
                               swap_ab="--swap-ab" in sys.argv, balanced="--balanced" in sys.argv)
                      for case in CASES]))
