"""Gather elimination, the sum family: softmax reductions of gathered logits, computed per rank.

Inductor's post-grad graphs hold ``log_softmax``, ``logsumexp``, ``softmax`` and
``cross_entropy`` decomposed (docs/passes.md, "Gather elimination: the sum family").  Around
the gathered logits ``X`` (after the steps ``elimination_walk.py`` walks: upcast,
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
- ``sum(mul(div(exp, total), log_softmax), [-1])``: minus the entropy;
- ``gather(div(exp, total), -1, index)``: the probability of one class per row;
- ``topk(div(exp, total), k)``: the k most probable classes and their probabilities (a draft
  model's proposals), the indices by ``tpfuse::topk_hidden`` on the logits (the softmax is
  monotone in them), the probabilities from the statistics.

Either may read the probabilities through a ``convert_element_type`` (a bf16 softmax).

A softmax after a scalar temperature (``softmax(X / t)``, ``softmax(X * s)``) arrives in
Inductor's scaled form: its joint-graph pass rewrites ``S - amax(S)`` (``S = X / t``) into
``(M - amax(M)) / d`` with ``M = X * sign``, ``d = sign * t`` (``*`` for a multiplier),
guarded on recent torch by ``where(all(isfinite(S)), that, S - amax(S))``.  The matcher reads
it from ``amax(M)``: the band is ``M``'s, divided (multiplied) by ``d`` before the statistics,
which is ``S``'s band exactly (``sign`` is +-1).

All of them come from ``tpfuse::softmax_stats_hidden`` on this rank's band: one exchange of
a few float32 numbers per row instead of the gathered logits.  What the graph does with the
per-row results (``neg``, the ``ignore_index`` mask, the mean) stays as it is.  Any other use
of a full-width intermediate keeps the gather, with the reason.

A reshape that merges the logits' leading dims before the softmax (HF's
``logits.view(-1, V)``) is one of the walk's steps: it is replayed on the band.

The class index may be computed from the gathered logits through an eliminated consumer (the
token of an eliminated argmax, for greedy decoding with log-probabilities); the framework
checks that (``gather_elimination._input_problem``).

The matchers run in inference graphs (no autograd).  A training graph's backward is split
off before post-grad passes run; its loss is written with ``tpfuse.cross_entropy_hidden``
(docs/passes.md, "Training").
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
from torch.fx import Node

from ..compile_ops import reduce_hidden, vocab_parallel_loss  # noqa: F401 - register the ops the rewrite emits
from . import graph_facts as facts
from .elimination_matchers import Elimination, EliminationMatcher, ReductionSite
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
TOPK = facts.op_overloads("topk.default")
CONVERT = frozenset({torch.ops.prims.convert_element_type.default})
ANY = facts.op_overloads("any.dims", "any.dim")
SCALE = DIV | MUL


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
    # a scaled softmax: ("div" | "mul", the factor d: a number or a node) applied to the band
    scale: tuple[str, object] | None = None
    scale_nodes: tuple[Node, ...] = ()  # (M - amax(M)) and its scaling, the guard, S - amax(S)

    @property
    def nodes(self) -> tuple[Node, ...]:
        return ((self.amax, *self.shift_nodes, *self.scale_nodes, self.centred, self.exp, self.total)
                + ((self.log,) if self.log else ()))


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


def parse_scaled_softmax(logits: Node, amax: Node) -> Softmax | None:
    """Inductor's scaled softmax around ``amax = amax(M, [-1], True)`` (``logits`` is ``M``), or None.

    ``stable = (M - amax) / d`` (or ``* d``); ``centred`` is ``where(all(isfinite(S)), stable,
    S - amax(S))`` (torch 2.13) or ``stable`` itself (older torch)."""
    ndim = facts.ndim(logits)
    if not (_is(amax, AMAX) and amax.args[0] is logits and ndim and len(amax.users) == 1):
        return None
    if not (_last_dims(facts.arg(amax, 1, "dim", []), ndim) and facts.arg(amax, 2, "keepdim", False)):
        return None
    centred_m = next(iter(amax.users))
    if not (_is(centred_m, SUB) and centred_m.args[:2] == (logits, amax) and len(centred_m.users) == 1):
        return None
    stable = next(iter(centred_m.users))
    if not (_is(stable, SCALE) and stable.args[0] is centred_m and _row_constant(stable.args[1], ndim)):
        return None
    scale = ("div" if stable.target in DIV else "mul", stable.args[1])
    centred, guard = stable, ()
    where = _single(stable.users, WHERE)
    if where is not None:
        guard = _finite_guard(where, stable, ndim)
        if guard is None or len(stable.users) != 1:
            return None
        centred = where
    exp = _single(centred.users, EXP)
    total = _single(exp.users, SUM) if exp is not None else None
    if total is None or not _last_dims(facts.arg(total, 1, "dim", []), ndim):
        return None
    log = _single(total.users, LOG)
    return Softmax(amax, amax, (), centred, exp, total, bool(facts.arg(total, 2, "keepdim", False)), log,
                   scale=scale, scale_nodes=(centred_m, stable, *guard))


def _row_constant(factor, ndim: int) -> bool:
    """A number, or a tensor the same along the gathered axis (0-d, or last dim 1) and not wider than the logits."""
    if isinstance(factor, (int, float)):
        return True
    shape = facts.shape(factor) if isinstance(factor, Node) else None
    return shape is not None and len(shape) <= ndim and (len(shape) == 0 or facts.same_size(shape[-1], 1))


def _finite_guard(where: Node, stable: Node, ndim: int) -> tuple[Node, ...] | None:
    """The nodes of ``where(all(isfinite(S)), stable, S - amax(S))`` besides ``stable`` (S itself is
    a step of the walk, not one of them), or None when ``where`` is not that."""
    condition, original = where.args[0], where.args[2]
    if where.args[1] is not stable or not (_is(original, SUB) and isinstance(original.args[1], Node)):
        return None
    scaled, amax = original.args[:2]
    if not (_is(amax, AMAX) and amax.args[0] is scaled and _last_dims(facts.arg(amax, 1, "dim", []), ndim)):
        return None
    checks = _computed_only_from(condition, scaled)
    if checks is None:
        return None
    return (where, amax, original, *checks)


def _computed_only_from(node: Node, source: Node) -> list[Node] | None:
    """The elementwise ops and ``any`` reductions between ``source`` and ``node``, when ``node`` is
    computed from ``source`` alone through them (an isfinite test of a row); else None."""
    found, pending = [], [node]
    while pending:
        current = pending.pop()
        if current is source or current in found:
            continue
        if not (isinstance(current, Node) and current.op == "call_function" and current.all_input_nodes):
            return None
        target = current.target
        pointwise = isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags
        if not (pointwise or target in ANY) or len(found) > 16:
            return None
        found.append(current)
        pending += current.all_input_nodes
    return found


# --------------------------------------------------------------------------- what is read from it


@dataclass(frozen=True)
class Terminal:
    """A per-row value read from the softmaxes: ``kind`` in logsumexp, logprob, sum_logprobs,
    neg_entropy; ``keepdim``: the row axis is kept (size 1); ``raw``: its softmax shifts the row
    by its raw max (``amax``, as log_softmax and softmax do), not by torch.logsumexp's guarded
    shift, so a row whose max is infinite is NaN (``_replacement``)."""

    kind: str
    node: Node
    keepdim: bool
    raw: bool = True


@dataclass
class _Reading:
    terminals: list
    nodes: list  # every node of the matched region (full width or not), terminals included
    index: Node | None = None  # the class index of the logprob and prob terminals ([..., 1])
    topk: tuple | None = None  # (k, largest, sorted) of the topk terminals
    problem: str | None = None
    fewer_rows: bool = False  # the class index may have fewer rows than the logits (``_read_index``)
    raw: dict = field(default_factory=dict)  # log-softmax or probabilities -> its softmax shifts by the raw max

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
    reading.raw.update((n, not s.shift_nodes) for s in softmaxes for n in (*_log_softmaxes(s), *_probabilities(s)))
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
                _read_probability_user(p, user, ndim, reading)
    for product in products:
        reading.nodes.append(product)
        total = _single(product.users, SUM)
        if total is None or len(product.users) != 1 or not _last_dims(facts.arg(total, 1, "dim", []), ndim):
            reading.fail(f"the product {product.name} of the softmax and the log-softmax is used other than "
                         "by a sum over the last axis")
            continue
        _terminal(reading, "neg_entropy", total, raw=any(reading.raw.get(a, False) for a in product.args[:2]))
    _check_inner_users(softmaxes, log_softmaxes, probabilities, reading)
    return reading


def _read_logsumexp(s: Softmax, reading: _Reading) -> None:
    """``add(log, squeeze(shift))``, or ``add(log, shift)`` with keepdim: torch.logsumexp (its shift
    guarded), or the same written by hand with the raw max (NaN where the max is infinite)."""
    if s.log is None or s.scale is not None:
        return
    raw = not s.shift_nodes
    if s.keepdim:
        for add in s.log.users:
            if _is(add, ADD) and set(add.args[:2]) == {s.log, s.shift}:
                _terminal(reading, "logsumexp", add, keepdim=True, raw=raw)
        return
    for squeeze in [u for u in s.shift.users if _is(u, SQUEEZE)]:
        for add in squeeze.users:
            if _is(add, ADD) and set(add.args[:2]) == {s.log, squeeze}:
                reading.nodes.append(squeeze)
                _terminal(reading, "logsumexp", add, raw=raw)


def _read_index(user: Node, reading: _Reading) -> None:
    """The class index of ``gather(.., -1, index)``: one per row, the same tensor for every such terminal."""
    index = user.args[2]
    if reading.index is not None and index is not reading.index:
        reading.fail(f"{user.name} gathers the log-softmax at a second index tensor {index.name}; "
                     f"one index per row is supported ({reading.index.name})")
    shape = facts.shape(index)
    if shape is None or not facts.same_size(shape[-1], 1):
        reading.fail(f"{user.name} gathers {shape[-1] if shape else '?'} classes per row; one is supported")
    elif not facts.same_shape(shape[:-1], facts.shape(user.args[0])[:-1]):
        # torch.gather reads the first rows, as many as its index has (a static index at a dynamic T, a
        # second symbol for the same T): the replacement pads the index and keeps those rows
        reading.fewer_rows = True
    reading.index = index


def _read_probability_user(p: Node, user: Node, ndim: int, reading: _Reading, converted: bool = False) -> None:
    """A use of the probabilities ``p``: gathered at a class index, a top-k, or either after one conversion."""
    if _is(user, CONVERT) and not converted:
        reading.nodes.append(user)
        reading.raw[user] = reading.raw.get(p, True)
        for inner in user.users:
            _read_probability_user(user, inner, ndim, reading, converted=True)
    elif _is(user, GATHER) and user.args[0] is p and _last_dims(user.args[1], ndim):
        _read_index(user, reading)
        _terminal(reading, "prob", user, keepdim=True, raw=reading.raw.get(p, True))
    elif _is(user, TOPK) and user.args[0] is p and _last_dims(facts.arg(user, 2, "dim", -1), ndim):
        _read_topk(user, reading, raw=reading.raw.get(p, True))
    else:
        reading.fail(f"the softmax {p.name} is also used by {facts.describe(user)}")


def _read_topk(user: Node, reading: _Reading, raw: bool) -> None:
    k = facts.arg(user, 1, "k", None)
    chosen = (k, bool(facts.arg(user, 3, "largest", True)), bool(facts.arg(user, 4, "sorted", True)))
    items = [u for u in user.users if u.op == "call_function" and u.target is operator.getitem]
    if not isinstance(k, int):
        reading.fail(f"{user.name} (topk of the softmax): k={k!r} is not a literal int")
    elif len(items) != len(user.users):
        reading.fail(f"{user.name} (topk of the softmax) is used other than through getitem")
    elif reading.topk is not None and reading.topk != chosen:
        reading.fail(f"{user.name} is a second top-k of the softmax; one is supported")
    reading.topk = chosen
    reading.nodes.append(user)
    for item in items:
        _terminal(reading, ("topk_values", "topk_indices")[item.args[1]], item, raw=raw)


def _read_log_softmax_user(ls: Node, user: Node, probabilities, ndim, reading: _Reading, products) -> None:
    if _is(user, GATHER) and user.args[0] is ls and _last_dims(user.args[1], ndim):
        _read_index(user, reading)
        _terminal(reading, "logprob", user, keepdim=True, raw=reading.raw.get(ls, True))
    elif _is(user, SUM) and _last_dims(facts.arg(user, 1, "dim", []), ndim):
        _terminal(reading, "sum_logprobs", user, keepdim=bool(facts.arg(user, 2, "keepdim", False)),
                  raw=reading.raw.get(ls, True))
    elif _is(user, MUL) and any(a in probabilities for a in user.args[:2]) and ls in user.args[:2]:
        products[user] = None
    else:
        reading.fail(f"the log-softmax {ls.name} is also used by {facts.describe(user)}")


def _terminal(reading: _Reading, kind: str, node: Node, keepdim: bool = False, raw: bool = True) -> None:
    if node not in [t.node for t in reading.terminals]:
        reading.terminals.append(Terminal(kind, node, keepdim, raw))
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


def _replacement(band, *inputs, hidden_widths, group_name, valid_columns, plan, vocab, with_logit_sum,
                 with_entropy, scale, topk, fewer_rows=False):
    """The terminals' values from this rank's band (traced into the graph by the framework)."""
    if scale is not None:  # a scaled softmax: the band of S = M / d (M * d), bit for bit
        op, factor = scale
        if factor is None:
            factor, inputs = inputs[0], inputs[1:]
        band = band / factor if op == "div" else band * factor
    target = inputs[0].squeeze(-1) if inputs else None
    index_rows = target.shape if target is not None else None
    if fewer_rows:  # class 0 in the rows past the index's: computed, then dropped
        target = torch.constant_pad_nd(target, [p for n, full in zip(reversed(index_rows), reversed(band.shape[:-1]))
                                                for p in (0, full - n)], 0)
    shift, log_sum, target_logit, logit_sum, entropy = torch.ops.tpfuse.softmax_stats_hidden(
        band, target, hidden_widths, group_name, -100, with_logit_sum, with_entropy, valid_columns)
    if topk is not None:  # the softmax is monotone in the logits: the same classes, exactly
        k, largest, is_sorted = topk
        top_values, top_indices = torch.ops.tpfuse.topk_hidden(band, k, hidden_widths, group_name, largest,
                                                               is_sorted, valid_columns)
    if with_entropy:
        # the program sums p * log p, which is 0 * (-inf) = NaN at a column of -inf (a masked class), where
        # the statistics count 0: the row's min tells those rows
        row_min = torch.ops.tpfuse.max_hidden(band, hidden_widths, group_name, False, valid_columns)[0]
    values = {"logsumexp": lambda: shift + log_sum,
              "logprob": lambda: target_logit - log_sum,
              # exp(x - c) / S as torch computes it, S = exp(log_sum)
              "prob": lambda: torch.exp(target_logit) / torch.exp(log_sum),
              "sum_logprobs": lambda: logit_sum - vocab * log_sum,  # sum_c (x_c - shift) - V log_sum
              "neg_entropy": lambda: torch.where(row_min == -math.inf, math.nan, -entropy),
              "topk_values": lambda: (torch.exp(top_values.float() - shift.unsqueeze(-1))
                                      / torch.exp(log_sum).unsqueeze(-1)),
              "topk_indices": lambda: top_indices}
    out = []
    for kind, keepdim, dtype, raw in plan:
        value = values[kind]()
        if raw and kind != "topk_indices":
            value = _nan_where_the_max_is_infinite(value, log_sum)
        if fewer_rows and kind in ("logprob", "prob"):  # torch.gather's rows: the index's
            value = value[tuple(slice(0, n) for n in index_rows)]
        value = value.unsqueeze(-1) if keepdim else value
        # prims' conversion, as post-grad graphs spell it (Inductor lowers no aten._to_copy there)
        out.append(value if value.dtype == dtype else torch.ops.prims.convert_element_type(value, dtype))
    return tuple(out)


def _nan_where_the_max_is_infinite(value, log_sum):
    """NaN in the rows whose max is +-inf, as a softmax shifted by its raw max computes them (``x - max``
    is ``inf - inf`` there).  The statistics' shift is torch.logsumexp's guarded one (0 where the max is
    infinite), so they are finite there; ``log_sum`` tells those rows: +-inf exactly there, since every
    other row's sum of ``exp(x - max)`` lies in [1, V]."""
    infinite = torch.isinf(log_sum)
    infinite = infinite.unsqueeze(-1) if value.dim() > infinite.dim() else infinite
    return torch.where(infinite, math.nan, value)


