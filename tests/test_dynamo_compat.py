"""passes/dynamo_compat.py: funcol's hidden-axis gather compiles where Dynamo would skip its helper.

torch 2.13 (CI) already inlines ``torch._utils._maybe_view_chunk_cat``; torch 2.11
(the GPU hosts) skips it and breaks the graph.  Each rank here removes the rule,
shows the graph break that torch 2.11 has, applies the shim and shows that the
same function then compiles with ``fullgraph=True`` and gathers correctly.
"""

import pytest
import torch

from multiproc import run_ranks


def _without_rule_then_with(rank, world_size):
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol
    from torch._dynamo import trace_rules

    from tpfuse.passes.dynamo_compat import _NAME, allow_funcol_gather_tracing

    def gather(t):
        return funcol.all_gather_tensor(t, gather_dim=1, group=dist.group.WORLD)

    x = torch.arange(6.0).view(3, 2) + 10 * rank
    expected = torch.cat([torch.arange(6.0).view(3, 2) + 10 * r for r in range(world_size)], dim=1)
    had_rule = trace_rules.manual_torch_name_rule_map.pop(_NAME, None) is not None
    trace_rules.get_torch_obj_rule_map.cache_clear()
    torch._dynamo.reset()
    try:
        torch.compile(gather, fullgraph=True, backend="eager")(x)
        broke = False
    except Exception as e:  # noqa: BLE001 - Dynamo's Unsupported, whatever its class
        broke = "_maybe_view_chunk_cat" in str(e)
    added = allow_funcol_gather_tracing()
    again = allow_funcol_gather_tracing()
    torch._dynamo.reset()
    got = torch.compile(gather, fullgraph=True, backend="eager")(x)
    return {"had_rule": had_rule, "broke": broke, "added": added, "again": again,
            "equal": bool(torch.equal(got, expected))}


def test_shim_turns_the_graph_break_into_a_full_graph():
    for r in run_ranks(2, _without_rule_then_with):
        assert r["broke"], "without the rule Dynamo should refuse _maybe_view_chunk_cat (torch 2.11's behaviour)"
        assert r["added"] and not r["again"], r  # added once, idempotent after
        assert r["equal"], r
