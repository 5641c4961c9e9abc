"""An EAGLE3-style draft step, compiled, tpfuse off / on / fuse_linear, at T = 1..8 draft tokens.

    PYTHONPATH=. torchrun --nproc-per-node 4 benchmarks/bench_eagle_draft.py --out /tmp/eagle

(W=2: ``--nproc-per-node 2``; a CPU smoke run with gloo: ``--device cpu --tiny``.)

**The step** is unmodified TP code in plain torch modules, EAGLE3's draft for Llama-3.1-8B with
random bf16 weights (hidden 4096, intermediate 14336, 32 heads, 8 KV heads, head dim 128):

1. ``fc``: the projection of the target's three captured hidden states ``[T, 3*4096]`` to
   ``[T, 4096]``, column-parallel (each rank ``4096/W`` output columns) and gathered along the
   hidden axis as TP code writes it: ``funcol.all_gather_tensor(local, gather_dim=0)``, then
   ``view(W, T, w).permute(1, 0, 2).reshape(T, W*w)`` (a replicated output; the form vLLM uses);
2. one Llama decoder layer in EAGLE3's form: the token embeddings (a replicated table of the
   target's vocab, 128256) and the ``fc`` output are RMS-normed apart and concatenated to
   ``[T, 8192]``, the input of q/k/v (column-parallel by heads); llama3 rope at positions
   ``context .. context+T-1``; attention over a KV cache of ``--context`` (512) earlier tokens plus
   the T new ones (causal among them; the cache is read, not written: a write is one small copy,
   the same in every column); o row-parallel + all-reduce; residual from the ``fc`` output;
   SwiGLU MLP, gate/up column-parallel, down row-parallel + all-reduce;
3. the draft LM head: final RMSNorm, a vocab-parallel linear over EAGLE3's **draft vocab of
   32000** (``--draft-vocab 128256`` for the target's), its logits gathered along the vocab axis
   in the same funcol form, greedy argmax, and the draft-to-target id map (``d2t``).

It returns the draft tokens (target ids) and the hidden state (the next draft step's input).

**Configurations**, per T in ``--tokens`` (1..8): ``torch.compile`` ``--modes`` default and
reduce-overhead (CUDA graphs, CUDA only) times ``--variants`` off / on (``tpfuse.enable()``) /
fuse (``tpfuse.enable(fuse_linear=True)``), each compiled and warmed up in its own
``tpfuse.enabled(...)`` block and kept (benchmarks/compiled_tp_bench.py says how they are
isolated); ``torch._dynamo.reset()`` between T.  Static shapes: one compile per T and
configuration, as a CUDA graph per T would be captured.

**Timing (low noise).**  ``--rounds`` rounds (7); each runs every configuration once, in an order
rotated by one per round; a sample is ``--calls`` (20) back-to-back steps between CUDA events,
divided by the calls; every sample is the slowest rank's.  Reported: µs per step, median
[min-max] over the rounds, and the ratio to ``off`` of the same mode (median [min-max] of the
per-round ratios).

**Also reported**: compile time (the first call, compile included, slowest rank), gathers
rewritten (2 expected: fc and LM head) and fused (``tpfuse.report()``), tpfuse backends that ran
(``dispatch.chosen``; capture counts under CUDA graphs), graph breaks, recompiles in the timed
rounds, and whether the draft tokens equal ``off``'s (with the largest difference of the hidden
state) -- ``NO`` in the table, a FAILED line and exit status 1 otherwise.  ``--out DIR`` writes
``eagle_draft_w{W}.json`` (after every T) and ``eagle_draft_w{W}.log``.

**Time.**  48 compiles of a one-layer step at the defaults; ``--time-limit-s`` (540) stops
before a T that would not finish in time; ``--quick`` is T = 1, 4, 8 and 3 rounds.
"""

import os

# Never NVLink multicast on the shared hosts (docs/safety.md, "Multicast"); set before torch loads NCCL.
os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
os.environ["NVSHMEM_DISABLE_NVLS"] = "1"

import argparse  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.distributed._functional_collectives as funcol  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compiled_tp_bench as cb  # noqa: E402

import tpfuse  # noqa: E402

