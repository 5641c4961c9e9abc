"""What every symmetric-memory push backend refuses alike (flag/, barrier/ build on it).

A push backend's refusal runs in three steps, each answering from what every rank
knows identically (docs/contract.md §2):

1. ``call_refusal``: the call alone (forcing, 32-bit indexing, the size policy and
   the protocol's own limits);
2. ``facts_refusal``: the group's agreed facts (the workspace is set up first,
   collectively, at the same call on every rank; at compile time the local
   device's facts stand in for them);
3. ``state_refusal``: the group's buffers, which a protocol sets up or grows here,
   collectively, or refuses under CUDA-graph capture (a collective cannot be
   captured; every rank captures the same calls, so every rank falls back alike).

The planner (``dispatch.planned_backend``) asks steps 1 and 2 only: at compile time
there is no group and no buffer.
"""

from __future__ import annotations

from .. import config as settings
from . import workspace as workspaces
from .backend import DEPENDS_ON_T, GatherBackend, GatherCall


def multimem_asked() -> bool:
    """``TPFUSE_ENABLE_MULTIMEM=1``: the user asked for the multicast push (same on every rank)."""
    return settings.get("TPFUSE_ENABLE_MULTIMEM")


class PushBackend(GatherBackend):
    devices = ("cuda",)

    def refusal(self, call: GatherCall) -> str:
        why = self.call_refusal(call)
        if why or call.group is None:  # compile time: the call and the planned facts are all there is
            return why or self.facts_refusal(call, call.planned_facts)
        ws, why = workspaces.set_up_for_call(call.group)
        return why or self.facts_refusal(call, ws.facts) or self.state_refusal(call, ws)

    def call_refusal(self, call: GatherCall) -> str:
        """What the call alone rules out (step 1)."""
        if call.forced not in ("auto", self.name):
            return f"TPFUSE_BACKEND={call.forced}"
        if call.tokens is None:
            return DEPENDS_ON_T
        if call.out_numel >= 2**31:
            return f"{call.out_numel} output elements exceed the kernels' 32-bit indexing"
        if call.forced == "auto" and call.nbytes > settings.get("TPFUSE_PUSH_MAX_BYTES"):
            return f"{call.nbytes} output bytes are above TPFUSE_PUSH_MAX_BYTES: NCCL moves large messages"
        return ""

    def facts_refusal(self, call: GatherCall, facts) -> str:
        """What the group's agreed facts rule out (step 2)."""
        return "" if facts.push_ok else facts.reason

    def state_refusal(self, call: GatherCall, ws) -> str:
        """Set the protocol's buffers up for ``call`` (collective), or say why not (step 3)."""
        return ""

    def gather(self, x, hidden_widths, group, slot=-1, skip_entry_sync=False, zero_copy=False):
        return self.prepare(x, hidden_widths, group, slot, skip_entry_sync, zero_copy)(x)
