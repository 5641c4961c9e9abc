"""Comparison reductions over a hidden axis split across ranks, without gathering it (the EXACT family).

Each rank holds the slab ``x [..., w_r]`` of ``cat_r(x_r, dim=-1)`` (global columns
``[offset_r, offset_r + w_r)``, ``offset_r = sum(hidden_widths[:r])``).  The ops compute what
torch computes on the gathered tensor, bit for bit, but each rank reduces only its own slab
and the ranks exchange a few words per row (docs/op.md, "Reductions without the gather")::

    tpfuse::max_hidden(Tensor x, int[] hidden_widths, str group_name, bool largest=True,
                       int? valid_columns=None) -> (Tensor values, Tensor indices)
    tpfuse::topk_hidden(Tensor x, int k, int[] hidden_widths, str group_name, bool largest=True,
                        bool sorted=True, int? valid_columns=None) -> (Tensor values, Tensor indices)
    tpfuse::hidden_band(Tensor full, int[] hidden_widths, int local_width, str group_name) -> Tensor

``max_hidden`` is ``torch.max(cat, -1)`` (``largest=False``: ``torch.min``), ``topk_hidden`` is
``torch.topk(cat, k, -1, largest, sorted)``; ``valid_columns=V`` reduces ``cat[..., :V]`` (a
padded vocabulary sliced to its real size), so a rank may hold no valid column at all.
``hidden_band`` is the helper the gather-elimination pass uses to apply a full-width operand
(a bias, a mask) to this rank's slab: columns ``[offset_r, offset_r + local_width)`` of
``full``'s last dim, zero-filled where ``full`` is narrower (the columns a ``valid_columns``
slice drops anyway).

Exactness: only comparisons, no arithmetic.  Each rank picks its candidates (the first
maximal element of its valid columns, or its first k in a stable sort), packs each as two
int32 words (the value's own bits and the global index) and one ``tpfuse::all_gather_hidden``
moves them (it moves bytes: contract §5); every rank then merges all candidates in the same
order, so every rank holds the same bits.  The order is torch's: NaN above every number
(for ``max``/``min`` the FIRST NaN wins, as ``torch.argmax``/``torch.argmin`` return it; for
``topk`` NaN is the largest value whatever its sign and payload, also with ``largest=False``,
as ``torch.topk`` and the CPU's ``torch.sort`` treat it), then by value, then the lowest global
index.  ``torch.sort`` on CUDA is a radix sort of the bits (rows of more than 128 elements): a
NaN with its sign bit set lands below -inf there, so the composition sorts ``_sort_key``.

On CUDA the same steps run as two Triton kernels around the exchange (reduce_kernels.py): each
rank sends the best candidate (or first k) of each of S chunks of its row, S planned from
rank-invariant facts; the torch composition here is their reference and the CPU path.

Ties: ``max_hidden`` returns the first maximal (minimal) index, as ``torch.max(dim)`` and
``torch.argmax`` document.  ``torch.topk`` promises nothing about which of equal values it
returns, or in which order; ``topk_hidden`` returns equal values by increasing global index
(and with ``sorted=False`` still sorted, which is one of the orders torch allows).  Equal
values are ``==``-equal: ``-0.0`` and ``0.0`` tie, and the value returned is the element at
the returned index (its own sign of zero, its own NaN payload).

Autograd: none.  The indices have no gradient anyway; the values are returned as results
that do not require grad (use ``torch.max(tpfuse.all_gather_hidden(x, ...), -1)`` where a
gradient must flow through them).  The gather-elimination pass rewrites post-grad graphs,
where autograd has already been split off, so it never needs one.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from .all_gather_hidden import refused_alike
from .groups import Group, group_name_of, resolve_group
from .validation import (check_device_matches_group, check_not_scalar, check_one_width_per_rank, check_widths,
                         whole_widths, world_size_of)

#: the dtypes of x the ops accept; a value travels as its own bits in one int32 word
VALUE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: the dtype the partials travel in (the gather moves it bit-exactly on every backend)
PARTIAL_DTYPE = torch.int32
#: the index of a neutral candidate (a rank without valid columns, or with fewer than k): it
#: loses every tie, since ties go to the lowest global index
_NEVER = torch.iinfo(torch.int32).max

_lib = torch.library.Library("tpfuse", "FRAGMENT")
_lib.define(
    "max_hidden(Tensor x, int[] hidden_widths, str group_name, bool largest=True, "
    "int? valid_columns=None) -> (Tensor values, Tensor indices)"
)
_lib.define(
    "topk_hidden(Tensor x, int k, int[] hidden_widths, str group_name, bool largest=True, "
    "bool sorted=True, int? valid_columns=None) -> (Tensor values, Tensor indices)"
)
_lib.define("hidden_band(Tensor full, int[] hidden_widths, int local_width, str group_name) -> Tensor")


# --------------------------------------------------------------------------- layout facts


def partial_words(k: int = 1) -> int:
    """int32 words one rank sends per row: k values' bits, then k global indices."""
    return 2 * k


