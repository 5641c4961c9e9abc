"""The barrier protocol, device side: its facts here, its device functions and kernels beside them.

Every rank pushes its band into a slot of every peer's symmetric buffer between an
entry barrier (no peer still reads the slot we write) and an exit barrier
(release/acquire: our pushes are visible before any peer reads).  Two slots
alternate, so a pass may prove an entry barrier redundant.  Safety argument:
docs/safety.md, "Barriers"; the elision proof that rests on the facts below:
docs/barrier_elision.md.

- ``device.py``: signal / wait / barrier over self-resetting counter slots;
- ``push_gather.py``: the push kernels (peer stores, and the multicast variant);
- the fused linear + push (``kernels/linear_push.py``) is a kernel of the fused op
  built on these device functions, not a protocol of its own.

This ``__init__`` is plain Python (no Triton import): the passes read the facts.
"""


def next_slot(slot: int) -> int:
    """The slot after ``slot`` in the alternation that every rank follows alike (two slots)."""
    return slot ^ 1


def signal_pad_bytes(max_blocks: int, world_size: int) -> int:
    """Bytes of signal pad the barriers need: one int32 counter per (block, peer)."""
    return max_blocks * world_size * 4


def blocks_that_fit(max_blocks: int, world_size: int, pad_bytes: int) -> int:
    """The grid cap once the pad size is known: no block may lack its counters."""
    return max(1, min(max_blocks, pad_bytes // (world_size * 4)))


# --------------------------------------------------------------------------- facts for the elision proof
# Stated once, here, next to the code that makes them true; passes/barrier_elision.py
# imports them (docs/barrier_elision.md).

#: A call's every read of its data slot ends inside the kernel that wrote it (the copy-out is
#: fused), so the only hazard is a peer pushing a later call into the slot while we copy out.
READS_END_IN_KERNEL = True
#: A rank leaves a call's exit barrier only after every peer signalled in it, that is, after
#: every peer started the call and so finished everything before it on its stream: the call is a
#: fence for the group.  How a report names that fence:
EXIT_FENCE = "exit barrier of {gather}"
