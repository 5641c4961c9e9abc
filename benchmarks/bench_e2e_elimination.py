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
- ``train_loss``: a training step: HF's own forward of one sequence of ``--train-seq`` (1024)
  tokens with ``labels=`` (``ForCausalLMLoss``), compiled, returning what it returns (the loss
  **and the logits**), then ``loss.backward()``.  The logits are returned, so the gather stays;
  the loss is split onto the slabs (docs/passes.md, "Training");
- ``train_loss_only``: the same step whose compiled function returns only the loss: the gather
  goes, forward and backward;
- ``eagle_draft``: an EAGLE3-style draft head on ``--draft-tokens`` (1, 8; the table's ``B``)
  hidden states: bench_eagle_draft.py's ``DraftStep`` (imported: its final norm, its
  column-parallel draft LM head over the draft vocab and its funcol gather), ``softmax`` in
  float32 and ``topk(k=8)``; returns the probabilities and the draft ids.

A training step's result is the loss and the norm of this rank's LM-head gradient (the
gradient's meaning is checked too); peak memory per rank (``torch.cuda.max_memory_allocated``
over a call, the largest rank's) is reported for both.

**Variants**: ``off`` (plain ``torch.compile``), ``keep`` (``tpfuse.enable(eliminate_gathers=False)``:
the gather rewritten but kept), ``elim`` (``tpfuse.enable()``).  Each is compiled and warmed up
inside its own ``tpfuse.enabled(...)`` with a backend of its own (compiled_tp_bench.py says why),
and its ``tpfuse.report()`` kept: gathers rewritten and eliminated.  Before timing, every variant's
result on the same inputs is compared with ``off``'s: tokens equal; log-probs within 1e-3 of
``off``'s largest magnitude; the loss and the gradient norm each within 1e-3 of ``off``'s; draft
probabilities within 1e-3 and ids equal wherever ``off``'s probability cannot be tied in its row
(tied: met twice in its top 8, or its 8th value, whose equals past the 8th topk leaves out).  A
mismatch, an ``elim`` that eliminated nothing where it must (greedy, logprobs, train_loss_only)
or a recompile during the timed rounds is a FAILED line and exit status 1; for train_loss and
eagle_draft the log says what elim did and why.

**Statistics**: ``--rounds`` (5) paired rounds, each running every variant once in an order
rotated by one per round; a sample is ``--calls`` (5) calls between CUDA events (``perf_counter``
on the CPU), the slowest rank's, per call.  Reported: the median ms per call, and the ratio to
``off``: the median of the per-round ratios with a 95% percentile-bootstrap interval of that median
(2000 resamples of the rounds, fixed seed; with 5 rounds it is coarse: grow ``--rounds``).

**Time**: 21 compiles at the defaults (a training step's compiles its backward too);
``--time-limit-s`` (140) starts no piece (workload x batch) that would end past it: name the
workloads to run (``--workloads``).
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

WORKLOADS = ("greedy", "logprobs", "train_loss", "train_loss_only", "eagle_draft")
TRAINING = ("train_loss", "train_loss_only")
#: variant -> tpfuse.enable's options (None: tpfuse not installed)
VARIANTS = {"off": None, "keep": {"eliminate_gathers": False}, "elim": {}}
REL_TOL = 1e-3
TOPK = 8
#: Where the elim variant must eliminate.  Not train_loss: HF's forward returns the logits, so the
#: gather stays (its loss is split onto the slabs; docs/passes.md, "Training"); not eagle_draft, whose
#: softmax probabilities feed topk; there the log says what was done and why.
MUST_ELIMINATE = ("greedy", "logprobs", "train_loss_only")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=",".join(WORKLOADS))
    p.add_argument("--batches", default="1,32", help="greedy batch sizes (e.g. 1,8,32)")
    p.add_argument("--draft-tokens", default="1,8", help="eagle_draft: draft tokens per step (e.g. 1,8)")
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
    a.draft_tokens = cb.parse_list(a.draft_tokens, kind=int)
    a.seq = a.seq or (64 if a.tiny else 2048)
    a.train_seq = a.train_seq or (64 if a.tiny else 1024)
    a.modes = ["default"]  # cb.start reads it
    return a


# --------------------------------------------------------------------------- the workloads


class Workload:
    """What one piece runs: ``fn`` (compiled), its ``inputs``, ``before`` each call (or None), and
    ``finish``, which turns ``fn``'s output into the result kept (a training step's backward runs there)."""

    def __init__(self, fn, inputs, before=None, finish=None):
        self.fn, self.inputs, self.before = fn, inputs, before
        self.finish = finish or (lambda out: out)


def make_workload(model, name, args, batch, device):
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(2000 + batch)
    if name == "greedy":
        ids = torch.randint(0, vocab, (batch, 1), generator=g).to(device)

        def greedy(ids):
            # argmax before the position is picked: a select between the gather and the argmax is
            # not a step the elimination walks through (docs/passes.md, "Gather elimination")
            return model(input_ids=ids, use_cache=False, logits_to_keep=1).logits.argmax(dim=-1)[:, -1]

        return Workload(greedy, (ids,))
    if name == "eagle_draft":
        return eagle_workload(args, batch, device, g)
    seq = args.seq if name == "logprobs" else args.train_seq
    ids = torch.randint(0, vocab, (1, seq), generator=g).to(device)
    if name == "logprobs":
        labels = torch.roll(ids, -1, dims=1).unsqueeze(-1)

        def logprobs(ids, labels):
            logits = model(input_ids=ids, use_cache=False).logits
            return torch.log_softmax(logits.float(), -1).gather(-1, labels).squeeze(-1)

        return Workload(logprobs, (ids, labels))
    return training_workload(model, name, ids)


def training_workload(model, name, ids):
    """One training step: the compiled forward (HF shifts the labels itself), then the loss's backward."""

    def train_loss(ids):  # HF's own forward: it returns the logits with the loss
        out = model(input_ids=ids, labels=ids, use_cache=False)
        return out.loss, out.logits

    def train_loss_only(ids):
        return model(input_ids=ids, labels=ids, use_cache=False).loss

    def zero_grad():
        model.zero_grad(set_to_none=True)

    def backward(out):
        loss = out[0] if isinstance(out, tuple) else out
        loss.backward()
        grad = model.lm_head.weight.grad
        grad = grad.to_local() if hasattr(grad, "to_local") else grad
        return torch.stack([loss.detach().float(), grad.float().norm()])

    fn = train_loss if name == "train_loss" else train_loss_only
    return Workload(fn, (ids,), zero_grad, backward)


_DRAFTS = {}


def eagle_workload(args, tokens, device, g):
    """bench_eagle_draft.py's draft head (its weights, norm and gather) on ``tokens`` hidden states:
    float32 softmax over the draft vocabulary, then the top 8 probabilities and their ids."""
    import bench_eagle_draft as eagle

    draft = _DRAFTS.get(device.type)
    if draft is None:  # built once: the layer's other weights are not used here
        W, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
        shape = eagle.SHAPES["tiny" if args.tiny else "llama31_8b"]
        draft = _DRAFTS[device.type] = eagle.DraftStep(rank, W, shape, max(args.draft_tokens), device)
    hidden = torch.randn(tokens, draft.norm_final.shape[0], generator=g).to(torch.bfloat16).to(device)

    def eagle_draft(hidden):
        logits = draft.gather_hidden(draft.rms(hidden, draft.norm_final) @ draft.lm_head.t())
        return torch.topk(torch.softmax(logits.float(), dim=-1), TOPK, dim=-1)

    return Workload(eagle_draft, (hidden,), finish=lambda out: (out.values, out.indices))


def call(fn, work):
    if work.before is not None:
        work.before()
    return work.finish(fn(*work.inputs))


def disagreement(name, ref, got):
    """None if ``got`` agrees with ``off``'s ``ref``, else what differs."""
    if name == "greedy":
        bad = (ref != got).sum().item()
        return None if bad == 0 else f"{bad} of {ref.numel()} tokens differ"
    if name == "eagle_draft":
        return draft_disagreement(ref, got)
    if name in TRAINING:  # the loss and the gradient norm, each against its own size
        rel = ((ref.float() - got.float()).abs() / ref.float().abs().clamp_min(1e-30)).max().item()
        return None if rel <= REL_TOL else f"loss or gradient norm: relative difference {rel:.2e} > {REL_TOL:g}"
    return _relative(ref, got, "")


def _relative(ref, got, what):
    scale = ref.float().abs().max().item() or 1.0
    rel = (ref.float() - got.float()).abs().max().item() / scale
    return None if rel <= REL_TOL else f"{what}relative difference {rel:.2e} > {REL_TOL:g}"


def draft_disagreement(ref, got):
    """Probabilities within REL_TOL; ids equal wherever off's probability may not be tied in its row
    (``topk`` promises no order among equal values, nor which of them fill its last places)."""
    (ref_p, ref_ids), (got_p, got_ids) = ref, got
    bad = _relative(ref_p, got_p, "probabilities: ")
    if bad:
        return bad
    differ = ((ref_ids != got_ids) & ~possibly_tied(ref_p)).sum().item()
    return None if differ == 0 else f"{differ} draft ids differ where off's probability is not tied"


def possibly_tied(top_p):
    """Where a class's probability may equal another class's in the full row: a value met twice in
    the top k, or the k-th (smallest) value, whose equals past k ``topk`` leaves out unseen, so
    either variant may return any of them there."""
    in_top = (top_p.unsqueeze(-1) == top_p.unsqueeze(-2)).sum(-1) > 1
    return in_top | (top_p == top_p.min(dim=-1, keepdim=True).values)


def _detached(result):
    return tuple(_detached(r) for r in result) if isinstance(result, tuple) else result.detach().clone()


# --------------------------------------------------------------------------- one piece


def prepare(model, name, args, batch, device, variant):
    """Compile and warm up one variant inside its own tpfuse installation; its facts and result."""
    work = make_workload(model, name, args, batch, device)
    compiled = cb.compile_fn(work.fn, "default")
    tpfuse.report()  # drop earlier graphs' records
    config = VARIANTS[variant]
    with (tpfuse.enabled(**config) if config is not None else _off()):
        # the first call compiles the forward, and a training step's backward when it runs
        result, compile_s = cb.wall(device, lambda: call(compiled, work))
        call(compiled, work)  # a second call: every graph compiled before the timed rounds
        rep = tpfuse.report()
    return {"fn": compiled, "work": work, "result": _detached(result),
            "compile_s": compile_s, "graphs_after_warmup": cb.compiled_graph_count(),
            "rewritten": rep.rewritten if hasattr(rep, "rewritten") else sum(g.rewritten for g in rep.graphs),
            "eliminated": len(rep.eliminations), "report": str(rep),
            "kept_because": [n.reason for n in rep.near_misses if _says_why_kept(n)]}


def _says_why_kept(near_miss):
    """The near-misses that say why a gather stayed: the post-grad walk's, a matcher's ("gather kept:
    ..."), and the training loss's (split or kept, before autograd)."""
    return near_miss.pattern in ("gather_elimination", "cross_entropy_before_autograd") or \
        near_miss.reason.startswith("gather kept")


class _off:
    def __enter__(self):
        tpfuse.disable()

    def __exit__(self, *exc):
        return False


def time_rounds(prepared, args, device, workload):
    """Per variant: ms per call of every round (slowest rank), and peak MB per call for a training step."""
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
                    call(p["fn"], p["work"])
            ms[v].append(sample[0] / args.calls)
            if device.type == "cuda" and workload in TRAINING:
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
        if name == "logprobs":
            rows[v]["value"] = p["result"].float().sum().item()
        elif name in TRAINING:
            rows[v]["value"], rows[v]["grad_norm"] = p["result"].tolist()
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
    lines = [f"{'workload':<15} {'B':>3} {'variant':<5} {'ms/call':>9} {'ratio to off [95% CI]':>24} "
             f"{'peak MB':>9} {'rewr':>4} {'elim':>4}  agrees"]
    for piece in pieces:
        for v, row in piece["rows"].items():
            head = f"{piece['workload']:<15} {piece['B']:>3} {v:<5}"
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
    sizes = {"greedy": args.batches, "eagle_draft": args.draft_tokens}
    plan_pieces = [(w, b) for w in args.workloads for b in sizes.get(w, [1])]
    last_s = 0.0
    for workload, batch in plan_pieces:
        if cb.out_of_time(args, t_start, last_s, device):
            payload["skipped"].append(f"{workload} B={batch}")
            continue
        t0 = time.perf_counter()
        with torch.set_grad_enabled(workload in TRAINING):
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
            why = "; ".join(row["kept_because"]) or "no consumer a matcher reduces"
            log(f"NOTE: {piece['workload']} B={piece['B']} elim kept the gather: {why}")
    for f in fails:
        log("FAILED: " + f)
    log(f"total {payload['seconds']:.0f} s" + (f"; results in {args.out}" if args.out else ""))
    if delete and rank == 0:
        shutil.rmtree(path, ignore_errors=True)
    cb.finish(rank, device, 1 if fails else 0)


if __name__ == "__main__":
    main()