def band_offset(hidden_widths: Sequence[int], rank: int) -> int:
    """The global column of this rank's first column."""
    return int(sum(hidden_widths[:rank]))


def valid_width(hidden_widths: Sequence[int], rank: int, valid_columns: int | None) -> int:
    """How many of this rank's columns lie inside ``[..., :valid_columns]`` (0 to its width)."""
    width = int(hidden_widths[rank])
    if valid_columns is None:
        return width
    return max(0, min(width, int(valid_columns) - band_offset(hidden_widths, rank)))


def widest_valid_width(hidden_widths: Sequence[int], valid_columns: int | None) -> int:
    """The most valid columns any rank holds: the same on every rank, so it may size what each sends."""
    return max(valid_width(hidden_widths, rank, valid_columns) for rank in range(len(hidden_widths)))


# --------------------------------------------------------------------------- validation


def _names(dtypes) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def _check_shape_and_dtype(x: Tensor) -> None:
    """What needs no process group (the fake kernels call it too)."""
    check_not_scalar(x)
    if x.dtype not in VALUE_DTYPES:
        raise TypeError(f"tpfuse: reduction over the hidden axis of dtype {x.dtype} is not supported; "
                        f"accepted dtypes are {_names(VALUE_DTYPES)}")


def _columns(hidden_widths: Sequence[int], valid_columns: int | None) -> int:
    """The number of global columns reduced over, checked: at least one."""
    check_widths(hidden_widths)
    total = int(sum(hidden_widths))
    if total >= _NEVER:
        raise ValueError(f"tpfuse: sum(hidden_widths)={total} does not fit the int32 indices the partials "
                         f"carry; accepted are fewer than {_NEVER} columns")
    if valid_columns is None:
        return total
    if valid_columns < 1:
        raise ValueError(f"tpfuse: valid_columns={valid_columns} keeps no column; accepted are 1 to "
                         f"sum(hidden_widths)={total}, or None for all")
    return min(total, int(valid_columns))


def _check_k(k: int, columns: int) -> None:
    if not 1 <= k <= columns:
        raise ValueError(f"tpfuse: topk_hidden k={k} is out of range; accepted are 1 to the number of "
                         f"columns reduced over ({columns})")


def _check_slab(x: Tensor, hidden_widths: Sequence[int], group: Group) -> None:
    """This rank's view: one width per rank, x as wide as its own entry, a device the group moves."""
    check_one_width_per_rank(hidden_widths, group)
    if x.shape[-1] != hidden_widths[group.rank]:
        raise ValueError(f"tpfuse: x.shape[-1]={x.shape[-1]} on rank {group.rank} but "
                         f"hidden_widths[{group.rank}]={hidden_widths[group.rank]}; x's last dim must "
                         "equal this rank's entry in hidden_widths")
    check_device_matches_group(x.device.type, group)


