"""Cross-rank agreement: every rank learns, before it uses a peer's bytes, whether that peer agrees.

A gather is only meaningful if every rank means the same call: the same dtype,
the same leading dims, the same ``hidden_widths``, and each rank's slab as wide
as its entry.  Each rank checks its own view before any communication
(``validation.py``), but a disagreement *between* ranks is invisible locally:
gloo aborts the processes on a size mismatch, and equal byte counts with other
meanings (fp32 width 4 against bf16 width 8) would be silent garbage.

So the c10d path first all-gathers a fixed-size **signature** of the call
(``WORDS`` int64 words per rank; the same size whatever the ranks disagree on,
so this exchange itself can never mismatch), and every rank compares all of
them.  On disagreement every rank raises the same ``ValueError`` naming the
ranks and their values, before the payload moves: no abort, no hang, no garbage.

Besides the call's shape the signature carries what else decides how a rank's
call pairs with its peers': the op (the gather, or the fused linear and its K),
the ``TPFUSE_*`` settings that steer dispatch (``RANK_CONSISTENT_VARIABLES``),
and whether the call is the forward of an autograd graph (its backward is a
collective: a rank that wants a gradient while its peer does not would wait in
it alone).  And it carries whether this rank's own checks refused the call
(``local_check``): the checks run before the exchange, their verdict travels
with the signature, and a call one rank refuses is refused by every rank, each
naming the rank and its reason (docs/contract.md §4).  A
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
- CPU tensors (gloo): always; one extra collective of ``8 · WORDS · W`` bytes.
- CUDA tensors, every backend (nccl, flag, p2p, multimem): with
  ``TPFUSE_CHECK=1``, outside CUDA-graph capture (it reads the signatures on the
  host: a device synchronisation per call, so it is a debugging mode).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import threading
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from .. import config as settings
from .groups import Group, all_gather_single
from .validation import check_widths

#: The variables that decide how a call pairs with its peers' calls: the backend, the flag protocol's and the
#: push's size limits, the fused linear's choice, the push kernels' grid and chunking.  Every rank must have
#: them alike (docs/api.md).  Not here: ``TPFUSE_CHECK`` (ranks that differ on it show it by their call
#: numbers), ``TPFUSE_DISABLE_PUSH`` (the group's set-up agrees on it: one rank's sends every rank to NCCL),
#: the timeouts, warps, the flag kernel's tile (any flag grid pairs with any other, kernels/flag/gather.py)
#: and the watchdog, which change nothing a peer sees.
RANK_CONSISTENT_VARIABLES = ("TPFUSE_BACKEND", "TPFUSE_PUSH_MAX_BYTES", "TPFUSE_ENABLE_MULTIMEM",
                             "TPFUSE_FLAG_MAX_BYTES", "TPFUSE_LINEAR_PUSH", "TPFUSE_PUSH_BLOCKS_PER_SM",
                             "TPFUSE_PUSH_BLOCK_V", "TPFUSE_PUSH_CHUNK_TILES")

#: int64 words per rank: a marker, what must agree (the call number last), this rank's refusal and its width
WORDS = 13
(_MARK, _OP, _DTYPE, _ELEMENT, _LEAD, _RANK_OF_LEAD, _WIDTHS, _TOTAL, _SETTINGS, _GRAD, _CALL,
 _REFUSED, _WIDTH) = range(WORDS)
_AGREE = _CALL + 1  # words [0, _AGREE) must be alike on every rank
_MARKER = 0x7470667573650003  # "tpfuse", version 3 (2 had no op, settings, gradient or refusal)
#: the width word of a scalar (the op refuses it) and of a call whose op checks the width itself
_SCALAR, _NOT_HELD = -1, -2
#: the refusal word of a rank that refused its call before the op could be dispatched (``refuse_early``): its
#: view is not the call's, so every rank raises the refusal rather than comparing the views
_REFUSED_EARLY = 2

# Checked calls made so far, per process group object: keyed by the object, not the name,
# because a group destroyed and created again may reuse the name and must count from 0.
_calls: "weakref.WeakKeyDictionary[dist.ProcessGroup, int]" = weakref.WeakKeyDictionary()
_autograd = threading.local()
_begun = threading.local()


def _digest(value) -> int:
    return int.from_bytes(hashlib.sha256(repr(value).encode()).digest()[:8], "little") >> 2


@contextlib.contextmanager
def forward_of_a_graph():
    """Within: the op's calls are the forward of an autograd graph, whose backward is a collective."""
    previous = getattr(_autograd, "forward", False)
    _autograd.forward = True
    try:
        yield
    finally:
        _autograd.forward = previous


