"""Hidden-axis all-gather: NCCL against the tpfuse push kernels, eager and CUDA-graph replay.

    PYTHONPATH=. torchrun --nproc-per-node 4 benchmarks/bench_gather.py --out /tmp/bench

Rows: T in {1, 8, 32, 128, 512} x local width in {1024, 1792, 4096, 32064}
(bf16, every rank the same width).  Columns, each eager and graph-replayed:
- ``nccl_gather``: ``all_gather_into_tensor`` into ``[W*T, w]`` only (not the result's layout);
- ``nccl_rearrange``: the same plus the rearrange into ``[T, W*w]`` (tpfuse's NCCL backend);
- ``tpfuse_both``: the push kernel with entry and exit barriers (the op's default);
- ``tpfuse_elided``: entry barrier elided, ping-pong slots (what a proven pass may emit);
- ``tpfuse_flag``: the flag protocol (no barriers; a flag in every 8 bytes), for slabs up
  to the flag buffers' size (``FLAG_MAX_SLAB_BYTES``), blank above;
- ``nccl_symmetric``: the ``nccl_symmetric`` backend (NCCL's all-gather between buffers registered as
  NCCL symmetric windows, then the rearrange), forced; blank on every row, with the backend's reason
  printed, where the host cannot register windows (NCCL before 2.27, a torch without ``symm``).
The floor for small messages is an empty kernel in a graph plus one link traversal
(``--diagnose`` times the empty kernel).  The last lines give, per width, the
largest slab at which the flag protocol beat the barrier push in both modes: the
crossover ``compile_ops/flag/evidence.py`` records per card and W; and the largest
output up to which nccl_symmetric was no slower than nccl_rearrange (the rule of
``crossover_rule.py``, the tune's ``nccl_symmetric`` crossover).
Times are per call, median over repeats, the slowest rank's.  Egress is the
bytes each GPU sends, ``T * w * 2 * (W - 1)``, over the time.  Prints the
card, torch, NCCL and Triton versions first and a short table last; writes
JSON and a PNG plot (latency against T) to ``--out`` on rank 0.
"""

import os

# Never NVLink multicast on the shared hosts (docs/safety.md, "Multicast"); set before torch loads NCCL.
os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
os.environ["NVSHMEM_DISABLE_NVLS"] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from tpfuse import config  # noqa: E402
from tpfuse.compile_ops import collective, crossover_rule, nccl_symmetric  # noqa: E402
from tpfuse.compile_ops.backend import GatherCall  # noqa: E402
from tpfuse.compile_ops.barrier import P2P  # noqa: E402
from tpfuse.compile_ops.flag import FLAG  # noqa: E402
from tpfuse.compile_ops.groups import resolve_group  # noqa: E402
from tpfuse.compile_ops.nccl_symmetric import NCCL_SYMMETRIC  # noqa: E402

import compiled_tp_bench as cb  # noqa: E402  (this folder: the script's own)

METHODS = ("nccl_gather", "nccl_rearrange", "tpfuse_both", "tpfuse_elided", "tpfuse_flag", "nccl_symmetric")
#: method -> why it was not run on this host (the same on every rank)
SKIPPED = {}


def make_methods(group, x, widths):
    W = group.world_size
    T, w = x.shape
    flat = torch.empty(W * T * w, dtype=x.dtype, device=x.device)
    slot = [0]

    def nccl_gather():
        dist.all_gather_into_tensor(flat, x, group=group.pg)
        return flat

    def nccl_rearrange():
        return collective.gather_hidden(x, widths, group)

    def tpfuse_both():
        return P2P.gather(x, widths, group, -1, False)

    def tpfuse_elided():
        # Alternating slots with an even number of calls per timed unit: the
        # last reader of a slot finished before the peers passed the exit
        # barrier of the call in between (see tests/gpu, CUDA-graph test).
        slot[0] ^= 1
        return P2P.gather(x, widths, group, slot[0], True)

    def tpfuse_flag():
        return FLAG.gather(x, widths, group)

    from tpfuse.compile_ops import workspace as workspaces
    from tpfuse.compile_ops.flag.buffers import ensure_buffers
    from tpfuse.kernels.flag import MAX_SLAB_BYTES as FLAG_MAX_SLAB_BYTES

    ws = workspaces.workspace(group, torch.cuda.current_device())  # collective: every rank, same row
    ensure_buffers(ws)
    flag = tpfuse_flag if T * max(widths) * x.element_size() <= FLAG_MAX_SLAB_BYTES else None
    return {"nccl_gather": nccl_gather, "nccl_rearrange": nccl_rearrange, "tpfuse_both": tpfuse_both,
            "tpfuse_elided": tpfuse_elided, "tpfuse_flag": flag,
            "nccl_symmetric": nccl_symmetric_method(group, x, widths)}


