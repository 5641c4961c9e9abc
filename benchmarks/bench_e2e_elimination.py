"""Gather elimination end to end: HF ``LlamaForCausalLM`` compiled unmodified, the gather kept or eliminated.

    PYTHONPATH=. torchrun --nproc-per-node 2 benchmarks/bench_e2e_elimination.py --out DIR

(W=4: ``--nproc-per-node 4``; a CPU smoke run with gloo: ``--device cpu --tiny``.)

**Model and sharding** are bench_hf_decode.py's (imported, not copied): random weights in
Llama-3.1-8B's shape with ``--layers`` decoder layers (default 2), saved by rank 0 and loaded by
every rank with transformers' own ``tp_plan="auto"``, whose LM head is column-parallel with its
output gathered over the vocabulary: the hidden-axis gather tpfuse rewrites, and eliminates
when every consumer reduces over the vocabulary (docs/passes.md, "Gather elimination").

**Workloads** (``--workloads``), each one compiled function returning only what a user keeps:

- ``greedy``: forward of ``--batches`` (1, 32) sequences of one token (no cache,
  ``logits_to_keep=1``) and argmax of the last logits; returns the tokens;
- ``logprobs``: forward of one sequence of ``--seq`` (2048) tokens and
  ``log_softmax(logits.float(), -1).gather(-1, labels)``; returns the token log-probs;
- ``train_loss``: forward of one sequence of ``--train-seq`` (1024) tokens with ``labels=`` (HF's
  ``ForCausalLMLoss``) and ``.backward()``; returns the loss.  Peak memory per rank
  (``torch.cuda.max_memory_allocated`` over a call, the largest rank's) is reported too.

**Variants**: ``off`` (plain ``torch.compile``), ``keep`` (``tpfuse.enable(eliminate_gathers=False)``:
the gather rewritten but kept), ``elim`` (``tpfuse.enable()``).  Each is compiled and warmed up
inside its own ``tpfuse.enabled(...)`` with a backend of its own (compiled_tp_bench.py says why),
and its ``tpfuse.report()`` kept: gathers rewritten and eliminated.  Before timing, every variant's
result on the same inputs is compared with ``off``'s: tokens equal; log-probs and loss within
1e-3 of ``off``'s largest magnitude.  A mismatch, an ``elim`` that eliminated nothing or a
recompile during the timed rounds is a FAILED line and exit status 1.

**Statistics**: ``--rounds`` (5) paired rounds, each running every variant once in an order
rotated by one per round; a sample is ``--calls`` (5) calls between CUDA events (``perf_counter``
on the CPU), the slowest rank's, per call.  Reported: the median ms per call, and the ratio to
``off``: the median of the per-round ratios with a 95% percentile-bootstrap interval of that median
(2000 resamples of the rounds, fixed seed; with 5 rounds it is coarse: grow ``--rounds``).

**Time**: 12 compiles at the defaults, sized for a 150-second step at W=2 on H200s;
``--time-limit-s`` (140) starts no piece (workload x batch) that would end past it.
``--out DIR`` writes ``e2e_elimination_w{W}.json`` and ``.log``.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# bench_hf_decode sets the no-multicast variables before torch loads NCCL (docs/safety.md, "Multicast")
import bench_hf_decode as hf  # noqa: E402
import compiled_tp_bench as cb  # noqa: E402

import argparse  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import torch  # noqa: E402

import tpfuse  # noqa: E402

WORKLOADS = ("greedy", "logprobs", "train_loss")
#: variant -> tpfuse.enable's options (None: tpfuse not installed)
VARIANTS = {"off": None, "keep": {"eliminate_gathers": False}, "elim": {}}
REL_TOL = 1e-3
#: Where the elim variant must eliminate.  Not train_loss: HF's LM head gathers through a DTensor
#: redistribute, and a training loss is eliminated only before AOTAutograd, on tpfuse's own gather
#: (docs/passes.md, "Training"); there the table reports the count and the log the reason.
MUST_ELIMINATE = ("greedy", "logprobs")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="greedy,logprobs,train_loss")
    p.add_argument("--batches", default="1,32", help="greedy batch sizes (e.g. 1,8,32)")
    p.add_argument("--seq", type=int, default=None, help="logprobs sequence length (default 2048; --tiny: 64)")
    p.add_argument("--train-seq", type=int, default=None, help="train_loss sequence length (default 1024; --tiny: 64)")
    p.add_argument("--layers", type=int, default=2, help="decoder layers built")
    p.add_argument("--hidden", type=int, default=4096, choices=(4096, 8192),
                   help="4096: Llama-3.1-8B's shape; 8192: Llama-3.1-70B's")
    p.add_argument("--tiny", action="store_true", help="hidden 256, vocab 1024 (CPU smoke runs)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=5, help="calls per timed sample")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--out", default=None, help="folder for e2e_elimination_w{W}.json and .log")
    p.add_argument("--ckpt", default=None, help="checkpoint folder: reused if it holds one, kept afterwards")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-limit-s", type=float, default=140.0,
                   help="start no piece that the last one's duration says would end past this (0: no limit)")
    a = p.parse_args(argv)
    a.workloads = cb.parse_list(a.workloads, allowed=list(WORKLOADS))
    a.batches = cb.parse_list(a.batches, kind=int)
    a.seq = a.seq or (64 if a.tiny else 2048)
    a.train_seq = a.train_seq or (64 if a.tiny else 1024)
    a.modes = ["default"]  # cb.start reads it
    return a


# --------------------------------------------------------------------------- the workloads


def make_workload(model, name, args, batch, device):
    """(fn, inputs, before_call): the compiled-to-be function, its inputs, what runs before each call."""
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(2000 + batch)
    if name == "greedy":
        ids = torch.randint(0, vocab, (batch, 1), generator=g).to(device)

        def greedy(ids):
            # argmax before the position is picked: a select between the gather and the argmax is
            # not a step the elimination walks through (docs/passes.md, "Gather elimination")
            return model(input_ids=ids, use_cache=False, logits_to_keep=1).logits.argmax(dim=-1)[:, -1]

        return greedy, (ids,), None
    seq = args.seq if name == "logprobs" else args.train_seq
    ids = torch.randint(0, vocab, (1, seq), generator=g).to(device)
    if name == "logprobs":
        labels = torch.roll(ids, -1, dims=1).unsqueeze(-1)

        def logprobs(ids, labels):
            logits = model(input_ids=ids, use_cache=False).logits
            return torch.log_softmax(logits.float(), -1).gather(-1, labels).squeeze(-1)

        return logprobs, (ids, labels), None

    def train_loss(ids):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss  # HF shifts the labels itself
        loss.backward()
        return loss.detach()

    def zero_grad():
        model.zero_grad(set_to_none=True)

    return train_loss, (ids,), zero_grad


def call(fn, inputs, before):
    if before is not None:
        before()
    return fn(*inputs)


def disagreement(name, ref, got):
    """None if ``got`` agrees with ``off``'s ``ref``, else what differs."""
    if name == "greedy":
        bad = (ref != got).sum().item()
        return None if bad == 0 else f"{bad} of {ref.numel()} tokens differ"
    scale = ref.float().abs().max().item() or 1.0
    rel = (ref.float() - got.float()).abs().max().item() / scale
    return None if rel <= REL_TOL else f"relative difference {rel:.2e} > {REL_TOL:g}"


