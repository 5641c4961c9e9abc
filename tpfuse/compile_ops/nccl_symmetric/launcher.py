"""The nccl_symmetric backend's one launcher: the op's backend (backend.py), the tune's runner and the benchmark
call it alike.

``launcher`` does once per call shape what does not change between calls: windows big enough for the shape
(windows.py, collective at the first call that needs them).  The views into the windows follow the group's
current pair (made again when the windows grow), never the pair the launcher first saw.  The ``launch`` it
returns checks the group's status word (a push call that failed on the group fails every later call,
docs/contract.md), then, as one step in the group's host issue order (program_order.py), copies the slab
into the send window, all-gathers into the receive window and rearranges the bands into a fresh result.
The order matters here as it does for the push protocols: every call of the group shares the windows, so a
call on another stream must not overwrite them while an earlier call still reads them.  On one stream,
stream order does it (the collective waits for the copy in, the rearrange for the collective).

A peer that never arrives is NCCL's to report (its watchdog), as on the ``nccl`` backend.
"""

from __future__ import annotations

import torch

from ..failures import raise_if_failed
from ..groups import all_gather_single
from .windows import ensure_windows

#: the copies move an integer of the element's size: bit-exact for every dtype, float8 included
_WIRE = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def launcher(ws, x, hidden_widths):
    """The launcher ``launch(x, out=None) -> result`` of every call shaped like ``x`` on workspace ``ws``.

    ``out`` (tests only) is the caller-owned result to fill.  Raises, naming the agreed reason, where the
    group cannot have windows (the backend refuses those calls; a direct caller may not have asked it)."""
    shape = tuple(x.shape[:-1]) + (sum(hidden_widths),)
    tokens = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if tokens == 0:  # identical on every rank: every rank skips
        return lambda x, out=None: x.new_empty(shape) if out is None else out
    width, dtype = x.shape[-1], x.dtype
    wire = _WIRE[x.element_size()]
    windows = ensure_windows(ws, tokens * max(hidden_widths) * x.element_size())
    if windows.reason:
        raise RuntimeError(f"tpfuse: nccl_symmetric cannot run on group {ws.group.name!r}: {windows.reason}")
    pg, device_index, order, status = ws.group.pg, x.device.index, ws.order, ws.status_view
    views = None

    def launch(x, out=None):
        nonlocal views
        if status is not None and status[0]:
            raise_if_failed(ws)
        if out is None:
            out = torch.empty(shape, dtype=dtype, device=x.device)
        with order.lock:  # this call's place in the group's host order and its work are one step
            order.next_call(device_index)
            # The group's current windows, never the ones this launcher saw when it was made: every rank
            # grows them at the same call, but keeping a launcher is rank-local (a peer may have dropped
            # and remade its own), and two ranks on different windows would not meet in one.
            if views is None or views[0] is not windows.send or views[1] is not windows.recv:
                views = (windows.send, windows.recv, *_views(windows, tokens, width, hidden_widths, wire))
            _, _, send_bytes, recv_bytes, send, bands = views
            send.copy_(x.reshape(tokens, width).view(wire))
            all_gather_single(recv_bytes, send_bytes, group=pg)
            torch.cat(bands, dim=-1, out=out.view(tokens, -1).view(wire))
        return out

    return launch


def _views(windows, tokens: int, width: int, hidden_widths, wire: torch.dtype) -> tuple:
    """(send bytes, receive bytes, this rank's slab in the send window, every rank's band in the receive
    window) of a ``tokens``-row call in ``windows``' current pair."""
    widest, W = max(hidden_widths), len(hidden_widths)
    slab = tokens * widest * wire.itemsize
    send_bytes, recv_bytes = windows.send[:slab], windows.recv[:W * slab]
    send = send_bytes.view(wire).view(tokens, widest)[:, :width]  # padding columns are never read
    stacked = recv_bytes.view(wire).view(W, tokens, widest)
    return send_bytes, recv_bytes, send, [stacked[r, :, :w] for r, w in enumerate(hidden_widths)]
