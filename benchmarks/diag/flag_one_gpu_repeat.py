"""Diagnostic: repeat the one-GPU W=8 tiny_odd bf16 sequence and print where any result differs."""
import sys, os
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests", "gpu"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests"))
import torch
from tpfuse.compile_ops.dispatch import FLAG_MAX_SLAB_BYTES
from flag_one_gpu import OneGpuGroup, as_int, inputs, reference, width_kinds

bad = 0
for rep in range(int(sys.argv[1]) if len(sys.argv) > 1 else 20):
    for W, kind in ((8, "tiny_odd"), (8, "uneven")):
        group = OneGpuGroup(width_kinds(kind, W), torch.bfloat16)
        T_max = min(128, FLAG_MAX_SLAB_BYTES // (max(group.widths) * 2))
        for i, T in enumerate(min(T, T_max) for T in (1, 7, 32, 1, 128, 3)):
            xs = inputs(i, T, group.widths, torch.bfloat16)
            outs = group.call(xs)
            ref = reference(xs)
            for r, o in enumerate(outs):
                d = (as_int(o) != ref)
                if d.any():
                    bad += 1
                    rows, cols = d.nonzero(as_tuple=True)
                    offs = [0]
                    for w in group.widths:
                        offs.append(offs[-1] + w)
                    bands = sorted({next(b for b in range(W) if offs[b] <= c < offs[b + 1]) for c in cols.tolist()})
                    print(f"rep {rep} {kind} call {i} T={T} rank {r}: {int(d.sum())} wrong, rows {sorted(set(rows.tolist()))[:8]}, "
                          f"bands {bands}, got {as_int(o)[rows[:4], cols[:4]].tolist()} want {ref[rows[:4], cols[:4]].tolist()}, "
                          f"codes {group.failure_codes()}, epochs agree {group.epochs_agree()}")
print("bad results:", bad)