def _check_no_gradient(x: Tensor, what: str) -> None:
    if x.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"tpfuse: {what} has no gradient; accepted are inputs that do not require grad "
                         f"(for a gradient, reduce tpfuse.all_gather_hidden(x, group) with torch instead)")


def _agree(x: Tensor, hidden_widths: list[int], group: Group, local_check, call: str) -> None:
    """Where the gather checks that the ranks mean the same call, check it here too, first, with every check
    of this rank's own as ``local_check``: a call that one rank refuses (a dtype, a k out of range, a slab not
    as wide as its entry) is refused by every rank, and arguments that differ between the ranks (``call``:
    the op with its k, largest and valid_columns) too, where each rank would merge candidates its peers
    chose by other rules (docs/contract.md §4)."""
    from .. import config as settings
    from . import agreement
    from .all_gather_hidden import agreement_applies  # the gather's own rule of where it checks

    if agreement_applies(x.device.type, group, settings.raw_dispatch_values()[-1]):
        agreement.check(x, hidden_widths, group, local_check, agreement.CallView.of_gather(x, hidden_widths, op=call))
    else:
        local_check()


def _prepare(x: Tensor, hidden_widths: list[int], group_name: str, valid_columns: int | None, op: str,
             largest: bool, k: int | None = None):
    """Every check, agreed before any exchange; returns (group, columns, local valid slab)."""
    group = resolve_group(group_name)

    def local_check():
        _check_shape_and_dtype(x)
        _check_no_gradient(x, op)
        columns = _columns(hidden_widths, valid_columns)
        if k is not None:
            _check_k(k, columns)
        _check_slab(x, hidden_widths, group)

    k_text = "" if k is None else f"k={k}, "
    _agree(x, hidden_widths, group, local_check, f"{op}({k_text}largest={largest}, valid_columns={valid_columns})")
    columns = _columns(hidden_widths, valid_columns)
    width = valid_width(hidden_widths, group.rank, columns)
    return group, columns, x[..., :width]


# --------------------------------------------------------------------------- packing


def _value_bits(values: Tensor) -> Tensor:
    """A value's own bits in an int32 word (16-bit floats sign-extended, undone by ``_from_bits``)."""
    if values.dtype == torch.float32:
        return values.contiguous().view(torch.int32)
    return values.contiguous().view(torch.int16).to(torch.int32)


def _from_bits(bits: Tensor, dtype: torch.dtype) -> Tensor:
    if dtype == torch.float32:
        return bits.contiguous().view(torch.float32)
    return bits.to(torch.int16).view(dtype)


def _neutral(largest: bool) -> float:
    """The value of a candidate that must never be chosen (its index ``_NEVER`` loses every tie)."""
    return float("-inf") if largest else float("inf")


def _exchange(values: Tensor, indices: Tensor, group: Group) -> tuple[Tensor, Tensor]:
    """Every rank's k candidates ``[..., k]`` -> all of them ``[..., W, k]`` (values' bits, int64 indices)."""
    k = values.shape[-1]
    partials = torch.cat([_value_bits(values), indices.to(torch.int32)], dim=-1)
    gathered = torch.ops.tpfuse.all_gather_hidden.default(
        partials, [partial_words(k)] * group.world_size, group.name)
    gathered = gathered.view(*gathered.shape[:-1], group.world_size, 2, k)
    return gathered[..., 0, :], gathered[..., 1, :].to(torch.int64)


# --------------------------------------------------------------------------- max / min


