"""Gather elimination, measured: an LM head's logits feeding argmax, top-k or cross-entropy.

Two runs:

    # W ranks, one GPU each (the multi-GPU runs): per rank, µs and peak extra memory of
    #   funcol gather + reduction | tpfuse gather + reduction | eliminated (tpfuse's vocab-parallel op)
    PYTHONPATH=. torchrun --nproc-per-node 4 benchmarks/bench_gather_elimination.py --out DIR

    # One GPU: what does not communicate.  The gathered form runs the full-vocab reduction on
    # every rank; the eliminated form runs tpfuse's op on the rank's own vocab/W slab, here on a
    # one-rank group, so its exchange is a one-rank gather (the W-rank exchange of the partials,
    # [T, a few words x W], is what the multi-GPU run adds).
    PYTHONPATH=. python benchmarks/bench_gather_elimination.py --one-gpu 2,4 --out DIR

Consumers: ``argmax`` (greedy decoding), ``topk8`` (EAGLE-style draft), ``ce`` (HF's
ForCausalLMLoss: ``cross_entropy(logits.float(), target)``, forward only) and ``ce_fwd_bwd``
(forward and backward: the gradient of the logits).  Logits are random bf16 (never zeros),
targets random, every result checked against the gathered computation before timing.

Timing: forward consumers under CUDA-graph replay (``--calls`` replays between CUDA events,
median of ``--rounds``); ``ce_fwd_bwd`` eagerly.  Peak memory: the most memory allocated
during one call beyond what was allocated before it (``torch.cuda.max_memory_allocated``).
Prints the card, versions and a table with ratios against the gathered forms of the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

for _k, _v in {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}.items():
    os.environ[_k] = _v  # never NVLink multicast on the shared hosts (docs/safety.md, "Multicast")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tpfuse  # noqa: E402

CONSUMERS = ("argmax", "topk8", "ce", "ce_fwd_bwd")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", default="32000,128256,152064")
    p.add_argument("--tokens", default="1,8,32,128,1024,4096")
    p.add_argument("--consumers", default=",".join(CONSUMERS))
    p.add_argument("--one-gpu", default="", help="emulated world sizes on one GPU, e.g. 2,4 (no communication)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--out", default="")
    return p.parse_args()


# --------------------------------------------------------------------------- the consumers


def gathered(consumer, logits, target):
    """What every rank runs after the gather (the full-vocab reduction)."""
    if consumer == "argmax":
        return logits.argmax(-1)
    if consumer == "topk8":
        return logits.topk(8, -1)
    if consumer == "ce":
        return F.cross_entropy(logits.float(), target)
    logits = logits.detach().requires_grad_()
    F.cross_entropy(logits.float(), target).backward()
    return logits.grad


def eliminated(consumer, slab, target, group):
    """tpfuse's vocab-parallel op on this rank's slab."""
    if consumer == "argmax":
        return tpfuse.argmax_hidden(slab, group)
    if consumer == "topk8":
        return tpfuse.topk_hidden(slab, 8, group)
    if consumer == "ce":
        return tpfuse.cross_entropy_hidden(slab.float(), target, group)
    slab = slab.detach().requires_grad_()
    tpfuse.cross_entropy_hidden(slab.float(), target, group).backward()
    return slab.grad


# --------------------------------------------------------------------------- timing


def graph_of(fn):
    """``fn`` captured in a CUDA graph after an eager warm-up (tpfuse's collective set-up runs eagerly)."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def time_us(fn, consumer, rounds, calls):
    run = fn if consumer == "ce_fwd_bwd" else graph_of(fn)
    run()
    samples = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()
        start.record()
        for _ in range(calls):
            run()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1000 / calls)
    return statistics.median(samples)


def peak_extra_bytes(fn):
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def same(a, b):
    if isinstance(a, tuple):  # top-k: values exact; indices may differ on tied values (torch's are unspecified)
        return torch.equal(a[0], b[0])
    if a.dtype.is_floating_point:
        return bool(torch.allclose(a.float(), b.float(), rtol=2e-5, atol=2e-5))
    return torch.equal(a, b)


# --------------------------------------------------------------------------- runs


