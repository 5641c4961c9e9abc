"""Peer addresses as scalar kernel arguments: ``a0 .. a7`` hold rank r's address at index r (0 past W).

Scalar arguments live in constant memory, so no dependent global load stands
between a kernel's start and its first remote store.  Shared by every push
kernel (the barrier protocol's push kernels, fused linear + push, the flag protocol).
"""

import triton
import triton.language as tl

#: the most ranks the kernels take: peer addresses are 8 scalar arguments each
MAX_RANKS = 8


@triton.jit
def pick(i: tl.constexpr, a0, a1, a2, a3, a4, a5, a6, a7):
    """Argument ``a<i>`` for a compile-time ``i``: peer addresses live in constant memory, not in a table."""
    return a0 if i == 0 else (a1 if i == 1 else (a2 if i == 2 else (a3 if i == 3 else (
        a4 if i == 4 else (a5 if i == 5 else (a6 if i == 6 else a7))))))


@triton.jit
def per_lane(peers, a0, a1, a2, a3, a4, a5, a6, a7):
    """Per lane ``i`` of ``peers``, argument ``a<i>``."""
    v = tl.where(peers == 0, a0, a7)
    v = tl.where(peers == 1, a1, v)
    v = tl.where(peers == 2, a2, v)
    v = tl.where(peers == 3, a3, v)
    v = tl.where(peers == 4, a4, v)
    v = tl.where(peers == 5, a5, v)
    return tl.where(peers == 6, a6, v)