def _local_best(local: Tensor, offset: int, largest: bool) -> tuple[Tensor, Tensor]:
    """This rank's first maximal (minimal) element of each row, ``[..., 1]``, with its global index;
    a neutral candidate when the rank holds no valid column."""
    lead = local.shape[:-1]
    if local.shape[-1] == 0:
        values = local.new_full((*lead, 1), _neutral(largest))
        return values, torch.full((*lead, 1), _NEVER, dtype=torch.int64, device=local.device)
    # argmax/argmin: first occurrence on ties, the first NaN wins (torch's documented rule)
    index = (local.argmax(-1) if largest else local.argmin(-1)).unsqueeze(-1)
    # the element's own bits, gathered as integers: torch's CPU gather of bfloat16 returns a NaN as 0xFFFF
    ints = local.view(torch.int16 if local.element_size() == 2 else torch.int32)
    return ints.gather(-1, index).view(local.dtype), index + offset


def _merge_best(bits: Tensor, indices: Tensor, dtype: torch.dtype, largest: bool) -> tuple[Tensor, Tensor]:
    """The winner among every rank's candidate ``[..., W]``: NaN first, then value, then lowest index."""
    values = _from_bits(bits, dtype).float()  # exact for every accepted dtype
    nan = values.isnan()
    best = values.amax(-1, keepdim=True) if largest else values.amin(-1, keepdim=True)
    winners = torch.where(nan.any(-1, keepdim=True), nan, values == best)
    index = torch.where(winners, indices, _NEVER).amin(-1, keepdim=True)
    position = (winners & (indices == index)).to(torch.uint8).argmax(-1, keepdim=True)
    return _from_bits(bits.gather(-1, position), dtype).squeeze(-1), index.squeeze(-1)


def _max_hidden_impl(x: Tensor, hidden_widths: list[int], group_name: str, largest: bool = True,
                     valid_columns: int | None = None) -> tuple[Tensor, Tensor]:
    group, columns, local = _prepare(x, hidden_widths, group_name, valid_columns, "max_hidden", largest)
    if local.is_cuda:  # Triton kernels (reduce_kernels.py); the composition below is their reference
        from . import reduce_kernels
        return reduce_kernels.max_hidden(local, band_offset(hidden_widths, group.rank),
                                         widest_valid_width(hidden_widths, columns), group, largest)
    values, indices = _local_best(local, band_offset(hidden_widths, group.rank), largest)
    bits, indices = _exchange(values, indices, group)
    return _merge_best(bits.squeeze(-1), indices.squeeze(-1), x.dtype, largest)


# --------------------------------------------------------------------------- topk


def _sort_key(values: Tensor) -> Tensor:
    """What the composition sorts instead of ``values``: every NaN one positive NaN, -0.0 as 0.0.

    On this key a sort that compares (the CPU's) and one that orders bits (CUDA's radix sort, where
    a NaN with its sign bit falls below -inf and NaN payloads order among themselves) give the same
    stable order: NaN above every number, -0.0 tied with 0.0, ties by position."""
    key = values.masked_fill(values.isnan(), float("nan"))
    return key.masked_fill(key == 0, 0.0)


def _local_topk(local: Tensor, k: int, offset: int, largest: bool) -> tuple[Tensor, Tensor]:
    """This rank's first k elements in the merge order, ``[..., k]``, padded with neutral candidates.

    A stable sort, not ``torch.topk``: which of equal values topk keeps is unspecified, and the
    merge needs each rank's lowest-index ones.  It sorts ``_sort_key`` (torch.topk's NaN rule on
    every device) and returns the elements' own bits."""
    lead, kept = local.shape[:-1], min(k, local.shape[-1])
    order = torch.sort(_sort_key(local), dim=-1, descending=largest, stable=True)[1][..., :kept]
    # gathered as integers: torch's CPU gather of bfloat16 returns a NaN as 0xFFFF
    ints = local.view(torch.int16 if local.element_size() == 2 else torch.int32)
    values, indices = ints.gather(-1, order).view(local.dtype), order + offset
    if kept < k:
        values = torch.cat([values, local.new_full((*lead, k - kept), _neutral(largest))], -1)
        never = torch.full((*lead, k - kept), _NEVER, dtype=torch.int64, device=local.device)
        indices = torch.cat([indices, never], -1)
    return values, indices