def one_gpu_rows(args, vocabs, tokens, consumers):
    """Full-vocab reduction against tpfuse's op on a vocab/W slab (one-rank group: no communication)."""
    rows = []
    group = dist.group.WORLD
    for W in [int(w) for w in args.one_gpu.split(",")]:
        for V in vocabs:
            width = -(-V // W)
            for T in tokens:
                g = torch.Generator(device="cuda").manual_seed(V + T)
                logits = torch.randn(T, V, device="cuda", generator=g).to(torch.bfloat16)
                target = torch.randint(0, V, (T,), device="cuda", generator=g)
                slab = logits[:, :width].contiguous()
                local_target = target.remainder(width)
                for consumer in consumers:
                    # The op on a one-rank group computes the slab's own reduction: check it against the
                    # same reduction done directly, then time both.
                    assert same(eliminated(consumer, slab, local_target, group),
                                gathered(consumer, slab, local_target)), (W, V, T, consumer)
                    full = time_us(lambda: gathered(consumer, logits, target), consumer, args.rounds, args.calls)
                    local = time_us(lambda: eliminated(consumer, slab, local_target, group), consumer,
                                    args.rounds, args.calls)
                    rows.append({"W": W, "vocab": V, "T": T, "consumer": consumer, "full_us": full,
                                 "local_us": local,
                                 "full_peak_bytes": peak_extra_bytes(lambda: gathered(consumer, logits, target)),
                                 "local_peak_bytes": peak_extra_bytes(
                                     lambda: eliminated(consumer, slab, local_target, group))})
                    r = rows[-1]
                    print(f"W={W} V={V} T={T} {consumer}: full {full:.1f} us, local {local:.1f} us "
                          f"({full / local:.2f}x); peak {r['full_peak_bytes'] / 2**20:.1f} -> "
                          f"{r['local_peak_bytes'] / 2**20:.1f} MiB", flush=True)
    return rows


def multi_gpu_rows(args, vocabs, tokens, consumers):
    from torch.distributed._functional_collectives import all_gather_tensor

    rank, W, group = dist.get_rank(), dist.get_world_size(), dist.group.WORLD
    rows = []
    for V in vocabs:
        width = -(-V // W)
        widths = [min(width, max(0, V - r * width)) for r in range(W)]
        for T in tokens:
            g = torch.Generator(device="cuda").manual_seed(V + T)
            logits = torch.randn(T, V, device="cuda", generator=g).to(torch.bfloat16)  # same on every rank
            target = torch.randint(0, V, (T,), device="cuda", generator=g)
            slab = logits[:, sum(widths[:rank]): sum(widths[:rank + 1])].contiguous()
            forms = {
                "funcol": lambda c: gathered(c, all_gather_tensor(slab, -1, group) if len(set(widths)) == 1
                                             else tpfuse.all_gather_hidden(slab, group, widths), target),
                "tpfuse gather": lambda c: gathered(c, tpfuse.all_gather_hidden(slab, group, widths), target),
                "eliminated": lambda c: eliminated(c, slab, target, group) if len(set(widths)) == 1
                else eliminated_uneven(c, slab, target, group, widths),
            }
            for consumer in consumers:
                reference = gathered(consumer, logits, target)
                row = {"W": W, "vocab": V, "T": T, "consumer": consumer}
                for name, form in forms.items():
                    assert same(form(consumer), reference), (name, V, T, consumer)
                    row[f"{name}_us"] = time_us(lambda: form(consumer), consumer, args.rounds, args.calls)
                    row[f"{name}_peak_bytes"] = peak_extra_bytes(lambda: form(consumer))
                rows.append(row)
                if rank == 0:
                    print(f"W={W} V={V} T={T} {consumer}: " + ", ".join(
                        f"{n} {row[f'{n}_us']:.1f} us" for n in forms), flush=True)
    return rows


def eliminated_uneven(consumer, slab, target, group, widths):
    if consumer == "argmax":
        return tpfuse.argmax_hidden(slab, group, widths)
    if consumer == "topk8":
        return tpfuse.topk_hidden(slab, 8, group, widths)
    if consumer == "ce":
        return tpfuse.cross_entropy_hidden(slab.float(), target, group, widths)
    slab = slab.detach().requires_grad_()
    tpfuse.cross_entropy_hidden(slab.float(), target, group, widths).backward()
    return slab.grad


def header():
    nccl = ".".join(map(str, torch.cuda.nccl.version()))
    import triton

    return (f"card: {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} "
            f"| NCCL {nccl} | tpfuse {getattr(tpfuse, '__version__', 'dev')}")


def table(rows, one_gpu):
    if one_gpu:
        print("\nmicro-benchmark (one GPU, no communication): full-vocab reduction vs tpfuse's op on the "
              "vocab/W slab; µs median, peak extra MiB")
        print("| W | vocab | T | consumer | full µs | slab µs | speed-up | full MiB | slab MiB | memory ratio |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['W']} | {r['vocab']} | {r['T']} | {r['consumer']} | {r['full_us']:.1f} | {r['local_us']:.1f} "
                  f"| {r['full_us'] / r['local_us']:.2f}x | {r['full_peak_bytes'] / 2**20:.1f} "
                  f"| {r['local_peak_bytes'] / 2**20:.1f} "
                  f"| {r['full_peak_bytes'] / max(1, r['local_peak_bytes']):.2f}x |")
        return
    print("\nper rank: µs median (peak extra MiB); ratios are the gathered form's time over the eliminated one's")
    print("| W | vocab | T | consumer | funcol | tpfuse gather | eliminated | vs funcol | vs tpfuse gather |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        cells = [f"{r[f'{n}_us']:.1f} ({r[f'{n}_peak_bytes'] / 2**20:.0f})" for n in ("funcol", "tpfuse gather",
                                                                                 "eliminated")]
        print(f"| {r['W']} | {r['vocab']} | {r['T']} | {r['consumer']} | " + " | ".join(cells)
              + f" | {r['funcol_us'] / r['eliminated_us']:.2f}x | {r['tpfuse gather_us'] / r['eliminated_us']:.2f}x |")


def main():
    args = parse_args()
    vocabs = [int(v) for v in args.vocab.split(",")]
    tokens = [int(t) for t in args.tokens.split(",")]
    consumers = [c for c in args.consumers.split(",") if c]
    unknown = set(consumers) - set(CONSUMERS)
    if unknown:
        raise SystemExit(f"unknown consumers {sorted(unknown)}; accepted are {', '.join(CONSUMERS)}")
    one_gpu = bool(args.one_gpu)
    if one_gpu:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29533"),
                          RANK="0", WORLD_SIZE="1")
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl", device_id=torch.device("cuda", torch.cuda.current_device()))
    if dist.get_rank() == 0:
        print(header(), flush=True)
    rows = one_gpu_rows(args, vocabs, tokens, consumers) if one_gpu else multi_gpu_rows(args, vocabs, tokens,
                                                                                      consumers)
    if dist.get_rank() == 0:
        table(rows, one_gpu)
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            name = "one_gpu" if one_gpu else f"w{dist.get_world_size()}"
            with open(os.path.join(args.out, f"gather_elimination_{name}.json"), "w") as f:
                json.dump({"header": header(), "rows": rows}, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