def nccl_symmetric_method(group, x, widths):
    """The nccl_symmetric backend's launcher for ``x``, forced; None where the host cannot register NCCL windows
    (its agreed reason goes to SKIPPED).  Collective: the first row registers the windows, a larger one grows them."""
    call = GatherCall("cuda", x.dtype, x.shape[0], tuple(widths), group, NCCL_SYMMETRIC.name)
    why = NCCL_SYMMETRIC.refusal(call)
    if why:
        SKIPPED[NCCL_SYMMETRIC.name] = why
        return None
    launch = NCCL_SYMMETRIC.prepare(x, widths, group)
    return lambda: launch(x)


def torchrun_group():
    """Under torchrun: this rank's GPU, the NCCL default group, its tpfuse Group, the card's name."""
    rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", rank))
    return rank, resolve_group(dist.group.WORLD.group_name), torch.cuda.get_device_name()


def quiesce():
    torch.cuda.synchronize()
    dist.barrier()
    torch.cuda.synchronize()


def slowest(value):
    t = torch.tensor([value], dtype=torch.float64, device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def time_eager(fn, calls, repeats):
    for _ in range(4):
        fn()
    quiesce()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / calls)
    quiesce()
    return slowest(statistics.median(samples))


def time_graph(fn, calls, repeats):
    for _ in range(4):
        fn()
    quiesce()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    for _ in range(3):
        graph.replay()
    quiesce()
    samples = cb.replay_us(graph, calls, repeats)
    quiesce()
    del graph
    return slowest(statistics.median(samples))


def host_cost(group, rank):
    """Host time of one eager call (µs), against a torch elementwise op on the same machine."""
    W = group.world_size
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    widths = [4096] * W
    name = dist.group.WORLD.group_name

    def per_call(fn, n=2000):
        for _ in range(50):
            fn()
        quiesce()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        t1 = time.perf_counter()
        quiesce()
        return slowest((t1 - t0) / n * 1e6)

    os.environ["TPFUSE_BACKEND"] = "p2p"
    out = {
        "torch_add": per_call(lambda: torch.add(x, 1)),
        "op_p2p": per_call(lambda: torch.ops.tpfuse.all_gather_hidden(x, widths, name)),
        "push_direct": per_call(lambda: P2P.gather(x, widths, group, -1, False)),
    }
    from tpfuse.compile_ops.dispatch import choose_backend

    out["dispatch_only"] = per_call(lambda: choose_backend("cuda", x.dtype, widths, group))
    os.environ["TPFUSE_BACKEND"] = "flag"
    out["op_flag"] = per_call(lambda: torch.ops.tpfuse.all_gather_hidden(x, widths, name))
    out["flag_direct"] = per_call(lambda: FLAG.gather(x, widths, group))
    os.environ["TPFUSE_BACKEND"] = "nccl"
    out["op_nccl"] = per_call(lambda: torch.ops.tpfuse.all_gather_hidden(x, widths, name))
    del os.environ["TPFUSE_BACKEND"]
    return out


def no_sync(x, widths, group):
    """The barrier push without its exit barrier (racy: the floor diagnostics' timing only)."""
    from tpfuse.compile_ops import workspace as workspaces
    from tpfuse.compile_ops.barrier import launcher

    ws = workspaces.usable_workspace(group, x.device.index)
    launch = launcher.launcher(ws, x, widths, slot=0, skip_entry_sync=True, copy_out=False, exit_sync=False)
    return lambda: launch(x)