def _merge_topk(bits: Tensor, indices: Tensor, k: int, dtype: torch.dtype, largest: bool):
    """The first k of every rank's candidates ``[..., C]`` by (neutral last, value, global index):
    stable sorts, least significant key first, so each later sort keeps the earlier order among its ties."""
    order = indices.argsort(dim=-1, stable=True)
    values = _sort_key(_from_bits(bits.gather(-1, order), dtype).float())  # exact for every accepted dtype
    order = order.gather(-1, values.argsort(dim=-1, stable=True, descending=largest))
    neutral = (indices.gather(-1, order) == _NEVER).to(torch.uint8)
    order = order.gather(-1, neutral.argsort(dim=-1, stable=True))[..., :k]
    return _from_bits(bits.gather(-1, order), dtype), indices.gather(-1, order)


def _topk_hidden_impl(x: Tensor, k: int, hidden_widths: list[int], group_name: str, largest: bool = True,
                      sorted: bool = True, valid_columns: int | None = None) -> tuple[Tensor, Tensor]:  # noqa: A002
    group, columns, local = _prepare(x, hidden_widths, group_name, valid_columns, "topk_hidden", largest, k)
    if local.is_cuda:  # Triton kernels up to their largest k (reduce_kernels.py); the same choice on every rank
        from . import reduce_kernels
        if k <= reduce_kernels.MAX_TOPK:
            return reduce_kernels.topk_hidden(local, k, band_offset(hidden_widths, group.rank),
                                              widest_valid_width(hidden_widths, columns), group, largest)
    values, indices = _local_topk(local, k, band_offset(hidden_widths, group.rank), largest)
    bits, indices = _exchange(values, indices, group)
    bits, indices = bits.flatten(-2), indices.flatten(-2)
    return _merge_topk(bits, indices, k, x.dtype, largest)


# --------------------------------------------------------------------------- band of a full-width operand


def _hidden_band_impl(full: Tensor, hidden_widths: list[int], local_width: int, group_name: str) -> Tensor:
    group = resolve_group(group_name)
    check_one_width_per_rank(hidden_widths, group)
    if hidden_widths[group.rank] != local_width:
        raise ValueError(f"tpfuse: hidden_band on rank {group.rank}: local_width={local_width} but "
                         f"hidden_widths[{group.rank}]={hidden_widths[group.rank]}; they must be equal")
    return _band(full, band_offset(hidden_widths, group.rank), local_width)


def _band(full: Tensor, offset: int, width: int) -> Tensor:
    if full.dim() == 0:
        raise ValueError("tpfuse: hidden_band of a scalar; accepted are tensors with a last (hidden) dim")
    out = full.new_zeros(*full.shape[:-1], width)
    inside = max(0, min(width, full.shape[-1] - offset))
    out[..., :inside] = full[..., offset:offset + inside]
    return out


for _device in ("CPU", "CUDA"):
    _lib.impl("max_hidden", _max_hidden_impl, _device)
    _lib.impl("topk_hidden", _topk_hidden_impl, _device)
    _lib.impl("hidden_band", _hidden_band_impl, _device)


# --------------------------------------------------------------------------- fake kernels


@torch.library.register_fake("tpfuse::max_hidden", lib=_lib)
def _(x, hidden_widths, group_name, largest=True, valid_columns=None):
    # Shapes only: never touches a process group; symbolic leading dims pass through.
    _check_shape_and_dtype(x)
    _columns(hidden_widths, valid_columns)
    lead = x.shape[:-1]
    return x.new_empty(lead), x.new_empty(lead, dtype=torch.int64)


@torch.library.register_fake("tpfuse::topk_hidden", lib=_lib)
def _(x, k, hidden_widths, group_name, largest=True, sorted=True, valid_columns=None):  # noqa: A002
    _check_shape_and_dtype(x)
    _check_k(k, _columns(hidden_widths, valid_columns))
    lead = x.shape[:-1]
    return x.new_empty(*lead, k), x.new_empty(*lead, k, dtype=torch.int64)


