"""The barrier push's elided entry barrier on one GPU, W ranks emulated as streams (tests/gpu/flag_one_gpu.py).

The default path copies out (the result is a fresh tensor) and, where the pass
proved it, skips the entry barrier.  Rank 0 is made a slow reader with a
test-only kernel variant that waits before each copy-out (``COPY_DELAY_NS``):
without it the window is too short for the race to show (measured: 0 of 800
corrupted with the entry skipped on one slot), and at sizes where a block moves
several chunks the chunked exit exchange itself keeps a fast rank out of the
tiles the slow one still reads (see ``T`` below).  The proof rests on the two slots
alternating: call k+2 writes the slot call k read, and a rank can start call
k+2 only after call k+1's exit barrier, which every peer enters only after
finishing call k's copy-out (docs/barrier_elision.md).  Here the ranks run
free with a slow reader, and:

- slots alternating, entry skipped (what the pass grants): exact;
- one slot for every call, entry kept: exact (the entry barrier is the guard);
- one slot for every call, entry skipped (the negative control): a fast rank
  pushes call k+1 into the slot a slow rank still copies call k out of, and the
  corruption must show.
"""

import random

import pytest
import torch

from flag_one_gpu import INT_OF_SIZE, OneGpuGroup, as_int, inputs, reference

pytestmark = [pytest.mark.gpu]

# T=2: each block moves one chunk of tiles.  With several chunks, a rank cannot finish call k before
# its peer signalled the last chunk's exit, so a fast rank's call k+1 can only reach the first chunk's
# tiles, which the slow rank copied out long before: the chunked exit exchange fences all but the last
# chunk (measured: 0 of 800 corrupted at T=32 even with a 20 µs slow reader).  One chunk leaves the
# whole window open.
T, WIDTH, CALLS = 2, 4096, 400


def _free_running(slot, skip_entry_sync, seed, W=2):
    """``CALLS`` calls per rank back to back; rank 0 is a slow reader: before each copy-out its kernel waits
    a random 0-20 µs (a test-only kernel variant), and it starts calls after random delays."""
    group = OneGpuGroup([WIDTH] * W, torch.bfloat16, timeout_s=5.0).add_barrier_push()
    for ws in group.workspaces:
        ws.facts.max_blocks = 2  # few blocks: each copies out many tiles, a long read window
    rng = random.Random(seed)
    xs = [inputs(seed * 1000 + j, T, group.widths, group.dtype) for j in range(8)]
    refs = [reference(x) for x in xs]
    order = [rng.randrange(8) for _ in range(CALLS)]
    from tpfuse.compile_ops.barrier import launcher

    delays = (0, 5_000, 20_000)  # ns before each copy-out chunk on rank 0; one variant per delay
    slow = [launcher.launcher(group.workspaces[0], xs[0][0], group.widths, slot=slot, skip_entry_sync=skip_entry_sync,
                              copy_delay_ns=d) for d in delays]
    launchers = [None] + [launcher.launcher(ws, xs[0][r], group.widths, slot=slot, skip_entry_sync=skip_entry_sync)
                          for r, ws in enumerate(group.workspaces) if r]
    outs = [[torch.full((T, W * WIDTH), -1, dtype=INT_OF_SIZE[2], device="cuda").view(group.dtype)
             for _ in range(CALLS)] for _ in range(W)]
    main = torch.cuda.current_stream()
    for r in range(W):
        group.streams[r].wait_stream(main)
        with torch.cuda.stream(group.streams[r]):
            for j, i in enumerate(order):
                if r == 0 and rng.random() < 0.5:
                    torch.cuda._sleep(rng.randint(0, 4000))
                launch = rng.choice(slow) if r == 0 else launchers[r]
                launch(xs[i][r], outs[r][j])
    for r in range(W):
        main.wait_stream(group.streams[r])
    torch.cuda.synchronize()
    corrupted = sum(int(not torch.equal(as_int(outs[r][j]), refs[i])) for r in range(W) for j, i in enumerate(order))
    return corrupted, group.failure_codes()


def test_elided_entry_with_alternating_slots_is_exact():
    corrupted, codes = _free_running(slot=-1, skip_entry_sync=True, seed=1)
    print(f"slots alternating, entry skipped: {corrupted} corrupted of {2 * CALLS}, codes {codes}")
    assert (corrupted, codes) == (0, [0, 0])


def test_one_slot_with_entry_barrier_is_exact():
    corrupted, codes = _free_running(slot=0, skip_entry_sync=False, seed=2)
    print(f"one slot, entry kept: {corrupted} corrupted of {2 * CALLS}, codes {codes}")
    assert (corrupted, codes) == (0, [0, 0])


def test_negative_control_one_slot_entry_skipped_corrupts():
    corrupted, codes = _free_running(slot=0, skip_entry_sync=True, seed=3)
    print(f"one slot, entry skipped (negative control): {corrupted} corrupted of {2 * CALLS}, codes {codes}")
    assert corrupted > 0, "the schedule cannot show the race the entry barrier guards against"
