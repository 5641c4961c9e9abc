"""The barrier protocol's device functions: signal, wait and barrier (the package docstring says what for).

The push kernels (``push_gather.py``, ``kernels/linear_push.py``) meet their peers
in an entry barrier (relaxed: no peer still reads the slot we write) and an exit
barrier (release/acquire: our pushes are visible before any peer reads).

Slots.  Every rank owns a signal pad; slot ``block * W + src`` on rank ``dst``
counts the signals that block ``block`` of rank ``src`` has sent to rank
``dst`` and that ``dst`` has not consumed yet.  A signal adds 1 to the slot on
the peer; a wait spins until its own slot is >= 1 and then subtracts 1.  So a
slot returns to zero by itself after every matched signal/wait pair: nothing
needs resetting on the host, and the barrier survives CUDA-graph replay and
back-to-back calls.  Counters (rather than 0/1 flags) also let the entry and
the exit barrier share one slot: the k-th wait of a block consumes exactly the
k-th signal of the matching peer block, whichever barrier sent it, because
both ranks run the same sequence of barriers (rank-consistent dispatch).

Parallel peers.  The W peers are handled by W lanes at once (one atomic per
lane), not one after another: a serial walk costs one NVLink round trip per
peer (7.6 us at W=4 against 2.5 us in parallel; docs/benchmarks.md, probe).

Addresses.  The signal pads' addresses arrive as scalar kernel arguments
(constant memory): no dependent global load stands between the kernel's
start and its first signal.

Bounded spin.  Every wait gives up after ``timeout_ns`` of %globaltimer time,
records which barrier, block and peer in the status word (``kernels/failure.py``, the
codes' one home; host-mapped, so the host reads it without synchronising) and
returns; the kernel then poisons the call's result, and the host turns the word
into an error naming the rank and the peer that never arrived.

Triton 3.6 crashes on ``while`` loops that carry a tensor (docs/design.md,
"Toolchain note"), so the spin loop carries scalars only: the smallest slot
value over the peers and the elapsed time.
"""

import triton
import triton.language as tl
from triton.language.extra.cuda import globaltimer

from ..failure import record_timeout


@triton.jit
def peer_lanes(rank, W: tl.constexpr, WP: tl.constexpr):
    """Lane ``i`` stands for peer ``i``; lanes past W and our own rank are off."""
    peers = tl.arange(0, WP)
    return peers, (peers < W) & (peers != rank)


@triton.jit
def signal_peers(peer_pads, rank, block, want, W: tl.constexpr, RELEASE: tl.constexpr):
    """Add 1 to slot (block, rank) on every peer whose lane is in ``want``, one lane per peer.

    ``peer_pads`` holds, per lane, the address of that peer's signal pad.
    With RELEASE the add is a system-scope release: every store this block
    made before it (the caller puts a CTA barrier in front, so all threads'
    stores count) is visible to a peer that acquires the slot's new value.
    The add returns nothing, so the lane does not wait for the round trip.
    """
    slots = peer_pads.to(tl.pointer_type(tl.int32)) + block * W + rank
    if RELEASE:
        tl.atomic_add(slots, 1, mask=want, sem="release", scope="sys")
    else:
        tl.atomic_add(slots, 1, mask=want, sem="relaxed", scope="sys")


@triton.jit
def _read_slots(slots, want, ACQUIRE: tl.constexpr):
    # A read-modify-write of 0 reads the slot coherently at system scope.
    if ACQUIRE:
        vals = tl.atomic_add(slots, 0, mask=want, sem="acquire", scope="sys")
    else:
        vals = tl.atomic_add(slots, 0, mask=want, sem="relaxed", scope="sys")
    return vals


@triton.jit
def wait_peers(own_pad, block, want, status, timeout_ns, KIND: tl.constexpr, W: tl.constexpr,
               ACQUIRE: tl.constexpr):
    """Spin until slot (block, peer) on our pad is >= 1 for every peer in ``want``, then consume one signal each.

    With ACQUIRE every spin read is a system-scope acquire, so once a read
    sees the peer's signal, this block's later reads see everything the peer
    released before it (the caller puts a CTA barrier after this, so every
    thread is ordered after the acquiring lanes).  The consuming decrement
    returns nothing, so nobody waits for it.  Returns whether the wait gave
    up; then the missing peer is recorded in ``status``.
    """
    WP: tl.constexpr = want.shape[0]
    peers = tl.arange(0, WP)
    slots = own_pad.to(tl.pointer_type(tl.int32)) + block * W + peers
    lo = tl.min(tl.where(want, _read_slots(slots, want, ACQUIRE), 1), axis=0)
    start = globaltimer()
    elapsed = start - start
    while (lo < 1) & (elapsed < timeout_ns):
        lo = tl.min(tl.where(want, _read_slots(slots, want, ACQUIRE), 1), axis=0)
        elapsed = globaltimer() - start
    tl.atomic_add(slots, -1, mask=want, sem="relaxed", scope="sys")
    if lo < 1:
        # Timed out.  The lanes whose slot went negative never arrived.
        after = _read_slots(slots, want, False)
        missing = tl.min(tl.where(want & (after < 0), peers, WP), axis=0)
        record_timeout(status, KIND, block, missing)
    return lo < 1


@triton.jit
def exchange(peer_pads, own_pad, rank, block, signal_want, wait_want, status, timeout_ns, KIND: tl.constexpr,
             W: tl.constexpr, ACQ_REL: tl.constexpr):
    """Signal the peers in ``signal_want``, then wait for those in ``wait_want`` (a barrier when both are all peers).

    ACQ_REL=False is the entry barrier: it only orders "the peer has finished
    the kernels that read its buffer" before "we write into that buffer", and
    kernel boundaries on the peer's stream already complete those reads, so
    relaxed atomics suffice.  ACQ_REL=True is the exit barrier: release on
    signal, acquire on wait, system scope, so our pushes are visible to each
    peer before it reads its buffer.  Returns whether the wait timed out.
    """
    # Every thread's earlier stores happen before the one lane per peer signals.
    tl.debug_barrier()
    signal_peers(peer_pads, rank, block, signal_want, W, ACQ_REL)
    timed_out = wait_peers(own_pad, block, wait_want, status, timeout_ns, KIND, W, ACQ_REL)
    # Every thread's later loads and stores happen after the acquiring lanes.
    tl.debug_barrier()
    return timed_out


@triton.jit
def barrier(peer_pads, own_pad, rank, block, status, timeout_ns, KIND: tl.constexpr, W: tl.constexpr,
            ACQ_REL: tl.constexpr):
    """Block ``block`` of every rank meets block ``block`` of every other rank (see ``exchange``)."""
    _, live = peer_lanes(rank, W, peer_pads.shape[0])
    return exchange(peer_pads, own_pad, rank, block, live, live, status, timeout_ns, KIND, W, ACQ_REL)