def expects_backward() -> bool:
    """Whether this call is the forward of an autograd graph (``forward_of_a_graph``)."""
    return getattr(_autograd, "forward", False)


def dispatch_settings() -> tuple[tuple[str, str], ...]:
    """This rank's ``RANK_CONSISTENT_VARIABLES`` as the op will use them: (name, value) in a fixed order, a
    value that does not parse marked invalid with its error (the op raises that error once the ranks agree)."""
    values = []
    for name in RANK_CONSISTENT_VARIABLES:
        try:
            value = settings.get(name)
            text = repr(value.lower() if isinstance(value, str) else value)
        except ValueError as err:  # its message names the raw value
            text = f"invalid ({str(err).removeprefix('tpfuse: ')})"
        values.append((name, text))
    return tuple(values)


@functools.lru_cache(maxsize=64)
def _settings_digest(values: tuple) -> int:
    return _digest(values)


def settings_digest() -> int:
    """One word for this rank's ``dispatch_settings()``: equal words, equal settings."""
    return _settings_digest(dispatch_settings())


def settings_apart(every_rank: list[tuple[tuple[str, str], ...]]) -> str:
    """The settings that differ between the ranks (``dispatch_settings()`` of each, in rank order), each
    rank's value named; "" when none does."""
    differing = _differing(every_rank)
    return "; ".join(f"rank {r}:" + _settings_text(values, differing)
                     for r, values in enumerate(every_rank)) if differing else ""


def settings_apart_message(group_name: str, every_rank) -> str:
    """The error every rank raises where the ranks' ``dispatch_settings()`` (in rank order) differ."""
    return (f"tpfuse: the ranks of group {group_name!r} have different settings that steer dispatch "
            f"({settings_apart(every_rank)}); set them alike on every rank (docs/api.md). Nothing was sent.")


#: the settings digest each process group agreed on (agree_on_settings), per group object
_agreed_settings: "weakref.WeakKeyDictionary[dist.ProcessGroup, int]" = weakref.WeakKeyDictionary()


@torch.compiler.disable
def agree_on_settings(group: Group, device: torch.device) -> None:
    """Collective where this rank's dispatch settings are not yet agreed on ``group``: at the group's first
    CUDA dispatch, and again after they changed.  Every rank raises, naming each rank's values, where they
    differ.  Without it a CUDA call exchanges nothing before its kernels, and settings that differ would
    have the ranks try other backends: one setting up a workspace (a collective) while its peer runs NCCL's
    gather, or two protocols whose barriers pair wrongly (docs/contract.md §2).

    The op calls it where it dispatches a call shape for the first time, which every rank does at the same
    call; a variable changed on every rank alike is agreed again there.  Under graph capture nothing is
    exchanged (the host cannot read the answer): capture after an eager warm-up, which agrees."""
    digest = settings_digest()
    if _agreed_settings.get(group.pg) == digest or group.backend == "fake":
        return
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return
    mine = torch.tensor([digest], dtype=torch.int64, device=device)
    everyone = torch.empty(group.world_size, dtype=torch.int64, device=device)
    all_gather_single(everyone, mine, group=group.pg)
    if len(set(everyone.tolist())) == 1:
        _agreed_settings[group.pg] = digest
        return
    every_rank = [None] * group.world_size
    dist.all_gather_object(every_rank, dispatch_settings(), group=group.pg)
    raise RuntimeError(settings_apart_message(group.name, every_rank))


