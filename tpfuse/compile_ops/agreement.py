"""Cross-rank agreement: every rank learns, before it uses a peer's bytes, whether that peer agrees.

A gather is only meaningful if every rank means the same call: the same dtype,
the same leading dims, the same ``hidden_widths``, and each rank's slab as wide
as its entry.  Each rank checks its own view before any communication
(``validation.py``), but a disagreement *between* ranks is invisible locally:
gloo aborts the processes on a size mismatch, and equal byte counts with other
meanings (fp32 width 4 against bf16 width 8) would be silent garbage.

So the c10d path first all-gathers a fixed-size **signature** of the call (8
int64 words per rank; the same size whatever the ranks disagree on, so this
exchange itself can never mismatch), and every rank compares all of them.  On
disagreement every rank raises the same ``ValueError`` naming the ranks and
their values, before the payload moves: no abort, no hang, no garbage.  A
rank-local "already checked" cache would not be safe (one rank may think a shape
known while its peer thinks it new, and only one would enter the exchange), so
the check runs on every call it covers.

Where it runs (docs/op.md, "Agreement across ranks"): the op calls it first, on
every call it covers, before any check that could raise on one rank only and
before any collective set-up (a workspace, a slot that grows):
- CPU tensors (gloo): always; one extra collective of ``64 · W`` bytes.
- CUDA tensors, every backend (NCCL, the flag protocol, the barrier push): with
  ``TPFUSE_CHECK=1``, outside CUDA-graph capture (it reads the signatures on the
  host: a device synchronisation per call, so it is a debugging mode).
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist

from .groups import Group
from .validation import check_widths

#: int64 words per rank: a marker, then what must agree, then this rank's width
WORDS = 8
_MARKER = 0x7470667573650001  # "tpfuse", version 1


def _digest(value) -> int:
    return int.from_bytes(hashlib.sha256(repr(value).encode()).digest()[:8], "little") >> 2


def signature(x: torch.Tensor, hidden_widths: list[int]) -> list[int]:
    """This rank's view of the call, as 8 words (dtype, leading dims and widths also in plain values)."""
    lead, width = _view(x)
    return [_MARKER, _digest(str(x.dtype)), x.element_size(), _digest(lead), len(lead),
            _digest(tuple(int(w) for w in hidden_widths)), sum(int(w) for w in hidden_widths), width]


def _view(x: torch.Tensor) -> tuple[tuple[int, ...], int]:
    """Leading dims and width; a scalar (which the op refuses after this check) has none and width -1."""
    if x.dim() == 0:
        return (), -1
    return tuple(int(d) for d in x.shape[:-1]), int(x.shape[-1])


def check(x: torch.Tensor, hidden_widths: list[int], group: Group) -> None:
    """Collective: raise the same ``ValueError`` on every rank unless every rank means the same call."""
    if group.backend == "fake":  # torch's testing backend moves nothing: there is nothing to agree on
        return
    mine = torch.tensor(signature(x, hidden_widths), dtype=torch.int64, device=x.device)
    everyone = torch.empty(group.world_size * WORDS, dtype=torch.int64, device=x.device)
    dist.all_gather_into_tensor(everyone, mine, group=group.pg)
    table = everyone.view(group.world_size, WORDS).tolist()
    # Plain values for the message: every rank's dtype, leading dims and widths, gathered
    # only when something disagrees (the common case pays for the 8 words alone).
    if all(row[:7] == table[0][:7] for row in table):
        if all(row[7] == -1 for row in table):
            return  # every rank passed a scalar: they agree, and the op's own check refuses it everywhere
        # Every rank passed the same list: if the list itself is invalid, every rank says so alike.
        check_widths(hidden_widths)
        if all(row[7] == hidden_widths[r] for r, row in enumerate(table)):
            return
    views = [None] * group.world_size
    lead, width = _view(x)
    dist.all_gather_object(views, (str(x.dtype).removeprefix("torch."), list(lead), list(hidden_widths), width),
                           group=group.pg)
    raise ValueError(_describe(views, group))


def _describe(views, group: Group) -> str:
    parts = [f"rank {r}: dtype {d}, leading dims {lead}, hidden_widths {widths}, x.shape[-1]={w}"
             for r, (d, lead, widths, w) in enumerate(views)]
    return (f"tpfuse: the ranks of group {group.name!r} disagree on the gather: " + "; ".join(parts)
            + ". Every rank must pass the same dtype, leading dims and hidden_widths, and a slab as wide "
            "as its own entry (pass hidden_widths when the ranks' widths differ).")
