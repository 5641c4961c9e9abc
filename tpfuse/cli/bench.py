"""``python -m tpfuse bench``: run the GPU benchmarks, write tables and PNG plots.

Runs, with ``torchrun`` on ``--nproc`` GPUs of this machine:
- ``benchmarks/bench_gather.py``: the gather against NCCL, eager and CUDA graphs;
- ``benchmarks/bench_e2e_decode.py``: a compiled TP decode step, tpfuse on/off;
- ``benchmarks/bench_linear_gather.py``: the fused column linear + push against
  cuBLAS + the NCCL or tpfuse gather.

The benchmark scripts live in the source checkout (``pip install -e .``).
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

from ..ranks import SAFE_GPU_ENV
from .errors import CommandError

BENCHMARKS = ("bench_gather.py", "bench_e2e_decode.py", "bench_linear_gather.py")


def _benchmarks_dir() -> pathlib.Path:
    root = pathlib.Path(__file__).resolve().parents[2]
    folder = root / "benchmarks"
    if not folder.is_dir():
        raise CommandError(
            f"no benchmarks/ folder next to the package ({root}); run it from a "
            "source checkout installed with `pip install -e .`"
        )
    return folder


def run(nproc: int, out: str, only: str | None = None) -> int:
    import torch

    found = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if found < max(nproc, 2):
        raise CommandError(f"--nproc {nproc} needs {nproc} CUDA GPUs, found {found}; the benchmarks "
                           "compare multi-GPU gathers")
    folder = _benchmarks_dir()
    env = dict(os.environ, **SAFE_GPU_ENV)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(folder.parent), env.get("PYTHONPATH")]))
    out_dir = pathlib.Path(out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    status = 0
    for script in BENCHMARKS:
        if only and only not in script:
            continue
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               str(folder / script), "--out", str(out_dir)]
        print("$", " ".join(cmd), flush=True)
        status |= subprocess.call(cmd, env=env)
        linear = out_dir / f"bench_linear_gather_w{nproc}.json"
        if script == "bench_linear_gather.py" and linear.exists():  # its plot, drawn from the JSON
            plot = [sys.executable, str(folder / "plot_linear_gather.py"), str(linear),
                    "--out", str(linear.with_suffix(".png"))]
            status |= subprocess.call(plot, env=env)
    print(f"tables and plots: {out_dir}")
    return status
