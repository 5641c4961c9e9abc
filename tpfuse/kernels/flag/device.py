"""The flag protocol's device functions: the epoch, the region layout, units, their stores and checks.

The design and safety argument are in docs/flag_protocol.md; the short form:

**Units.**  A sender packs its slab (flattened, element order) into 32-bit data words and stores each
word together with a 32-bit flag as one 8-byte *unit* (data in the low half, flag in the high half),
two units per 16-byte ``st.relaxed.sys.global.v2.b64``.  The PTX memory model treats a vector access
as scalar accesses of its element size, so each aligned 8-byte unit lands whole: a receiver that reads
a flag of the current epoch reads that store's data in the same load.

**Epoch.**  Every call has an epoch ``e`` (never 0), the same on every rank because every rank makes
the same sequence of flag calls on the group.  It lives in device memory (``EPOCH_SLOTS`` int32 slots,
all equal between calls) and advances on the device (``take_epoch``, ``next_epoch``), so a captured
CUDA graph advances it on every replay and the host keeps no per-call state.

**Parity.**  Each receiver has two buffers; call ``e`` writes buffer ``e & 1`` (``region_offset``).
A rank that starts call ``e`` has finished call ``e - 1``, so no peer still reads the buffer it writes:
no entry barrier.

**Freshness.**  Flag 0 means "never written" (buffers start zeroed); each receiver zeroes its buffer of
one parity every ``2 * CLEAR_PERIOD`` calls (``clear_due``), so a stale flag never equals the current
epoch across the 32-bit wrap.

No torch import here: CI compiles the kernel ahead of time with more than one Triton version.
"""

import triton
import triton.language as tl

from . import DATA_BYTES, EPOCH_SLOTS

# The package's numbers as compile-time constants (Triton kernels may read only constexpr globals).
_DATA_BYTES = tl.constexpr(DATA_BYTES)
_EPOCH_SLOTS = tl.constexpr(EPOCH_SLOTS)


# --------------------------------------------------------------------------- device side


@triton.jit
def next_epoch(e):
    """The epoch after ``e`` (int32 bits of a 32-bit count): 0 is skipped for 2, which keeps the parity
    alternating across the wrap (0xFFFFFFFF is odd, 2 even).  0 is "never written"."""
    e = e + 1
    return tl.where(e == 0, 2, e)


@triton.jit
def region_offset(parity, source, world_size, region_units):
    """Where the region of (parity, source) starts in a rank's flag buffer, in units: both parities,
    one region per source rank, parity-major (``buffer_bytes`` in the package sizes the whole)."""
    return (parity * world_size + source).to(tl.int64) * region_units


@triton.jit
def take_epoch(epochs, pid, nblocks, ADVANCE: tl.constexpr):
    """This call's epoch: slot ``pid`` + 1 (0 skipped, parity kept); with ADVANCE, store it in our slots.

    Slot ``pid`` is read only by this block in this call, and the slots this
    block writes (``pid + k * nblocks``) are read only by later calls, after
    this kernel ended: no two blocks race.  Within the block, a barrier keeps
    the writes after every thread's read.
    """
    e = tl.load(epochs + pid, volatile=True)
    if ADVANCE:
        # Every thread loads the slot; none may overwrite it before all have
        # read it, or the block's warps would disagree on the epoch.
        tl.debug_barrier()
        e = next_epoch(e)
        slots = pid + nblocks * tl.arange(0, _EPOCH_SLOTS)
        tl.store(epochs + slots, tl.full([_EPOCH_SLOTS], 0, tl.int32) + e, mask=slots < _EPOCH_SLOTS)
    return e


@triton.jit
def put_element(word, elem, c: tl.constexpr, ELEM: tl.constexpr):
    """``word`` (int64) with element ``c`` of its ``4 // ELEM`` elements set to ``elem`` (an ELEM-byte int)."""
    mask: tl.constexpr = (1 << (8 * ELEM)) - 1
    return word | ((elem.to(tl.int64) & mask) << (c * 8 * ELEM))


@triton.jit
def get_element(units, c: tl.constexpr, ELEM: tl.constexpr):
    """Element ``c`` of each unit's data word, as int32 (the caller narrows it on store)."""
    mask: tl.constexpr = (1 << (8 * ELEM)) - 1
    return ((units >> (c * 8 * ELEM)) & mask).to(tl.int32)


@triton.jit
def unit_of(word, e):
    """The unit that carries data ``word`` (low 32 bits) under flag ``e`` (high 32 bits)."""
    return (word & 0xFFFFFFFF) | (e.to(tl.int64) << 32)


@triton.jit
def flags_of(units):
    return (units >> 32).to(tl.int32)


@triton.jit
def store_unit_pairs(base, pair_index, u0, u1, live, PLAIN_STORES: tl.constexpr):
    """Store units (u0, u1) at unit ``2 * pair_index`` and ``2 * pair_index + 1`` of the region at ``base``.

    One 16-byte relaxed system-scope store per pair: each 8-byte half is a
    scalar access of the memory model and arrives whole.  ``PLAIN_STORES``
    is for Triton's interpreter, which runs no inline PTX.
    """
    if PLAIN_STORES:
        ptr = base.to(tl.pointer_type(tl.int64)) + 2 * pair_index
        tl.store(ptr, u0, mask=live)
        tl.store(ptr + 1, u1, mask=live)
    else:
        address = base + pair_index.to(tl.int64) * 16
        tl.inline_asm_elementwise(
            """
            {
                .reg .pred p;
                setp.ne.b32 p, $4, 0;
                @p st.relaxed.sys.global.v2.b64 [$1], {$2, $3};
                mov.u32 $0, 0;
            }
            """,
            "=r,l,l,l,r",
            [address, u0, u1, live.to(tl.int32)],
            dtype=tl.int32,
            is_pure=False,
            pack=1,
        )


@triton.jit
def accepted(flags, e, ACCEPT_STALE: tl.constexpr):
    """Whether a unit with these flags belongs to call ``e``.

    ``ACCEPT_STALE`` is the tests' negative control: it takes any unit that
    was ever written, stale epochs included, and must be caught corrupting.
    """
    if ACCEPT_STALE:
        return flags != 0
    else:
        return flags == e


@triton.jit
def clear_due(e, PERIOD: tl.constexpr):
    """Whether call ``e`` zeroes its buffer after reading it (every ``2 * PERIOD`` calls; a power of two)."""
    return ((e >> 1) & (PERIOD - 1)) == 0
