"""The flag protocol: every 8 bytes that cross the link carry their own arrival flag.

This module is the protocol's one home: the facts the host and the passes rely
on (constants and layout arithmetic, plain Python) and the device functions
the flag kernel (``flag_gather.py``) is built from.  The design and the safety
argument are in docs/flag_protocol.md; the short form:

**Units.**  A sender packs its slab (flattened, element order) into 32-bit data words and stores each word
together with a 32-bit flag as one 8-byte *unit* (data in the low half, flag in
the high half), two units per 16-byte ``st.relaxed.sys.global.v2.b64``.  The
PTX memory model treats a vector access as scalar accesses of its element
size, so each aligned 8-byte unit lands whole: a receiver that reads a flag of
the current epoch reads that store's data in the same load.  No fence, no
signal atomic and no barrier stand between the sender's stores and the
receiver's reads.

**Epoch.**  Every call has an epoch ``e`` (never 0), the same on every rank
because every rank makes the same sequence of flag calls on the group.  It
lives in device memory (``EPOCH_SLOTS`` int32 slots, all equal between calls)
and advances on the device, so a captured CUDA graph advances it on every
replay and the host keeps no per-call state.  Block ``b`` reads slot ``b``
and writes the new epoch into slots ``b, b + nblocks, ...``: every slot
advances on every call whatever the grid, so the grid may change with T.

**Parity.**  Each receiver has two buffers; call ``e`` writes buffer ``e & 1``.
A rank that starts call ``e`` has finished call ``e - 1`` (stream order), so
it has read every peer's epoch-(e-1) units; each peer stored those after its
own call ``e - 2`` had finished, and that call was the last reader of the
buffer about to be written.  So no entry barrier is needed.

**Freshness.**  Flag 0 means "never written" (buffers start zeroed).  A stale
unit in buffer ``p`` carries an older epoch of the same parity.  Epochs are
32-bit and wrap; so that a stale flag can never equal the current epoch, each
receiver zeroes the whole of its buffer ``p`` after reading it in the calls
whose ``(e >> 1) % CLEAR_PERIOD == 0``: no unit is older than ``2 * CLEAR_PERIOD``
calls, far less than a wrap (2**32 - 2 calls).

No torch import here: CI compiles the kernel ahead of time with more than one
Triton version, in processes that may not have torch.
"""

import triton
import triton.language as tl

#: bytes of one unit on the wire: DATA_BYTES of payload and a 4-byte flag
UNIT_BYTES = 8
DATA_BYTES = 4
#: wire bytes per payload byte (the flag's cost)
WIRE_OVERHEAD = UNIT_BYTES // DATA_BYTES
#: epoch slots in device memory; the flag kernel's grid never exceeds this
EPOCH_SLOTS = 256
#: a receiver zeroes its buffer of one parity once every 2 * CLEAR_PERIOD calls
CLEAR_PERIOD = 1 << 20
# The same numbers as compile-time constants for the device functions (Triton
# kernels may read only constexpr globals).
_DATA_BYTES = tl.constexpr(DATA_BYTES)
_EPOCH_SLOTS = tl.constexpr(EPOCH_SLOTS)

#: the protocol has no barriers, so a pass has no entry barrier to elide on it
HAS_ENTRY_BARRIER = False
#: Still, a flag call is a fence for the group: a rank finishes it only after every peer's units
#: of it arrived, and each peer sent them when it started the call, so every peer had finished
#: everything before it on its stream.  How a report names that fence:
FENCE = "{gather} (flag protocol: finished on one rank = started on every rank)"
#: buffers a receiver keeps per peer (selected by epoch parity)
PARITIES = 2


def units_for(elements: int, elem_size: int) -> int:
    """Units one slab of ``elements`` elements takes, padded to whole 16-byte pairs."""
    words = -(-elements * elem_size // DATA_BYTES)
    return words + (words & 1)


def region_units(max_slab_bytes: int) -> int:
    """Units of one (parity, source) region: the largest slab the buffers serve, padded to pairs."""
    return units_for(max_slab_bytes, 1)


def buffer_bytes(world_size: int, max_slab_bytes: int) -> int:
    """Bytes of one rank's flag buffer: both parities, one region per source rank."""
    return PARITIES * world_size * region_units(max_slab_bytes) * UNIT_BYTES


def region_offset_units(parity: int, source: int, world_size: int, units_per_region: int) -> int:
    """Where the region of (parity, source) starts in a buffer, in units."""
    return (parity * world_size + source) * units_per_region


def next_epoch(epoch: int) -> int:
    """The epoch after ``epoch`` (32-bit, skipping 0 and keeping the parity alternation)."""
    e = (epoch + 1) & 0xFFFFFFFF
    return 2 if e == 0 else e


# --------------------------------------------------------------------------- device side


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
        e = e + 1
        e = tl.where(e == 0, 2, e)  # 0 is "never written"; 2 keeps the parity alternating
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
