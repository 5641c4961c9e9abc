"""The backend interface: what one way of moving a gather's bytes must answer, and do.

A backend is one object.  ``refusal(call)`` says whether it can run a call
("" when it can, else why not) and ``gather(...)`` runs it.  Dispatch
(``dispatch.py``) walks the registered backends in a fixed, documented order and
takes the first that does not refuse, so the choice is rank-consistent as long
as every refusal looks only at the ``GatherCall``, which holds what every rank of
the group knows identically (docs/contract.md §2).  A refusal may set up shared
state collectively (a workspace, buffers): it runs at the same point of the walk
on every rank, so every rank sets up at the same call.

Adding a backend is one new file with a ``GatherBackend`` subclass, plus one
registration line (``dispatch.register_backend``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from .groups import Group


class Backend(str, enum.Enum):
    """The built-in backends' names (a registered backend may bring its own)."""

    GLOO = "gloo"  # CPU tensors: c10d gather through gloo (the reference)
    NCCL = "nccl"  # CUDA tensors: gather on dim 0, then rearrange
    P2P = "p2p"  # CUDA: Triton push into peers' symmetric memory, entry and exit barriers
    FLAG = "flag"  # CUDA: Triton push with a flag in every 8 bytes, no barriers (small messages)
    MULTIMEM = "multimem"  # CUDA: NVLink multicast push (compile-verified only)


@dataclass(frozen=True)
class GatherCall:
    """The rank-invariant facts of one gather call: everything a refusal may look at."""

    device_type: str
    dtype: torch.dtype
    out_numel: int  # elements of the gathered result
    group: Group
    #: T times the widest rank's width; None when the caller can use only the slot-based
    #: protocols (the fused linear + push asks that way)
    max_slab_numel: int | None
    forced: str  # TPFUSE_BACKEND: "auto" or a backend's name

    @property
    def nbytes(self) -> int:
        return self.out_numel * self.dtype.itemsize


class GatherBackend:
    """One way of moving the bytes of ``cat([x_0, ..., x_{W-1}], dim=-1)``."""

    #: the name ``TPFUSE_BACKEND`` and the reports use
    name: str = ""
    #: the device types whose tensors it moves
    devices: tuple[str, ...] = ()

    def refusal(self, call: GatherCall) -> str:
        """"" when this backend runs ``call``, else why not.  Rank-invariant (see the module docstring)."""
        raise NotImplementedError

    def gather(self, x: torch.Tensor, hidden_widths: list[int], group: Group, slot: int, skip_entry_sync: bool,
               zero_copy: bool) -> torch.Tensor:
        """Run the gather.  ``slot``, ``skip_entry_sync`` and ``zero_copy`` are permissions a pass proved
        (docs/op.md); a backend that has no use for one ignores it and returns a fresh, caller-owned result."""
        raise NotImplementedError

    def prepare(self, x: torch.Tensor, hidden_widths: list[int], group: Group, slot: int, skip_entry_sync: bool,
                zero_copy: bool):
        """A launcher ``launch(x) -> result`` for every later call of this shape, dtype and device.

        The op keeps it and calls it instead of choosing again (compile_ops/launchers.py).
        By default it calls ``gather``; a backend overrides this to do per-shape work once."""
        return lambda x: self.gather(x, hidden_widths, group, slot, skip_entry_sync, zero_copy)

    def __repr__(self) -> str:
        return f"<tpfuse backend {self.name}>"
