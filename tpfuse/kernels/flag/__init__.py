"""The flag protocol, device side: its facts and buffer layout here, its device functions and kernel beside them.

Every 8 bytes that cross the link carry their own arrival flag (the call's epoch),
two buffers alternate by the epoch's parity, and nothing waits but the receiver's
poll: no fence, no signal atomic, no barrier.  Safety argument (why a unit arrives
whole, why no entry barrier is needed, why a stale flag never matches):
docs/flag_protocol.md.

- ``device.py``: the epoch, the region layout, packing units, the flag stores and checks;
- ``gather.py``: the kernel and its compiled variants.

This ``__init__`` is plain Python (no Triton import): the host sizes the buffers and the
grid from it, and the passes read ``FENCE``.
"""

#: bytes of one unit on the wire: DATA_BYTES of payload and a 4-byte flag
UNIT_BYTES = 8
DATA_BYTES = 4
#: wire bytes per payload byte (the flag's cost)
WIRE_OVERHEAD = UNIT_BYTES // DATA_BYTES
#: epoch slots in device memory; the flag kernel's grid never exceeds this
EPOCH_SLOTS = 256
#: a receiver zeroes its buffer of one parity once every 2 * CLEAR_PERIOD calls
CLEAR_PERIOD = 1 << 20
#: buffers a receiver keeps per peer (selected by epoch parity)
PARITIES = 2
#: the largest slab (bytes per rank) one region holds: T=32 of a 4096-wide bf16 band
MAX_SLAB_BYTES = 256 << 10

#: A flag call is a fence for the group: a rank finishes it only after every peer's units of it
#: arrived, and each peer sent them when it started the call, so every peer had finished everything
#: before it on its stream.  How a report names that fence (passes/barrier_elision.py):
FENCE = "{gather} (flag protocol: finished on one rank = started on every rank)"


def units_for(elements: int, elem_size: int) -> int:
    """Units one slab of ``elements`` elements takes, padded to whole 16-byte pairs.

    The host sizes the grid and the regions with it; the kernel loops to its own count of the
    same units, so a grid that is too small is slower, never wrong."""
    words = -(-elements * elem_size // DATA_BYTES)
    return words + (words & 1)


def region_units(max_slab_bytes: int = MAX_SLAB_BYTES) -> int:
    """Units of one (parity, source) region: the largest slab the buffers serve, padded to pairs."""
    return units_for(max_slab_bytes, 1)


def buffer_bytes(world_size: int, max_slab_bytes: int = MAX_SLAB_BYTES) -> int:
    """Bytes of one rank's flag buffer: both parities, one region per source rank (the kernel's
    ``region_offset`` places them)."""
    return PARITIES * world_size * region_units(max_slab_bytes) * UNIT_BYTES
