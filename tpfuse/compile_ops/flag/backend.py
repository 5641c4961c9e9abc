"""The flag protocol's backend, ``flag``: small gathers with no barriers, where the evidence allows it.

Its refusal (push_backend.py's three steps): the call alone (forcing, sizes, the
multicast push asked for instead, the buffers' capacity), the agreed facts (the
measured crossover for the group's GPU model and W: the agreed tuned config's, else
evidence.py's), and the group's
buffers (made at the first flag call, never under graph capture).  It prepares and
launches its own calls through ``launcher.py``.  It has no fused linear kernel, so
it takes no fused linear call.  Safety argument: docs/flag_protocol.md.
"""

from __future__ import annotations

import torch

from .. import workspace as workspaces
from ..backend import Backend, GatherCall
from ..push_backend import PushBackend, multimem_asked
from . import evidence, launcher
from .buffers import buffers_of, capacity_refusal, ensure_buffers


class FlagBackend(PushBackend):
    """Small gathers with no barriers (docs/flag_protocol.md), up to the measured crossover, where the
    protocol's multi-GPU suite passed (``evidence.flag_limit``)."""

    name = Backend.FLAG.value
    takes_fused_linear = False

    def call_refusal(self, call: GatherCall) -> str:
        why = super().call_refusal(call)
        if why:
            return why
        if multimem_asked():
            return "TPFUSE_ENABLE_MULTIMEM=1 asks for the multicast push"
        return capacity_refusal(call.slab_bytes)

    def facts_refusal(self, call: GatherCall, facts) -> str:
        why = super().facts_refusal(call, facts)
        if why or call.forced == self.name:
            return why
        limit, source = evidence.flag_limit(facts.device_name, len(call.hidden_widths), facts.selection)
        if call.slab_bytes <= limit:
            return ""
        slab = call.slab_bytes
        return source if limit == 0 else f"a {slab}-byte slab is above the crossover ({source}: {limit} bytes)"

    def state_refusal(self, call: GatherCall, ws) -> str:
        if buffers_of(ws) is None:
            # Making the buffers is collective and cannot be captured in a graph.
            if torch.cuda.is_current_stream_capturing():
                return "the flag buffers must be set up by an eager call before graph capture"
            ensure_buffers(ws)
        return ""

    def why_taken(self, call: GatherCall) -> str:
        facts = call.planned_facts
        limit, source = evidence.flag_limit(facts.device_name, len(call.hidden_widths), facts.selection)
        return f"a {call.slab_bytes}-byte slab, within the flag protocol's {limit} bytes ({source})"

    def prepare(self, x, hidden_widths, group, slot=-1, skip_entry_sync=False, zero_copy=False):
        """The launcher of calls shaped like ``x``.  The pass's permissions do not apply: no slot, no barrier
        to skip, and always a fresh result (docs/flag_protocol.md, "In the passes")."""
        return launcher.launcher(workspaces.usable_workspace(group, x.device.index), x, hidden_widths)


FLAG = FlagBackend()
