"""How every push kernel is compiled: one explicit signature per variant, for the current GPU or a target.

Shared by the host launchers (target: the current GPU) and the ahead-of-time tests
(target: sm_90).  Plain Triton, no torch import.
"""

import triton

#: element size in bytes -> the integer type the kernels move (a gather does no arithmetic)
INT_OF_SIZE = {1: "i8", 2: "i16", 4: "i32"}


def band_offsets(hidden_widths, scale: int = 1) -> tuple:
    """The ``BAND_OFFSETS`` every push kernel takes: W + 1 column offsets, prefix sums of the widths (times
    ``scale``), rank r's band in ``[offsets[r], offsets[r + 1])``."""
    offsets = [0]
    for w in hidden_widths:
        offsets.append(offsets[-1] + w * scale)
    return tuple(offsets)


def compile_source(source, target=None, num_warps=4):
    """Compile an ASTSource for ``target`` (a ``GPUTarget``; None means the current GPU)."""
    return triton.compile(source, target=target, options={"num_warps": num_warps})
