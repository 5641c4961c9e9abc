"""Gather elimination, the sum family: softmax reductions of gathered logits, computed per rank.

Inductor's post-grad graphs hold ``log_softmax``, ``logsumexp``, ``softmax`` and
``cross_entropy`` decomposed (docs/passes.md, "Gather elimination: the sum family").  Around
the gathered logits ``X`` (after the steps ``gather_elimination.py`` walks: upcast,
temperature, ``[..., :V]``), one *softmax* is::

    amax = amax(X, [-1], True)
    shift = amax                                   # or where(abs(amax) == inf, 0, amax) (logsumexp)
    centred = sub(X, shift);  exp = exp(centred);  total = sum(exp, [-1], keepdim)
    log = log(total)                               # when a log-softmax or logsumexp follows

and what the program reads from it per row (the *terminals*) is one of:

- ``add(log, squeeze(shift))``: logsumexp;
- ``gather(sub(centred, log), -1, index)``: the log-probability of one class per row (the
  nll of ``cross_entropy``, a sampler's log-prob of its token);
- ``sum(sub(centred, log), [-1])``: the sum of the log-probabilities (label smoothing);
- ``sum(mul(div(exp, total), log_softmax), [-1])``: minus the entropy.

All of them come from ``tpfuse::softmax_stats_hidden`` on this rank's band: one exchange of
a few float32 numbers per row instead of the gathered logits.  What the graph does with the
per-row results (``neg``, the ``ignore_index`` mask, the mean) stays as it is.  Any other use
of a full-width intermediate keeps the gather, with the reason.

A reshape that merges the logits' leading dims before the softmax (HF's
``logits.view(-1, V)``) is part of the matched form: it is replayed on the band.

The matchers run in inference graphs (no autograd).  A training graph's backward is split
off before post-grad passes run; its loss is written with ``tpfuse.cross_entropy_hidden``
(docs/passes.md, "Training").
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch.fx import Node

from ..compile_ops import vocab_parallel_loss  # noqa: F401 - registers the op the rewrite emits
from . import graph_facts as facts
from .gather_elimination import Elimination, EliminationMatcher, ReductionSite
from .patterns import Reject

aten = torch.ops.aten

AMAX = facts.op_overloads("amax.default")
SUB = facts.op_overloads("sub.Tensor")
ADD = facts.op_overloads("add.Tensor")
MUL = facts.op_overloads("mul.Tensor")
DIV = facts.op_overloads("div.Tensor")
EXP = facts.op_overloads("exp.default")
LOG = facts.op_overloads("log.default")
SUM = facts.op_overloads("sum.dim_IntList")
GATHER = facts.op_overloads("gather.default")
SQUEEZE = facts.op_overloads("squeeze.dims", "squeeze.dim")
ABS = facts.op_overloads("abs.default")
EQ = facts.op_overloads("eq.Scalar")
WHERE = facts.op_overloads("where.self")


def _is(node: Node, ops: frozenset) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target in ops


def _last_dims(dims, ndim: int) -> bool:
    """``dims`` (an int or a one-element list) names exactly the last axis of an ``ndim``-d tensor."""
    if isinstance(dims, int):
        dims = [dims]
    return (isinstance(dims, (list, tuple)) and len(dims) == 1 and isinstance(dims[0], int)
            and facts.nonneg_dim(dims[0], ndim) == ndim - 1)


# --------------------------------------------------------------------------- one softmax


@dataclass(frozen=True)
class Softmax:
    """The nodes of one softmax of ``logits`` (see the module docstring)."""

    amax: Node
    shift: Node
    shift_nodes: tuple[Node, ...]  # abs, eq, where of logsumexp's shift (empty when shift is amax)
    centred: Node
    exp: Node
    total: Node
    keepdim: bool
    log: Node | None

    @property
    def nodes(self) -> tuple[Node, ...]:
        return (self.amax, *self.shift_nodes, self.centred, self.exp, self.total) + ((self.log,) if self.log else ())


def _single(nodes, ops) -> Node | None:
    found = [n for n in nodes if _is(n, ops)]
    return found[0] if len(found) == 1 else None


def _guarded_shift(amax: Node) -> tuple[Node, tuple[Node, ...]] | None:
    """logsumexp's shift ``where(abs(amax) == inf, 0, amax)``, or None."""
    where = _single(amax.users, WHERE)
    absolute = _single(amax.users, ABS)
    if where is None or absolute is None or len(absolute.users) != 1:
        return None
    eq = next(iter(absolute.users))
    if not (_is(eq, EQ) and eq.args[1] == float("inf") and where.args[0] is eq and where.args[2] is amax):
        return None
    zero = where.args[1]
    return where, (absolute, eq, where) + ((zero,) if isinstance(zero, Node) and len(zero.users) == 1 else ())


