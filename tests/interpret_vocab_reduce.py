"""Run the vocab-parallel reduction kernels in Triton's interpreter on the CPU, W ranks emulated.

``TRITON_INTERPRET=1`` executes the kernels' Python bodies with numpy on CPU tensors.  Each
rank's slab is a column band of one full ``[T, V]`` tensor; each rank's local kernel writes its
partials, the exchange is their concatenation in rank order (what ``tpfuse::all_gather_hidden``
returns on every rank), and the merge kernel writes the result.  Checked bit for bit against

- the torch composition of compile_ops/reduce_hidden.py on the same emulated ranks (the op's
  CPU path, the reference), and
- torch on the full tensor: ``torch.max``/``torch.min`` (values' bits and indices), and for
  top-k the first k of a stable ``torch.sort`` (the order ``topk_hidden`` documents).

Small tiles (``BLOCK`` 8 or 16 elements, merge tiles of 4 or 8 candidates) make several chunks
per row, several tiles per chunk and masked tails out of small slabs; the rows are adversarial
(NaN with different payloads and signs on several ranks, -inf and +inf rows, equal extremes on
different ranks, all-equal rows, signed zeros, subnormals next to zero, ranks with no valid
column after a padded-vocab slice).

Prints one JSON line (tests/test_vocab_reduce.py runs it in a subprocess, because the
interpreter is chosen when Triton is imported).  ``--control`` prints the negative control
only: the candidates merged in reverse rank order, which the same checks must reject.
``--host`` runs compile_ops/reduce_kernels.py's host code (shapes, views, plan) with its
launches handed to the interpreter.
"""

import math
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from interpreter_support import print_report  # noqa: E402
from tpfuse.compile_ops import reduce_hidden as rh  # noqa: E402
from tpfuse.kernels import vocab_reduce as vr  # noqa: E402

NAN, INF = float("nan"), float("inf")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
INT_OF = {2: torch.int16, 4: torch.int32}


def bits_of(t):
    return t.contiguous().view(INT_OF[t.element_size()])


