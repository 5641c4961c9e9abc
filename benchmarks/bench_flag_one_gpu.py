"""Micro-benchmark, one GPU: the flag kernel with W ranks emulated by W concurrent streams.

    PYTHONPATH=. python benchmarks/bench_flag_one_gpu.py

No NVLink is involved: the "peers" are buffers in the same GPU's memory, so
this measures what the protocol costs besides the link -- launch, packing,
local polling and copy-out -- against the same fork/join of W empty kernels
in the same CUDA graph, and against the barrier push (the op's kernel with entry and
exit barriers, its own slots and signal pads) emulated the same way.  The real
latency (with the link) comes from
benchmarks/bench_gather.py on several GPUs.
"""

import os
import statistics
import sys

for _k, _v in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ[_k] = _v

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "gpu"))
from flag_one_gpu import OneGpuGroup, inputs  # noqa: E402

import compiled_tp_bench as cb  # noqa: E402  (this folder: the script's own)


def time_graph(record, calls=20, repeats=30):
    samples = cb.graph_us(record, calls, repeats)
    return statistics.median(samples), min(samples), max(samples)


def fork_join(group, work):
    main = torch.cuda.current_stream()
    for r in range(group.W):
        group.streams[r].wait_stream(main)
        with torch.cuda.stream(group.streams[r]):
            work(r)
    for r in range(group.W):
        main.wait_stream(group.streams[r])


def main():
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", default="", help="kernel configs block_u:warps,... (default: the op's)")
    args = parser.parse_args()
    from tpfuse import config

    configs = [tuple(map(int, c.split(":"))) for c in args.configs.split(",")] if args.configs else [
        (config.get("TPFUSE_FLAG_BLOCK_U"), config.get("TPFUSE_FLAG_NUM_WARPS"))]
    card = torch.cuda.get_device_name()
    import triton

    print(f"micro-benchmark, one GPU, emulated ranks | {card} | torch {torch.__version__} | triton {triton.__version__}")
    for block_u, warps in configs:
        # read when each group's plans are built (tpfuse.config)
        os.environ["TPFUSE_FLAG_BLOCK_U"], os.environ["TPFUSE_FLAG_NUM_WARPS"] = str(block_u), str(warps)
        print(f"\nBLOCK_U {block_u}, {warps} warps")
        table()


def table():
    print(f"{'W':>2} {'T':>4} {'width':>6} | {'empty fork/join':>22} {'flag':>22} {'barrier push':>22} "
          f"{'flag - empty':>12} {'barrier - empty':>15}  (µs per call, graph replay, median [min-max])")
    for W in (2, 4):
        for width in (1024, 4096):
            group = OneGpuGroup([width] * W, torch.bfloat16).add_barrier_push()
            for T in (1, 8, 32):
                xs = inputs(T, T, group.widths, torch.bfloat16)
                outs = [torch.empty(T, width * W, dtype=torch.bfloat16, device="cuda") for _ in range(W)]
                empty = time_graph(lambda: fork_join(group, lambda r: torch.cuda._sleep(0)))
                flag = time_graph(lambda: fork_join(group, lambda r: group.launch(r, xs[r], outs[r])))
                barrier = time_graph(lambda: fork_join(group, lambda r: group.launch_barrier_push(r, xs[r], outs[r])))
                assert group.failure_codes() == [0] * W

                def cell(t):
                    return f"{t[0]:6.2f} [{t[1]:.2f}-{t[2]:.2f}]"

                print(f"{W:>2} {T:>4} {width:>6} | {cell(empty):>22} {cell(flag):>22} {cell(barrier):>22} "
                      f"{flag[0] - empty[0]:12.2f} {barrier[0] - empty[0]:15.2f}", flush=True)


if __name__ == "__main__":
    main()