def _logits_of(site: ReductionSite) -> Node | None:
    """The full-width tensor the softmaxes read (the value at an amax or sub consumer)."""
    return site.value if _is(site.consumer, AMAX) or _is(site.consumer, SUB) else None


def match_softmax(site: ReductionSite) -> Elimination | Reject | None:
    logits = _logits_of(site)
    if logits is None:
        return None
    # every softmax of these logits: an entropy reads two (softmax and log-softmax), and one
    # exchange serves them all
    softmaxes = [s for s in (parse_softmax(logits, a) or parse_scaled_softmax(logits, a)
                             for a in logits.users if _is(a, AMAX)) if s is not None]
    mine = [s for s in softmaxes if site.consumer in (s.amax, s.centred, *s.scale_nodes[:1])]
    if not mine:
        return None  # an amax the program reads itself: the exact family's
    if len({s.scale for s in softmaxes}) > 1:
        softmaxes = mine  # softmaxes at different temperatures: each one its own statistics
    if _is(site.consumer, SUB):
        softmaxes = mine
    reading = _read(softmaxes, facts.ndim(logits))
    if reading.problem is None and not reading.terminals:
        reading.fail("no per-row value is read from the softmax")
    if site.dtype not in vocab_parallel_loss.LOGIT_DTYPES:  # float64: float32 statistics would change it
        accepted = ", ".join(str(d).removeprefix("torch.") for d in vocab_parallel_loss.LOGIT_DTYPES)
        reading.fail(f"the logits are {site.dtype}; the statistics take {accepted}")
    if reading.topk is not None and isinstance(reading.topk[0], int) and not 1 <= reading.topk[0] <= site.columns:
        reading.fail(f"topk of the softmax: k={reading.topk[0]} is outside 1..{site.columns}")
    scale = mine[0].scale
    if reading.problem is None and scale is not None and isinstance(scale[1], Node) and _reads(scale[1], site.gather):
        reading.fail(f"the temperature {scale[1].name} is computed from the gathered logits")
    if reading.problem is not None:
        # about every node of the softmaxes, so that the report does not list each of them again
        return Reject("softmax of the gathered logits not eliminated: " + reading.problem,
                      (site.consumer, *(n for s in softmaxes for n in s.nodes)))
    if _is(site.consumer, SUB):
        return None  # matched from its amax, which comes first in the graph
    return _elimination(site, softmaxes, reading)


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


