"""Program order per group, host side (CPU, with a stand-in CUDA stream runtime).

What ``ProgramOrder`` must do on the host: nothing when a call is on the previous
call's stream; when the stream changes, make the new stream wait for an event
recorded now on the previous one; no edge between eager work and a capture;
and under the lock a total order of call numbers across threads.  The GPU
side (two streams released together on one rank, 0 wrong results in 300
trials, and the control without the ordering) is tests/gpu/test_flag_gather_one_gpu.py.
"""

import contextlib
import threading

import pytest
import torch

from tpfuse.compile_ops import program_order
from tpfuse.compile_ops.program_order import ProgramOrder


class Runtime:
    """Streams, events and capture state, recorded instead of run."""

    def __init__(self):
        self.current = Stream(self, 7)
        self.capturing = set()  # handles of capturing streams
        self.log = []  # ("record", stream handle) / ("wait", stream handle)

    def install(self, monkeypatch):
        monkeypatch.setattr(program_order, "raw_stream", lambda device: self.current.cuda_stream)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: self.current)
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing",
                            lambda: self.current.cuda_stream in self.capturing)
        monkeypatch.setattr(torch.cuda, "stream", self._use)
        monkeypatch.setattr(torch.cuda, "Event", lambda: Event(self))
        return self

    @contextlib.contextmanager
    def _use(self, stream):
        saved, self.current = self.current, stream
        try:
            yield
        finally:
            self.current = saved


class Stream:
    def __init__(self, runtime, handle):
        self.runtime, self.cuda_stream = runtime, handle

    def wait_event(self, event):
        self.runtime.log.append(("wait", self.cuda_stream, event.recorded_on))


class Event:
    def __init__(self, runtime):
        self.runtime, self.recorded_on = runtime, None

    def record(self, stream):
        self.recorded_on = stream.cuda_stream
        self.runtime.log.append(("record", stream.cuda_stream))


@pytest.fixture
def runtime(monkeypatch):
    return Runtime().install(monkeypatch)


def _call(order, runtime, stream=None):
    if stream is not None:
        runtime.current = stream
    with order.lock:
        return order.next_call(0)


def test_same_stream_calls_add_nothing(runtime):
    order = ProgramOrder()
    assert [_call(order, runtime) for _ in range(3)] == [(7, 1), (7, 2), (7, 3)]
    assert runtime.log == []


def test_a_changed_stream_waits_for_everything_queued_on_the_previous_one(runtime):
    order = ProgramOrder()
    side = Stream(runtime, 9)
    _call(order, runtime)
    assert _call(order, runtime, side) == (9, 2)
    assert runtime.log == [("record", 7), ("wait", 9, 7)]  # recorded on the old stream now, waited on by the new
    runtime.log.clear()
    _call(order, runtime, side)
    assert runtime.log == []  # back to free
    main = Stream(runtime, 7)
    _call(order, runtime, main)
    assert runtime.log == [("record", 9), ("wait", 7, 9)]


def test_negative_control_unordered_adds_no_edge(runtime):
    order = ProgramOrder(enforce=False)
    _call(order, runtime)
    _call(order, runtime, Stream(runtime, 9))
    assert runtime.log == []


def test_no_edge_joins_eager_work_and_a_capture(runtime):
    order = ProgramOrder()
    _call(order, runtime)  # eager on stream 7
    capture = Stream(runtime, 11)
    runtime.capturing.add(11)
    _call(order, runtime, capture)
    assert runtime.log == []  # a captured call cannot wait on eager work
    fork = Stream(runtime, 12)
    runtime.capturing.add(12)
    _call(order, runtime, fork)
    assert runtime.log == [("record", 11), ("wait", 12, 11)]  # within one capture: a fork/join edge


def test_call_numbers_are_a_total_order_across_threads(runtime):
    order = ProgramOrder()
    numbers, lock = [], threading.Lock()

    def issue():
        for _ in range(2000):
            _, call = _call(order, runtime)
            with lock:
                numbers.append(call)

    threads = [threading.Thread(target=issue) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(numbers) == list(range(1, 16001))


def test_call_numbers_skip_zero_when_they_wrap(runtime):
    order = ProgramOrder()
    order.calls = 0x7FFFFFFE
    assert [_call(order, runtime)[1] for _ in range(3)] == [0x7FFFFFFF, 1, 2]