def _differing(every_rank) -> list[int]:
    """The positions of the settings whose values differ between the ranks."""
    return [i for i in range(len(every_rank[0])) if len({values[i] for values in every_rank}) > 1]


def _settings_text(values, shown: list[int]) -> str:
    return "".join(f", {values[i][0]}={values[i][1]}" for i in shown).removeprefix(",")


@dataclass(frozen=True)
class CallView:
    """One rank's view of one call: what every rank must present alike, and this rank's own slab width."""

    op: str
    dtype: torch.dtype
    lead: tuple[int, ...]
    hidden_widths: tuple[int, ...]
    width: int  # this rank's slab width, held to its entry; _SCALAR, or _NOT_HELD where the op's own check holds it
    needs_grad: bool
    settings: tuple[tuple[str, str], ...]

    @classmethod
    def of_gather(cls, x: torch.Tensor, hidden_widths, needs_grad: bool = False,
                  op: str = "all_gather_hidden") -> "CallView":
        """The gather of ``x``: leading dims and width; a scalar (refused after this check) has none.  ``op``
        names the call with the arguments its peers must pass alike (a reduction's k, its target, ...)."""
        lead, width = ((), _SCALAR) if x.dim() == 0 else (tuple(int(d) for d in x.shape[:-1]), int(x.shape[-1]))
        return cls(op, x.dtype, lead, _ints(hidden_widths), width, needs_grad, dispatch_settings())

    @classmethod
    def of_linear(cls, x: torch.Tensor, hidden_widths, needs_grad: bool = False) -> "CallView":
        """The fused linear on ``x [..., K]``: every rank passes the same x; each weight's rows are its own check."""
        lead, k = ((), _SCALAR) if x.dim() == 0 else (tuple(int(d) for d in x.shape[:-1]), int(x.shape[-1]))
        return cls(f"linear_all_gather_hidden (K={k})", x.dtype, lead, _ints(hidden_widths), _NOT_HELD, needs_grad,
                   dispatch_settings())

    def words(self, call: int, refused: bool) -> list[int]:
        widths = self.hidden_widths
        # the sum folded into 62 bits: widths near 2**62 must reach the checks' own messages, not overflow here
        return [_MARKER, _digest(self.op), _digest(str(self.dtype)), self.dtype.itemsize, _digest(self.lead),
                len(self.lead), _digest(widths), sum(widths) % (1 << 62), _settings_digest(self.settings),
                int(self.needs_grad),
                call, int(refused), self.width]

    def described(self) -> tuple:
        """What the message shows of this view (plain values: they travel by all_gather_object)."""
        return (self.op, str(self.dtype).removeprefix("torch."), list(self.lead), list(self.hidden_widths),
                self.width, self.needs_grad, self.settings)


def _ints(values) -> tuple[int, ...]:
    return tuple(int(v) for v in values)


def signature(x: torch.Tensor, hidden_widths: list[int], call: int = 0) -> list[int]:
    """This rank's view of its ``call``-th gather on a group, as ``WORDS`` words."""
    return CallView.of_gather(x, hidden_widths).words(call, refused=False)


def next_call(pg: dist.ProcessGroup) -> int:
    """This rank's number for its next checked call on ``pg`` (0 for the first), counted here."""
    call = _calls.get(pg, 0)
    _calls[pg] = call + 1
    _begun.count = getattr(_begun, "count", 0) + 1
    return call


def checks_begun() -> int:
    """How many checks (on any group) this thread has begun: a call that raised with this unchanged never
    reached its exchange, where its peers may wait (``refuse_early``)."""
    return getattr(_begun, "count", 0)


