"""End to end on real model code: HuggingFace ``LlamaForCausalLM``, TP-sharded by transformers' own plan,
greedy decoding with a static KV cache, compiled, tpfuse off / on / fuse_linear.

    PYTHONPATH=. torchrun --nproc-per-node 4 benchmarks/bench_hf_decode.py --out /tmp/hf

(W=2: ``--nproc-per-node 2``; a CPU smoke run with gloo: ``--device cpu --tiny``.)

**Model.** ``LlamaForCausalLM`` with random weights and Llama-3.1-8B's shape: hidden 4096,
intermediate 14336, 32 heads, 8 KV heads, vocab 128256, llama3 rope (theta 500000, factor 8,
low/high frequency factors 1 / 4, original context 8192), untied LM head, but only ``--layers``
decoder layers (default 4: six compiled configurations of 32 layers do not fit a 10-minute run).
``--hidden 8192`` takes Llama-3.1-70B's width instead (intermediate 28672, 64 heads, 8 KV heads;
full depth 80).  ``--tiny`` is hidden 256, 2 layers, vocab 1024, for the CPU.

**Sharding, as a user gets it.**  Rank 0 builds the model from its config with a fixed seed
(``--seed``) and ``save_pretrained``\\ s it to a temporary folder (or ``--ckpt DIR``, kept and
reused); after a barrier every rank loads it with
``from_pretrained(dir, distributed_config=DistributedConfig(tp_plan="auto"), dtype=bfloat16)``
(``tp_plan="auto"`` directly on transformers without ``DistributedConfig``).  That is
transformers' TP plan for Llama: q/k/v and gate/up column-parallel, o and down row-parallel
(all-reduce), and the LM head ``colwise_gather_output``: a column-parallel linear whose output
DTensor is redistributed from ``Shard(-1)`` to ``Replicate()``, the hidden-axis gather tpfuse
rewrites.  Nothing is downloaded; no tokenizer: the prompt is fixed random token ids.

**Decoding.**  Batch ``--batches`` (default 1, 8, 32) of ``--prompt`` (32) random tokens, then
``--new-tokens`` (32) greedy tokens with a ``StaticCache`` of prompt + new tokens.  The prefill
runs eagerly (the same in every configuration, not timed); each decode step is one call of a
compiled function ``step(ids)`` that calls the model's forward (``logits_to_keep=1``, the cache)
and returns the argmax token and the last logits.  The loop feeds each token to the next step
from a buffer of its own (so no input is CUDA-graph memory).

**Configurations**, per batch size: ``torch.compile`` ``--modes`` default and reduce-overhead
(CUDA graphs, CUDA only) times ``--variants`` off (no tpfuse), on (``tpfuse.enable()``), fuse
(``tpfuse.enable(fuse_linear=True)``).  Each is compiled and warmed up inside its own
``tpfuse.enabled(...)`` block and then kept (benchmarks/compiled_tp_bench.py says how they are
isolated); ``torch._dynamo.reset()`` between batch sizes.

**Timing (low noise).**  ``--rounds`` rounds (7); each round runs every configuration once, in an
order rotated by one per round; a sample is a whole ``--new-tokens`` decode (CUDA events on the
GPU), divided by the tokens; every sample is the slowest rank's.  Reported: the median ms per
decoded token with [min-max] over the rounds, tokens/s (batch x 1000 / ms), and the ratio to
``off`` of the same mode: the median of the per-round ratios (the rounds pair the samples) with
[min-max].

**Full depth.**  Besides the measured depth N, every row gives the per-token time scaled to the
model's full depth D (32; 80 with ``--hidden 8192``), assuming each decoder layer costs the same:
``t_D = t_N + (D - N) * b`` with ``b = (t_N(off) - t_0(off)) / N``, where ``t_0`` is the same
forward with 0 decoder layers (``config.num_hidden_layers = 0``: embedding, final norm, LM head and
its gather, argmax), compiled and timed in the same rounds with tpfuse off (``--no-depth-probe``
drops it).  tpfuse rewrites nothing inside a decoder layer here (its collectives are
all-reduces), so b is taken from ``off`` for every variant.  The arithmetic is printed per mode
and batch.

**Also reported** per configuration: compile time (the first step, compile included, slowest
rank; FX-graph-cache hits beside it), gathers rewritten and linear+gather fusions (from
``tpfuse.report()``), the tpfuse backends that ran (``tpfuse.compile_ops.dispatch.chosen``; under
CUDA graphs the op's Python runs at capture only, so those are capture counts), graph breaks
(``torch._dynamo.utils.counters["graph_break"]``), recompiles during the timed rounds (should be
0), and whether it generated the same tokens as ``off`` (and its own warm-up) -- ``NO`` in the
table, a FAILED line and exit status 1 otherwise -- with the largest difference of the first
step's logits.  ``--out DIR`` writes ``hf_decode_w{W}.json`` (after every batch size) and
``hf_decode_w{W}.log`` (everything printed, the tpfuse reports too).

**Time.**  18 compiles of a 4-layer model at the defaults; ``--time-limit-s`` (540) stops before a
batch size that would not finish in time (said in the table); ``--quick`` is batches 1 and 32,
3 rounds, 16 new tokens.
"""