# --------------------------------------------------------------------------- one piece


def prepare(model, name, args, batch, device, variant):
    """Compile and warm up one variant inside its own tpfuse installation; its facts and result."""
    fn, inputs, before = make_workload(model, name, args, batch, device)
    compiled = cb.compile_fn(fn, "default")
    tpfuse.report()  # drop earlier graphs' records
    config = VARIANTS[variant]
    with (tpfuse.enabled(**config) if config is not None else _off()):
        result, compile_s = cb.wall(device, lambda: call(compiled, inputs, before))
        call(compiled, inputs, before)  # a second call: every graph compiled before the timed rounds
        rep = tpfuse.report()
    return {"fn": compiled, "inputs": inputs, "before": before, "result": result.detach().clone(),
            "compile_s": compile_s, "graphs_after_warmup": cb.compiled_graph_count(),
            "rewritten": rep.rewritten if hasattr(rep, "rewritten") else sum(g.rewritten for g in rep.graphs),
            "eliminated": len(rep.eliminations), "report": str(rep),
            "kept_because": [n.reason for n in rep.near_misses if n.pattern == "gather_elimination"]}


class _off:
    def __enter__(self):
        tpfuse.disable()

    def __exit__(self, *exc):
        return False


def time_rounds(prepared, args, device, workload):
    """Per variant: ms per call of every round (slowest rank), and peak MB per call for train_loss."""
    names = list(prepared)
    ms = {v: [] for v in names}
    peak = {v: [] for v in names}
    watch = cb.Stopwatch(device)
    for r in range(args.rounds):
        for v in cb.order_for_round(names, r):
            p = prepared[v]
            cb.sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sample = []
            with watch(sample):
                for _ in range(args.calls):
                    call(p["fn"], p["inputs"], p["before"])
            ms[v].append(sample[0] / args.calls)
            if device.type == "cuda" and workload == "train_loss":
                peak[v].append(torch.cuda.max_memory_allocated(device) / 2**20)
    out = {}
    for v in names:
        out[v] = {"ms": cb.slowest(ms[v], device),
                  "peak_mb": cb.slowest(peak[v], device) if peak[v] else []}
    return out