def parse_softmax(logits: Node, amax: Node) -> Softmax | None:
    """The softmax around ``amax = amax(logits, [-1], True)``, or None when it is not one."""
    ndim = facts.ndim(logits)
    if not (_is(amax, AMAX) and amax.args[0] is logits and ndim):
        return None
    if not (_last_dims(facts.arg(amax, 1, "dim", []), ndim) and facts.arg(amax, 2, "keepdim", False)):
        return None
    shift, shift_nodes = _guarded_shift(amax) or (amax, ())
    centred = next((u for u in shift.users if _is(u, SUB) and u.args[0] is logits and u.args[1] is shift), None)
    exp = _single(centred.users, EXP) if centred is not None else None
    total = _single(exp.users, SUM) if exp is not None else None
    if total is None or not _last_dims(facts.arg(total, 1, "dim", []), ndim):
        return None
    log = _single(total.users, LOG)
    return Softmax(amax, shift, shift_nodes, centred, exp, total, bool(facts.arg(total, 2, "keepdim", False)), log)


# --------------------------------------------------------------------------- what is read from it


@dataclass(frozen=True)
class Terminal:
    """A per-row value read from the softmaxes: ``kind`` in logsumexp, logprob, sum_logprobs,
    neg_entropy; ``keepdim``: the row axis is kept (size 1)."""

    kind: str
    node: Node
    keepdim: bool


@dataclass
class _Reading:
    terminals: list
    nodes: list  # every node of the matched region (full width or not), terminals included
    index: Node | None = None  # the class index of the logprob terminals ([..., 1])
    problem: str | None = None

    def fail(self, why: str) -> None:
        self.problem = self.problem or why


def _log_softmaxes(softmax: Softmax) -> list[Node]:
    if softmax.log is None or not softmax.keepdim:
        return []
    return [u for u in softmax.centred.users if _is(u, SUB) and u.args[1] is softmax.log]


def _probabilities(softmax: Softmax) -> list[Node]:
    return [u for u in softmax.exp.users if _is(u, DIV) and u.args[1] is softmax.total and softmax.keepdim]


def _read(softmaxes: list[Softmax], ndim: int) -> _Reading:
    """The terminals of the softmaxes, and the first use that is none (``problem``)."""
    reading = _Reading([], [])
    log_softmaxes = [ls for s in softmaxes for ls in _log_softmaxes(s)]
    probabilities = [p for s in softmaxes for p in _probabilities(s)]
    products = {}
    for s in softmaxes:
        reading.nodes += s.nodes
        _read_logsumexp(s, reading)
    for ls in log_softmaxes:
        reading.nodes.append(ls)
        for user in ls.users:
            _read_log_softmax_user(ls, user, probabilities, ndim, reading, products)
    for p in probabilities:
        reading.nodes.append(p)
        for user in p.users:
            if user not in products:
                reading.fail(f"the softmax {p.name} is also used by {facts.describe(user)}")
    for product in products:
        reading.nodes.append(product)
        total = _single(product.users, SUM)
        if total is None or len(product.users) != 1 or not _last_dims(facts.arg(total, 1, "dim", []), ndim):
            reading.fail(f"the product {product.name} of the softmax and the log-softmax is used other than "
                         "by a sum over the last axis")
            continue
        _terminal(reading, "neg_entropy", total)
    _check_inner_users(softmaxes, log_softmaxes, probabilities, reading)
    return reading