# Runtime only, never traced: where a compiled frame falls back to eager, Dynamo compiles the frames it
# calls, the op's implementation among them, and object collectives cannot be traced.
@torch.compiler.disable
def check(x: torch.Tensor, hidden_widths: list[int], group: Group, local_check: Callable[[], None] | None = None,
          view: CallView | None = None, widths_rule: Callable[[list[int]], None] = check_widths) -> None:
    """Collective: raise on every rank unless every rank means the same call and none refuses it.

    ``local_check`` raises where this rank's own view refuses the call (default: ``widths_rule``); it
    runs before the exchange, and its verdict is agreed.  ``view`` is the call's (default: the gather of
    ``x``); the exchange runs on ``x``'s device.  ``widths_rule`` is what a valid list is (the gather's
    default: positive widths; the softmax reductions also take 0)."""
    if local_check is None:
        local_check = functools.partial(widths_rule, hidden_widths)
    if group.backend == "fake":  # torch's testing backend moves nothing: there is nothing to agree on
        local_check()
        return
    view = view or CallView.of_gather(x, hidden_widths, expects_backward())
    refusal = _refusal(local_check)
    # Counted before the exchange, refused calls too: every rank that enters the exchange counts it.
    call = next_call(group.pg)
    mine = torch.tensor(view.words(call, refusal is not None), dtype=torch.int64, device=x.device)
    everyone = torch.empty(group.world_size * WORDS, dtype=torch.int64, device=x.device)
    all_gather_single(everyone, mine, group=group.pg)
    table = everyone.view(group.world_size, WORDS).tolist()
    if any(row[_REFUSED] == _REFUSED_EARLY for row in table):  # a peer never reached its op (refuse_early)
        _raise_refusal(refusal, group, call)
    # Plain values for the messages are gathered only when something is wrong (the common case pays for
    # the signature alone); every rank sees the same table, so every rank enters those exchanges too.
    if all(row[:_AGREE] == table[0][:_AGREE] for row in table):
        if any(row[_WIDTH] != _SCALAR for row in table):  # scalars everywhere: every rank's own check says so
            widths_rule(hidden_widths)  # every rank passed this list: if it is invalid itself, every rank says so
        # every rank refusing the same call (all slabs narrower than their entries, say) is no disagreement:
        # each rank raises its own reason
        if _widths_held(table, hidden_widths) or all(row[_REFUSED] for row in table):
            if any(row[_REFUSED] for row in table):
                _raise_refusal(refusal, group, call)
            return
    views = [None] * group.world_size
    dist.all_gather_object(views, view.described(), group=group.pg)
    raise ValueError(describe(views, [row[_CALL] for row in table], group.name))


@torch.compiler.disable
def refuse_early(device: torch.device, group: Group, error: Exception) -> None:
    """Collective: raise ``error``, which this rank's call raised before its check began (an argument the
    op's schema cannot take, such as a width that is not a whole number for ``int[]``), and on every peer,
    inside its own check of the same call, an error naming it, rather than leave the peers waiting in that
    exchange."""
    call = next_call(group.pg)
    mine = [_MARKER] + [0] * (WORDS - 1)
    mine[_CALL], mine[_REFUSED], mine[_WIDTH] = call, _REFUSED_EARLY, _NOT_HELD
    everyone = torch.empty(group.world_size * WORDS, dtype=torch.int64, device=device)
    all_gather_single(everyone, torch.tensor(mine, dtype=torch.int64, device=device), group=group.pg)
    _raise_refusal(error, group, call)


def _refusal(local_check: Callable[[], None]) -> Exception | None:
    """What this rank's own checks raise for the call, or None."""
    try:
        local_check()
    except Exception as err:  # noqa: BLE001 - every refusal is agreed before it is raised
        return err
    return None


def _widths_held(table: list[list[int]], hidden_widths: list[int]) -> bool:
    """Every rank's slab is as wide as its entry (where the op's own check does not hold it; a list of the wrong
    length is the same on every rank, and every rank's own check refuses it)."""
    if len(hidden_widths) != len(table):
        return True
    return all(row[_WIDTH] in (_SCALAR, _NOT_HELD) or row[_WIDTH] == hidden_widths[r] for r, row in enumerate(table))