#: Llama-3.1-8B's EAGLE3 draft; tiny for the CPU
SHAPES = {
    "llama31_8b": dict(hidden=4096, intermediate=14336, heads=32, kv_heads=8, target_vocab=128256,
                       draft_vocab=32000, context=512),
    "tiny": dict(hidden=256, intermediate=512, heads=8, kv_heads=4, target_vocab=2048, draft_vocab=1024,
                 context=64),
}
ROPE = dict(theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_context=8192)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", default=None, help="draft tokens T per step, comma-separated (default 1..8)")
    p.add_argument("--draft-vocab", type=int, default=None, help="LM head vocab (default 32000, EAGLE3's)")
    p.add_argument("--context", type=int, default=None, help="KV-cache entries before the step (default 512)")
    p.add_argument("--tiny", action="store_true", help="hidden 256, draft vocab 1024 (CPU smoke runs)")
    p.add_argument("--calls", type=int, default=20, help="steps per timed sample")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 7)")
    p.add_argument("--modes", default=None, help="default,reduce-overhead (reduce-overhead: CUDA only)")
    p.add_argument("--variants", default="off,on,fuse", help="off,on,fuse")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--out", default=None, help="folder for eagle_draft_w{W}.json and .log")
    p.add_argument("--quick", action="store_true", help="T = 1,4,8, 3 rounds")
    p.add_argument("--time-limit-s", type=float, default=540.0,
                   help="start no T that the last one's duration says would end past this (0: no limit)")
    a = p.parse_args()
    a.tokens = cb.parse_list(a.tokens or ("1,4,8" if a.quick else "1,2,3,4,5,6,7,8"), kind=int)
    a.rounds = a.rounds or (3 if a.quick else 7)
    default_modes = "default,reduce-overhead" if a.device == "cuda" else "default"
    a.modes = cb.parse_list(a.modes or default_modes, allowed=list(cb.MODES))
    a.variants = cb.parse_list(a.variants, allowed=list(cb.VARIANTS))
    if "off" not in a.variants:
        a.variants = ["off"] + a.variants
    a.shape = dict(SHAPES["tiny" if a.tiny else "llama31_8b"])
    if a.draft_vocab:
        a.shape["draft_vocab"] = a.draft_vocab
    if a.context:
        a.shape["context"] = a.context
    return a


# --------------------------------------------------------------------------- the draft step


def _weight(rows, cols, seed, device, dtype, scale=None):
    g = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(rows, cols, device=device, generator=g, dtype=torch.float32) * (scale or cols ** -0.5)
    return nn.Parameter(w.to(dtype), requires_grad=False)


