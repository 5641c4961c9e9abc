"""How every push kernel is compiled: one explicit signature per variant, for the current GPU or a target.

Shared by the host launchers (target: the current GPU) and the ahead-of-time tests
(target: sm_90); ``ast_source`` builds the explicit signature for every kernel module
(the fused linear's, the reductions' and the fused LM head's as well).  Plain Triton, no torch import.
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


def ast_source(fn, types, constexprs, aligned=()):
    """The ``ASTSource`` of ``fn``: the arguments named in ``constexprs`` take those values, the others the
    Triton types in ``types``.  ``aligned`` names the pointers that are 16-byte aligned and the integers that
    are multiples of 16 (Triton's "tt.divisibility"; the host checks both before it picks such a variant), so
    that their loads and stores can be 16-byte vectors."""
    from triton.compiler import ASTSource

    signature = {n: ("constexpr" if n in constexprs else types[n]) for n in fn.arg_names}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    return ASTSource(fn, signature, constexprs, attrs)


def compile_source(source, target=None, num_warps=4, num_stages=None):
    """Compile an ASTSource for ``target`` (a ``GPUTarget``; None means the current GPU).  ``num_stages``: the
    software pipeline's depth (the fused linear's launch config picks it); None leaves Triton's default."""
    options = {"num_warps": num_warps}
    if num_stages is not None:
        options["num_stages"] = num_stages
    return triton.compile(source, target=target, options=options)
