"""``python -m tpfuse explain MODULE:FUNCTION``: what tpfuse does to your code.

On each of ``--nproc`` spawned ranks (gloo on the CPU by default) the process
group is set up, tpfuse is enabled with graph dumps, and ``FUNCTION()`` is
called.  FUNCTION either

- returns ``(fn, args)`` or ``(fn, args, kwargs)``: explain compiles ``fn`` with
  ``torch.compile`` and calls it once; or
- compiles and runs on its own and returns ``None``.

Rank 0 then prints the report (matches, near-misses with reasons, barrier
decisions) and where the before/after dumps are.  Reports that differ between
ranks are flagged: tpfuse requires every rank to compile the same graph.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import pathlib
import sys

log = logging.getLogger("tpfuse.explain")


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


def _compile_fresh() -> None:
    """A graph served from Inductor's FX graph cache (or AOTAutograd's cache)
    skips the post-grad passes, so it would leave no report and no dump."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = False
    if hasattr(functorch_config, "enable_autograd_cache"):
        functorch_config.enable_autograd_cache = False


def _explain_rank(rank: int, world_size: int, spec: str, dump_dir: str, device: str, options: dict):
    import torch

    import tpfuse

    if device == "cuda":
        torch.cuda.set_device(rank)
    _compile_fresh()
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
    shape = [(len(g.matches), len(g.near_misses)) for g in rep.graphs]
    return str(rep), shape, len(rep.matches), len(rep.near_misses)


def run(spec: str, nproc: int = 2, dump_dir: str = "tpfuse_dumps", device: str = "cpu",
        timeout: float = 600.0, fuse_linear: bool = False, zero_copy: bool = False) -> int:
    from .ranks import run_ranks

    load_entry(spec)  # fail here, with one clear message, not once per rank
    dump_dir = str(pathlib.Path(dump_dir).resolve())
    backend = "nccl" if device == "cuda" else "gloo"
    print(f"tpfuse explain {spec}: {nproc} {backend} ranks, dumps in {dump_dir}")
    log.info("spawning ranks and compiling (first compiles take a while)")
    options = {"fuse_linear": fuse_linear, "zero_copy": zero_copy}  # tpfuse.enable's opt-in rewrites
    per_rank = run_ranks(nproc, _explain_rank, spec, dump_dir, device, options, backend=backend, timeout=timeout)
    text, shape, matches, near = per_rank[0]
    print(text)
    differing = [r for r, (_, s, _, _) in enumerate(per_rank) if s != shape]
    if differing:
        print(f"\nWARNING: ranks {differing} saw other graphs or decisions than rank 0; every rank must "
              "compile the same graphs, or the gathers will not pair up")
    print(f"\n{matches} gather(s) rewritten, {near} near-miss(es); before/after code: {dump_dir}")
    return 1 if differing else 0