import os

# Never NVLink multicast on the shared hosts (docs/safety.md, "Multicast"); set before torch loads NCCL.
os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
os.environ["NVSHMEM_DISABLE_NVLS"] = "1"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import inspect  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compiled_tp_bench as cb  # noqa: E402

import tpfuse  # noqa: E402

ROPE_LLAMA31 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
#: name -> (LlamaConfig fields, full depth)
PRESETS = {
    4096: (dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                vocab_size=128256), 32),
    8192: (dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
                vocab_size=128256), 80),
    "tiny": (dict(hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=4,
                  vocab_size=1024), 32),
}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,8,32)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers built (default 4; --tiny: 2)")
    p.add_argument("--hidden", type=int, default=4096, choices=(4096, 8192),
                   help="4096: Llama-3.1-8B's shape; 8192: Llama-3.1-70B's")
    p.add_argument("--tiny", action="store_true", help="hidden 256, 2 layers, vocab 1024 (CPU smoke runs)")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens per sequence")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens decoded per sample (default 32)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 7)")
    p.add_argument("--modes", default=None, help="default,reduce-overhead (reduce-overhead: CUDA only)")
    p.add_argument("--variants", default="off,on,fuse", help="off,on,fuse")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--out", default=None, help="folder for hf_decode_w{W}.json and .log")
    p.add_argument("--ckpt", default=None, help="checkpoint folder: reused if it holds one, kept afterwards")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-depth-probe", action="store_true", help="skip the 0-layer forward (no full-depth column)")
    p.add_argument("--quick", action="store_true", help="batches 1,32, 3 rounds, 16 new tokens")
    p.add_argument("--time-limit-s", type=float, default=540.0,
                   help="start no batch size that the last one's duration says would end past this (0: no limit)")
    a = p.parse_args()
    a.batches = cb.parse_list(a.batches or ("1,32" if a.quick else "1,8,32"), kind=int)
    a.layers = a.layers if a.layers is not None else (2 if a.tiny else 4)
    a.new_tokens = a.new_tokens or (16 if a.quick else 32)
    a.rounds = a.rounds or (3 if a.quick else 7)
    default_modes = "default,reduce-overhead" if a.device == "cuda" else "default"
    a.modes = cb.parse_list(a.modes or default_modes, allowed=list(cb.MODES))
    a.variants = cb.parse_list(a.variants, allowed=list(cb.VARIANTS))
    if "off" not in a.variants:
        a.variants = ["off"] + a.variants  # the reference every ratio and token check needs
    return a


# --------------------------------------------------------------------------- the model