def _read_logsumexp(s: Softmax, reading: _Reading) -> None:
    if s.log is None or s.keepdim:
        return
    for squeeze in [u for u in s.shift.users if _is(u, SQUEEZE)]:
        for add in squeeze.users:
            if _is(add, ADD) and set(add.args[:2]) == {s.log, squeeze}:
                reading.nodes.append(squeeze)
                _terminal(reading, "logsumexp", add)


def _read_log_softmax_user(ls: Node, user: Node, probabilities, ndim, reading: _Reading, products) -> None:
    if _is(user, GATHER) and user.args[0] is ls and _last_dims(user.args[1], ndim):
        index = user.args[2]
        if reading.index is not None and index is not reading.index:
            reading.fail(f"{user.name} gathers the log-softmax at a second index tensor {index.name}; "
                         f"one index per row is supported ({reading.index.name})")
        shape = facts.shape(index)
        if shape is None or not facts.same_size(shape[-1], 1):
            reading.fail(f"{user.name} gathers {shape[-1] if shape else '?'} classes per row; one is supported")
        reading.index = index
        _terminal(reading, "logprob", user, keepdim=True)
    elif _is(user, SUM) and _last_dims(facts.arg(user, 1, "dim", []), ndim):
        _terminal(reading, "sum_logprobs", user, keepdim=bool(facts.arg(user, 2, "keepdim", False)))
    elif _is(user, MUL) and any(a in probabilities for a in user.args[:2]) and ls in user.args[:2]:
        products[user] = None
    else:
        reading.fail(f"the log-softmax {ls.name} is also used by {facts.describe(user)}")


def _terminal(reading: _Reading, kind: str, node: Node, keepdim: bool = False) -> None:
    if node not in [t.node for t in reading.terminals]:
        reading.terminals.append(Terminal(kind, node, keepdim))
        reading.nodes.append(node)


def _check_inner_users(softmaxes, log_softmaxes, probabilities, reading: _Reading) -> None:
    """Every user of a softmax's inner nodes is in the matched region."""
    region = set(reading.nodes)
    for s in softmaxes:
        for node in s.nodes:
            for user in node.users:
                if user not in region:
                    reading.fail(f"{node.name} ({facts.target_name(node)}, inside a softmax of the gathered "
                                 f"logits) is also used by {facts.describe(user)}")


# --------------------------------------------------------------------------- the matcher


def _replacement(band, *inputs, hidden_widths, group_name, valid_columns, plan, flatten, vocab,
                 with_logit_sum, with_entropy):
    """The terminals' values from this rank's band (traced into the graph by the framework)."""
    if flatten:
        band = band.reshape(-1, band.shape[-1])  # the logits' view(-1, V), replayed on the band
    target = inputs[0].squeeze(-1) if inputs else None
    shift, log_sum, target_logit, logit_sum, entropy = torch.ops.tpfuse.softmax_stats_hidden(
        band, target, hidden_widths, group_name, -100, with_logit_sum, with_entropy, valid_columns)
    values = {"logsumexp": lambda: shift + log_sum,
              "logprob": lambda: target_logit - log_sum,
              "sum_logprobs": lambda: logit_sum - vocab * log_sum,  # sum_c (x_c - shift) - V log_sum
              "neg_entropy": lambda: -entropy}
    out = []
    for kind, keepdim, dtype in plan:
        value = values[kind]()
        out.append((value.unsqueeze(-1) if keepdim else value).to(dtype))
    return tuple(out)


def _logits_of(site: ReductionSite) -> tuple[Node, bool] | None:
    """(the full-width tensor the softmaxes read, whether it is a reshape of ``site.value``)."""
    consumer = site.consumer
    if _is(consumer, AMAX) or _is(consumer, SUB):
        return site.value, False
    if facts.is_reshape(consumer) and consumer.args[0] is site.value:
        shape, value_shape = facts.shape(consumer), facts.shape(site.value)
        # only ``view(-1, V)``: leading dims merged into one, the gathered axis unchanged
        if shape is not None and len(shape) == 2 and facts.same_size(shape[-1], value_shape[-1]):
            return consumer, True
    return None


