"""End to end: a compiled TP decode step, tpfuse on against tpfuse off.

    PYTHONPATH=. torchrun --nproc-per-node 4 benchmarks/bench_e2e_decode.py --out /tmp/e2e

The model is Llama-like and unmodified TP code: random bf16 weights, hidden
4096, ``--layers`` SwiGLU MLP blocks (intermediate 14336, column-parallel
gate/up, row-parallel down + all-reduce), RMSNorm, and a vocab-parallel LM
head (vocab 128256) whose logits are gathered along the vocab axis (funcol
gather on dim 0, then rearrange: a replicated output), then greedy sampling.
Attention is left out: it has no hidden-axis gather and its KV-cache reads
would only dilute the comparison in both columns alike.

Both variants are ``torch.compile(mode="reduce-overhead")``; the only
difference is ``tpfuse.enable()`` (``--fuse-linear`` adds a third variant with
``tpfuse.enable(fuse_linear=True)``; ``--zero-copy`` turns on zero-copy results in both
tpfuse variants).  Per T in {1, 8, 32, 128}: the step's time
(CUDA events over many CUDA-graph replays, median of repeats, slowest rank),
the ratio off/on, and whether both variants sampled the same tokens.
"""

import os

# Never NVLink multicast on the shared hosts (docs/safety.md, "Multicast"); set before torch loads NCCL.
os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
os.environ["NVSHMEM_DISABLE_NVLS"] = "1"

import argparse  # noqa: E402
import faulthandler  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.distributed._functional_collectives as funcol  # noqa: E402
import torch.nn as nn  # noqa: E402

import tpfuse  # noqa: E402

HIDDEN, INTERMEDIATE, VOCAB = 4096, 14336, 128256


def _weight(rows, cols, seed, device, dtype):
    g = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(rows, cols, device=device, generator=g, dtype=torch.float32) / cols**0.5
    return nn.Parameter(w.to(dtype), requires_grad=False)


