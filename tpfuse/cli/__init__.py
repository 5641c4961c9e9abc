"""``python -m tpfuse``: the command line (demo, explain, bench, and tune where the tuner is present);
``tpfuse/__main__.py`` calls ``main``.

Every error, argparse's own included, is one line on stderr that names the bad value and what is
accepted, with exit status 2 (``-v`` adds the traceback where there is one).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import math
import sys
import traceback

from .errors import CommandError

PROG = "python -m tpfuse"


class _Parser(argparse.ArgumentParser):
    """argparse, raising its complaint as a ``CommandError`` instead of printing the usage and exiting."""

    def error(self, message: str):
        raise CommandError(f"{self.prog}: error: {message}")


def _ranks(text: str) -> int:
    """``--nproc``: a gather pairs at least two ranks."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 2:
        raise argparse.ArgumentTypeError(f"expected a whole number of ranks >= 2 (a gather needs two), got {text!r}")
    return value


def _seconds(text: str) -> float:
    """``--timeout``: a positive number of seconds (0 would give up before the ranks start)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def _verbosity(parser: argparse.ArgumentParser, dest: str) -> None:
    parser.add_argument("-v", "--verbose", dest=dest, action="count", default=0,
                        help="more log output and full tracebacks (-vv: debug)")


def tuner():
    """The tuner's ``main(argv)`` where this checkout has one (``tpfuse/cli/tune.py`` or ``tpfuse/tune.py``),
    else None (then ``tune`` is no command)."""
    if importlib.util.find_spec("tpfuse.cli.tune") is not None:
        from . import tune

        return tune.main
    if importlib.util.find_spec("tpfuse.tune") is not None:
        from .. import tune

        return tune.main
    return None


def _check_tune_arguments(tune_main, argv: list[str]) -> None:
    """Parse the tuner's arguments with its own parser first, its complaint raised as one line: argparse would
    print the usage before it. Only where ``tune_main`` is its module's ``main`` beside a ``parser()``."""
    module = sys.modules.get(getattr(tune_main, "__module__", None) or "")
    make = getattr(module, "parser", None)
    if getattr(module, "main", None) is not tune_main or not callable(make):
        return
    parser = make()

    def error(message: str):
        if "unrecognized arguments" in message:
            message += f"; accepted: {_accepted(parser)}"
        raise CommandError(message)

    parser.error = error
    parser.parse_args(argv)


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="run tpfuse on spawned ranks and check the results")
    _verbosity(p, "verbose")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--nproc", type=_ranks, default=2, help="number of ranks, at least 2 (default 2)")
    p.add_argument("--timeout", type=_seconds, default=300.0, help="seconds to wait for the ranks (default 300)")


def _add_explain(sub) -> None:
    p = sub.add_parser(
        "explain", help="compile MODULE:FUNCTION with tpfuse on spawned ranks; print the report, dump graphs"
    )
    _verbosity(p, "verbose")
    p.add_argument("entry", metavar="MODULE:FUNCTION", help="e.g. mypkg.model:step or model.py:step")
    p.add_argument("--nproc", type=_ranks, default=2, help="number of ranks, at least 2 (default 2)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dump-dir", default="tpfuse_dumps", help="where before/after graphs go")
    p.add_argument("--timeout", type=_seconds, default=600.0, help="seconds to wait for the ranks (default 600)")
    p.add_argument("--fuse-linear", action="store_true",
                   help="also fuse column linears with their gather where the cost rule says so")
    p.add_argument("--zero-copy", action="store_true", help="also let proven gathers return a view of their slot")
    p.add_argument("--keep-gathers", action="store_true",
                   help="do not eliminate gathers consumed only by reductions (argmax, topk, ...)")


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="run the GPU benchmarks (torchrun); write tables and PNG plots")
    _verbosity(p, "verbose")
    p.add_argument("--nproc", type=_ranks, default=4, help="GPUs to use, at least 2 (default 4)")
    p.add_argument("--out", default="tpfuse_bench", help="folder for tables and plots")
    p.add_argument("--only", default=None, help="run only benchmarks whose file name contains this")


def _add_tune(sub) -> None:
    # the tuner parses its own arguments: everything after ``tune`` goes to it untouched
    p = sub.add_parser("tune", help="measure and record launch configurations (see its --help)", add_help=False)
    p.add_argument("tune_args", nargs=argparse.REMAINDER)
    p.set_defaults(verbose=0)


def _parser() -> _Parser:
    parser = _Parser(prog=PROG, description="tpfuse command line")
    # -v is accepted before and after the subcommand; the two counts add up
    _verbosity(parser, "verbose_before")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_demo(sub)
    _add_explain(sub)
    _add_bench(sub)
    if tuner() is not None:
        _add_tune(sub)
    return parser


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _accepted(parser: argparse.ArgumentParser) -> str:
    """What ``parser`` accepts, for an error message: its options, or its commands."""
    options = [a.option_strings[-1] for a in parser._actions if a.option_strings]
    return ", ".join(options)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = _parser()
    args, extras = parser.parse_known_args(argv)
    commands = _commands(parser)
    if args.command == "tune":
        args.tune_args = [*extras, *args.tune_args]
        return args
    if args.command is None:
        what = f"unrecognized argument(s) {' '.join(extras)}" if extras else "no command given"
        parser.error(f"{what}; accepted: {_accepted(parser)}, then a command: {', '.join(commands)}")
    if extras:
        command = commands[args.command]
        command.error(f"unrecognized argument(s) {' '.join(extras)}; accepted: {_accepted(command)}")
    return args


def _run(args) -> int:
    if args.command == "demo":
        from . import demo

        return demo.run(args.device, args.nproc, args.timeout)
    if args.command == "explain":
        from . import explain

        return explain.run(args.entry, args.nproc, args.dump_dir, args.device, args.timeout,
                           args.fuse_linear, args.zero_copy, not args.keep_gathers)
    if args.command == "tune":
        tune_main = tuner()
        _check_tune_arguments(tune_main, args.tune_args)
        return tune_main(args.tune_args)
    from . import bench

    return bench.run(args.nproc, args.out, args.only)


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parse(argv)
    except CommandError as err:
        print(err, file=sys.stderr)
        return 2
    verbose = args.verbose_before + args.verbose
    logging.basicConfig(
        level=logging.WARNING - 10 * min(verbose, 2),
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return _run(args)
    except CommandError as err:
        if verbose:
            traceback.print_exc()
        print(f"{PROG} {args.command}: error: {err}", file=sys.stderr)
        return 2
