"""How a failed push call reaches the host: the error message, the check before each launch, and the watchdog.

A wait that gives up on the device writes the group workspace's status word
and poisons its call's result (kernels/failure.py).  The host learns of it
two ways (docs/contract.md, "A failed call never yields data"):

- **before each launch** the launchers read the status word (host-mapped: a
  plain memory read, no synchronisation) and raise ``failure_message``; the
  word is never cleared, so every later call on the group raises too;
- **the watchdog**, a daemon thread like ProcessGroupNCCL's, reads every
  workspace's status word every ``TPFUSE_WATCHDOG_INTERVAL_S`` seconds.  It is
  what reports a failure while no host code of ours runs: under CUDA-graph
  replay, or while the host waits on something else.  It never touches a
  stream.  ``TPFUSE_WATCHDOG`` says what it does on a failure: ``teardown``
  (the default: print the error and end the process with exit code
  ``TEARDOWN_EXIT_CODE``, as NCCL's async error handling does, so that a
  launcher such as torchrun stops the job), ``report`` (print it once, keep
  running: later calls raise), or ``off`` (no thread).
"""

from __future__ import annotations

import os
import sys
import threading
import time

import torch.distributed as dist

from .. import config as settings
from ..kernels import failure

#: the exit code of a process the watchdog tears down (128 + SIGABRT, as an abort would give)
TEARDOWN_EXIT_CODE = 134

_watched: list = []  # workspaces whose status words the watchdog reads
_reported: set = set()  # ids of the workspaces already reported
#: every report the watchdog made in this process (its message), oldest first
reports: list[str] = []
#: process group -> the failure message of its workspace, once the host has learnt of it: every
#: tpfuse call on such a group raises, whatever backend it would take (all_gather_hidden.py)
failed_groups: dict = {}
_thread: threading.Thread | None = None
_lock = threading.Lock()


def failure_message(ws, op: str = "tpfuse::all_gather_hidden") -> str:
    """What went wrong on ``ws``, by whom, in which call, and how to recover (its status word is non-zero)."""
    which, block, peer = failure.describe(ws.failure_code())
    group = ws.group
    try:
        global_peer = f" (global rank {dist.get_global_rank(group.pg, peer)})"
    except Exception:  # noqa: BLE001 - an emulated or destroyed group has no global ranks
        global_peer = ""
    call = ws.failed_call()
    which_call = f"call {call} on the group (counted on this rank, in host issue order)" if call else "a call"
    return (
        f"{op}: rank {group.rank} of group {group.name!r} timed out in the {which} (block {block}) of "
        f"{which_call} after {ws.timeout_ns / 1e9:g}s waiting for rank {peer}{global_peer}, which never "
        "arrived: that rank skipped, reordered or has not reached this collective. That call's result was "
        "poisoned (NaN for floating dtypes; docs/contract.md). The group's tpfuse workspace has failed: every "
        "later tpfuse call on this group raises. To recover, destroy the process group and create a new one "
        "(its name may be reused); there is no silent re-synchronisation."
    )


def raise_if_failed(ws, op: str = "tpfuse::all_gather_hidden") -> None:
    """Raise if a wait of an earlier call on this workspace timed out (reads host-mapped memory, no sync)."""
    if ws.failure_code():
        message = failure_message(ws, op)
        _mark_failed(ws, message)
        raise RuntimeError(message)


def raise_if_group_failed(group, op: str = "tpfuse::all_gather_hidden") -> None:
    """Raise if the host has learnt that a tpfuse call on ``group`` failed (any backend, any device)."""
    message = failed_groups.get(group.pg)
    if message is not None:
        raise RuntimeError(f"{op}: group {group.name!r} has failed earlier, so this call is refused. "
                           f"The failure: {message}")


def _mark_failed(ws, message: str) -> None:
    pg = getattr(ws.group, "pg", None)
    if pg is not None:
        failed_groups.setdefault(pg, message)


def watch(ws) -> None:
    """Have the watchdog read ``ws``'s status word from now on (starts the thread at the first workspace)."""
    global _thread
    if settings.get("TPFUSE_WATCHDOG") == "off":
        return
    with _lock:
        _watched.append(ws)
        if _thread is None or not _thread.is_alive():
            _thread = threading.Thread(target=_run, name="tpfuse-watchdog", daemon=True)
            _thread.start()


def check_now() -> list[str]:
    """Read every watched status word once and report the new failures; returns their messages."""
    with _lock:
        fresh = [ws for ws in _watched if id(ws) not in _reported and ws.failure_code()]
        _reported.update(id(ws) for ws in fresh)
    messages = [failure_message(ws) for ws in fresh]
    for ws, message in zip(fresh, messages):
        _mark_failed(ws, message)
        _report(message)
    return messages


def _run() -> None:
    while True:
        time.sleep(settings.get("TPFUSE_WATCHDOG_INTERVAL_S"))
        check_now()


def _report(message: str) -> None:
    reports.append(message)
    mode = settings.get("TPFUSE_WATCHDOG")
    print(f"[tpfuse watchdog, pid {os.getpid()}] {message}", file=sys.stderr, flush=True)
    if mode == "teardown":
        print(f"[tpfuse watchdog] tearing the process down (TPFUSE_WATCHDOG=teardown; exit code "
              f"{TEARDOWN_EXIT_CODE}). Set TPFUSE_WATCHDOG=report to keep running.", file=sys.stderr, flush=True)
        os._exit(TEARDOWN_EXIT_CODE)
