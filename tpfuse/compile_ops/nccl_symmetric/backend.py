"""The ``nccl_symmetric`` backend: NCCL's all-gather between buffers registered as NCCL symmetric windows.

Tried after ``p2p`` and before ``nccl`` (dispatch.BACKENDS): where p2p does not take a call, it may replace
NCCL's classic path.  Its refusal, in the three steps of push_backend.py, each rank-invariant:

1. the call: forcing, and the group (windows register on a ProcessGroupNCCL: "not a CUDA group");
2. the agreed facts, under ``auto`` only: the tuned config every rank agreed on must hold a passing
   nccl_symmetric record and a crossover for it (tuned.CROSSOVERS), and the output must be within
   that crossover: ``auto`` never takes it by default.  ``TPFUSE_BACKEND=nccl_symmetric`` skips this step;
3. the group's windows (windows.py): made or grown collectively, never under graph capture, and only where
   every rank's NCCL (2.27 or later), torch (a ``register_mem_pool`` that takes ``symm``) and
   ``NCCL_NVLS_ENABLE=0`` allow (support.py); every rank refuses alike, with the same reason.

At compile time (no group) the planned facts and this process's software stand in for steps 2 and 3.  It
has no fused linear kernel, so it takes no fused linear call (the op runs ``linear``, then the gather, which
may come here).  The pass's permissions do not apply: no slot, no barrier, always a fresh result.
"""

from __future__ import annotations

import torch

from .. import failures
from .. import workspace as workspaces
from ..backend import DEPENDS_ON_T, Backend, GatherBackend, GatherCall
from . import launcher, support
from .windows import room_refusal


class NcclSymmetricBackend(GatherBackend):
    name = Backend.NCCL_SYMMETRIC.value
    devices = ("cuda",)
    takes_fused_linear = False
    #: the tuned config's crossover (tuned.CROSSOVERS) that caps the outputs ``auto`` gives it
    crossover = "nccl_symmetric"

    def refusal(self, call: GatherCall) -> str:
        why = self.call_refusal(call)
        if why:
            return why
        if call.group is None:  # compile time: the planned facts and this process stand in
            return self.facts_refusal(call, call.planned_facts) or support.software_refusal()
        if call.forced == "auto":
            # The config the group agreed on lives in its workspace.  A group no earlier call set one up on has
            # none yet, and auto does not set one up (symmetric memory, collectively) for a backend that no
            # config chose; every rank has made the same calls, so every rank refuses alike.
            ws = workspaces.workspace(call.group, torch.cuda.current_device(), establish=False)
            if ws is None:
                return "no tuned config agreed on this group yet (the first call a push backend takes agrees on it)"
            if not ws.facts.push_ok:
                return f"push workspace unavailable: {ws.facts.reason}"
        else:
            ws, why = workspaces.set_up_for_call(call.group)
            if ws is None:  # under capture, on a group not set up yet
                return why
        return self.facts_refusal(call, ws.facts) or self.state_refusal(call, ws)

    def call_refusal(self, call: GatherCall) -> str:
        """What the call alone rules out (step 1)."""
        if call.forced not in ("auto", self.name):
            return f"TPFUSE_BACKEND={call.forced}"
        return support.group_refusal(call.group) if call.group is not None else ""

    def facts_refusal(self, call: GatherCall, facts) -> str:
        """Under ``auto``: the agreed tuned config's record and crossover (step 2)."""
        if call.forced == self.name:
            return ""
        selection = getattr(facts, "selection", None)
        cap = selection.crossover(self.crossover) if selection is not None else None
        source = selection.source() if selection is not None else "no tuned config"
        if cap is None:
            return (f"auto takes it only from a tuned config with a passing {self.name} record and its crossover "
                    f"({source}: none)")
        if cap == 0:
            return f"its crossover with nccl is 0 bytes ({source}): slower than nccl already at the smallest output"
        if call.tokens is None:
            return DEPENDS_ON_T
        if call.nbytes > cap:
            return f"a {call.nbytes}-byte output is above its crossover with nccl ({cap} bytes, {source})"
        return ""

    def state_refusal(self, call: GatherCall, ws) -> str:
        """The group's windows, made or grown for this call (collective), or why not (step 3)."""
        return room_refusal(ws, call.slab_bytes)

    def why_taken(self, call: GatherCall) -> str:
        selection = call.planned_facts.selection
        return (f"a {call.nbytes}-byte output, within its crossover with nccl "
                f"({selection.crossover(self.crossover)} bytes, {selection.source()})")

    def prepare(self, x, hidden_widths, group, slot=-1, skip_entry_sync=False, zero_copy=False):
        """The launcher of calls shaped like ``x``; ``slot``, ``skip_entry_sync`` and ``zero_copy`` have no use
        here: NCCL orders its own calls, and the result is always a fresh tensor the caller owns."""
        ws = workspaces.workspace(group, x.device.index)
        failures.raise_if_failed(ws)  # a group whose push call failed takes no new call shape either
        return launcher.launcher(ws, x, hidden_widths)

    def gather(self, x, hidden_widths, group, slot=-1, skip_entry_sync=False, zero_copy=False):
        return self.prepare(x, hidden_widths, group)(x)


NCCL_SYMMETRIC = NcclSymmetricBackend()
