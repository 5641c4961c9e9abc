"""Cross-GPU barrier device functions over symmetric-memory signal pads.

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
peer (CONTEXT §6: 7.6 us at W=4 against 2.5 us in parallel).

Bounded spin.  Every wait gives up after ``timeout_ns`` of %globaltimer time,
writes ``kind * 65536 + block * 256 + missing_peer + 1`` into a status word
(host-mapped, so the host reads it without synchronising) and returns; the host
turns that into an error naming the rank and the peer that never arrived.

Triton 3.6 crashes on ``while`` loops that carry a tensor (CONTEXT §6), so the
spin loop carries scalars only: the smallest slot value over the peers and the
elapsed time.
"""

import triton
import triton.language as tl
from triton.language.extra.cuda import globaltimer

# Status word codes: which barrier gave up (the peer and block are added).
ENTRY_TIMEOUT = tl.constexpr(1)
EXIT_TIMEOUT = tl.constexpr(2)


@triton.jit
def peer_lanes(rank, W: tl.constexpr, WP: tl.constexpr):
    """Lane ``i`` stands for peer ``i``; lanes past W and our own rank are off."""
    peers = tl.arange(0, WP)
    return peers, (peers < W) & (peers != rank)


@triton.jit
def signal_peers(signal_pads, rank, block, want, W: tl.constexpr, RELEASE: tl.constexpr):
    """Add 1 to slot (block, rank) on every peer whose lane is in ``want``, one lane per peer.

    ``signal_pads`` points to W uint64 addresses, rank r's signal pad at index
    r (the symmetric handle's ``signal_pad_ptrs_dev``).  With RELEASE the add
    is a system-scope release: every store this block made before it (the
    caller puts a CTA barrier in front, so all threads' stores count) is
    visible to a peer that acquires the slot's new value.
    """
    peers = tl.arange(0, want.shape[0])
    pads = tl.load(signal_pads + peers, mask=want, other=0).to(tl.pointer_type(tl.int32))
    slots = pads + block * W + rank
    if RELEASE:
        tl.atomic_add(slots, 1, mask=want, sem="release", scope="sys")
    else:
        tl.atomic_add(slots, 1, mask=want, sem="relaxed", scope="sys")


@triton.jit
def wait_peers(signal_pads, rank, block, want, status, timeout_ns, KIND: tl.constexpr, W: tl.constexpr,
               ACQUIRE: tl.constexpr):
    """Spin until slot (block, peer) on our pad is >= 1 for every peer in ``want``, then consume one signal each.

    The spin reads are relaxed; with ACQUIRE the consuming decrement is a
    system-scope acquire, so this block's later reads see everything the peer
    released before its signal (the caller puts a CTA barrier after this, so
    every thread of the block is ordered after the acquire).  Returns whether
    it gave up (and then records the missing peer in ``status``).
    """
    WP: tl.constexpr = want.shape[0]
    peers = tl.arange(0, WP)
    own_pad = tl.load(signal_pads + rank).to(tl.pointer_type(tl.int32))
    slots = own_pad + block * W + peers
    # A relaxed RMW of 0 reads the slot coherently at system scope.
    lo = tl.min(tl.where(want, tl.atomic_add(slots, 0, mask=want, sem="relaxed", scope="sys"), 1), axis=0)
    start = globaltimer()
    elapsed = start - start
    while (lo < 1) & (elapsed < timeout_ns):
        lo = tl.min(tl.where(want, tl.atomic_add(slots, 0, mask=want, sem="relaxed", scope="sys"), 1), axis=0)
        elapsed = globaltimer() - start
    if ACQUIRE:
        before = tl.atomic_add(slots, -1, mask=want, sem="acquire", scope="sys")
    else:
        before = tl.atomic_add(slots, -1, mask=want, sem="relaxed", scope="sys")
    # A lane whose slot was still 0 when we consumed it never arrived: we timed out.
    missing = tl.min(tl.where(want & (before < 1), peers, WP), axis=0)
    if missing < WP:
        # Keep the first report (a later barrier of a failed call gives up at
        # once and may name another peer).  Plain load and store: the status
        # word lives in host-mapped memory, where atomics are not guaranteed
        # over PCIe; any of the racing first writers' codes is a correct report.
        if tl.load(status, volatile=True) == 0:
            tl.store(status, KIND * 65536 + block * 256 + missing + 1)
    return missing < WP


@triton.jit
def exchange(signal_pads, rank, block, signal_want, wait_want, status, timeout_ns, KIND: tl.constexpr,
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
    signal_peers(signal_pads, rank, block, signal_want, W, ACQ_REL)
    timed_out = wait_peers(signal_pads, rank, block, wait_want, status, timeout_ns, KIND, W, ACQ_REL)
    # Every thread's later loads and stores happen after the acquiring lanes.
    tl.debug_barrier()
    return timed_out


@triton.jit
def barrier(signal_pads, rank, block, status, timeout_ns, KIND: tl.constexpr, W: tl.constexpr,
            WP: tl.constexpr, ACQ_REL: tl.constexpr):
    """Block ``block`` of every rank meets block ``block`` of every other rank (see ``exchange``)."""
    _, live = peer_lanes(rank, W, WP)
    return exchange(signal_pads, rank, block, live, live, status, timeout_ns, KIND, W, ACQ_REL)
