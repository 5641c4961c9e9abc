"""The built-in graph forms of a hidden-axis gather, one pattern object per form.

Every form starts at a gather site ``wait_tensor(all_gather_into_tensor(x, W, group))``,
whose result stacks the ranks' slabs along dim 0 (``[W*T, ..., w]``), and
rearranges it into ``cat([x_0, ..., x_{W-1}], dim=-1)``.  They differ only in
how the rearrangement is spelled (docs/passes.md, "The graph forms"):

=============  ==========================================================  ==========================
pattern        graph after the wait                                        written as
=============  ==========================================================  ==========================
split_cat      split(T, dim 0) -> getitem x W -> cat(dim=-1 or n-1)        funcol, DTensor, chunk+cat
narrow_cat     slice(dim 0) x W -> cat(dim=-1 or n-1)                      dist.all_gather(list)+cat,
                                                                            funcol with unbacked sizes
rearrange      reshape [W, .., w] -> permute/transpose/movedim -> (clone)  in-place c10d + view/permute
               -> reshape [.., W*w]
view           reshape [.., W*w] when every leading dim of x is 1          funcol/DTensor, T == 1
=============  ==========================================================  ==========================

All four share one replacement (``tpfuse::all_gather_hidden`` on ``x``) and
one set of preconditions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import Graph, Node

from . import graph_facts as facts
from .patterns import Candidate, FusionPattern, GatherSite, Precondition, Reject

aten = torch.ops.aten


# --------------------------------------------------------------------------- matchers


def _rows(site: GatherSite) -> tuple[Node, list[Node]]:
    """The gathered ``[W*T, ..., w]`` rows, looking through copies into fresh buffers
    (in-place c10d code in AOT graphs) and clones."""
    return facts.through_clones(site.wait)


@dataclass(frozen=True)
class RankBands:
    """The gathered rows cut into the W rank bands: ``bands[r]`` is rank r's ``[T, ..., w]``
    slab; ``region`` holds the nodes that cut them (they die with a rewrite)."""

    bands: tuple[Node, ...]
    region: tuple[Node, ...]


def rank_bands(site: GatherSite) -> RankBands | None:
    """For user patterns: the rank bands of a gather site in rank order, however they
    were cut (split + getitem, slice, narrow, chunk), or ``None`` when the gathered
    rows are used in any other way."""
    rows, copies = _rows(site)
    bands, cutters = [], []
    for user in rows.users:
        found = facts.bands_of_user(rows, user)
        if found is None:
            return None
        bands += found
        cutters.append(user)
    rows_per_rank = facts.product([site.rows])
    ordered = []
    for k in range(site.world_size):
        band = next((b for b in bands if b.dim == 0 and facts.same_size(b.start, k * rows_per_rank)
                     and facts.same_size(b.length, site.rows)), None)
        if band is None:
            return None
        ordered.append(band.node)
    if len(bands) != site.world_size:
        return None
    extra = [b.node for b in bands if b.node not in cutters]
    return RankBands(tuple(ordered), (*copies, *cutters, *extra))


def _raw_use_reject(raw: list[Node]) -> Reject:
    used_by = ", ".join(facts.describe(u) for u in raw)
    return Reject(f"wait_tensor result is also used raw (as [W*T, ...] rows) by {used_by}", tuple(raw))


def _epilogue_signature(node: Node) -> tuple:
    return (node.target, repr(node.args[1:]), repr(sorted(node.kwargs.items())))


def _follow_band(band: Node) -> tuple[Node, list[Node], list[Node]]:
    """From a band to what the cat reads: through clones and unary elementwise ops.

    Inductor pushes elementwise ops through a cat (``relu(cat(a, b))`` becomes
    ``cat(relu(a), relu(b))``), so a gather followed by an activation arrives
    with the activation on every band.  Returns (end, skipped nodes, epilogue)."""
    node, skipped, epilogue = band, [], []
    while len(node.users) == 1:
        user = next(iter(node.users))
        if facts.is_clone_like(user) and facts.clone_source(user) is node:
            skipped.append(user)
        elif facts.unary_pointwise(user):
            skipped.append(user)
            epilogue.append(user)
        else:
            break
        node = user
    return node, skipped, epilogue


def _match_band_cat(site: GatherSite, band_ops: frozenset) -> Candidate | Reject | None:
    """``cat`` of the W rank bands of the gathered rows, in rank order, on the last dim."""
    rows, copies = _rows(site)
    if not any(u.op == "call_function" and u.target in band_ops for u in rows.users):
        return None
    bands, banders = [], []
    for user in rows.users:
        found = facts.bands_of_user(rows, user) if user.target in band_ops else None
        if found is None:
            return _raw_use_reject([user])
        bands += found
        banders.append(user)
    off_axis = [b for b in bands if b.dim != 0]
    if off_axis:
        return Reject(
            f"bands taken along dim {off_axis[0].dim} of the gathered tensor; ranks are "
            "stacked along dim 0", tuple(b.node for b in off_axis),
        )
    followed = {b.node: _follow_band(b.node) for b in bands}
    consumers = {u for end, _, _ in followed.values() for u in end.users}
    cat = next(iter(consumers)) if len(consumers) == 1 else None
    if cat is None or not facts.is_cat(cat):
        used_by = ", ".join(sorted(facts.describe(u) for u in consumers)) or "nothing"
        return Reject(f"rank bands are consumed by {used_by}, not by a single cat")
    inputs = list(cat.args[0])
    band_of = {followed[b.node][0]: b for b in bands}
    if any(t not in band_of for t in inputs) or len(inputs) != len(band_of):
        return Reject(
            f"{cat.name} concatenates the gathered bands with other tensors, or not all of them",
            (cat,),
        )
    order = [band_of[t] for t in inputs]
    rows_per_rank = site.rows
    in_rank_order = len(order) == site.world_size and all(
        facts.same_size(b.start, k * facts.product([rows_per_rank]))
        and facts.same_size(b.length, rows_per_rank)
        for k, b in enumerate(order)
    )
    if not in_rank_order:
        return Reject(
            f"{cat.name} does not concatenate the {site.world_size} rank bands of "
            f"{rows_per_rank} rows in rank order (got starts {[str(b.start) for b in order]})",
            (cat,),
        )
    epilogues = {tuple(map(_epilogue_signature, followed[b.node][2])) for b in bands}
    if len(epilogues) != 1:
        return Reject(f"the rank bands pass through different elementwise ops before {cat.name}",
                      (cat,))
    dim, rank = facts.cat_dim(cat), facts.ndim(cat)
    if dim != rank - 1:
        what = "a gather along dim 0" if dim == 0 else f"a gather along dim {dim} of {rank}"
        return Reject(f"{cat.name} concatenates the rank bands on dim {dim}: {what}, "
                      "not along the last (hidden) axis", (cat,))
    skipped = [n for b in bands for n in followed[b.node][1]]
    region = (*copies, *banders, *(b.node for b in bands if b.node not in banders), *skipped, cat)
    epilogue = tuple(followed[order[0].node][2])
    extra = (("epilogue", epilogue),) if epilogue else ()
    return Candidate(output=cat, region=region, inputs=(site.local,), extra=extra)


def match_split_cat(site: GatherSite):
    return _match_band_cat(site, facts.SPLITS)


def match_narrow_cat(site: GatherSite):
    return _match_band_cat(site, facts.SLICES | facts.NARROWS)


def _single_user(node: Node) -> Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def match_rearrange(site: GatherSite) -> Candidate | Reject | None:
    """``[W*N.., w] -> [W, *lead, w] -> move the rank axis next to w -> [.., W*w]``."""
    rows, copies = _rows(site)
    reshapes = [u for u in rows.users if facts.is_reshape(u)]
    split = next((r for r in reshapes if any(facts.permutation(p) is not None for p in r.users)), None)
    if split is None:
        return None
    raw = [u for u in rows.users if u is not split]
    if raw:
        return _raw_use_reject(raw)
    permute = _single_user(split)
    if permute is None:
        return Reject(f"{split.name} is used by more than the rearrangement", (split,))
    world, width = site.world_size, site.hidden_width
    split_shape = facts.shape(split)
    tokens = facts.product(site.local_shape[:-1])
    if not (
        len(split_shape) >= 2
        and facts.same_size(split_shape[0], world)
        and facts.same_size(split_shape[-1], width)
        and facts.same_size(facts.product(split_shape[1:-1]), tokens)
    ):
        return Reject(
            f"{split.name} reshapes the gathered rows to {list(split_shape)}, not to "
            f"[W={world}, ..., w={width}]", (split,),
        )
    perm = facts.permutation(permute)
    k = len(split_shape) - 2
    rank_axis_to_hidden = tuple(range(1, k + 1)) + (0, k + 1)
    if perm != rank_axis_to_hidden:
        return Reject(
            f"{permute.name} permutes {list(split_shape)} by {list(perm)}; only moving the "
            f"rank axis next to the hidden axis ({list(rank_axis_to_hidden)}) is a "
            "hidden-axis concat", (permute,),
        )
    region = [*copies, split, permute]
    last, clones = facts.through_clones(permute)
    region += clones
    node = _single_user(last)
    if node is None or not facts.is_reshape(node):
        return Reject(
            f"the permuted rows ({last.name}) are not flattened back to [..., W*w] "
            "by a single reshape", (last,),
        )
    out_shape = facts.shape(node)
    if not facts.same_size(out_shape[-1], world * facts.product([width])):
        return Reject(
            f"{node.name} reshapes to {list(out_shape)}, whose last dim is not "
            f"W*w = {world}*{width}", (node,),
        )
    region.append(node)
    return Candidate(output=node, region=tuple(region), inputs=(site.local,))


def match_view(site: GatherSite) -> Candidate | Reject | None:
    """The view funcol emits when every leading dim is 1: ``[W, 1.., w] -> [1.., W*w]``."""
    rows, copies = _rows(site)
    reshapes = [u for u in rows.users if facts.is_reshape(u)]
    if len(reshapes) != 1 or any(facts.permutation(p) is not None for p in reshapes[0].users):
        return None
    view = reshapes[0]
    raw = [u for u in rows.users if u is not view]
    if raw:
        return _raw_use_reject(raw)
    out_shape = facts.shape(view)
    if facts.same_size(out_shape[-1], site.hidden_width):
        return None  # the rows stay rows of w columns (a gather along dim 0): not this form
    lead = site.local_shape[:-1]
    if not facts.same_size(facts.product(lead), 1):
        return Reject(
            f"{view.name} reshapes the gathered rows to {list(out_shape)}; with leading dims "
            f"{list(lead)} (not all 1) a plain reshape is not a hidden-axis concat", (view,),
        )
    if not facts.same_size(out_shape[-1], site.world_size * facts.product([site.hidden_width])):
        return Reject(
            f"{view.name} reshapes to {list(out_shape)}, whose last dim is not "
            f"W*w = {site.world_size}*{site.hidden_width}", (view,),
        )
    return Candidate(output=view, region=(*copies, view), inputs=(site.local,))


# --------------------------------------------------------------------------- preconditions


def group_resolves(site: GatherSite, candidate: Candidate) -> str | None:
    from tpfuse.compile_ops.groups import resolve_group  # the op's own resolution rule

    try:
        group = resolve_group(site.group_name)
    except Exception as err:  # noqa: BLE001 - the reason is reported, not swallowed
        return f"group {site.group_name!r} cannot be resolved: {err}"
    if group.world_size != site.world_size:
        return (
            f"the gather moves {site.world_size} slabs but group {site.group_name!r} "
            f"has {group.world_size} ranks"
        )
    return None


def dtype_supported(site: GatherSite, candidate: Candidate) -> str | None:
    from tpfuse.compile_ops.validation import SUPPORTED_DTYPES  # the op's contract

    if site.dtype not in SUPPORTED_DTYPES:
        return f"dtype {site.dtype} is not moved by tpfuse::all_gather_hidden"
    return None


def static_hidden_width(site: GatherSite, candidate: Candidate) -> str | None:
    if not isinstance(site.hidden_width, int):
        return f"hidden width {site.hidden_width} is symbolic; the op needs static widths"
    if site.hidden_width <= 0:
        return f"hidden width {site.hidden_width} is empty"
    return None


DEFAULT_PRECONDITIONS = (
    Precondition("group_resolves", group_resolves),
    Precondition("dtype_supported", dtype_supported),
    Precondition("static_hidden_width", static_hidden_width),
)


# --------------------------------------------------------------------------- replacement


def gather_hidden_replacement(
    graph: Graph, site: GatherSite, candidate: Candidate, skip_entry_sync: bool
) -> Node:
    """``tpfuse::all_gather_hidden(x, widths, group)``, reshaped to the output's shape if
    needed, then the elementwise epilogue that Inductor had pushed onto every band.

    The op is written with its defaults (both barriers, a copy, the op's slot):
    ``skip_entry_sync`` is always False here, because barrier elision decides
    after every rewrite and writes its proven permissions into the node; the
    argument stays in the replacement signature for replacements written
    against it (docs/patterns.md)."""
    (local,) = candidate.inputs
    widths = [int(w) for w in site.hidden_widths]
    with graph.inserting_before(candidate.output):
        node = graph.call_function(
            torch.ops.tpfuse.all_gather_hidden.default, (local, widths, site.group_name), {}
        )
        node.meta["val"] = _value(candidate, site.dtype, node, site)
        for template in candidate.fact("epilogue", ()):
            node = graph.call_function(template.target, (node, *template.args[1:]), template.kwargs)
            node.meta["val"] = _value(candidate, facts.val(template).dtype, node, site)
        want = facts.shape(candidate.output)
        if facts.same_shape(facts.shape(node), want):
            return node
        # Same elements in the same row-major order, other leading dims: reuse the
        # output node's own size arguments so symbolic sizes stay graph values.
        size_arg = candidate.output.args[1] if facts.is_reshape(candidate.output) else list(want)
        reshaped = graph.call_function(aten.reshape.default, (node, size_arg))
        reshaped.meta["val"] = facts.val(candidate.output)
        return reshaped


gather_hidden_replacement.emits_graph = True  # a graph emitter, not a traceable function


def _value(candidate: Candidate, dtype: torch.dtype, node: Node, site: GatherSite):
    """The new node's fake value.  Running the fake kernel costs ~1 ms a node, so the
    replaced output's value is reused when it describes the new node exactly: same
    shape, dtype and (contiguous) layout."""
    out = facts.val(candidate.output)
    want = (*site.local_shape[:-1], site.world_size * facts.product([site.hidden_width]))
    if (isinstance(out, torch.Tensor) and out.dtype == dtype
            and facts.same_shape(tuple(out.shape), want) and facts.is_contiguous(out)):
        return out
    return _fake_run(node.target, facts.val(node.args[0]), *node.args[1:], **node.kwargs)


def _fake_run(target, x, *args, **kwargs):
    """The output's fake value, computed under the graph's own fake mode."""
    from torch._guards import detect_fake_mode

    mode = detect_fake_mode([x])
    if mode is None:
        return target(x, *args, **kwargs)
    with mode:
        return target(x, *args, **kwargs)


# --------------------------------------------------------------------------- the objects


def _builtin(name, match, priority, description):
    return FusionPattern(
        name=name,
        match=match,
        replacement=gather_hidden_replacement,
        preconditions=DEFAULT_PRECONDITIONS,
        priority=priority,
        description=description,
        builtin=True,
    )


SPLIT_CAT = _builtin("split_cat", match_split_cat, 10,
                     "split(T) -> getitem x W -> cat on the last dim (funcol, DTensor, chunk+cat)")
NARROW_CAT = _builtin("narrow_cat", match_narrow_cat, 10,
                      "slice/narrow x W -> cat on the last dim (all_gather(list)+cat, unbacked funcol)")
REARRANGE = _builtin("rearrange", match_rearrange, 10,
                     "reshape [W,..,w] -> permute/transpose/movedim -> clone -> reshape [..,W*w]")
VIEW = _builtin("view", match_view, 10,
                "reshape [..,W*w] of the gathered rows when every leading dim is 1")

BUILTIN_PATTERNS = (SPLIT_CAT, NARROW_CAT, REARRANGE, VIEW)