def diagnose(group, rows):
    """Graph-replay time of the push kernel with parts removed, to explain the gap to the floor."""
    W = group.world_size
    lines = []
    for row in rows.split(","):
        T, w = map(int, row.split("x"))
        x = torch.randn(T, w, device="cuda", dtype=torch.bfloat16)
        widths = [w] * W
        methods = make_methods(group, x, widths)
        flip = [0]

        def alternate():
            flip[0] ^= 1
            return flip[0]

        variants = {
            "empty kernel": lambda: torch.cuda._sleep(0),
            "nccl+rearrange": methods["nccl_rearrange"],
            "both": methods["tpfuse_both"],
            "elided": methods["tpfuse_elided"],
            "zero-copy both": lambda: P2P.gather(x, widths, group, 0, False, zero_copy=True),
            "zero-copy elided": lambda: P2P.gather(x, widths, group, alternate(), True, zero_copy=True),
            "no-sync": no_sync(x, widths, group),
            "flag": methods["tpfuse_flag"] or (lambda: None),
            "nccl_symmetric": methods["nccl_symmetric"] or (lambda: None),
        }
        parts = [f"{name} {time_graph(fn, calls=20, repeats=20):.1f}" for name, fn in variants.items()]
        lines.append(f"T={T} w={w}: " + ", ".join(parts))
    return lines