def llama_config(args):
    from transformers import LlamaConfig

    fields, full_depth = PRESETS["tiny" if args.tiny else args.hidden]
    common = dict(num_hidden_layers=args.layers, max_position_embeddings=131072, rms_norm_eps=1e-5,
                  hidden_act="silu", tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
                  bos_token_id=128000, eos_token_id=128001)
    try:
        cfg = LlamaConfig(**fields, **common, rope_parameters=dict(ROPE_LLAMA31))
    except TypeError:  # a transformers without rope_parameters
        rope = {k: v for k, v in ROPE_LLAMA31.items() if k != "rope_theta"}
        cfg = LlamaConfig(**fields, **common, rope_theta=ROPE_LLAMA31["rope_theta"], rope_scaling=rope)
    return cfg, full_depth


def checkpoint_dir(args, rank):
    """The shared folder (rank 0 chooses, every rank gets the same path) and whether to delete it."""
    if args.ckpt:
        return args.ckpt, False
    box = [tempfile.mkdtemp(prefix="tpfuse_hf_decode_") if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0], True


def build_and_save(cfg, path, args, rank, device, log):
    """Rank 0: the model from its config, fixed seed, bf16, saved with ``save_pretrained``."""
    from transformers import LlamaForCausalLM

    if rank == 0:
        if os.path.exists(os.path.join(path, "config.json")):
            log(f"checkpoint: reusing {path}")
        else:
            t0 = time.perf_counter()
            torch.manual_seed(args.seed)
            with torch.device(device):
                model = LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16)
            tmp = path.rstrip("/") + ".partial"
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(tmp)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if os.path.isdir(path):
                os.rmdir(path)  # the empty temporary folder (or an empty --ckpt folder)
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            os.replace(tmp, path)
            log(f"checkpoint: built (seed {args.seed}) and saved to {path} in {time.perf_counter() - t0:.1f} s")
    dist.barrier()


def load_tp(path, log):
    from transformers import LlamaForCausalLM

    kwargs = {"dtype": torch.bfloat16}
    try:
        from transformers.distributed import DistributedConfig

        kwargs["distributed_config"] = DistributedConfig(tp_plan="auto")
        how = 'distributed_config=DistributedConfig(tp_plan="auto")'
    except ImportError:
        kwargs["tp_plan"] = "auto"
        how = 'tp_plan="auto"'
    t0 = time.perf_counter()
    model = LlamaForCausalLM.from_pretrained(path, **kwargs).eval()
    log(f"loaded with from_pretrained(dir, {how}, dtype=torch.bfloat16) in {time.perf_counter() - t0:.1f} s")
    plan = getattr(model, "tp_plan", None) or getattr(model, "_tp_plan", None) or {}
    return model, dict(plan)


def describe_sharding(model, W):
    """What the plan made of the LM head (the gather tpfuse is after) and of one layer."""
    from torch.distributed.tensor import DTensor

    def one(name, p):
        if isinstance(p, DTensor):
            return f"{name} {tuple(p.shape)} as {p.placements[0]} (local {tuple(p.to_local().shape)})"
        return f"{name} {tuple(p.shape)} (not a DTensor)"

    layer = model.model.layers[0]
    return [one("lm_head.weight", model.lm_head.weight),
            one("layers.0.self_attn.q_proj.weight", layer.self_attn.q_proj.weight),
            one("layers.0.mlp.down_proj.weight", layer.mlp.down_proj.weight)]


@contextlib.contextmanager
def depth(model, layers):
    """Run the forward with the first ``layers`` decoder layers (LlamaModel loops over
    ``self.layers[: config.num_hidden_layers]``)."""
    saved = model.config.num_hidden_layers
    model.config.num_hidden_layers = layers
    try:
        yield
    finally:
        model.config.num_hidden_layers = saved


