"""Run the flag-protocol gather in Triton's interpreter on the CPU, W ranks simulated in one process.

``TRITON_INTERPRET=1`` executes the kernel's Python body with numpy on CPU
memory; raw addresses work as pointers, so every rank's flag buffer is a plain
CPU tensor whose address goes in ``buf0..7``.  The interpreter runs one launch
at a time, so a call is two launches per rank (``PHASES``): every rank's SEND,
then every rank's RECEIVE.  Interleavings that a GPU produces only by chance
are written out here:

- ``cases``: bit-exact results for every element size, uneven widths, widths
  that are not whole 32-bit words, several calls with T (and so the grid)
  changing between them, a block taking several tiles;
- ``ahead``: a fast peer sends call e+1 before rank 0 has read call e.  With
  the parity alternation that is harmless; with one buffer (``PARITY`` off)
  and stale epochs accepted the corruption shows;
- ``stale``: rank 0 reads call e before a peer sent it, so the peer's region
  holds only an older call's units.  The protocol waits and gives up (the
  status word names the peer; here the wait is bounded by poll iterations);
  with ``ACCEPT_STALE`` it takes the old data;
- ``clear``: with a clear period of 1 the buffers are zeroed after every read
  and the results stay exact;
- ``wrap``: the epoch slots start just below the 32-bit wrap: the kernel's own
  ``next_epoch`` must skip 0 (and 1) and keep the parities alternating;
- ``layout``: where the kernel's own ``region_offset`` puts each source's units
  in a receiver's buffer, against the layout docs/flag_protocol.md states.

Prints one JSON line (tests/test_flag_protocol.py runs it in a subprocess,
because the interpreter is chosen when Triton is imported).
"""

import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from interpreter_support import addressed  # noqa: E402
from tpfuse.kernels import failure  # noqa: E402
from tpfuse.kernels import flag as flag_protocol  # noqa: E402
from tpfuse.kernels.flag import gather as flag_gather  # noqa: E402

INT_OF = {1: torch.uint8, 2: torch.int16, 4: torch.int32}
POLLS = 3  # poll iterations before a wait gives up (the GPU bounds it by %globaltimer)


