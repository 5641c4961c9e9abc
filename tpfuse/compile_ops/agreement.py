"""Cross-rank agreement: every rank learns, before it uses a peer's bytes, whether that peer agrees.

A gather is only meaningful if every rank means the same call: the same dtype,
the same leading dims, the same ``hidden_widths``, and each rank's slab as wide
as its entry.  Each rank checks its own view before any communication
(``validation.py``), but a disagreement *between* ranks is invisible locally:
gloo aborts the processes on a size mismatch, and equal byte counts with other
meanings (fp32 width 4 against bf16 width 8) would be silent garbage.

So the c10d path first all-gathers a fixed-size **signature** of the call (9
int64 words per rank; the same size whatever the ranks disagree on, so this
exchange itself can never mismatch), and every rank compares all of them.  On
disagreement every rank raises the same ``ValueError`` naming the ranks and
their values, before the payload moves: no abort, no hang, no garbage.  A
rank-local "already checked" cache would not be safe (one rank may think a shape
known while its peer thinks it new, and only one would enter the exchange), so
the check runs on every call it covers.

The signature also carries the **call number**: how many checked calls this rank
has made on this process group before (kept per group object, so a group
re-created under the same name starts again at 0).  Calls on a group pair in
order, so a rank that skipped or added a call shows up at the first pair of calls
whose dtype, leading dims or widths differ, and the error names that call number.
Two calls that are identical cannot be told apart by any signature: a skip that
only ever pairs identical calls moves data and is not detected (docs/op.md,
"Agreement across ranks", says exactly what is and is not).

Where it runs (docs/op.md, "Agreement across ranks"): the op calls it first, on
every call it covers, before any check that could raise on one rank only and
before any collective set-up (a workspace, a slot that grows):
- CPU tensors (gloo): always; one extra collective of ``64 · W`` bytes.
- CUDA tensors, every backend (nccl, flag, p2p, multimem): with
  ``TPFUSE_CHECK=1``, outside CUDA-graph capture (it reads the signatures on the
  host: a device synchronisation per call, so it is a debugging mode).
"""

from __future__ import annotations

import hashlib
import weakref

import torch
import torch.distributed as dist

from .groups import Group, all_gather_single
from .validation import check_widths

#: int64 words per rank: a marker, then what must agree (the call number last), then this rank's width
WORDS = 9
_AGREE = WORDS - 1  # the words that every rank must present alike
_CALL = WORDS - 2
_MARKER = 0x7470667573650002  # "tpfuse", version 2 (version 1 had no call number)

# Checked calls made so far, per process group object: keyed by the object, not the name,
# because a group destroyed and created again may reuse the name and must count from 0.
_calls: "weakref.WeakKeyDictionary[dist.ProcessGroup, int]" = weakref.WeakKeyDictionary()


def _digest(value) -> int:
    return int.from_bytes(hashlib.sha256(repr(value).encode()).digest()[:8], "little") >> 2


def signature(x: torch.Tensor, hidden_widths: list[int], call: int = 0) -> list[int]:
    """This rank's view of its ``call``-th call on a group, as 9 words (dtype, leading dims and widths
    also in plain values)."""
    lead, width = _view(x)
    return [_MARKER, _digest(str(x.dtype)), x.element_size(), _digest(lead), len(lead),
            _digest(tuple(int(w) for w in hidden_widths)), sum(int(w) for w in hidden_widths), call, width]


def next_call(pg: dist.ProcessGroup) -> int:
    """This rank's number for its next checked call on ``pg`` (0 for the first), counted here."""
    call = _calls.get(pg, 0)
    _calls[pg] = call + 1
    return call


def _view(x: torch.Tensor) -> tuple[tuple[int, ...], int]:
    """Leading dims and width; a scalar (which the op refuses after this check) has none and width -1."""
    if x.dim() == 0:
        return (), -1
    return tuple(int(d) for d in x.shape[:-1]), int(x.shape[-1])


def check(x: torch.Tensor, hidden_widths: list[int], group: Group) -> None:
    """Collective: raise the same ``ValueError`` on every rank unless every rank means the same call."""
    if group.backend == "fake":  # torch's testing backend moves nothing: there is nothing to agree on
        return
    # Counted before the exchange, refused calls too: every rank that enters the exchange counts it.
    call = next_call(group.pg)
    mine = torch.tensor(signature(x, hidden_widths, call), dtype=torch.int64, device=x.device)
    everyone = torch.empty(group.world_size * WORDS, dtype=torch.int64, device=x.device)
    all_gather_single(everyone, mine, group=group.pg)
    table = everyone.view(group.world_size, WORDS).tolist()
    # Plain values for the message: every rank's dtype, leading dims and widths, gathered
    # only when something disagrees (the common case pays for the 9 words alone).
    if all(row[:_AGREE] == table[0][:_AGREE] for row in table):
        if all(row[_AGREE] == -1 for row in table):
            return  # every rank passed a scalar: they agree, and the op's own check refuses it everywhere
        # Every rank passed the same list: if the list itself is invalid, every rank says so alike.
        check_widths(hidden_widths)
        if all(row[_AGREE] == hidden_widths[r] for r, row in enumerate(table)):
            return
    views = [None] * group.world_size
    lead, width = _view(x)
    dist.all_gather_object(views, (str(x.dtype).removeprefix("torch."), list(lead), list(hidden_widths), width),
                           group=group.pg)
    raise ValueError(describe(views, [row[_CALL] for row in table], group.name))


def describe(views, calls: list[int], group_name: str) -> str:
    """The message every rank raises: where the ranks are in their calls on the group, and each one's view."""
    parts = [f"rank {r}: dtype {d}, leading dims {lead}, hidden_widths {widths}, x.shape[-1]={w}"
             for r, (d, lead, widths, w) in enumerate(views)]
    rule = (". Every rank must pass the same dtype, leading dims and hidden_widths, and a slab as wide as its "
            "own entry (pass hidden_widths when the ranks' widths differ).")
    if all(c == calls[0] for c in calls):
        # The ranks' calls pair in order, so a skipped or added call surfaces at the first pair that differs.
        return (f"tpfuse: at call {calls[0]} of group {group_name!r} (numbered alike on every rank) the ranks "
                "disagree on the gather: " + "; ".join(parts) + rule + " Calls on a group pair in order: where "
                "the ranks run the same code, a rank skipped or added this call or an earlier one.")
    return f"tpfuse: {_calls_apart(calls, group_name)}; the ranks disagree on the gather: " + "; ".join(parts) + rule


def _calls_apart(calls: list[int], group_name: str) -> str:
    """Each rank's call number, the one furthest ahead first."""
    # The exchanges pair one for one, so the counts differ only if some rank made checked calls on
    # this group while its peers made theirs unchecked (TPFUSE_CHECK=1 on some ranks only).
    (first, count), *rest = sorted(enumerate(calls), key=lambda rank_call: (-rank_call[1], rank_call[0]))
    others = "".join(f", rank {r} at call {c}" for r, c in rest)
    return (f"rank {first} is at call {count} of group {group_name!r}{others}: a rank skipped or added a call "
            "(each rank numbers its own checked calls on the group)")