class Decoder:
    """The prompt, the cache and the step function of one batch size."""

    def __init__(self, model, args, batch, device):
        from transformers import StaticCache

        self.model, self.args, self.batch, self.device = model, args, batch, device
        params = inspect.signature(model.forward).parameters
        # transformers 5.17 calls the cache ``past_key_values``; later 5.x ``cache``
        cache_kw = "cache" if "cache" in params else "past_key_values"
        self.cache = StaticCache(config=model.config, max_cache_len=args.prompt + args.new_tokens + 1)
        self.kwargs = {cache_kw: self.cache, "use_cache": True, "logits_to_keep": 1}
        g = torch.Generator().manual_seed(1000 + batch)
        vocab = model.config.vocab_size
        self.prompt = torch.randint(0, vocab, (batch, args.prompt), generator=g).to(device)

    def make_step(self):
        model, kwargs = self.model, self.kwargs

        def step(ids):
            logits = model(input_ids=ids, **kwargs).logits[:, -1, :]
            return logits.argmax(dim=-1, keepdim=True), logits

        return step

    def generate(self, step, stopwatch=None, samples=None, first_wall=None, keep_logits=False):
        """Prefill (eager), then ``new_tokens`` steps of ``step``; the tokens [B, 1 + new_tokens]."""
        n = self.args.new_tokens
        self.cache.reset()
        with torch.no_grad():
            out = self.model(input_ids=self.prompt, **self.kwargs)
            tokens = torch.empty(n + 1, self.batch, 1, dtype=torch.long, device=self.device)
            tokens[0].copy_(out.logits[:, -1, :].argmax(dim=-1, keepdim=True))
            first_logits = None
            k0 = 0
            if first_wall is not None:  # the first step alone: compile time
                (nxt, logits), seconds = cb.wall(self.device, lambda: (cb.mark_step(), step(tokens[0]))[1])
                first_wall.append(seconds)
                tokens[1].copy_(nxt)
                if keep_logits:
                    first_logits = logits.float().clone()
                k0 = 1
            cb.sync(self.device)
            dist.barrier()
            region = stopwatch(samples) if stopwatch is not None else contextlib.nullcontext()
            with region:
                for k in range(k0, n):
                    cb.mark_step()
                    nxt, logits = step(tokens[k])
                    tokens[k + 1].copy_(nxt)
                    if keep_logits and k == 0:
                        first_logits = logits.float().clone()
            cb.sync(self.device)
        return tokens.squeeze(-1).t().cpu(), first_logits


# --------------------------------------------------------------------------- one batch size


