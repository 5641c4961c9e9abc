"""The barrier protocol's backends: ``p2p`` (stores through peer pointers) and ``multimem`` (NVLink multicast).

Each refuses what it cannot run (push_backend.py's three steps) and prepares and
launches its own calls, the gather's (``launcher.py``) and the fused linear's
(whether it fuses: ``compile_ops/linear_decision.py``; its one launcher:
``compile_ops/linear_push.py``).  Safety argument: docs/safety.md, "Barriers".
"""

from __future__ import annotations

from .. import linear_decision, linear_push
from .. import workspace as workspaces
from ..backend import Backend, GatherCall
from ..push_backend import PushBackend, multimem_asked
from . import launcher
from .slots import room_refusal, slots_of


class P2PBackend(PushBackend):
    """The push with entry and exit barriers, over two ping-pong slots."""

    name = Backend.P2P.value
    #: which kernel variant it launches: stores through peer pointers
    multimem = False
    #: the tuned config's crossover (tuned.CROSSOVERS) that caps the outputs ``auto`` gives it
    crossover = "p2p"

    def facts_refusal(self, call: GatherCall, facts) -> str:
        """Step 2, and under ``auto`` the agreed tuned config's crossover with NCCL: above it NCCL runs."""
        why = super().facts_refusal(call, facts)
        if why or call.forced == self.name or facts.selection is None or self.crossover is None:
            return why
        cap = facts.selection.crossover(self.crossover)
        if cap is None or call.nbytes <= cap:
            return ""
        return (f"a {call.nbytes}-byte output is above its crossover with nccl ({cap} bytes, "
                f"{facts.selection.source()})")

    def why_taken(self, call: GatherCall) -> str:
        """The tuned config that let it take the call, with its path ("" where none did: the default)."""
        selection = call.planned_facts.selection if call.planned_facts is not None else None
        return f"selection: {selection.source()}" if selection is not None and selection.config_path else ""

    def state_refusal(self, call: GatherCall, ws) -> str:
        return room_refusal(ws, call.nbytes)

    def prepare(self, x, hidden_widths, group, slot=-1, skip_entry_sync=False, zero_copy=False):
        ws = workspaces.usable_workspace(group, x.device.index)
        return launcher.launcher(ws, x, hidden_widths, self.multimem, slot, skip_entry_sync, copy_out=not zero_copy)

    def prepare_linear(self, x, weight, bias, hidden_widths, group, slot=-1, skip_entry_sync=False, zero_copy=False):
        """The fused kernel's launcher where linear_decision.py says so (``TPFUSE_LINEAR_PUSH``, else the cost
        rule on the GPU model and tuned config the ranks agreed on); None otherwise (the op runs ``linear``,
        then the gather)."""
        ws = workspaces.usable_workspace(group, x.device.index, linear_push.OP)
        if not linear_decision.fuses_call(ws, x, hidden_widths):
            return None
        return linear_push.launcher(ws, x, weight, bias, hidden_widths, self.multimem, slot, skip_entry_sync,
                                    zero_copy)


class MultimemBackend(P2PBackend):
    """NVLink multicast, where the user asked for it and every rank has an address: never on the shared
    hosts (docs/safety.md, "Multicast"), where the address is always 0.  Compile-verified only."""

    name = Backend.MULTIMEM.value
    multimem = True
    crossover = None  # never measured by the tune (it never runs on our hosts)

    def call_refusal(self, call: GatherCall) -> str:
        if not multimem_asked():
            return "TPFUSE_ENABLE_MULTIMEM is not 1"
        why = super().call_refusal(call)
        if why:
            return why
        # One multimem.st moves 16 bytes: every band must be whole 16-byte vectors (the widths are the same
        # on every rank, so every rank refuses alike and takes p2p).
        ragged = [w for w in call.hidden_widths if w * call.dtype.itemsize % 16]
        return f"widths {ragged} are not whole 16-byte vectors" if ragged else ""

    def state_refusal(self, call: GatherCall, ws) -> str:
        return super().state_refusal(call, ws) or ("" if slots_of(ws).multicast_ptr else
                                                   "no multicast address on every rank")


P2P = P2PBackend()
MULTIMEM = MultimemBackend()