def median_ratio_ci(num, den, resamples=2000, seed=0):
    """Median of the per-round ratios and its 95% percentile-bootstrap interval."""
    ratios = [a / b for a, b in zip(num, den)]
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples))
    return statistics.median(ratios), meds[int(0.025 * resamples)], meds[int(0.975 * resamples) - 1]


def run_piece(model, name, args, batch, device, log):
    """Compile the three variants, check they agree with off, time them in paired rounds."""
    torch._dynamo.reset()
    prepared, rows = {}, {}
    for v in VARIANTS:
        try:
            prepared[v] = prepare(model, name, args, batch, device, v)
        except Exception as err:  # a variant that fails is a row that says so, not a lost run
            log(f"{name} B={batch} {v}: FAILED to compile/run: {err!r}")
            traceback.print_exc()
            rows[v] = {"error": repr(err)}
    if "off" not in prepared:
        return {"workload": name, "B": batch, "rows": rows}
    ref = prepared["off"]["result"]
    for v, p in prepared.items():
        rows[v] = {k: p[k] for k in ("compile_s", "rewritten", "eliminated", "kept_because")}
        rows[v]["disagreement"] = disagreement(name, ref, p["result"]) if v != "off" else None
        if name != "greedy":
            rows[v]["value"] = p["result"].float().sum().item() if name == "logprobs" else p["result"].item()
        log(f"--- {name} B={batch} {v}: compile {p['compile_s']:.1f} s, {p['rewritten']} rewritten, "
            f"{p['eliminated']} eliminated", p["report"])
    graphs = cb.compiled_graph_count()
    timed = time_rounds(prepared, args, device, name)
    recompiles = cb.compiled_graph_count() - graphs
    for v, t in timed.items():
        rows[v].update(t)
        rows[v]["recompiles_timed"] = recompiles
        rows[v]["ratio"] = median_ratio_ci(t["ms"], timed["off"]["ms"]) if v != "off" else (1.0, 1.0, 1.0)
    return {"workload": name, "B": batch, "rows": rows}


# --------------------------------------------------------------------------- output


def table(pieces):
    lines = [f"{'workload':<11} {'B':>3} {'variant':<5} {'ms/call':>9} {'ratio to off [95% CI]':>24} "
             f"{'peak MB':>9} {'rewr':>4} {'elim':>4}  agrees"]
    for piece in pieces:
        for v, row in piece["rows"].items():
            head = f"{piece['workload']:<11} {piece['B']:>3} {v:<5}"
            if "error" in row:
                lines.append(f"{head} ERROR {row['error'][:80]}")
                continue
            r, lo, hi = row["ratio"]
            peak = f"{statistics.median(row['peak_mb']):.0f}" if row.get("peak_mb") else "-"
            agrees = "ref" if v == "off" else ("yes" if row["disagreement"] is None else "NO")
            lines.append(f"{head} {statistics.median(row['ms']):>9.3f} {r:>8.3f} [{lo:.3f}-{hi:.3f}]     "
                         f"{peak:>9} {row['rewritten']:>4} {row['eliminated']:>4}  {agrees}")
    return lines