def run_batch(model, args, batch, device, W, log, full_depth):
    torch._dynamo.reset()
    dec = Decoder(model, args, batch, device)
    stopwatch = cb.Stopwatch(device)
    configs = [(m, v) for m in args.modes for v in args.variants]
    probes = [] if args.no_depth_probe else [(m, "off") for m in args.modes]
    rows = {}

    def prepare(mode, variant, layers):
        name = cb.config_name(mode, variant) + ("" if layers == args.layers else f"@{layers}L")
        row = {"B": batch, "mode": mode, "variant": variant, "layers": layers, "name": name}
        step = cb.compile_fn(dec.make_step(), mode)
        breaks0, cache0, chosen0 = cb.graph_break_count(), cb.fx_cache_hits(), cb.chosen_backends()
        ok = True
        try:
            with depth(model, layers), cb.variant_installed(variant):
                first = []
                tokens, logits = dec.generate(step, first_wall=first, keep_logits=True)
                tokens2, _ = dec.generate(step)  # CUDA graphs recorded by now; replays from here
                report = tpfuse.report() if variant != "off" else None
        except Exception as e:  # noqa: BLE001 - reported in the table, the other configurations go on
            ok = False
            row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            traceback.print_exc()
        failed = cb.slowest([0.0 if ok else 1.0], device)[0]
        if failed:
            row.setdefault("error", "failed on another rank")
            log(f"B={batch} {name}: FAILED to compile/run: {row['error']}")
            return name, row, None
        row.update(compile_s=first[0], graph_breaks=cb.graph_break_count() - breaks0,
                   fx_cache_hits=cb.fx_cache_hits() - cache0,
                   backends_warmup=cb.counter_delta(cb.chosen_backends(), chosen0),
                   warmup_deterministic=bool(torch.equal(tokens, tokens2)))
        row["tpfuse"] = cb.tpfuse_summary(report) if report is not None else None
        row["_tokens"], row["_logits"], row["_step"] = tokens, logits, step
        if report is not None:
            log(f"--- tpfuse report, B={batch} {name} ---", str(report))
        log(f"B={batch} {name}: compiled + first step {first[0]:.1f} s, "
            f"rewritten {row['tpfuse']['rewritten'] if row['tpfuse'] else '-'}, "
            f"graph breaks {row['graph_breaks']}")
        return name, row, step

    order = []
    for mode, variant in configs:
        name, row, step = prepare(mode, variant, args.layers)
        rows[name] = row
        if step is not None:
            order.append((name, mode, variant, args.layers))
    for mode, variant in probes:
        name, row, step = prepare(mode, variant, 0)
        rows[name] = row
        if step is not None:
            order.append((name, mode, variant, 0))

    # the timed rounds: every configuration once per round, in a rotated order
    samples = {name: [] for name, *_ in order}
    chosen = {name: {} for name, *_ in order}
    compiled0 = cb.compiled_graph_count()
    per_config_compiles = {name: 0 for name, *_ in order}
    mismatched_rounds = {name: 0 for name, *_ in order}
    for r in range(args.rounds):
        for name, mode, variant, layers in cb.order_for_round(order, r):
            before, graphs_before = cb.chosen_backends(), cb.compiled_graph_count()
            with depth(model, layers):
                tokens, _ = dec.generate(rows[name]["_step"], stopwatch=stopwatch, samples=samples[name])
            per_config_compiles[name] += cb.compiled_graph_count() - graphs_before
            for k, v in cb.counter_delta(cb.chosen_backends(), before).items():
                chosen[name][k] = chosen[name].get(k, 0) + v
            if not torch.equal(tokens, rows[name]["_tokens"]):
                mismatched_rounds[name] += 1
    timed_steps = args.new_tokens  # every step of a timed generate is timed
    recompiles_total = cb.compiled_graph_count() - compiled0

    ref_name = cb.config_name(args.modes[0], "off")
    ref = rows.get(ref_name, {})
    for name, mode, variant, layers in order:
        row = rows[name]
        ms = [s / timed_steps for s in cb.slowest(samples[name], device)]
        row["ms_per_token_samples"] = ms
        row["ms_per_token"] = cb.spread(ms)
        row["tokens_per_s"] = batch * 1e3 / row["ms_per_token"]["median"]
        row["backends_timed"] = chosen[name]
        row["recompiles_timed"] = per_config_compiles[name]
        row["rounds_with_other_tokens"] = mismatched_rounds[name]
    for name, mode, variant, layers in order:
        row = rows[name]
        off = rows.get(cb.config_name(mode, "off"))
        if off and "ms_per_token_samples" in off and layers == args.layers:
            ratios = [a / b for a, b in zip(off["ms_per_token_samples"], row["ms_per_token_samples"])]
            row["vs_off"] = cb.spread(ratios)
        if layers == args.layers and "_tokens" in ref:
            diff = (row["_tokens"] != ref["_tokens"])
            row["same_tokens_as_off"] = not bool(diff.any())
            if diff.any():
                bad_rows = diff.any(dim=1)
                first_step = int(diff.any(dim=0).nonzero()[0])
                row["token_mismatch"] = {"sequences": int(bad_rows.sum()), "of": batch, "first_position": first_step}
            if row["_logits"] is not None and ref["_logits"] is not None:
                row["first_step_logits_max_abs_diff"] = float((row["_logits"] - ref["_logits"]).abs().max())
    # full depth: t_D = t_N + (D - N) * b, b = (t_N(off) - t_0(off)) / N
    depth_notes = []
    for mode in args.modes:
        off, probe = rows.get(cb.config_name(mode, "off")), rows.get(cb.config_name(mode, "off") + "@0L")
        if not (off and probe and "ms_per_token" in off and "ms_per_token" in probe):
            continue
        t_n, t_0 = off["ms_per_token"]["median"], probe["ms_per_token"]["median"]
        b = (t_n - t_0) / args.layers
        depth_notes.append(f"{mode}, B={batch}: b = (t_{args.layers}(off) - t_0(off)) / {args.layers} = "
                           f"({t_n:.3f} - {t_0:.3f}) / {args.layers} = {b:.4f} ms per layer; "
                           f"t_{full_depth} = t_{args.layers} + {full_depth - args.layers} x {b:.4f}")
        for v in args.variants:
            row = rows.get(cb.config_name(mode, v))
            if row and "ms_per_token" in row:
                row["full_depth"] = full_depth
                row["per_layer_ms"] = b
                row["non_layer_ms_off"] = t_0
                row["ms_per_token_full_depth"] = row["ms_per_token"]["median"] + (full_depth - args.layers) * b
        off_full = off.get("ms_per_token_full_depth")
        for v in args.variants:
            row = rows.get(cb.config_name(mode, v))
            if row and "ms_per_token_full_depth" in row and off_full:
                row["vs_off_full_depth"] = off_full / row["ms_per_token_full_depth"]
    for row in rows.values():
        for k in ("_tokens", "_logits", "_step"):
            row.pop(k, None)
    return {"B": batch, "rows": list(rows.values()), "depth_notes": depth_notes, "recompiles_timed": recompiles_total}


