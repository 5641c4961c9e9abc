"""``python -m tpfuse``: the command line (demo, explain, bench); ``tpfuse/__main__.py`` calls ``main``."""

from __future__ import annotations

import argparse
import logging
import sys
import traceback

from .explain import EntryError


def _verbosity(parser: argparse.ArgumentParser, dest: str) -> None:
    parser.add_argument("-v", "--verbose", dest=dest, action="count", default=0,
                        help="more log output and full tracebacks (-vv: debug)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tpfuse", description="tpfuse command line")
    # -v is accepted before and after the subcommand; the two counts add up
    _verbosity(parser, "verbose_before")
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="run tpfuse on spawned ranks and check the results")
    _verbosity(p_demo, "verbose")
    p_demo.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p_demo.add_argument("--nproc", type=int, default=2, help="number of ranks (default 2)")
    p_demo.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the ranks")
    p_explain = sub.add_parser(
        "explain", help="compile MODULE:FUNCTION with tpfuse on spawned ranks; print the report, dump graphs"
    )
    _verbosity(p_explain, "verbose")
    p_explain.add_argument("entry", metavar="MODULE:FUNCTION", help="e.g. mypkg.model:step or model.py:step")
    p_explain.add_argument("--nproc", type=int, default=2, help="number of ranks (default 2)")
    p_explain.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p_explain.add_argument("--dump-dir", default="tpfuse_dumps", help="where before/after graphs go")
    p_explain.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the ranks")
    p_explain.add_argument("--fuse-linear", action="store_true",
                           help="also fuse column linears with their gather where the cost rule says so")
    p_explain.add_argument("--zero-copy", action="store_true",
                           help="also let proven gathers return a view of their slot")
    p_explain.add_argument("--keep-gathers", action="store_true",
                           help="do not eliminate gathers consumed only by reductions (argmax, topk, ...)")
    p_bench = sub.add_parser("bench", help="run the GPU benchmarks (torchrun); write tables and PNG plots")
    _verbosity(p_bench, "verbose")
    p_bench.add_argument("--nproc", type=int, default=4, help="GPUs to use (default 4)")
    p_bench.add_argument("--out", default="tpfuse_bench", help="folder for tables and plots")
    p_bench.add_argument("--only", default=None, help="run only benchmarks whose file name contains this")
    return parser


def _run(args) -> int:
    if args.command == "demo":
        from . import demo

        return demo.run(args.device, args.nproc, args.timeout)
    if args.command == "explain":
        from . import explain

        return explain.run(args.entry, args.nproc, args.dump_dir, args.device, args.timeout,
                           args.fuse_linear, args.zero_copy, not args.keep_gathers)
    from . import bench

    return bench.run(args.nproc, args.out, args.only)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    verbose = args.verbose_before + args.verbose
    logging.basicConfig(
        level=logging.WARNING - 10 * min(verbose, 2),
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return _run(args)
    except EntryError as err:
        if verbose:
            traceback.print_exc()
        print(f"python -m tpfuse {args.command}: error: {err}", file=sys.stderr)
        return 2