def llama3_inv_freq(head_dim):
    """Llama 3.1's rope frequencies (rope_type "llama3")."""
    inv = 1.0 / (ROPE["theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    low_wavelen = ROPE["original_context"] / ROPE["low_freq_factor"]
    high_wavelen = ROPE["original_context"] / ROPE["high_freq_factor"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / ROPE["factor"], inv)
    smooth = (ROPE["original_context"] / wavelen - ROPE["low_freq_factor"]) / (
        ROPE["high_freq_factor"] - ROPE["low_freq_factor"])
    mid = (1 - smooth) * scaled / ROPE["factor"] + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, mid, scaled).float()


class DraftStep(nn.Module):
    """One EAGLE3 draft step on this rank's shards (every rank the same widths)."""

    def __init__(self, rank, W, shape, max_tokens, device, dtype=torch.bfloat16):
        super().__init__()
        H, I = shape["hidden"], shape["intermediate"]
        self.heads_r, self.kv_r = shape["heads"] // W, shape["kv_heads"] // W
        self.head_dim = H // shape["heads"]
        self.context = shape["context"]
        hd, ctx = self.head_dim, self.context
        for name, n in (("hidden", H), ("intermediate", I), ("heads", shape["heads"]),
                        ("kv_heads", shape["kv_heads"]), ("draft_vocab", shape["draft_vocab"])):
            if n % W:
                raise SystemExit(f"{name} {n} is not divisible by W={W}")
        w = lambda rows, cols, seed, scale=None: _weight(rows, cols, seed, device, dtype, scale)  # noqa: E731
        # replicated: the target's embedding table (EAGLE3 shares it), every rank the same seed
        self.embed = w(shape["target_vocab"], H, 7, scale=1.0)
        # column-parallel fc: this rank's H/W output columns of [H, 3H]
        self.fc = w(H // W, 3 * H, 100 + rank)
        self.q = w(self.heads_r * hd, 2 * H, 200 + rank)
        self.k = w(self.kv_r * hd, 2 * H, 300 + rank)
        self.v = w(self.kv_r * hd, 2 * H, 400 + rank)
        self.o = w(H, self.heads_r * hd, 500 + rank)
        self.gate_up = w(2 * (I // W), H, 600 + rank)
        self.down = w(H, I // W, 700 + rank)
        self.lm_head = w(shape["draft_vocab"] // W, H, 800 + rank)
        ones = lambda: nn.Parameter(torch.ones(H, device=device, dtype=dtype), requires_grad=False)  # noqa: E731
        self.norm_emb, self.norm_hidden, self.norm_post, self.norm_final = ones(), ones(), ones(), ones()
        g = torch.Generator(device=device).manual_seed(900 + rank)
        kv = lambda: torch.randn(self.kv_r, ctx, hd, device=device, generator=g).to(dtype)  # noqa: E731
        self.register_buffer("k_cache", kv())
        self.register_buffer("v_cache", kv())
        pos = torch.arange(ctx + max_tokens, device=device, dtype=torch.float32)
        freqs = torch.outer(pos, llama3_inv_freq(hd).to(device))
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos().to(dtype))
        self.register_buffer("sin", emb.sin().to(dtype))
        g = torch.Generator(device=device).manual_seed(11)
        # draft id -> offset to the target id (EAGLE3's d2t), the same on every rank
        self.register_buffer("d2t", torch.randint(0, shape["target_vocab"] - shape["draft_vocab"] + 1,
                                                  (shape["draft_vocab"],), device=device, generator=g))

    @staticmethod
    def rms(h, weight, eps=1e-5):
        h32 = h.float()
        return (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype) * weight

    @staticmethod
    def gather_hidden(local):
        """[T, w] on each rank -> [T, W*w]: funcol gather on dim 0, then rearrange (replicated output)."""
        tokens, width = local.shape
        stacked = funcol.all_gather_tensor(local, gather_dim=0, group=dist.group.WORLD)
        return stacked.view(-1, tokens, width).permute(1, 0, 2).reshape(tokens, -1)

    def rope(self, x, cos, sin):
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def forward(self, ids, features):
        T, hd, ctx = ids.shape[0], self.head_dim, self.context
        group = dist.group.WORLD
        hidden = self.gather_hidden(features @ self.fc.t())                 # [T, H]
        residual = hidden
        x = torch.cat((self.rms(self.embed[ids], self.norm_emb), self.rms(hidden, self.norm_hidden)), dim=-1)
        q = (x @ self.q.t()).view(T, self.heads_r, hd).transpose(0, 1)       # [h, T, hd]
        k = (x @ self.k.t()).view(T, self.kv_r, hd).transpose(0, 1)
        v = (x @ self.v.t()).view(T, self.kv_r, hd).transpose(0, 1)
        cos, sin = self.cos[ctx:ctx + T], self.sin[ctx:ctx + T]
        q, k = self.rope(q, cos, sin), self.rope(k, cos, sin)
        keys = torch.cat((self.k_cache, k), dim=1).repeat_interleave(self.heads_r // self.kv_r, dim=0)
        values = torch.cat((self.v_cache, v), dim=1).repeat_interleave(self.heads_r // self.kv_r, dim=0)
        visible = torch.arange(ctx + T, device=ids.device)[None, :] <= (ctx + torch.arange(T, device=ids.device))[:, None]
        attn = F.scaled_dot_product_attention(q[None], keys[None], values[None], attn_mask=visible)[0]  # [h, T, hd]
        partial = attn.transpose(0, 1).reshape(T, self.heads_r * hd) @ self.o.t()
        h = residual + funcol.all_reduce(partial, "sum", group)
        gate, up = (self.rms(h, self.norm_post) @ self.gate_up.t()).chunk(2, dim=-1)
        h = h + funcol.all_reduce((F.silu(gate) * up) @ self.down.t(), "sum", group)
        logits = self.gather_hidden(self.rms(h, self.norm_final) @ self.lm_head.t())  # [T, draft vocab]
        draft = logits.argmax(dim=-1)
        return draft + self.d2t[draft], h


# --------------------------------------------------------------------------- one T


def run_tokens(model, args, T, device, log):
    torch._dynamo.reset()
    H, Vt = args.shape["hidden"], args.shape["target_vocab"]
    g = torch.Generator().manual_seed(2000 + T)
    ids = torch.randint(0, Vt, (T,), generator=g).to(device)
    features = torch.randn(T, 3 * H, generator=g).to(torch.bfloat16).to(device)
    stopwatch = cb.Stopwatch(device)
    rows, order = {}, []

    def call(fn):
        cb.mark_step()
        return fn(ids, features)

    for mode in args.modes:
        for variant in args.variants:
            name = cb.config_name(mode, variant)
            row = {"T": T, "mode": mode, "variant": variant, "name": name}
            rows[name] = row
            fn = cb.compile_fn(model, mode)
            breaks0, cache0, chosen0 = cb.graph_break_count(), cb.fx_cache_hits(), cb.chosen_backends()
            ok = True
            try:
                with torch.no_grad(), cb.variant_installed(variant):
                    out, seconds = cb.wall(device, lambda: call(fn))
                    tokens, hidden = out[0].clone(), out[1].float().clone()
                    for _ in range(3):  # CUDA graphs recorded by now; replays from here
                        again = call(fn)
                    same_again = bool(torch.equal(again[0], tokens))
                    cb.sync(device)
                    report = tpfuse.report() if variant != "off" else None
            except Exception as e:  # noqa: BLE001 - reported in the table, the other configurations go on
                ok = False
                row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                traceback.print_exc()
            if cb.slowest([0.0 if ok else 1.0], device)[0]:
                row.setdefault("error", "failed on another rank")
                log(f"T={T} {name}: FAILED to compile/run: {row['error']}")
                continue
            row.update(compile_s=seconds, graph_breaks=cb.graph_break_count() - breaks0,
                       fx_cache_hits=cb.fx_cache_hits() - cache0,
                       backends_warmup=cb.counter_delta(cb.chosen_backends(), chosen0),
                       warmup_deterministic=same_again)
            row["tpfuse"] = cb.tpfuse_summary(report) if report is not None else None
            row["_tokens"], row["_hidden"], row["_fn"] = tokens.cpu(), hidden.cpu(), fn
            if report is not None:
                log(f"--- tpfuse report, T={T} {name} ---", str(report))
            log(f"T={T} {name}: compiled + first call {seconds:.1f} s, "
                f"rewritten {row['tpfuse']['rewritten'] if row['tpfuse'] else '-'}, graph breaks {row['graph_breaks']}")
            order.append(name)

    samples = {name: [] for name in order}
    chosen = {name: {} for name in order}
    recompiles = {name: 0 for name in order}
    other_tokens = {name: 0 for name in order}
    with torch.no_grad():
        for r in range(args.rounds):
            for name in cb.order_for_round(order, r):
                fn = rows[name]["_fn"]
                before, graphs_before = cb.chosen_backends(), cb.compiled_graph_count()
                cb.sync(device)
                dist.barrier()
                with stopwatch(samples[name]):
                    for _ in range(args.calls):
                        out = call(fn)
                if not torch.equal(out[0].cpu(), rows[name]["_tokens"]):
                    other_tokens[name] += 1
                recompiles[name] += cb.compiled_graph_count() - graphs_before
                for k, v in cb.counter_delta(cb.chosen_backends(), before).items():
                    chosen[name][k] = chosen[name].get(k, 0) + v

    ref = rows.get(cb.config_name(args.modes[0], "off"), {})
    for name in order:
        row = rows[name]
        us = [s * 1e3 / args.calls for s in cb.slowest(samples[name], device)]
        row["us_per_step_samples"] = us
        row["us_per_step"] = cb.spread(us)
        row["backends_timed"] = chosen[name]
        row["recompiles_timed"] = recompiles[name]
        row["rounds_with_other_tokens"] = other_tokens[name]
    for name in order:
        row = rows[name]
        off = rows.get(cb.config_name(row["mode"], "off"))
        if off and "us_per_step_samples" in off:
            row["vs_off"] = cb.spread([a / b for a, b in zip(off["us_per_step_samples"], row["us_per_step_samples"])])
        if "_tokens" in ref:
            diff = row["_tokens"] != ref["_tokens"]
            row["same_tokens_as_off"] = not bool(diff.any())
            if diff.any():
                row["token_mismatch"] = {"tokens": int(diff.sum()), "of": T}
            row["hidden_max_abs_diff"] = float((row["_hidden"] - ref["_hidden"]).abs().max())
    for row in rows.values():
        for k in ("_tokens", "_hidden", "_fn"):
            row.pop(k, None)
    return {"T": T, "rows": list(rows.values())}


# --------------------------------------------------------------------------- tables


def timing_table(results, args, info):
    s = args.shape
    lines = [f"\nEAGLE3 draft step (fc {3 * s['hidden']}->{s['hidden']} + gather, 1 decoder layer, draft LM head "
             f"{s['draft_vocab']} + gather), W={info['W']}, {info['card']}, context {s['context']}; µs per step "
             f"(median [min-max] over {args.rounds} rounds of {args.calls} calls, slowest rank); ratio = off / this, "
             f"same mode (median [min-max] of per-round ratios)"]
    head = (f"{'T':>2} {'mode':<15} {'variant':<7} {'µs/step':>26} {'vs off':>19} {'rewritten':>9} {'fused':>5} "
            f"{'same tokens':>12}")
    lines += [head, "-" * len(head)]
    for res in results:
        for row in res["rows"]:
            if "us_per_step" not in row:
                lines.append(f"{row['T']:>2} {row['mode']:<15} {row['variant']:<7} ERROR: {row.get('error')}")
                continue
            vs = cb.fmt_spread(row["vs_off"], 3) if row["variant"] != "off" and "vs_off" in row else "1"
            tp = row.get("tpfuse")
            same = "-" if "same_tokens_as_off" not in row else (
                "yes" if row["same_tokens_as_off"] else f"NO {row['token_mismatch']['tokens']}/{row['token_mismatch']['of']}")
            if row.get("rounds_with_other_tokens"):
                same += f" (varies {row['rounds_with_other_tokens']})"
            lines.append(f"{row['T']:>2} {row['mode']:<15} {row['variant']:<7} {cb.fmt_spread(row['us_per_step'], 1):>26} "
                         f"{vs:>19} {tp['rewritten'] if tp else '-':>9} {tp['fused_linear'] if tp else '-':>5} "
                         f"{same:>12}")
    return lines


def facts_table(results):
    lines = ["\nper configuration: compile = the first call, compile included (s, slowest rank; FX-graph-cache hits "
             "on rank 0); "
             "backends = tpfuse dispatch calls in the warm-up | in the timed rounds (capture counts under CUDA "
             "graphs); recompiles in the timed rounds should be 0; max |dh| = the hidden state against off"]
    head = (f"{'T':>2} {'configuration':<24} {'compile s':>13} {'graph breaks':>12} {'recompiles':>10} "
            f"{'max |dh|':>9}  backends")
    lines += [head, "-" * len(head)]
    for res in results:
        for row in res["rows"]:
            if "compile_s" not in row:
                continue
            dh = row.get("hidden_max_abs_diff")
            lines.append(f"{row['T']:>2} {row['name']:<24} {row['compile_s']:>7.1f} ({row['fx_cache_hits']:>2} hit) "
                         f"{row['graph_breaks']:>12} {row.get('recompiles_timed', '-'):>10} "
                         f"{'-' if dh is None else f'{dh:.3g}':>9}  "
                         f"{cb.short_backends(row['backends_warmup'])} | {cb.short_backends(row.get('backends_timed', {}))}")
    return lines


def main():
    args = parse_args()
    rank, W, device, info, name, log, t_start = cb.start(args, "eagle_draft")
    model = DraftStep(rank, W, args.shape, max(args.tokens), device).eval()
    log(f"draft: {args.shape} ({'tiny' if args.tiny else 'Llama-3.1-8B EAGLE3'}), bf16, random weights; "
        f"per rank: fc {tuple(model.fc.shape)}, lm_head {tuple(model.lm_head.shape)}")
    payload = {"benchmark": "eagle_draft", **info, "args": vars(args), "results": []}
    skipped, last_s = [], 0.0
    for T in args.tokens:
        if cb.out_of_time(args, t_start, last_s, device):
            skipped.append(T)
            continue
        t0 = time.perf_counter()
        log(f"\n=== T={T} ===")
        res = run_tokens(model, args, T, device, log)
        last_s = cb.slowest([time.perf_counter() - t0], device)[0]
        res["seconds"] = last_s
        payload["results"].append(res)
        payload["skipped_tokens"] = skipped
        cb.write_json(args.out, name, payload, rank)
        log(*timing_table([res], args, info))
    total = time.perf_counter() - t_start
    payload["seconds"] = total
    cb.write_json(args.out, name, payload, rank)

    log("\n" + "=" * 100, cb.versions_line(info))
    log(*timing_table(payload["results"], args, info))
    log(*facts_table(payload["results"]))
    if skipped:
        log(f"SKIPPED T {skipped}: --time-limit-s {args.time_limit_s:.0f} would have been passed")
    rows = [row for res in payload["results"] for row in res["rows"]]
    failures = cb.failures(rows, key="T", expect_rewritten=2)
    for f in failures:
        log("FAILED: " + f)
    log(f"total {total:.0f} s" + (f"; results in {args.out}" if args.out else ""))
    cb.finish(rank, device, 1 if failures else 0)


if __name__ == "__main__":
    main()