# --------------------------------------------------------------------------- the tables


def timing_table(batches, args, info, full_depth):
    lines = [f"\nHF LlamaForCausalLM greedy decode, W={info['W']}, {info['card']}: {args.layers} of {full_depth} "
             f"layers measured, prompt {args.prompt}, {args.new_tokens} new tokens, {args.rounds} rounds; "
             f"ms per decoded token (median [min-max] over rounds, slowest rank); ratio = off / this, same mode "
             f"(median [min-max] of per-round ratios); '{full_depth}L' columns: t_{full_depth} = "
             f"t_{args.layers} + {full_depth - args.layers} x b (below)"]
    head = (f"{'B':>3} {'mode':<15} {'variant':<7} {'ms/token':>24} {'tok/s':>9} {'vs off':>19} "
            f"{f'{full_depth}L ms/tok':>12} {f'{full_depth}L vs off':>11} {'same tokens':>14}")
    lines += [head, "-" * len(head)]
    for bt in batches:
        for row in bt["rows"]:
            if row["layers"] != args.layers:
                continue
            if "ms_per_token" not in row:
                lines.append(f"{row['B']:>3} {row['mode']:<15} {row['variant']:<7} ERROR: {row.get('error')}")
                continue
            vs = cb.fmt_spread(row["vs_off"], 3) if "vs_off" in row and row["variant"] != "off" else "1"
            fd = f"{row['ms_per_token_full_depth']:.3f}" if "ms_per_token_full_depth" in row else "-"
            fdr = f"{row['vs_off_full_depth']:.3f}" if "vs_off_full_depth" in row and row["variant"] != "off" else (
                "1" if "vs_off_full_depth" in row else "-")
            same = same_cell(row)
            lines.append(f"{row['B']:>3} {row['mode']:<15} {row['variant']:<7} "
                         f"{cb.fmt_spread(row['ms_per_token'], 3):>24} {row['tokens_per_s']:>9.1f} {vs:>19} "
                         f"{fd:>12} {fdr:>11} {same:>14}")
    notes = [n for bt in batches for n in bt["depth_notes"]]
    if notes:
        lines.append("full depth: each decoder layer assumed to cost the same; t_0 = the forward with 0 decoder "
                     "layers (embedding, norm, LM head + gather, argmax), tpfuse off, timed in the same rounds:")
        lines += ["  " + n for n in notes]
    return lines


def same_cell(row):
    if "same_tokens_as_off" not in row:
        return "-"
    cell = "yes" if row["same_tokens_as_off"] else (
        f"NO {row['token_mismatch']['sequences']}/{row['token_mismatch']['of']}@{row['token_mismatch']['first_position']}")
    if row.get("rounds_with_other_tokens"):
        cell += f" (varies {row['rounds_with_other_tokens']})"
    return cell