def failures(pieces):
    out = []
    for piece in pieces:
        for v, row in piece["rows"].items():
            where = f"{piece['workload']} B={piece['B']} {v}"
            if "error" in row:
                out.append(f"{where}: {row['error']}")
                continue
            if row.get("disagreement"):
                out.append(f"{where}: differs from off: {row['disagreement']}")
            if v == "elim" and row["eliminated"] == 0 and piece["workload"] in MUST_ELIMINATE:
                out.append(f"{where}: no gather eliminated ({'; '.join(row['kept_because']) or 'no reason recorded'})")
            if v == "keep" and row["eliminated"]:
                out.append(f"{where}: eliminated {row['eliminated']} gather(s) with eliminate_gathers=False")
            if v == "off" and row["rewritten"]:
                out.append(f"{where}: tpfuse rewrote {row['rewritten']} gather(s): variants not isolated")
            if row.get("recompiles_timed"):
                out.append(f"{where}: {row['recompiles_timed']} recompile(s) during the timed rounds")
    return out


def main(argv=None):
    args = parse_args(argv)
    import transformers  # noqa: F401  (before the versions line, which names the version in use)

    rank, W, device, info, name, log, t_start = cb.start(args, "e2e_elimination")
    cfg, _ = hf.llama_config(args)
    log(f"model: LlamaForCausalLM ({'tiny' if args.tiny else f'hidden {args.hidden}'}: hidden {cfg.hidden_size}, "
        f"vocab {cfg.vocab_size}), {args.layers} layers, random weights (seed {args.seed}), bf16; "
        f"statistics: median of per-round ratios, 95% percentile-bootstrap interval over {args.rounds} rounds")
    path, delete = hf.checkpoint_dir(args, rank)
    hf.build_and_save(cfg, path, args, rank, device, log)
    model, plan = hf.load_tp(path, log)
    log(*("sharded: " + s for s in hf.describe_sharding(model, W)))

    payload = {"benchmark": "e2e_elimination", **info, "args": vars(args), "pieces": [], "skipped": []}
    plan_pieces = [(w, b) for w in args.workloads for b in (args.batches if w == "greedy" else [1])]
    last_s = 0.0
    for workload, batch in plan_pieces:
        if cb.out_of_time(args, t_start, last_s, device):
            payload["skipped"].append(f"{workload} B={batch}")
            continue
        t0 = time.perf_counter()
        with torch.set_grad_enabled(workload == "train_loss"):
            payload["pieces"].append(run_piece(model, workload, args, batch, device, log))
        last_s = cb.slowest([time.perf_counter() - t0], device)[0]
        cb.write_json(args.out, name, payload, rank)

    fails = failures(payload["pieces"])
    payload.update(seconds=time.perf_counter() - t_start, failures=fails)
    cb.write_json(args.out, name, payload, rank)
    log("\n" + "=" * 100, cb.versions_line(info), *table(payload["pieces"]))
    if payload["skipped"]:
        log(f"SKIPPED (--time-limit-s {args.time_limit_s:.0f}): {', '.join(payload['skipped'])}")
    for piece in payload["pieces"]:
        row = piece["rows"].get("elim", {})
        if row.get("eliminated") == 0 and piece["workload"] not in MUST_ELIMINATE:
            log(f"NOTE: {piece['workload']} B={piece['B']} elim kept the gather: {'; '.join(row['kept_because'])}")
    for f in fails:
        log("FAILED: " + f)
    log(f"total {payload['seconds']:.0f} s" + (f"; results in {args.out}" if args.out else ""))
    if delete and rank == 0:
        shutil.rmtree(path, ignore_errors=True)
    cb.finish(rank, device, 1 if fails else 0)


if __name__ == "__main__":
    main()
