"""Micro-benchmark, one GPU: the exact family's two kernels alone (no exchange), against torch on the full vocabulary.

    PYTHONPATH=. python benchmarks/bench_vocab_reduce.py --vocab 128256 --world 4 --tokens 1,8,128,1024,4096

Per (T, consumer), under CUDA-graph replay (20 calls per replay, median of 30 replays):
- ``local``: kernels/vocab_reduce.py's local kernel on one rank's slab (vocab / W columns, bf16);
- ``merge``: the merge kernel on W ranks' partials (W copies of that rank's, already concatenated:
  the exchange's result, whose cost bench_gather_elimination.py measures with the op);
- ``full``: ``torch.argmax`` / ``torch.topk(8)`` on all the vocabulary (what a rank runs after the gather).
Every result is checked against torch on the slab first.  benchmarks/NOTES.md ("Vocab-parallel
argmax / top-k in Triton") has the floor and the prediction.
"""

import argparse
import os
import statistics
import sys

for _k, _v in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ[_k] = _v

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tpfuse.compile_ops import reduce_kernels  # noqa: E402
from tpfuse.kernels import vocab_reduce  # noqa: E402

import compiled_tp_bench as cb  # noqa: E402  (this folder: the script's own)


def time_graph(record, calls=20, repeats=30):
    return statistics.median(cb.graph_us(record, calls, repeats))


def row(T, vocab, world, k):
    width = -(-vocab // world)
    g = torch.Generator(device="cuda").manual_seed(T)
    full = torch.randn(T, vocab, device="cuda", generator=g).to(torch.bfloat16)
    slab = full[:, :width].contiguous()
    partials = reduce_kernels.local_partials(slab, 0, width, True, k)
    gathered = torch.cat([partials] * world, -1)  # what the exchange returns (here: W equal bands)
    values, indices = reduce_kernels.merge(gathered, slab.dtype, True, k)
    want = slab.topk(k, -1) if k else torch.max(slab, -1)
    assert torch.equal(values, want[0]), (T, k)  # values exact; top-k's tied indices are torch's choice
    if not k:
        assert torch.equal(indices, want[1]), T
    local = time_graph(lambda: reduce_kernels.local_partials(slab, 0, width, True, k))
    merge = time_graph(lambda: reduce_kernels.merge(gathered, slab.dtype, True, k))
    both = time_graph(lambda: reduce_kernels.merge(torch.cat([reduce_kernels.local_partials(slab, 0, width, True, k)]
                                                             * world, -1), slab.dtype, True, k))
    torch_full = time_graph((lambda: full.topk(k, -1)) if k else (lambda: full.argmax(-1)))
    chunks, tiles = vocab_reduce.chunk_plan(T, width, 2, k or 1)
    return {"T": T, "consumer": f"topk{k}" if k else "argmax", "S": chunks, "tiles_per_chunk": tiles,
            "local_us": local, "merge_us": merge, "local_cat_merge_us": both, "full_us": torch_full}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--tokens", default="1,8,128,1024,4096")
    args = p.parse_args()
    import triton

    print(f"card: {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} "
          f"| vocab {args.vocab} over W={args.world} (slab {-(-args.vocab // args.world)} columns, bf16)")
    print("| T | consumer | S x tiles | local µs | merge µs | local+cat+merge µs | torch full-vocab µs | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for T in [int(t) for t in args.tokens.split(",")]:
        for k in (None, 8):
            r = row(T, args.vocab, args.world, k)
            print(f"| {T} | {r['consumer']} | {r['S']} x {r['tiles_per_chunk']} | {r['local_us']:.1f} "
                  f"| {r['merge_us']:.1f} | {r['local_cat_merge_us']:.1f} | {r['full_us']:.1f} "
                  f"| {r['full_us'] / r['local_cat_merge_us']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
