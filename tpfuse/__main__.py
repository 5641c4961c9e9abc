"""python -m tpfuse: command-line entry points (demo, explain, bench)."""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tpfuse", description="tpfuse command line")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="run tpfuse on spawned ranks and check the results")
    p_demo.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p_demo.add_argument("--nproc", type=int, default=2, help="number of ranks (default 2)")
    p_demo.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the ranks")
    p_explain = sub.add_parser(
        "explain", help="compile MODULE:FUNCTION with tpfuse on spawned ranks; print the report, dump graphs"
    )
    p_explain.add_argument("entry", metavar="MODULE:FUNCTION", help="e.g. mypkg.model:step or model.py:step")
    p_explain.add_argument("--nproc", type=int, default=2, help="number of ranks (default 2)")
    p_explain.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p_explain.add_argument("--dump-dir", default="tpfuse_dumps", help="where before/after graphs go")
    p_explain.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the ranks")
    p_explain.add_argument("--fuse-linear", action="store_true",
                           help="also fuse column linears with their gather where the cost rule says so")
    p_explain.add_argument("--zero-copy", action="store_true",
                           help="also let proven gathers return a view of their slot")
    p_bench = sub.add_parser("bench", help="run the GPU benchmarks (torchrun); write tables and PNG plots")
    p_bench.add_argument("--nproc", type=int, default=4, help="GPUs to use (default 4)")
    p_bench.add_argument("--out", default="tpfuse_bench", help="folder for tables and plots")
    p_bench.add_argument("--only", default=None, help="run only benchmarks whose file name contains this")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2),
        format="%(levelname)s %(name)s: %(message)s",
    )
    if args.command == "demo":
        from . import demo

        return demo.run(args.device, args.nproc, args.timeout)
    if args.command == "explain":
        from . import explain

        return explain.run(args.entry, args.nproc, args.dump_dir, args.device, args.timeout,
                           args.fuse_linear, args.zero_copy)
    if args.command == "bench":
        from . import bench

        return bench.run(args.nproc, args.out, args.only)
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
