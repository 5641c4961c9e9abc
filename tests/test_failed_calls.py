"""A failed push call never yields data: its status, its poison, the failed group and the watchdog (CPU).

The kernels' side (a wait that gives up poisons its call's whole result and
names the call) runs in Triton's interpreter (tests/test_flag_protocol.py) and
on a GPU (tests/gpu/test_flag_gather_one_gpu.py); here is what the host does
with the status word, on stand-in workspaces whose status lives in CPU memory.
"""

import os
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tpfuse.compile_ops import failures
from tpfuse.kernels import failure


def _workspace(code=0, call=0, pg=None):
    status = np.array([code, call], dtype=np.int32)
    group = SimpleNamespace(rank=1, name="tp", pg=pg)
    return SimpleNamespace(group=group, timeout_ns=5_000_000_000, status_view=status,
                           failure_code=lambda: int(status[0]), failed_call=lambda: int(status[1]))


@pytest.fixture
def clean_failures():
    saved = (list(failures._watched), set(failures._reported), list(failures.reports), dict(failures.failed_groups))
    failures._watched.clear()
    failures.failed_groups.clear()
    yield
    failures._watched[:], failures.reports[:] = saved[0], saved[2]
    failures._reported.clear()
    failures._reported.update(saved[1])
    failures.failed_groups.clear()
    failures.failed_groups.update(saved[3])


def test_status_codes_round_trip():
    for kind, name in failure.KIND_NAMES.items():
        assert failure.describe(failure.code(kind, 131, 6)) == (name, 131, 6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn,
                                   torch.float8_e5m2])
def test_poison_of_every_floating_dtype_is_nan(dtype):
    bits = failure.poison_bits(str(dtype).removeprefix("torch."), dtype.itemsize)
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32}[dtype.itemsize]
    assert torch.tensor([bits], dtype=ints).view(dtype).float().isnan().all()
    word = failure.poison_word(str(dtype).removeprefix("torch."), dtype.itemsize)
    assert torch.tensor([word], dtype=torch.int32).view(dtype).float().isnan().all()


def test_poison_of_integer_dtypes_is_documented_extreme():
    assert failure.poison_bits("int32", 4) == -(2**31)
    assert failure.poison_bits("int16", 2) == -(2**15)
    assert failure.poison_bits("int8", 1) == -128
    assert torch.tensor([failure.poison_bits("uint8", 1)], dtype=torch.int8).view(torch.uint8).item() == 255
    with pytest.raises(ValueError, match="no poison pattern for dtype complex64; known are"):
        failure.poison_bits("complex64", 8)


def test_message_names_rank_wait_peer_call_and_recovery():
    ws = _workspace(failure.code(3, 7, 0), call=41)
    message = failures.failure_message(ws)
    assert "rank 1 of group 'tp' timed out in the flag wait (block 7) of call 41" in message
    assert "waiting for rank 0" in message and "after 5s" in message
    assert "poisoned" in message and "destroy the process group and create a new one" in message


def test_a_failed_workspace_raises_on_every_later_call_and_marks_its_group(clean_failures):
    pg = object()
    failures.raise_if_failed(_workspace(0, pg=pg))  # nothing failed: no error, nothing marked
    assert not failures.failed_groups
    ws = _workspace(failure.code(2, 0, 3), call=9, pg=pg)
    for _ in range(3):  # the word is never cleared: no silent re-synchronisation
        with pytest.raises(RuntimeError, match="exit barrier .* of call 9 .*waiting for rank 3"):
            failures.raise_if_failed(ws)
    group = SimpleNamespace(pg=pg, name="tp")
    with pytest.raises(RuntimeError, match="group 'tp' has failed earlier, so this call is refused"):
        failures.raise_if_group_failed(group)
    failures.raise_if_group_failed(SimpleNamespace(pg=object(), name="other"))  # other groups are unaffected


def test_watchdog_reports_a_failure_written_into_a_status_word(clean_failures, monkeypatch):
    """The status word is written by the device while no host code of ours runs (graph replay): the
    watchdog thread finds it on its own, reports it once and marks the group failed."""
    monkeypatch.setenv("TPFUSE_WATCHDOG", "report")
    monkeypatch.setenv("TPFUSE_WATCHDOG_INTERVAL_S", "0.05")
    pg = object()
    ws = _workspace(pg=pg)
    failures.watch(ws)
    time.sleep(0.3)
    assert failures.reports == []  # a clean status is never reported
    ws.status_view[:] = (failure.code(3, 2, 0), 17)  # what a kernel writes when a wait gives up
    deadline = time.monotonic() + 5
    while not failures.reports and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(failures.reports) == 1, failures.reports
    assert "flag wait (block 2) of call 17" in failures.reports[0]
    assert pg in failures.failed_groups
    time.sleep(0.3)
    assert len(failures.reports) == 1  # reported once


_TEARDOWN = """
import sys, time
from types import SimpleNamespace
import numpy as np
from tpfuse.compile_ops import failures
from tpfuse.kernels import failure
status = np.zeros(2, dtype=np.int32)
ws = SimpleNamespace(group=SimpleNamespace(rank=0, name="tp", pg=None), timeout_ns=10**9, status_view=status,
                     failure_code=lambda: int(status[0]), failed_call=lambda: int(status[1]))
failures.watch(ws)
status[:] = (failure.code(1, 0, 1), 3)
time.sleep(10)
print("still alive")
"""


def test_watchdog_tears_the_process_down_by_default():
    env = {k: v for k, v in os.environ.items() if not k.startswith("TPFUSE_WATCHDOG")}
    env["TPFUSE_WATCHDOG_INTERVAL_S"] = "0.05"
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", _TEARDOWN], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == failures.TEARDOWN_EXIT_CODE, (done.returncode, done.stderr[-2000:])
    assert "still alive" not in done.stdout
    assert "entry barrier (block 0) of call 3" in done.stderr and "tearing the process down" in done.stderr


def test_watchdog_off_starts_no_thread(clean_failures, monkeypatch):
    monkeypatch.setenv("TPFUSE_WATCHDOG", "off")
    failures.watch(_workspace())
    assert failures._watched == []


def test_watchdog_variables_refuse_bad_values(monkeypatch):
    from tpfuse import config

    monkeypatch.setenv("TPFUSE_WATCHDOG", "kill")
    with pytest.raises(ValueError, match="TPFUSE_WATCHDOG='kill' must be one of teardown, report, off"):
        config.get("TPFUSE_WATCHDOG")
    monkeypatch.setenv("TPFUSE_BARRIER_TIMEOUT_S", "0")
    with pytest.raises(ValueError, match="must be a positive number"):
        config.get("TPFUSE_BARRIER_TIMEOUT_S")


def _call_on_failed_group(rank, world_size):
    import torch.distributed as dist

    import tpfuse

    x = torch.randn(2, 3)
    before = tpfuse.all_gather_hidden(x)  # the group works
    failures.failed_groups[dist.group.WORLD] = "rank 0 timed out in the flag wait (stand-in)"
    try:
        tpfuse.all_gather_hidden(x)
    except RuntimeError as err:
        return tuple(before.shape), str(err)
    return tuple(before.shape), ""


def test_every_backend_refuses_calls_on_a_failed_group():
    """Once the host knows a group failed, even its gloo/NCCL calls raise on that rank, with the cause."""
    from multiproc import run_ranks

    for shape, message in run_ranks(2, _call_on_failed_group):
        assert shape == (2, 6)
        assert "has failed earlier, so this call is refused" in message and "(stand-in)" in message