@torch.library.register_fake("tpfuse::hidden_band", lib=_lib)
def _(full, hidden_widths, local_width, group_name):
    check_not_scalar(full)
    return full.new_empty(*full.shape[:-1], local_width)


# --------------------------------------------------------------------------- Python API


class MaxHidden(NamedTuple):
    values: Tensor
    indices: Tensor


def _call_args(x: Tensor, group, hidden_widths: Sequence[int] | None, what: str) -> tuple[str, Sequence]:
    if torch.compiler.is_compiling():  # tracing is rank-local: refuse here, where the message reaches the user
        check_not_scalar(x)
        _check_no_gradient(x, what)
    # Eager, the op refuses both, after the ranks agree (a scalar on one rank gets widths of -1, as the
    # gather's wrapper gives it): raised here, on one rank only, they would strand its peers in the exchange.
    name = group_name_of(group)
    if hidden_widths is None:
        return name, [int(x.shape[-1]) if x.dim() else -1] * world_size_of(name)
    return name, hidden_widths  # made whole in the dispatch, so that a refusal reaches the peers (refused_alike)


def max_hidden(x: Tensor, group=None, hidden_widths: Sequence[int] | None = None, *,
               valid_columns: int | None = None) -> MaxHidden:
    """``torch.max(cat_r(x_r, -1)[..., :valid_columns], -1)`` without the gather: (values, indices)."""
    name, widths = _call_args(x, group, hidden_widths, "max_hidden")
    def call():
        return torch.ops.tpfuse.max_hidden.default(x, whole_widths(widths), name, True, valid_columns)
    return MaxHidden(*(call() if torch.compiler.is_compiling() else refused_alike(x, name, call)))


def min_hidden(x: Tensor, group=None, hidden_widths: Sequence[int] | None = None, *,
               valid_columns: int | None = None) -> MaxHidden:
    """``torch.min(cat_r(x_r, -1)[..., :valid_columns], -1)`` without the gather: (values, indices)."""
    name, widths = _call_args(x, group, hidden_widths, "min_hidden")
    def call():
        return torch.ops.tpfuse.max_hidden.default(x, whole_widths(widths), name, False, valid_columns)
    return MaxHidden(*(call() if torch.compiler.is_compiling() else refused_alike(x, name, call)))


def argmax_hidden(x: Tensor, group=None, hidden_widths: Sequence[int] | None = None, *,
                  valid_columns: int | None = None) -> Tensor:
    """``torch.argmax(cat_r(x_r, -1)[..., :valid_columns], -1)`` without the gather."""
    return max_hidden(x, group, hidden_widths, valid_columns=valid_columns).indices


def argmin_hidden(x: Tensor, group=None, hidden_widths: Sequence[int] | None = None, *,
                  valid_columns: int | None = None) -> Tensor:
    """``torch.argmin(cat_r(x_r, -1)[..., :valid_columns], -1)`` without the gather."""
    return min_hidden(x, group, hidden_widths, valid_columns=valid_columns).indices


def topk_hidden(x: Tensor, k: int, group=None, hidden_widths: Sequence[int] | None = None, *,
                largest: bool = True, sorted: bool = True,  # noqa: A002 - torch.topk's name
                valid_columns: int | None = None) -> MaxHidden:
    """``torch.topk(cat_r(x_r, -1)[..., :valid_columns], k, -1, largest, sorted)`` without the gather;
    equal values come by increasing global index."""
    name, widths = _call_args(x, group, hidden_widths, "topk_hidden")
    def call():
        return torch.ops.tpfuse.topk_hidden.default(x, k, whole_widths(widths), name, largest, sorted, valid_columns)
    return MaxHidden(*(call() if torch.compiler.is_compiling() else refused_alike(x, name, call)))
