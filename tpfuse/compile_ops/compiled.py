"""A compiled kernel ready to launch without Triton's per-call binder; what every launcher shares.

The launchers (barrier/launcher.py, flag/launcher.py, linear_push.py, softmax_kernels.py,
lm_head_kernels.py) compile each variant once and call Triton's compiled launcher directly: an eager call must cost
about one torch elementwise op (docs/benchmarks.md, "Against the targets"), so no
argument specialisation or table is built per call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Compiled:
    """One compiled variant: its launcher and the fixed arguments every launch passes."""

    run: object  # Triton's compiled launcher, loaded on the device
    function: object
    packed_metadata: object
    constexprs: tuple  # the constexpr values, in argument order (the launcher takes them last)
    kernel: object  # the CompiledKernel (its metadata: shared memory, registers, scratch)


def compile_for(device: torch.device | int, source, compile) -> Compiled:
    """``compile(source)`` for ``device``'s GPU (a device or its index), loaded there."""
    with torch.cuda.device(device):
        kernel = compile(source)
        run = kernel.run  # loads the module on this device
    names = source.fn.arg_names
    constexprs = tuple(source.constants[(names.index(n),)] for n in names if source.signature[n] == "constexpr")
    return Compiled(run, kernel.function, kernel.packed_metadata, constexprs, kernel)