def match_softmax(site: ReductionSite) -> Elimination | Reject | None:
    found = _logits_of(site)
    if found is None:
        return None
    logits, flatten = found
    # every softmax of these logits: an entropy reads two (softmax and log-softmax), and one
    # exchange serves them all
    softmaxes = [s for s in (parse_softmax(logits, a) for a in logits.users if _is(a, AMAX)) if s is not None]
    mine = [s for s in softmaxes if site.consumer in (s.amax, s.centred)] if not flatten else softmaxes
    if not mine:
        return None  # an amax the program reads itself: the exact family's
    if _is(site.consumer, SUB):
        softmaxes = mine
    reading = _read(softmaxes, facts.ndim(logits))
    if reading.problem is None and not reading.terminals:
        reading.fail("no per-row value is read from the softmax")
    if reading.index is not None and _reads(reading.index, site.gather):
        reading.fail(f"the class index {reading.index.name} is computed from the gathered logits")
    if reading.problem is None and flatten:
        strays = [u for u in logits.users if u not in set(reading.nodes)]
        if strays:
            reading.fail(f"the reshaped logits {logits.name} are also used by {facts.describe(strays[0])}")
    if reading.problem is not None:
        return Reject("softmax of the gathered logits not eliminated: " + reading.problem, (site.consumer,))
    if _is(site.consumer, SUB):
        return None  # matched from its amax, which comes first in the graph
    return _elimination(site, logits, flatten, softmaxes, reading)


def _reads(node: Node, source: Node) -> bool:
    """``node`` is computed from ``source`` (a walk back over the nodes after ``source``)."""
    order = {n: i for i, n in enumerate(source.graph.nodes)}
    pending, seen = [node], set()
    while pending:
        current = pending.pop()
        if current is source:
            return True
        if current in seen or order[current] < order[source]:
            continue
        seen.add(current)
        pending += current.all_input_nodes
    return False


def _elimination(site, logits, flatten, softmaxes, reading: _Reading) -> Elimination:
    kinds = [t.kind for t in reading.terminals]
    plan = tuple((t.kind, t.keepdim, facts.val(t.node).dtype) for t in reading.terminals)
    with_logit_sum, with_entropy = "sum_logprobs" in kinds, "neg_entropy" in kinds
    claims = () if flatten else tuple(dict.fromkeys(
        n for s in softmaxes for n in (s.amax, s.centred) if n is not site.consumer))
    words = 2 + int(reading.index is not None) + int(with_logit_sum) + int(with_entropy)
    name = "+".join(dict.fromkeys({"logsumexp": "logsumexp", "logprob": "log_softmax gather",
                                   "sum_logprobs": "log_softmax sum", "neg_entropy": "entropy"}[k] for k in kinds))
    return Elimination(
        name,
        outputs=tuple(t.node for t in reading.terminals),
        replacement=_replacement,
        claims=claims,
        region=tuple(dict.fromkeys(n for n in reading.nodes if n is not site.consumer and n not in claims)),
        inputs=(reading.index,) if reading.index is not None else (),
        extra=(("plan", plan), ("flatten", flatten), ("vocab", site.columns),
               ("with_logit_sum", with_logit_sum), ("with_entropy", with_entropy)),
        partials=(words, torch.float32),
    )


MATCHERS = (
    EliminationMatcher(
        name="softmax",
        match=match_softmax,
        consumers=(aten.amax.default, aten.sub.Tensor, *sorted(facts.RESHAPES, key=str)),
        # above the exact family's amax: the amax of a softmax is not a max the program reads
        priority=20,
        description="log_softmax / logsumexp / cross_entropy / entropy over the gathered axis -> "
                    "tpfuse::softmax_stats_hidden",
        builtin=True,
    ),
)