def _elimination(site, softmaxes, reading: _Reading) -> Elimination:
    kinds = [t.kind for t in reading.terminals]
    plan = tuple((t.kind, t.keepdim, facts.val(t.node).dtype, t.raw) for t in reading.terminals)
    with_logit_sum, with_entropy = "sum_logprobs" in kinds, "neg_entropy" in kinds
    users = set(site.value.users)
    claims = tuple(dict.fromkeys(n for s in softmaxes for n in (s.amax, s.centred, *s.scale_nodes[:1])
                                 if n is not site.consumer and n in users))
    scale = softmaxes[0].scale
    factor = scale[1] if scale is not None and isinstance(scale[1], Node) else None
    inputs = tuple(n for n in (factor, reading.index) if n is not None)
    words = 2 + int(reading.index is not None) + int(with_logit_sum) + int(with_entropy)
    partials = ((words, torch.float32),) + (((2 * reading.topk[0], torch.int32),) if reading.topk else ()) \
        + (((2, torch.int32),) if with_entropy else ())  # the row's min: a column of -inf
    name = "+".join(dict.fromkeys({"logsumexp": "logsumexp", "logprob": "log_softmax gather", "prob": "softmax gather",
                                   "sum_logprobs": "log_softmax sum", "neg_entropy": "entropy",
                                   "topk_values": "softmax topk", "topk_indices": "softmax topk"}[k] for k in kinds))
    return Elimination(
        name,
        outputs=tuple(t.node for t in reading.terminals),
        replacement=_replacement,
        claims=claims,
        region=tuple(dict.fromkeys(n for n in reading.nodes if n is not site.consumer and n not in claims)),
        inputs=inputs,
        extra=(("plan", plan), ("vocab", site.columns), ("with_logit_sum", with_logit_sum),
               ("with_entropy", with_entropy),
               ("scale", None if scale is None else (scale[0], None if factor is not None else scale[1])),
               ("topk", reading.topk), ("fewer_rows", reading.fewer_rows)),
        partials=partials if len(partials) > 1 else partials[0],
    )


MATCHERS = (
    EliminationMatcher(
        name="softmax",
        match=match_softmax,
        consumers=(aten.amax.default, aten.sub.Tensor),
        # above the exact family's amax: the amax of a softmax is not a max the program reads
        priority=20,
        description="log_softmax / logsumexp / cross_entropy / entropy / softmax gathered or top-k, also after a "
                    "temperature, over the gathered axis -> tpfuse::softmax_stats_hidden (and tpfuse::topk_hidden)",
        builtin=True,
    ),
)
