"""``python -m tpfuse explain MODULE:FUNCTION``: what tpfuse does to your code.

On each of ``--nproc`` spawned ranks (gloo on the CPU by default) the process
group is set up, tpfuse is enabled with graph dumps, and ``FUNCTION()`` is
called.  FUNCTION either

- returns ``(fn, args)`` or ``(fn, args, kwargs)``: explain compiles ``fn`` with
  ``torch.compile`` and calls it once; or
- compiles and runs on its own and returns ``None``.

Rank 0 then prints the report (matches, near-misses with reasons, barrier
decisions), the tuned config that decides the backends and the linear rule
(with its path) and where the before/after dumps are.  Reports that differ between
ranks are flagged: tpfuse requires every rank to compile the same graph.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import pathlib
import sys

from .errors import CommandError

log = logging.getLogger("tpfuse.explain")


class EntryError(CommandError):
    """A problem with the user's entry, said in one line (the traceback only with -v)."""


def load_entry(spec: str):
    """``package.module:function`` or ``path/to/file.py:function``."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"tpfuse explain: expected MODULE:FUNCTION or FILE.py:FUNCTION, got {spec!r}")
    if module_name.endswith(".py"):
        path = pathlib.Path(module_name).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"tpfuse explain: no such file {module_name!r}")
        loaded = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(loaded)
        sys.modules[path.stem] = module
        loaded.loader.exec_module(module)
    else:
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        module = importlib.import_module(module_name)
    try:
        return getattr(module, attr)
    except AttributeError:
        raise AttributeError(f"tpfuse explain: {module_name!r} has no attribute {attr!r}") from None


def _explain_rank(rank: int, world_size: int, spec: str, dump_dir: str, device: str, options: dict):
    import torch

    import tpfuse

    if device == "cuda":
        torch.cuda.set_device(rank)
    # The FX graph cache stays on: a graph it serves still has its report (docs/passes.md#caching).
    entry = load_entry(spec)
    with tpfuse.enabled(dump_dir=dump_dir, **options):
        result = entry()
        if result is not None:
            if not isinstance(result, tuple) or len(result) not in (2, 3) or not callable(result[0]):
                raise TypeError(
                    f"tpfuse explain: {spec} returned {type(result).__name__}; expected None "
                    "(it compiled and ran itself) or (fn, args) / (fn, args, kwargs)"
                )
            fn, args, kwargs = (*result, {})[:3]
            torch.compile(fn)(*args, **kwargs)
        rep = tpfuse.report(all=True)
    shape = [(len(g.matches), len(g.near_misses), len(g.eliminations)) for g in rep.graphs]
    return (str(rep), shape, len(rep.matches), len(rep.near_misses), len(rep.eliminations),
            selection_line(device, world_size))


def selection_line(device: str, world_size: int) -> str:
    """Which tuned config decides the CUDA backends and the linear rule at this W, with its path
    (docs/tuning.md); the op's ranks agree on it when their group is set up."""
    if device != "cuda":
        return "tuned config: none applies (CPU tensors run gloo; tuned configs choose between the CUDA backends)"
    from ..compile_ops import tuned

    return f"tuned config (W={world_size}): {tuned.local_selection(world_size).describe()}"


def run(spec: str, nproc: int = 2, dump_dir: str = "tpfuse_dumps", device: str = "cpu",
        timeout: float = 600.0, fuse_linear: bool = False, zero_copy: bool = False,
        eliminate_gathers: bool = True) -> int:
    from ..ranks import run_ranks

    try:
        load_entry(spec)  # fail here, with one clear message, not once per rank
    except (Exception, SystemExit) as err:  # noqa: BLE001 - any failure to load is the entry's problem
        # SystemExit too: a module that calls sys.exit() on import would end the command without a word
        raise EntryError(_one_line(err)) from err
    _check_gpus(device, nproc)
    dump_dir = str(pathlib.Path(dump_dir).resolve())
    backend = "nccl" if device == "cuda" else "gloo"
    print(f"tpfuse explain {spec}: {nproc} {backend} ranks, dumps in {dump_dir}")
    log.info("spawning ranks and compiling (first compiles take a while)")
    # tpfuse.enable's opt-in rewrites, and gather elimination (on by default)
    options = {"fuse_linear": fuse_linear, "zero_copy": zero_copy, "eliminate_gathers": eliminate_gathers}
    try:
        per_rank = run_ranks(nproc, _explain_rank, spec, dump_dir, device, options, backend=backend,
                             timeout=timeout)
    except (AssertionError, RuntimeError, TimeoutError) as err:
        raise EntryError(f"{spec} failed: {_rank_failures(err)} (-v shows the tracebacks)") from err
    text, shape, matches, near, eliminated, selection = per_rank[0]
    print(text)
    print(selection)
    differing = [r for r, (_, s, *_) in enumerate(per_rank) if s != shape]
    if differing:
        print(f"\nWARNING: ranks {differing} saw other graphs or decisions than rank 0; every rank must "
              "compile the same graphs, or the gathers will not pair up")
    gone = f", {eliminated} of them eliminated (not gathered at all)" if eliminated else ""
    print(f"\n{matches} gather(s) rewritten{gone}, {near} near-miss(es); before/after code: {dump_dir}")
    return 1 if differing else 0


def _check_gpus(device: str, nproc: int) -> None:
    """Refuse ``--device cuda`` without a GPU per rank here, as demo does, not as each spawned rank's
    own failure to select its device."""
    import torch

    found = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device == "cuda" and found < nproc:
        raise CommandError(f"--device cuda --nproc {nproc} needs {nproc} GPUs, found {found}; "
                           "accepted: --nproc up to the GPUs present, or --device cpu")


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    text = text.removeprefix("tpfuse explain: ")
    return text if isinstance(err, (ValueError, FileNotFoundError, AttributeError)) else \
        f"{type(err).__name__}: {text}"


def _rank_failures(err: BaseException) -> str:
    """``rank 0: ValueError: ...; rank 1: ...``: the last line of each rank's traceback."""
    text = str(err)
    if "--- rank " not in text:
        return text.splitlines()[0] if text else type(err).__name__
    parts = []
    for chunk in text.split("--- rank ")[1:]:
        rank, _, body = chunk.partition(" ---")
        lines = [line for line in body.strip().splitlines() if line.strip()]
        parts.append(f"rank {rank}: {lines[-1].strip() if lines else '?'}")
    return "; ".join(parts)