class DecodeStep(nn.Module):
    def __init__(self, rank, world_size, layers, device="cuda", dtype=torch.bfloat16):
        super().__init__()
        inter = INTERMEDIATE // world_size
        w = lambda rows, cols, seed: _weight(rows, cols, seed, device, dtype)  # noqa: E731
        self.gate_up = nn.ParameterList([w(2 * inter, HIDDEN, 10 * i + rank) for i in range(layers)])
        self.down = nn.ParameterList([w(HIDDEN, inter, 1000 + 10 * i + rank) for i in range(layers)])
        self.lm_head = w(VOCAB // world_size, HIDDEN, 99 + rank)
        self.norm = nn.Parameter(torch.ones(HIDDEN, device=device, dtype=dtype), requires_grad=False)

    def rms(self, h):
        h32 = h.float()
        return (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(h.dtype) * self.norm

    def forward(self, h):
        group = dist.group.WORLD
        for gate_up, down in zip(self.gate_up, self.down):
            gate, up = (self.rms(h) @ gate_up.t()).chunk(2, dim=-1)
            partial = (nn.functional.silu(gate) * up) @ down.t()
            h = h + funcol.all_reduce(partial, "sum", group)
        local_logits = self.rms(h) @ self.lm_head.t()
        # The vocab gather as vLLM writes it: gather on dim 0, then rearrange.  (funcol's
        # gather_dim=-1 form breaks the graph on torch 2.11 unless tpfuse is enabled --
        # passes/dynamo_compat.py -- which would handicap the "off" column.)
        tokens, shard = local_logits.shape
        stacked = funcol.all_gather_tensor(local_logits, gather_dim=0, group=group)
        logits = stacked.view(-1, tokens, shard).permute(1, 0, 2).reshape(tokens, -1)
        return logits.argmax(dim=-1)


def slowest(value):
    t = torch.tensor([value], dtype=torch.float64, device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def time_step(step, h, calls=50, repeats=7):
    for _ in range(5):  # warm-up, CUDA-graph recording, then replays
        step(h)
    torch.cuda.synchronize()
    dist.barrier()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            step(h)
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / calls)
    return slowest(statistics.median(samples))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", default="1,8,32,128")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--out", default=None)
    parser.add_argument("--fuse-linear", action="store_true",
                        help="a third column: tpfuse.enable(fuse_linear=True) (the LM head's linear + gather "
                             "as one kernel where the cost rule picks it)")
    parser.add_argument("--zero-copy", action="store_true",
                        help="every tpfuse variant with zero_copy=True (results that are views of the slot "
                             "where the pass proves it)")
    args = parser.parse_args()
    # A run stopped from outside (torchrun forwards SIGTERM) prints where every thread was.
    faulthandler.register(signal.SIGTERM, all_threads=True, chain=True)

    rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", rank))
    W = dist.get_world_size()
    torch.manual_seed(0)
    model = DecodeStep(rank, W, args.layers)
    card = torch.cuda.get_device_name()
    if rank == 0:
        nccl = ".".join(map(str, torch.cuda.nccl.version()))
        print(f"card: {W} x {card} | torch {torch.__version__} | NCCL {nccl} | layers {args.layers}", flush=True)

    rows = []
    for T in map(int, args.tokens.split(",")):
        h = torch.randn(T, HIDDEN, device="cuda", generator=torch.Generator(device="cuda").manual_seed(T))
        h = h.to(torch.bfloat16)
        torch._dynamo.reset()
        tpfuse.disable()
        off = torch.compile(model, mode="reduce-overhead", dynamic=False)
        tokens_off = off(h).clone()
        t_off = time_step(off, h)
        torch._dynamo.reset()
        tpfuse.enable(zero_copy=args.zero_copy)
        on = torch.compile(model, mode="reduce-overhead", dynamic=False)
        tokens_on = on(h).clone()
        rewrites = tpfuse.report().rewritten
        t_on = time_step(on, h)
        tpfuse.disable()
        same = bool(torch.equal(tokens_on, tokens_off))
        row = {"T": T, "off_us": t_off, "on_us": t_on, "speedup": t_off / t_on, "same_tokens": same,
               "rewrites": rewrites}
        if args.fuse_linear:
            torch._dynamo.reset()
            tpfuse.enable(fuse_linear=True, zero_copy=args.zero_copy)
            fused = torch.compile(model, mode="reduce-overhead", dynamic=False)
            tokens_fused = fused(h).clone()
            row["fused_linear"] = [m.linear_fusion for m in tpfuse.report().matches]
            row["fused_us"] = time_step(fused, h)
            tpfuse.disable()
            # the fused GEMM rounds like any bf16 GEMM, not like cuBLAS: report, do not require, equality
            row["fused_same_tokens"] = bool(torch.equal(tokens_fused, tokens_off))
        rows.append(row)
        if rank == 0 and rewrites == 0:
            print(f"WARNING T={T}: tpfuse rewrote nothing (a graph break around the gather?); "
                  "this row compares two identical programs", flush=True)
        if rank == 0:
            print(f"T={T}: off {t_off:.1f} us, on {t_on:.1f} us, x{t_off / t_on:.2f}, "
                  f"rewrites {rewrites}, same tokens {same}", flush=True)
            if args.fuse_linear:
                print(f"T={T}: fuse_linear {row['fused_us']:.1f} us, x{t_off / row['fused_us']:.2f}, "
                      f"{row['fused_linear']}, same tokens {row['fused_same_tokens']}", flush=True)

    if rank == 0:
        print(f"\nTP decode step, W={W}, {card}, mode=reduce-overhead, CUDA-graph replay, median µs")
        print(f"{'T':>5} {'tpfuse off':>11} {'tpfuse on':>10} {'speedup':>8} {'rewrites':>9} {'same tokens':>12}")
        for r in rows:
            print(f"{r['T']:>5} {r['off_us']:>11.1f} {r['on_us']:>10.1f} {r['speedup']:>7.2f}x "
                  f"{r['rewrites']:>9} {str(r['same_tokens']):>12}"
                  + (f"   fuse_linear {r['fused_us']:.1f} us x{r['off_us'] / r['fused_us']:.2f}" if "fused_us" in r else ""))
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, f"e2e_w{W}.json"), "w") as f:
                json.dump({"card": card, "W": W, "torch": torch.__version__, "zero_copy": args.zero_copy,
                           "rows": rows}, f, indent=1)
    # Teardown: destroy_process_group() can hang once CUDA graphs captured NCCL collectives (the
    # "tpfuse off" graphs do). Seen here: with --fuse-linear every rank
    # printed its results, then sat in destroy_process_group for > 120 s (stacks in
    # benchmarks/results/). Every rank is done with NCCL after this barrier, so the process
    # exits without destroying the group; the watchdog still catches a stuck barrier.
    print(f"rank {rank}: finished, tearing down", flush=True)
    faulthandler.dump_traceback_later(120, exit=True)
    dist.barrier()
    torch.cuda.synchronize()
    print(f"rank {rank}: done (exiting without destroy_process_group, which can hang after CUDA graphs "
          "captured NCCL collectives)", flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