#: the errors a refusal raises on the ranks that did not refuse, by the refusing rank's error's name
_ERRORS = {"ValueError": ValueError, "TypeError": TypeError, "RuntimeError": RuntimeError}


def _raise_refusal(refusal: Exception | None, group: Group, call: int) -> None:
    """Some rank's own checks refused the call: that rank raises its error, every other rank one naming it."""
    reasons = [None] * group.world_size
    mine = None if refusal is None else (type(refusal).__name__, str(refusal))
    dist.all_gather_object(reasons, mine, group=group.pg)
    if refusal is not None:
        raise refusal
    refused = [(r, reason) for r, reason in enumerate(reasons) if reason is not None]
    parts = "; ".join(f"rank {r}: {message}" for r, (_, message) in refused)
    raise _ERRORS.get(refused[0][1][0], ValueError)(
        f"tpfuse: rank(s) {[r for r, _ in refused]} of group {group.name!r} refused call {call} on it (numbered "
        f"alike on every rank), so every rank refuses it, before any payload moves: {parts}")


def describe(views, calls: list[int], group_name: str) -> str:
    """The message every rank raises: where the ranks are in their calls on the group, and each one's view."""
    show_op = len({view[0] for view in views}) > 1
    show_grad = len({view[5] for view in views}) > 1
    differing = _differing([view[6] for view in views])
    parts = [f"rank {r}: {_one_view(view, show_op, show_grad, differing)}" for r, view in enumerate(views)]
    rule = (". Every rank must pass the same dtype, leading dims and hidden_widths, and a slab as wide as its "
            "own entry (pass hidden_widths when the ranks' widths differ).")
    if show_grad:
        rule += (" A gradient must be wanted on every rank or on none: the backward is a reduce-scatter that "
                 "every rank must join.")
    if differing:
        rule += " The TPFUSE_* settings that steer dispatch must be alike on every rank (docs/api.md)."
    if all(c == calls[0] for c in calls):
        # The ranks' calls pair in order, so a skipped or added call surfaces at the first pair that differs.
        calls_differ = len({tuple(map(repr, view[:5])) for view in views}) > 1
        return (f"tpfuse: at call {calls[0]} of group {group_name!r} (numbered alike on every rank) the ranks "
                "disagree on the gather: " + "; ".join(parts) + rule + (" Calls on a group pair in order: where "
                "the ranks run the same code, a rank skipped or added this call or an earlier one."
                                                                        if calls_differ else ""))
    return f"tpfuse: {_calls_apart(calls, group_name)}; the ranks disagree on the gather: " + "; ".join(parts) + rule


def _one_view(view, show_op: bool, show_grad: bool, settings_shown: list[int]) -> str:
    """One rank's part of the message: its call, and what differs between the ranks besides."""
    op, dtype, lead, widths, width, needs_grad, values = view
    text = (f"{op}, " if show_op else "") + f"dtype {dtype}, leading dims {lead}, hidden_widths {widths}"
    if width != _NOT_HELD:
        text += f", x.shape[-1]={width}"
    if show_grad:
        text += ", a gradient wanted" if needs_grad else ", no gradient wanted"
    return text + ("," + _settings_text(values, settings_shown) if settings_shown else "")


def _calls_apart(calls: list[int], group_name: str) -> str:
    """Each rank's call number, the one furthest ahead first."""
    # The exchanges pair one for one, so the counts differ only if some rank made checked calls on
    # this group while its peers made theirs unchecked (TPFUSE_CHECK=1 on some ranks only).
    (first, count), *rest = sorted(enumerate(calls), key=lambda rank_call: (-rank_call[1], rank_call[0]))
    others = "".join(f", rank {r} at call {c}" for r, c in rest)
    return (f"rank {first} is at call {count} of group {group_name!r}{others}: a rank skipped or added a call "
            "(each rank numbers its own checked calls on the group)")