def facts_table(batches, args):
    lines = ["\nper configuration: compile = the first step, compile included (s, slowest rank; FX-graph-cache hits "
             "on rank 0); "
             "rewritten / fused = tpfuse.report(); backends = tpfuse dispatch calls in the warm-up | in the timed "
             "rounds (capture counts under CUDA graphs); recompiles in the timed rounds should be 0"]
    head = (f"{'B':>3} {'configuration':<28} {'compile s':>13} {'rewritten':>9} {'fused':>5} {'graph breaks':>12} "
            f"{'recompiles':>10} {'max |dlogits| step 1':>20}  backends")
    lines += [head, "-" * len(head)]
    for bt in batches:
        for row in bt["rows"]:
            if "compile_s" not in row:
                continue
            tp = row.get("tpfuse")
            rw = str(tp["rewritten"]) if tp else "-"
            fused = str(tp["fused_linear"]) if tp else "-"
            dl = row.get("first_step_logits_max_abs_diff")
            dl = f"{dl:.3g}" if dl is not None else "-"
            lines.append(f"{row['B']:>3} {row['name']:<28} {row['compile_s']:>7.1f} ({row['fx_cache_hits']:>2} hit) "
                         f"{rw:>9} {fused:>5} {row['graph_breaks']:>12} {row.get('recompiles_timed', '-'):>10} "
                         f"{dl:>20}  {cb.short_backends(row['backends_warmup'])} | "
                         f"{cb.short_backends(row.get('backends_timed', {}))}")
    return lines


# --------------------------------------------------------------------------- main


def main():
    args = parse_args()
    import transformers  # noqa: F401  (before the versions line, which names the version in use)

    rank, W, device, info, name, log, t_start = cb.start(args, "hf_decode")
    cfg, full_depth = llama_config(args)
    preset = "tiny" if args.tiny else f"hidden {args.hidden}"
    log(f"model: LlamaForCausalLM ({preset}: hidden {cfg.hidden_size}, intermediate {cfg.intermediate_size}, "
        f"{cfg.num_attention_heads} heads, {cfg.num_key_value_heads} KV heads, vocab {cfg.vocab_size}), "
        f"{args.layers} of {full_depth} layers, random weights (seed {args.seed}), bf16")

    path, delete = checkpoint_dir(args, rank)
    build_and_save(cfg, path, args, rank, device, log)
    model, plan = load_tp(path, log)
    log("TP plan: " + ", ".join(f"{k}: {v}" for k, v in sorted(plan.items())))
    log(*("sharded: " + s for s in describe_sharding(model, W)))

    payload = {"benchmark": "hf_decode", **info, "args": vars(args), "full_depth": full_depth,
               "model": {k: getattr(cfg, k) for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                      "num_key_value_heads", "vocab_size", "num_hidden_layers")},
               "tp_plan": plan, "batches": []}
    skipped = []
    last_batch_s = 0.0
    for batch in args.batches:
        if cb.out_of_time(args, t_start, last_batch_s, device):
            skipped.append(batch)
            continue
        t0 = time.perf_counter()
        log(f"\n=== batch {batch} ===")
        result = run_batch(model, args, batch, device, W, log, full_depth)
        last_batch_s = cb.slowest([time.perf_counter() - t0], device)[0]
        result["seconds"] = last_batch_s
        payload["batches"].append(result)
        payload["skipped_batches"] = skipped
        cb.write_json(args.out, name, payload, rank)
        log(*timing_table([result], args, info, full_depth))
    total = time.perf_counter() - t_start
    payload["seconds"] = total
    cb.write_json(args.out, name, payload, rank)

    log("\n" + "=" * 100, cb.versions_line(info))
    log(*timing_table(payload["batches"], args, info, full_depth))
    log(*facts_table(payload["batches"], args))
    if skipped:
        log(f"SKIPPED batch sizes {skipped}: --time-limit-s {args.time_limit_s:.0f} would have been passed")
    rows = [row for bt in payload["batches"] for row in bt["rows"]]
    failures = cb.failures(rows, key="B", expect_rewritten=1)  # the LM head's gather
    for f in failures:
        log("FAILED: " + f)
    log(f"total {total:.0f} s" + (f"; results in {args.out}" if args.out else ""))
    if delete and rank == 0:
        shutil.rmtree(path, ignore_errors=True)
    cb.finish(rank, device, 1 if failures else 0)


if __name__ == "__main__":
    main()
