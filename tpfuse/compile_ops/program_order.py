"""Program order per group: a group's push calls pair across ranks in the order the host issued them.

The push protocols pair the k-th call of one rank with the k-th call of every
peer *in the order the GPU runs them* (the flag protocol's epochs and the
barriers' counters advance on the device).  Two calls on one group issued from
two streams could run in either order, or at once, on one rank while a peer
runs them in host order: the calls would then exchange each other's bytes with
a clean status.  ProcessGroupNCCL avoids this by running every collective of a
group on the group's own stream, in host order; we keep the caller's stream
(a same-stream call must cost nothing on the GPU) and order across streams
only when the stream changes (docs/contract.md, "Program order per group"):

- a call on the same stream as the group's previous call needs nothing:
  stream order already runs it after everything issued before it;
- a call on another stream first makes that stream wait for an event recorded
  *now* on the previous call's stream, so it starts only after every call of
  the group issued before it has finished on this rank;
- the lock makes "issued before" a total order across host threads: a call
  takes its number, its slot and its place in the stream order under it.

So on every rank the GPU runs the group's calls one at a time, in host order,
which is also what lets ``take_epoch`` (a plain load and store) be correct:
two flag kernels of one group are never in flight at once on one rank.

CUDA graphs.  A dependency can only join two streams in the same capture
state: both eager, or both capturing (a fork/join inside one capture).  A
call captured on a stream whose predecessor ran eagerly gets no edge: the
graph's calls keep their captured order, and a replay is ordered against
eager calls by the stream it is replayed on, as with NCCL collectives captured
in a graph.  Two captures at once on one group are not supported.
"""

from __future__ import annotations

import threading

import torch


class ProgramOrder:
    """The host issue order of one group's push calls on one device.

    Use ``with order.lock: stream, call = order.next_call(device_index)`` and
    launch on ``stream`` inside the block.  ``enforce=False`` is the tests'
    negative control: calls from different streams are then left unordered.
    """

    def __init__(self, enforce: bool = True):
        self.lock = threading.Lock()
        self.enforce = enforce
        self.calls = 0  # calls issued on the group from this process, for naming a failed one
        self._stream_handle = None  # raw handle of the group's previous call's stream
        self._stream = None  # and that stream (kept to record on when the stream changes)

    def next_call(self, device_index: int) -> tuple[int, int]:
        """The raw stream this call runs on, ordered after every earlier call of the group; and the call's number.

        Call it holding ``self.lock``.  The number is 1, 2, ... (never 0, which the
        status word reads as "no failed call"), wrapping below 2**31.
        """
        handle = raw_stream(device_index)
        if handle != self._stream_handle:
            self._follow(device_index, handle)
        self.calls += 1
        return handle, (self.calls - 1) % 0x7FFFFFFF + 1

    def _follow(self, device_index: int, handle: int) -> None:
        """The stream changed: the current stream waits for everything queued on the previous one so far."""
        current = torch.cuda.current_stream(device_index)
        previous = self._stream
        self._stream_handle, self._stream = handle, current
        if previous is None or not self.enforce:
            return
        capturing = torch.cuda.is_current_stream_capturing()
        with torch.cuda.stream(previous):
            previous_capturing = torch.cuda.is_current_stream_capturing()
        if capturing != previous_capturing:
            return  # no edge joins eager work and a capture (module docstring, "CUDA graphs")
        event = torch.cuda.Event()
        event.record(previous)
        current.wait_event(event)


def raw_stream(device_index):
    """The current CUDA stream's handle, for launching compiled kernels directly."""
    return torch.cuda.current_stream(device_index).cuda_stream


if hasattr(torch._C, "_cuda_getCurrentRawStream"):
    raw_stream = torch._C._cuda_getCurrentRawStream  # noqa: F811  (the same, ~10x cheaper)
