"""The backend interface: what one way of moving a gather's bytes must answer, and do.

A backend is one object that owns its whole path.  ``refusal(call)`` says whether
it runs a call ("" when it does, else why not); ``prepare(...)`` returns the
launcher of every later call of the same shape, and ``gather(...)`` runs one call;
``prepare_linear(...)`` does the same for the fused linear op where the backend has
a fused kernel.  Dispatch (``dispatch.py``) walks the registered backends in a
fixed, documented order and takes the first that does not refuse, so the choice
is rank-consistent as long as every refusal looks only at the ``GatherCall``, which
holds what every rank of the group knows identically, and at the group's agreed
facts (docs/contract.md §2).  A refusal may set up shared state collectively (a
workspace, buffers): it runs at the same point of the walk on every rank, so
every rank sets up at the same call.

The same refusals predict the protocol at compile time (``dispatch.planned_backend``):
there the call has no group (``group`` is None), T may be symbolic (``tokens`` is
None: a check that needs T answers ``DEPENDS_ON_T``), and ``planned_facts``, the
local device's, stand in for the group's agreed facts.

Adding a backend is one new module (or package) with a ``GatherBackend`` subclass,
plus one registration line (``dispatch.register_backend``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from .groups import Group, GroupFacts


class Backend(str, enum.Enum):
    """The built-in backends' names: each is its backend object's ``name``, the value ``TPFUSE_BACKEND``
    takes and what the reports print (a registered backend brings its own)."""

    GLOO = "gloo"  # CPU tensors: c10d gather through gloo (the reference)
    NCCL = "nccl"  # CUDA tensors: gather on dim 0, then rearrange
    P2P = "p2p"  # CUDA: Triton push into peers' symmetric memory between entry and exit barriers
    FLAG = "flag"  # CUDA: Triton push with a flag in every 8 bytes, no barriers (small messages)
    MULTIMEM = "multimem"  # CUDA: NVLink multicast push between barriers (compile-verified only)
    NCCL_SYMMETRIC = "nccl_symmetric"  # CUDA: NCCL's all-gather between symmetric windows, then rearrange


#: what a refusal answers, at compile time only, when its decision needs T and T is symbolic
DEPENDS_ON_T = "depends on T"


@dataclass(frozen=True)
class GatherCall:
    """The rank-invariant facts of one call: everything a refusal may look at besides the group's agreed facts."""

    device_type: str
    dtype: torch.dtype
    tokens: int | None  # T, the product of the leading dims; None only when planning a symbolic T
    hidden_widths: tuple[int, ...]
    group: Group | None  # None only when planning at compile time (no group yet)
    forced: str  # TPFUSE_BACKEND: "auto" or a backend's name
    #: the fused linear op asks (a backend that has a fused kernel may run it: ``prepare_linear``)
    fused_linear: bool = False
    #: when planning: the facts the group would agree on, as far as this process can tell
    planned_facts: GroupFacts | None = None

    @classmethod
    def of(cls, x: torch.Tensor, hidden_widths, group: Group, forced: str, fused_linear: bool = False):
        """The call that gathers ``x`` (T is the product of its leading dims; 0 rows where its last dim is 0)."""
        tokens = x.numel() // x.shape[-1] if x.shape[-1] else 0
        return cls(x.device.type, x.dtype, tokens, tuple(hidden_widths), group, forced, fused_linear)

    @property
    def out_numel(self) -> int:
        """Elements of the gathered result."""
        return self.tokens * sum(self.hidden_widths)

    @property
    def nbytes(self) -> int:
        return self.out_numel * self.dtype.itemsize

    @property
    def slab_bytes(self) -> int:
        """Bytes of the widest rank's slab: T times the widest width."""
        return self.tokens * max(self.hidden_widths) * self.dtype.itemsize


class GatherBackend:
    """One way of moving the bytes of ``cat([x_0, ..., x_{W-1}], dim=-1)``."""

    #: its one name: ``TPFUSE_BACKEND``, ``dispatch.chosen``, the reports and the docs use it
    name: str = ""
    #: the device types whose tensors it moves
    devices: tuple[str, ...] = ()
    #: whether it takes the fused linear op's calls (running its fused kernel, or leaving the op to
    #: its composite); a backend that does not is never forced on them
    takes_fused_linear: bool = True

    def refusal(self, call: GatherCall) -> str:
        """"" when this backend runs ``call``, else why not.  Rank-invariant (see the module docstring)."""
        raise NotImplementedError

    def why_taken(self, call: GatherCall) -> str:
        """Why it takes a call it does not refuse, for the compile-time plan ("" when nothing to add)."""
        return ""

    def gather(self, x: torch.Tensor, hidden_widths: list[int], group: Group, slot: int = -1,
               skip_entry_sync: bool = False, zero_copy: bool = False) -> torch.Tensor:
        """Run one gather.  ``slot``, ``skip_entry_sync`` and ``zero_copy`` are permissions a pass proved
        (docs/op.md); a backend that has no use for one ignores it and returns a fresh, caller-owned result."""
        raise NotImplementedError

    def prepare(self, x: torch.Tensor, hidden_widths: list[int], group: Group, slot: int = -1,
                skip_entry_sync: bool = False, zero_copy: bool = False):
        """A launcher ``launch(x) -> result`` for every later call of this shape, dtype and device.

        The op keeps it and calls it instead of choosing again (compile_ops/launchers.py).
        By default it calls ``gather``; a backend overrides this to do per-shape work once."""
        return lambda x: self.gather(x, hidden_widths, group, slot, skip_entry_sync, zero_copy)

    def prepare_linear(self, x, weight, bias, hidden_widths, group: Group, slot: int = -1,
                       skip_entry_sync: bool = False, zero_copy: bool = False):
        """A launcher ``launch(x, weight, bias) -> result`` of the fused linear + gather for this call, or None:
        no fused kernel here (or not worth it for this call), so the op runs ``linear`` and then the gather."""
        return None

    def __repr__(self) -> str:
        return f"<tpfuse backend {self.name}>"