class Group:
    """W simulated ranks: their flag buffers, epoch slots and status words."""

    def __init__(self, widths, elem_size, max_slab_bytes, block_u=16, **options):
        self.widths, self.elem_size, self.block_u, self.options = widths, elem_size, block_u, options
        self.W = len(widths)
        self.offsets = [0]
        for w in widths:
            self.offsets.append(self.offsets[-1] + w)
        self.region_units = flag_protocol.region_units(max_slab_bytes)
        nbytes = flag_protocol.buffer_bytes(self.W, max_slab_bytes)
        # addresses above 4 GiB, so that the interpreter types them as 64-bit values (interpreter_support.py)
        self.buffers = [addressed(nbytes // 8, torch.int64) for _ in range(self.W)]
        self.epochs = [torch.zeros(flag_protocol.EPOCH_SLOTS, dtype=torch.int32) for _ in range(self.W)]
        self.status = [torch.zeros(failure.STATUS_WORDS, dtype=torch.int32) for _ in range(self.W)]
        self.calls = [0] * self.W  # per rank, the host-issued number of its current call
        self.bufs = [b.data_ptr() for b in self.buffers] + [0] * (8 - self.W)

    def launch(self, rank, x, out, phases, nblocks):
        T = x.shape[0]
        if phases & flag_gather.SEND:
            self.calls[rank] += 1
        flag_gather.flag_gather_kernel[(nblocks,)](
            x, out, self.epochs[rank], self.status[rank], T, POLLS, self.calls[rank], self.region_units, *self.bufs,
            RANK=rank, W=self.W, PEERS=max(1, 1 << (self.W - 2).bit_length()), BAND_OFFSETS=tuple(self.offsets),
            ELEM=self.elem_size, BLOCK_U=self.block_u, POISON=failure.NAN_BITS_OF_SIZE[self.elem_size],
            PHASES=phases, PLAIN_STORES=True, INTERPRET=True, **self.options)

    def slabs(self, T, seed):
        g = torch.Generator().manual_seed(seed)
        return [torch.randint(-(2**31), 2**31 - 1, (T, w), generator=g, dtype=torch.int64).to(INT_OF[self.elem_size])
                for w in self.widths]

    def poisoned(self, T):
        return [torch.full((T, self.offsets[-1]), 0x5A, dtype=INT_OF[self.elem_size]) for _ in range(self.W)]

    def grid(self, T):
        units = flag_protocol.units_for(T * max(self.widths), self.elem_size)
        return max(1, min(3, -(-units // self.block_u)))  # at most 3 blocks: blocks take several tiles

    def call(self, slabs, send_order=None, receive_order=None):
        """One gather: SEND on every rank (in ``send_order``), then RECEIVE; returns every rank's result."""
        T = slabs[0].shape[0]
        outs = self.poisoned(T)
        for r in send_order or range(self.W):
            self.launch(r, slabs[r], outs[r], flag_gather.SEND, self.grid(T))
        for r in receive_order or range(self.W):
            self.launch(r, slabs[r], outs[r], flag_gather.RECEIVE, self.grid(T))
        return outs


def exact(outs, slabs):
    want = torch.cat(slabs, dim=-1)
    return all(torch.equal(o, want) for o in outs)


def cases():
    """Several calls per group with T changing, each checked bit-exact on every rank."""
    results = []
    for widths, elem in [([8, 8], 2), ([7, 5, 9], 2), ([3, 1], 1), ([5, 6, 7, 9], 1), ([3, 4], 4), ([9] * 8, 2)]:
        group = Group(widths, elem, max_slab_bytes=64 * max(widths) * elem)
        for i, T in enumerate([1, 5, 40, 2, 1]):
            slabs = group.slabs(T, seed=i)
            outs = group.call(slabs)
            results.append({"widths": widths, "elem": elem, "T": T, "nblocks": group.grid(T), "exact": exact(outs, slabs),
                            "status": [int(s[0]) for s in group.status], "epoch": int(group.epochs[0][0])})
    return results


def ahead(parity=True, accept_stale=False):
    """Rank 1 finishes call e and sends call e+1 before rank 0 reads call e."""
    group = Group([8, 8], 2, max_slab_bytes=4 * 8 * 2, PARITY=parity, ACCEPT_STALE=accept_stale)
    first, second = group.slabs(4, seed=1), group.slabs(4, seed=2)
    outs = group.poisoned(4)
    for r in (0, 1):
        group.launch(r, first[r], outs[r], flag_gather.SEND, 1)
    group.launch(1, first[1], outs[1], flag_gather.RECEIVE, 1)
    later = group.poisoned(4)
    group.launch(1, second[1], later[1], flag_gather.SEND, 1)  # rank 1's next call
    group.launch(0, first[0], outs[0], flag_gather.RECEIVE, 1)
    return {"exact": exact(outs, first), "status": int(group.status[0][0])}


def stale(accept_stale=False):
    """Rank 0 reads call 5 before rank 1 sent it: rank 1's region holds call 3's units (same parity).

    (Calls 1 and 2 zero their buffers after reading them, as every call
    whose ``(e >> 1) % CLEAR_PERIOD == 0`` does, so call 3 is the stale one.)
    """
    group = Group([8, 8], 2, max_slab_bytes=4 * 8 * 2, ACCEPT_STALE=accept_stale)
    for seed in range(1, 5):
        group.call(group.slabs(4, seed=seed))
    third = group.slabs(4, seed=5)
    outs = group.poisoned(4)
    group.launch(0, third[0], outs[0], flag_gather.SEND, 1)
    group.launch(0, third[0], outs[0], flag_gather.RECEIVE, 1)
    return {"exact": exact(outs[:1], third), "status": int(group.status[0][0]), "call": int(group.status[0][1]),
            "poisoned": poisoned_everywhere(outs[0], group.elem_size)}


def poisoned_everywhere(out, elem_size):
    """Every element of ``out`` holds the poison pattern (a timed-out call's result, kernels/failure.py)."""
    bits = failure.NAN_BITS_OF_SIZE[elem_size]
    bits = bits - (1 << (8 * elem_size)) if bits >> (8 * elem_size - 1) else bits
    return bool((out.view(INT_OF[elem_size]).to(torch.int64) & ((1 << (8 * elem_size)) - 1)
                 == (bits & ((1 << (8 * elem_size)) - 1))).all())


def missing(elem, widths):
    """Rank 1 never arrives at call 2: rank 0's wait gives up, its whole result is poison, the call is named."""
    group = Group(widths, elem, max_slab_bytes=8 * max(widths) * elem)
    group.call(group.slabs(3, seed=1))
    slabs = group.slabs(3, seed=2)
    outs = group.poisoned(3)
    group.launch(0, slabs[0], outs[0], flag_gather.SEND, group.grid(3))
    group.launch(0, slabs[0], outs[0], flag_gather.RECEIVE, group.grid(3))
    return {"status": int(group.status[0][0]), "call": int(group.status[0][1]),
            "poisoned": poisoned_everywhere(outs[0], elem)}


def clear():
    """A clear period of 1: every read zeroes the buffer it read; results stay exact.

    The regions (250 units) are no whole number of tiles, so a block that
    zeroed tiles by another tiling than the one it reads by would wipe a
    later block's units before that block read them (its wait would give up).
    """
    group = Group([7, 5, 9], 2, max_slab_bytes=1000, CLEAR_PERIOD=1)
    results = []
    for i, T in enumerate([3, 9, 1, 4]):
        slabs = group.slabs(T, seed=i)
        results.append(exact(group.call(slabs), slabs))
    # e = 4 was the last call: (4 >> 1) & 0 == 0, so buffer parity 0 is zeroed on every rank.
    zeroed = all(int(b[: group.W * group.region_units].abs().sum()) == 0 for b in group.buffers)
    return {"exact": all(results), "parity0_zeroed": zeroed, "status": [int(s[0]) for s in group.status]}


def wrap():
    """Epoch slots at 0xFFFFFFFE on every rank: the calls take 0xFFFFFFFF, then 2, 3 (never 0 or 1)."""
    group = Group([5, 3, 4], 2, max_slab_bytes=8 * 5 * 2)
    for epochs in group.epochs:
        epochs.fill_(-2)  # 0xFFFFFFFE as int32 bits
    results = []
    for i, T in enumerate([2, 8, 1]):
        slabs = group.slabs(T, seed=40 + i)
        exact_now = exact(group.call(slabs), slabs)
        results.append({"epoch": int(group.epochs[0][0]) & 0xFFFFFFFF, "exact": exact_now,
                        "slots_agree": all(bool((e == group.epochs[0][0]).all()) for e in group.epochs),
                        "status": [int(st[0]) for st in group.status]})
    return results


def layout():
    """After every rank sent call 1 (epoch 1, parity 1) and before anyone read it (a read of call 1 zeroes
    what it read: ``clear``): each receiver's buffer holds source s's units, flagged 1, at the start of
    region (1, s), that is from unit (1 * W + s) * region_units, and nothing anywhere else."""
    widths, elem, T = [7, 5, 9], 2, 3
    group = Group(widths, elem, max_slab_bytes=4 * max(widths) * elem)
    slabs = group.slabs(T, seed=7)
    outs = group.poisoned(T)
    for r in range(group.W):
        group.launch(r, slabs[r], outs[r], flag_gather.SEND, group.grid(T))
    W, units = group.W, group.region_units
    placed = []
    for r, buffer in enumerate(group.buffers):
        flags = torch.zeros_like(buffer)
        for s in range(W):
            if s != r:
                start = (1 * W + s) * units
                flags[start: start + flag_protocol.units_for(T * widths[s], elem)] = 1
        placed.append(bool(((buffer >> 32) == flags).all()) and bool((buffer[flags == 0] == 0).all()))
    for r in range(group.W):
        group.launch(r, slabs[r], outs[r], flag_gather.RECEIVE, group.grid(T))
    return {"exact": exact(outs, slabs), "placed": placed, "status": [int(st[0]) for st in group.status]}


if __name__ == "__main__":
    print(json.dumps({
        "cases": cases(),
        "ahead": ahead(),
        "ahead_one_buffer": ahead(parity=False),
        "ahead_one_buffer_accept_stale": ahead(parity=False, accept_stale=True),
        "stale": stale(),
        "stale_accepted": stale(accept_stale=True),
        "clear": clear(),
        "wrap": wrap(),
        "layout": layout(),
        "missing": [missing(elem, widths) for elem, widths in ((1, [5, 3]), (2, [8, 7, 9]), (4, [3, 4]))],
    }))