def sweep_configs(group, configs, config_rows):
    """Time the push kernel under other tile/warp/chunk/grid settings (same process, same machine)."""
    from tpfuse.compile_ops import workspace as workspaces
    import torch.distributed._symmetric_memory as symm_mem

    W = group.world_size
    sms = torch.cuda.get_device_properties().multi_processor_count
    lines = []
    for spec in configs.split(","):
        block_v, warps, chunk, per_sm = map(int, spec.split(":"))
        # read when plans are built (tpfuse.config); the plans are rebuilt below
        os.environ.update(TPFUSE_PUSH_BLOCK_V=str(block_v), TPFUSE_PUSH_NUM_WARPS=str(warps),
                          TPFUSE_PUSH_CHUNK_TILES=str(chunk))
        for ws in workspaces._workspaces.values():
            ws.plans.clear()
            ws.facts.max_blocks = min(sms * per_sm, symm_mem.get_signal_pad_size() // (W * 4))
        parts = []
        for row in config_rows.split(","):
            T, w = map(int, row.split("x"))
            x = torch.randn(T, w, device="cuda", dtype=torch.bfloat16)
            methods = make_methods(group, x, [w] * W)
            big = T * w * W * 2 > (64 << 20)
            both = time_graph(methods["tpfuse_both"], calls=4 if big else 20, repeats=10 if big else 20)
            elided = time_graph(methods["tpfuse_elided"], calls=4 if big else 20, repeats=10 if big else 20)
            gbps = T * w * 2 * (W - 1) / (both * 1e3)
            parts.append(f"{T}x{w}: {both:.1f}/{elided:.1f} ({gbps:.0f} GB/s)")
        lines.append(f"block_v={block_v} warps={warps} chunk={chunk} blocks/SM={per_sm}: " + "; ".join(parts))
    return lines


#: eager calls are host-bound (~20 us of Python and launch for either kernel): a flag row counts
#: as slower there only beyond this share, the rows' spread between repeats
EAGER_NOISE = 0.05


def crossover(rows):
    """Per width: the largest slab (bytes) up to which the flag protocol was never slower than the barrier push
    (graph replay strictly, eager within EAGER_NOISE)."""
    lines = []
    for w in sorted({r["width"] for r in rows}):
        best = 0
        for r in sorted((r for r in rows if r["width"] == w), key=lambda r: r["T"]):
            f_g, f_e = r["graph"]["tpfuse_flag"], r["eager"]["tpfuse_flag"]
            if not (f_g <= r["graph"]["tpfuse_both"] and f_e <= r["eager"]["tpfuse_both"] * (1 + EAGER_NOISE)):
                break  # NaN (not served) or slower: the crossover is below this row
            best = r["T"] * w * 2
        lines.append(f"crossover width {w}: flag never slower than the barrier push up to a {best}-byte slab")
    return lines


def symmetric_crossover(rows, W):
    """The tune's nccl_symmetric crossover on these rows: the largest output up to which nccl_symmetric was no
    slower than nccl_rearrange in graph replay and eager (crossover_rule.py; 0 where it did not run)."""
    judged = crossover_rule.judge_all(rows, "nccl_symmetric", "nccl_rearrange",
                                      lambda r: crossover_rule.slab_bytes(r) * W)
    best = crossover_rule.crossover(judged)
    return f"crossover: nccl_symmetric never slower than nccl_rearrange up to a {best}-byte output"


def plot(rows, W, card, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths = sorted({r["width"] for r in rows})
    fig, axes = plt.subplots(1, len(widths), figsize=(4.2 * len(widths), 3.8), squeeze=False)
    for ax, w in zip(axes[0], widths):
        sel = sorted((r for r in rows if r["width"] == w), key=lambda r: r["T"])
        ts = [r["T"] for r in sel]
        for m, style in zip(METHODS, ("C0", "C1", "C2", "C3", "C4", "C5")):
            ax.plot(ts, [r["graph"][m] for r in sel], "-o", color=style, label=f"{m} (graph)", ms=3)
            ax.plot(ts, [r["eager"][m] for r in sel], ":", color=style, label=f"{m} (eager)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"W={W}, local width {w}, bf16")
        ax.set_xlabel("tokens T")
        ax.set_ylabel("µs per call")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=6)
    fig.suptitle(f"hidden-axis all-gather, {card}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", default="1,8,32,128,512")
    parser.add_argument("--widths", default="1024,1792,4096,32064")
    parser.add_argument("--out", default=None)
    parser.add_argument("--tag", default="")
    parser.add_argument("--configs", default="",
                        help="extra kernel configs block_v:warps:chunk:blocks_per_sm,... timed on --config-rows")
    parser.add_argument("--config-rows", default="1x4096,32x4096,128x32064,512x32064")
    parser.add_argument("--skip-sweep", action="store_true")
    parser.add_argument("--diagnose", default="",
                        help="rows TxW (e.g. 1x4096,32x4096) split into launch / data / barrier / copy-out costs")
    args = parser.parse_args()

    rank, group, card = torchrun_group()
    W = group.world_size
    nccl = ".".join(map(str, torch.cuda.nccl.version()))
    import triton

    if rank == 0:
        print(f"card: {W} x {card} | torch {torch.__version__} | NCCL {nccl} | triton {triton.__version__} "
              f"| block_v {config.get('TPFUSE_PUSH_BLOCK_V')} warps {config.get('TPFUSE_PUSH_NUM_WARPS')} "
              f"chunk {config.get('TPFUSE_PUSH_CHUNK_TILES')} {args.tag}", flush=True)

    defaults = {"block_v": config.get("TPFUSE_PUSH_BLOCK_V"), "num_warps": config.get("TPFUSE_PUSH_NUM_WARPS"),
                "chunk": config.get("TPFUSE_PUSH_CHUNK_TILES")}
    rows = []
    for w in map(int, args.widths.split(",")) if not args.skip_sweep else ():
        for T in map(int, args.tokens.split(",")):
            x = torch.randn(T, w, device="cuda", dtype=torch.bfloat16)
            methods = make_methods(group, x, [w] * W)
            big = T * w * W * 2 > (64 << 20)
            row = {"T": T, "width": w, "eager": {}, "graph": {}}
            for name in METHODS:
                fn = methods[name]
                if fn is None:  # beyond what the method serves (same on every rank)
                    row["eager"][name] = row["graph"][name] = float("nan")
                    continue
                row["eager"][name] = time_eager(fn, calls=10 if big else 50, repeats=5)
                row["graph"][name] = time_graph(fn, calls=4 if big else 20, repeats=10 if big else 20)
            egress = T * w * 2 * (W - 1)
            row["egress_GBps"] = {m: egress / (row["graph"][m] * 1e3) for m in METHODS}
            rows.append(row)
            if rank == 0:
                g = row["graph"]
                print(f"T={T:4d} w={w:5d} graph µs: " + " ".join(f"{m}={g[m]:8.1f}" for m in METHODS), flush=True)

    diagnosis = diagnose(group, args.diagnose) if args.diagnose else []
    if rank == 0 and diagnosis:
        print("\nwhere the time goes (graph µs; zero-copy = result left in the symmetric slot; "
              "no-sync = no barrier at all, racy, floor only):")
        for line in diagnosis:
            print("  " + line)
    costs = host_cost(group, rank)
    tuning = sweep_configs(group, args.configs, args.config_rows) if args.configs else []
    if rank == 0 and tuning:
        print("\nkernel configs (graph µs, tpfuse both / elided; slowest rank):")
        for line in tuning:
            print("  " + line)
    if rank == 0:
        print()
        print("host cost per eager call (µs, slowest rank): " + ", ".join(f"{k} {v:.1f}" for k, v in costs.items()))
        print(f"  op_p2p / torch_add = {costs['op_p2p'] / costs['torch_add']:.2f}, "
              f"op_flag / torch_add = {costs['op_flag'] / costs['torch_add']:.2f} (target <= 1.5)")
        print()
        print(f"W={W} {card}; µs per call (slowest rank, median); ratio = nccl_rearrange / tpfuse")
        print(f"{'T':>4} {'width':>6} | {'graph: nccl':>11} {'nccl+rearr':>10} {'tp both':>8} {'tp elided':>9} "
              f"{'tp flag':>8} {'nccl symm':>9} {'ratio both':>10} {'ratio flag':>10} {'GB/s':>6} | "
              f"{'eager: nccl+rearr':>17} {'tp both':>8} {'tp elided':>9} {'tp flag':>8} {'nccl symm':>9}")
        for r in rows:
            g, e = r["graph"], r["eager"]
            print(f"{r['T']:>4} {r['width']:>6} | {g['nccl_gather']:11.1f} {g['nccl_rearrange']:10.1f} "
                  f"{g['tpfuse_both']:8.1f} {g['tpfuse_elided']:9.1f} {g['tpfuse_flag']:8.1f} "
                  f"{g['nccl_symmetric']:9.1f} "
                  f"{g['nccl_rearrange'] / g['tpfuse_both']:10.2f} {g['nccl_rearrange'] / g['tpfuse_flag']:10.2f} "
                  f"{r['egress_GBps']['tpfuse_both']:6.0f} | "
                  f"{e['nccl_rearrange']:17.1f} {e['tpfuse_both']:8.1f} {e['tpfuse_elided']:9.1f} "
                  f"{e['tpfuse_flag']:8.1f} {e['nccl_symmetric']:9.1f}")
        print()
        for line in crossover(rows):
            print(line)
        print(symmetric_crossover(rows, W))
        for method, why in SKIPPED.items():
            print(f"{method}: not run on this host ({why})")
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            meta = {"tuning": tuning, "diagnosis": diagnosis, "W": W, "card": card, "torch": torch.__version__,
                    "nccl": nccl, "triton": triton.__version__, **defaults, "tag": args.tag, "host_cost_us": costs,
                    "not_run": dict(SKIPPED)}
            stem = f"bench_w{W}{('_' + args.tag) if args.tag else ''}"
            with open(os.path.join(args.out, stem + ".json"), "w") as f:
                json.dump({"meta": meta, "rows": rows}, f, indent=1)
            try:
                plot(rows, W, card, os.path.join(args.out, stem + ".png"))
            except Exception as err:  # the numbers matter more than the picture
                print(f"plot failed: {err}")
    nccl_symmetric.release(group.name)  # collective: its windows are deregistered before the group goes
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