def adversarial(rows, columns, dtype, seed):
    """Random rows, then the hard ones (every rank builds the same full tensor)."""
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(rows, columns, generator=g).to(dtype)
    special = [
        lambda r: r.fill_(1.0),  # all equal
        lambda r: r.fill_(-INF),
        lambda r: r.fill_(INF),
        lambda r: (r.__setitem__(columns // 3, 9.0), r.__setitem__(columns - 2, 9.0)),  # equal maxima, two ranks
        lambda r: (r.__setitem__(columns // 3, -9.0), r.__setitem__(columns - 2, -9.0)),  # equal minima
        lambda r: (r.__setitem__(columns - 1, NAN), r.__setitem__(1, NAN)),  # NaN on the first and last rank
        lambda r: r.__setitem__(columns - 3, NAN),  # NaN on the last rank only
        lambda r: r.copy_(torch.where(torch.arange(columns) % 2 == 0, 0.0, -0.0)),  # signed zeros
        lambda r: r.copy_(torch.arange(columns, dtype=torch.float32).flip(0) % 5),  # repeated values across ranks
        lambda r: r.copy_(torch.arange(columns, dtype=torch.float32)),  # ascending: every tile brings new top-k
    ]
    for i, make in enumerate(special[:rows]):
        make(full[i])
    ints = bits_of(full)
    if rows > 5:  # NaN payloads and signs differ: the first NaN's own bits must come back
        ints[5, 1] = ints[5, 1] | 0x5  # another payload
        ints[5, columns - 1] = ints[5, columns - 1] | (-(1 << (8 * full.element_size() - 1)))  # a negative NaN
    if rows > 10:  # the smallest subnormal beside zeros: it must not tie with them
        full[10] = 0.0
        ints[10, columns // 2] = 1
        ints[10, columns // 4] = -(1 << (8 * full.element_size() - 1)) + 1  # the smallest negative subnormal
    return full


def bands(widths, valid_columns):
    offsets = [sum(widths[:r]) for r in range(len(widths))]
    valid = [rh.valid_width(widths, r, valid_columns) for r in range(len(widths))]
    return offsets, valid


def run_kernels(full, widths, valid_columns, largest, k, block, merge_block, reverse=False, sms=vr.SMS_GUESS):
    """Every rank's local kernel, the exchange (concatenation in rank order), the merge kernel."""
    name = str(full.dtype).removeprefix("torch.")
    T = full.shape[0]
    offsets, valid = bands(widths, valid_columns)
    widest = max(valid)
    kk = k or 1
    chunks, tiles_per_chunk = vr.chunk_plan(T, widest, full.element_size(), kk, block=block, sms=sms)
    partials = []
    for r, (offset, width) in enumerate(zip(offsets, widths)):
        slab = full[:, offset:offset + width].contiguous()  # rank r's own tensor
        local = slab[:, :valid[r]]  # its valid columns: rows stay `width` apart
        part = torch.full((T, 2 * chunks * kk), 0x7A7A7A7A, dtype=torch.int32)  # poisoned: every word must be written
        consts = vr.constexprs(name, largest, k, block)
        kernel = vr.local_best_kernel if k is None else vr.local_topk_kernel
        kernel[(T, chunks)](bits_of(slab), part.view(torch.int64), slab.stride(0) if T > 1 else 0, local.shape[-1],
                            offset, tiles_per_chunk, **consts)
        partials.append(part)
    if reverse:
        partials = partials[::-1]
    gathered = torch.cat(partials, dim=-1)
    shape = (T,) if k is None else (T, k)
    values = torch.full(shape, 0x7A7A, dtype=INT_OF[full.element_size()])
    indices = torch.full(shape, -7, dtype=torch.int64)
    consts = vr.constexprs(name, largest, k, merge_block)
    kernel = vr.merge_best_kernel if k is None else vr.merge_topk_kernel
    kernel[(T,)](gathered.view(torch.int64), values, indices, gathered.shape[-1] // 2, **consts)
    return values, indices, {"chunks": chunks, "tiles_per_chunk": tiles_per_chunk}


def composition(full, widths, valid_columns, largest, k):
    """reduce_hidden's torch composition on the same emulated ranks (the op's CPU path)."""
    offsets, valid = bands(widths, valid_columns)
    locals_ = [full[:, o:o + v] for o, v in zip(offsets, valid)]
    if k is None:
        parts = [rh._local_best(local, o, largest) for local, o in zip(locals_, offsets)]
        bits = torch.cat([rh._value_bits(v) for v, _ in parts], -1)
        values, indices = rh._merge_best(bits, torch.cat([i for _, i in parts], -1), full.dtype, largest)
    else:
        parts = [rh._local_topk(local, k, o, largest) for local, o in zip(locals_, offsets)]
        bits = torch.cat([rh._value_bits(v) for v, _ in parts], -1)
        values, indices = rh._merge_topk(bits, torch.cat([i for _, i in parts], -1), k, full.dtype, largest)
    return bits_of(values), indices


def torch_reference(full, valid_columns, largest, k):
    cut = full[:, :valid_columns] if valid_columns else full
    if k is None:
        values, indices = torch.max(cut, -1) if largest else torch.min(cut, -1)
    else:
        values, indices = torch.sort(cut, dim=-1, descending=largest, stable=True)
        values, indices = values[:, :k], indices[:, :k]
    return bits_of(values), indices


def check(full, widths, valid_columns, largest, k, block=8, reverse=False, sms=vr.SMS_GUESS):
    merge_block = 4 if k is None else 8  # several merge tiles too
    values, indices, plan = run_kernels(full, widths, valid_columns, largest, k, block, merge_block, reverse, sms)
    comp_values, comp_indices = composition(full, widths, valid_columns, largest, k)
    ref_values, ref_indices = torch_reference(full, valid_columns, largest, k)
    return {
        "dtype": str(full.dtype).removeprefix("torch."), "widths": widths, "valid_columns": valid_columns,
        "T": full.shape[0], "largest": largest, "k": k, "block": block, **plan,
        "as_composition": bool(torch.equal(values, comp_values) and torch.equal(indices, comp_indices)),
        "as_torch": bool(torch.equal(values, ref_values) and torch.equal(indices, ref_indices)),
    }


#: (widths, valid_columns): even, uneven, a padded slice, one rank, a padded slice leaving ranks 1-3 without
#: (rank 1 with part of its band)
EVEN, UNEVEN, PADDED, ONE_RANK, EMPTY_RANKS = ([16, 16], None), ([5, 12, 19, 26], None), ([16] * 4, 35), \
    ([13], None), ([5, 12, 19, 26], 9)


def cases():
    """Each case runs 12 rows (the adversarial ones and a random one) through W emulated ranks."""
    both = [(largest, k) for largest in (True, False) for k in (None, 3)]
    plan = [("bfloat16", UNEVEN, *c) for c in both] + [("bfloat16", EMPTY_RANKS, *c) for c in both]
    plan += [("bfloat16", layout, True, k) for layout in (EVEN, PADDED, ONE_RANK) for k in (None, 3)]
    plan += [("float16", UNEVEN, True, None), ("float16", UNEVEN, False, 8)]
    plan += [("float32", UNEVEN, True, None), ("float32", UNEVEN, False, 3), ("float32", EMPTY_RANKS, False, None),
             ("float32", PADDED, True, 8), ("bfloat16", EVEN, False, 1)]
    results = []
    for seed, (dtype_name, (widths, valid), largest, k) in enumerate(plan):
        results.append(check(adversarial(12, sum(widths), DTYPES[dtype_name], seed), widths, valid, largest, k))
    for k in (None, 8):  # one row: many chunks of one tile
        results.append(check(adversarial(1, 58, torch.bfloat16, 99), [29, 29], None, True, k, block=16))
    for largest in (True, False):  # several tiles per chunk (few multiprocessors planned)
        for k in (None, 5):
            results.append(check(adversarial(12, 73, torch.bfloat16, 7), [40, 33], None, largest, k, sms=2))
    return results


def control():
    """The merge fed the candidates in reverse rank order: ties go to the wrong rank."""
    full = adversarial(12, 32, torch.bfloat16, 0)
    return [check(full, [16, 16], None, True, k, reverse=True) for k in (None, 3)]


def interpreted_host():
    """compile_ops/reduce_kernels.py's host code with each launch run by the interpreter instead."""
    from tpfuse.compile_ops import reduce_kernels

    def compiled(key, source_of, device_index):
        kind, name, largest, k = key[:4]
        if kind == "local":
            return (vr.local_best_kernel if k is None else vr.local_topk_kernel), vr.constexprs(name, largest, k)
        block = vr.MERGE_BLOCK_BEST if k is None else vr.MERGE_BLOCK_TOPK
        return (vr.merge_best_kernel if k is None else vr.merge_topk_kernel), vr.constexprs(name, largest, k, block)

    def launch(kernel, grid, device_index, tensors, scalars):
        fn, consts = kernel
        fn[grid](*tensors, *scalars, **consts)

    reduce_kernels._compiled, reduce_kernels._launch = compiled, launch
    return reduce_kernels


def host():
    """The host path: leading dims (3-D, 1-D, T=0), a valid slice (rows wider than the slab), the
    production tiles and plan; each rank's partials, concatenated, merged; against torch."""
    reduce_kernels = interpreted_host()
    results = []
    for lead, widths, valid, dtype, largest, k in [((3, 4), [20, 30, 25], None, torch.float32, True, None),
                                                   ((3, 4), [20, 30, 25], 47, torch.bfloat16, False, 4),
                                                   ((), [9, 9], None, torch.float16, True, None),
                                                   ((), [9, 9], 10, torch.float16, False, 2),
                                                   ((0,), [9, 9], None, torch.bfloat16, True, 3),
                                                   ((2, 0), [9, 9], None, torch.bfloat16, True, None)]:
        rows = adversarial(max(1, math.prod(lead)), sum(widths), dtype, 5)
        full = rows[:math.prod(lead)].reshape(*lead, sum(widths))
        offsets, valid_widths = bands(widths, valid)
        partials = [reduce_kernels.local_partials(full[..., o:o + w].contiguous()[..., :v], o, max(valid_widths),
                                                  largest, k)
                    for o, w, v in zip(offsets, widths, valid_widths)]
        values, indices = reduce_kernels.merge(torch.cat(partials, -1), dtype, largest, k)
        cut = full[..., :valid] if valid else full
        if k is None:
            want = torch.max(cut, -1) if largest else torch.min(cut, -1)
        else:
            want = [t[..., :k] for t in torch.sort(cut, dim=-1, descending=largest, stable=True)]
        results.append({"lead": list(lead), "k": k, "words": partials[0].shape[-1],
                        "shapes": values.shape == want[0].shape and indices.shape == want[1].shape,
                        "as_torch": bool(torch.equal(bits_of(values), bits_of(want[0]))
                                         and torch.equal(indices, want[1]))})
    return results


if __name__ == "__main__":
    print_report(sys.argv, cases=cases, control=control, host=host)
