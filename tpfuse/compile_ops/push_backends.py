"""The symmetric-memory push backends: the flag protocol, the multicast push and the barrier push.

Each refusal uses only what every rank knows identically: the call's dtype and
sizes, the environment (set alike on every rank), and the group workspace's
agreed facts and capacity, which are set up and grown collectively at the same
call everywhere.  The first push-eligible call on a group sets its workspace up
(collective), so it must run eagerly: under CUDA-graph capture a group not yet
set up, or one whose buffers would have to grow, is refused (every rank
captures the same calls, so every rank falls back alike).  The data path itself
(``push.py``, which needs Triton) is imported only when a call runs.
"""

from __future__ import annotations


import torch

from .. import config as settings
from . import workspace as workspaces
from .backend import Backend, GatherBackend, GatherCall
from .flag_evidence import FLAG_CROSSOVER  # flag_limit reads it from here, so tests patch it here
from .workspace import FLAG_MAX_SLAB_BYTES

#: above this many bytes of output, ``auto`` leaves the gather to NCCL (the
#: workspace holds two slots of this size); ``TPFUSE_PUSH_MAX_BYTES`` overrides.
PUSH_MAX_BYTES = int(settings.VARIABLES["TPFUSE_PUSH_MAX_BYTES"].default)


def flag_limit(device_name: str, world_size: int) -> tuple[int, str]:
    """The largest slab (bytes) ``auto`` sends through the flag protocol, and where that number comes from.

    ``FLAG_CROSSOVER`` (``flag_evidence.py``) holds, per (device name, W), the measured
    crossover and the multi-GPU suite log.  ``auto`` takes the protocol only where both are
    there: a (device, W) not in the table was never measured, and one without a suite log
    has not shown the protocol correct across its GPUs.  ``TPFUSE_FLAG_MAX_BYTES`` overrides
    the table (benchmarks, tuning, tests); it must be set alike on every rank.
    """
    override = settings.get("TPFUSE_FLAG_MAX_BYTES")
    if override is not None:
        return min(override, FLAG_MAX_SLAB_BYTES), "TPFUSE_FLAG_MAX_BYTES"
    where = f"{device_name or 'this device'} at W={world_size}"
    evidence = FLAG_CROSSOVER.get((device_name, world_size))
    if evidence is None:
        return 0, f"flag protocol not measured on {where}"
    if evidence.suite_log is None:
        return 0, f"flag protocol: no committed passing multi-GPU suite for {where}"
    if evidence.crossover_bytes == 0:
        return 0, f"flag protocol: slower than the barrier push already at the smallest measured slab on {where}"
    return min(evidence.crossover_bytes, FLAG_MAX_SLAB_BYTES), f"measured crossover on {where}"


def _multimem_asked() -> bool:
    return settings.get("TPFUSE_ENABLE_MULTIMEM")


class _PushBackend(GatherBackend):
    devices = ("cuda",)

    def refusal(self, call: GatherCall) -> str:
        if call.forced not in ("auto", self.name):
            return f"TPFUSE_BACKEND={call.forced}"
        if call.out_numel >= 2**31:
            return f"{call.out_numel} output elements exceed the kernels' 32-bit indexing"
        if call.forced == "auto" and call.nbytes > settings.get("TPFUSE_PUSH_MAX_BYTES"):
            return f"{call.nbytes} output bytes are above TPFUSE_PUSH_MAX_BYTES: NCCL moves large messages"
        ws, why = self._workspace(call)
        return why or self.refuse_on(call, ws)

    def refuse_on(self, call: GatherCall, ws) -> str:
        """The backend's own conditions, on an agreed, set-up workspace."""
        raise NotImplementedError

    @staticmethod
    def _workspace(call: GatherCall):
        device_index = torch.cuda.current_device()
        ws = workspaces.workspace(call.group, device_index, establish=False)
        if ws is None:
            # Setting up is collective and cannot be captured in a graph.
            if torch.cuda.is_current_stream_capturing():
                return None, "the group's workspace must be set up by an eager call before graph capture"
            ws = workspaces.workspace(call.group, device_index)
        return ws, ("" if ws.facts.push_ok else ws.facts.reason)

    @staticmethod
    def _slots_hold(call: GatherCall, ws) -> str:
        """Grow both slots to hold the result (collective), or say why not."""
        if call.nbytes > ws.slot_bytes:
            if torch.cuda.is_current_stream_capturing():
                return (f"the group's slots must be grown to {call.nbytes} bytes by an eager call before graph "
                        "capture")
            workspaces.ensure_capacity(ws, call.nbytes)  # every rank grows at this call
        return ""

    def gather(self, x, hidden_widths, group, slot, skip_entry_sync, zero_copy):
        return self.prepare(x, hidden_widths, group, slot, skip_entry_sync, zero_copy)(x)

    def prepare(self, x, hidden_widths, group, slot, skip_entry_sync, zero_copy):
        from . import push  # the GPU data path: imported only when a call runs

        return push.prepare(x, hidden_widths, group, Backend(self.name), slot, skip_entry_sync, zero_copy)


class FlagBackend(_PushBackend):
    """Small gathers with no barriers (docs/flag_protocol.md), up to the measured crossover, where the
    protocol's multi-GPU suite passed (``flag_limit``)."""

    name = "flag"

    def refuse_on(self, call: GatherCall, ws) -> str:
        if call.max_slab_numel is None:
            return "the caller runs slot-based protocols only"
        if _multimem_asked():
            return "TPFUSE_ENABLE_MULTIMEM=1 asks for the multicast push"
        slab = call.max_slab_numel * call.dtype.itemsize
        if slab > FLAG_MAX_SLAB_BYTES:
            return f"a slab of {slab} bytes exceeds the flag buffers' {FLAG_MAX_SLAB_BYTES}"
        if call.forced != self.name:
            limit, why = flag_limit(ws.facts.device_name, ws.group.world_size)
            if slab > limit:
                return why if limit == 0 else f"a {slab}-byte slab is above the crossover ({why}: {limit} bytes)"
        if ws.flags is None:
            # Making the buffers is collective and cannot be captured in a graph.
            if torch.cuda.is_current_stream_capturing():
                return "the flag buffers must be set up by an eager call before graph capture"
            workspaces.ensure_flag_buffers(ws, FLAG_MAX_SLAB_BYTES)
        return ""


class MultimemBackend(_PushBackend):
    """NVLink multicast, where every rank has an address and the user asked for it: never on the shared
    hosts (docs/safety.md), where the address is always 0."""

    name = "multimem"

    def refusal(self, call: GatherCall) -> str:
        if not _multimem_asked():
            return "TPFUSE_ENABLE_MULTIMEM is not 1"
        return super().refusal(call)

    def refuse_on(self, call: GatherCall, ws) -> str:
        return self._slots_hold(call, ws) or ("" if ws.multicast_ptr else "no multicast address on every rank")


class BarrierPushBackend(_PushBackend):
    """The push with entry and exit barriers, over two ping-pong slots (docs/safety.md, "Barriers")."""

    name = "p2p"

    def refuse_on(self, call: GatherCall, ws) -> str:
        return self._slots_hold(call, ws)


FLAG = FlagBackend()
MULTIMEM = MultimemBackend()
BARRIER_PUSH = BarrierPushBackend()
