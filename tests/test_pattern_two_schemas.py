"""docs/patterns.md, "One pattern, two ops with different schemas": the documented code, run as it
stands on 2 gloo ranks, and the page's rule that ``site.wait`` is None with explicit ``anchor_args``."""

from __future__ import annotations

import importlib.util
import pathlib
import re

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

import tpfuse
from tpfuse.passes import AnchorArgs, Example, FusionPattern, graph_facts

from multiproc import run_ranks
from pass_helpers import capture, fake_world

ROOT = pathlib.Path(__file__).resolve().parents[1]
SECTION = "## One pattern, two ops with different schemas"


def documented_code() -> str:
    """The section's python blocks, in order, as the page has them."""
    text = (ROOT / "docs" / "patterns.md").read_text(encoding="utf-8")
    start = text.index(SECTION + "\n")
    end = text.find("\n## ", start + len(SECTION))
    blocks = re.findall(r"```python\n(.*?)```", text[start:end], re.S)
    assert len(blocks) == 3, f"expected the ops, the pattern and the model in {SECTION!r}, found {len(blocks)} blocks"
    return "\n\n".join(blocks)


def _documented_rank(rank: int, world_size: int, path: str) -> dict:
    spec = importlib.util.spec_from_file_location("two_schema_example", path)
    doc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(doc)  # runs the page's code: compiles with the pattern, asserts bit-equality
    with_pattern = doc.report
    # the negative control: the same model without the pattern leaves both opaque calls alone
    torch._dynamo.reset()
    with torch.no_grad(), tpfuse.enabled():
        torch.compile(doc.model, fullgraph=True)(doc.h)
        without = tpfuse.report()
    return {
        "matches": sorted((m.pattern, m.gather, m.wait) for m in with_pattern.matches),
        "near_misses": [n.reason for n in with_pattern.near_misses],
        "without": sorted(n.pattern for n in without.near_misses),
        "without_matches": len(without.matches),
    }


def test_the_documented_pattern_rewrites_both_ops(tmp_path):
    path = tmp_path / "two_schema_example.py"
    path.write_text(documented_code(), encoding="utf-8")
    for result in run_ranks(2, _documented_rank, str(path)):
        assert result["matches"] == [("twofw_gathers", "all_gather", None), ("twofw_gathers", "gather_last", None)]
        assert result["near_misses"] == []
        assert result["without_matches"] == 0 and result["without"] == ["no_anchor", "no_anchor"], result


# --------------------------------------------------------------------------- site.wait with anchor_args


def _gather_hidden(x, *, hidden_widths, group_name):
    return torch.ops.tpfuse.all_gather_hidden(x, list(hidden_widths), group_name)


def _reference(rows, *, hidden_widths, group_name):
    return torch.cat(rows.chunk(len(hidden_widths), dim=0), dim=-1)


def _sites_seen(anchor_args) -> list:
    """The ``site.wait`` a matcher anchored on the functional gather is handed (it declines every site)."""
    seen = []

    def spy(site):
        seen.append(site.wait)
        return None

    pattern = FusionPattern(name="spy", anchors=tuple(graph_facts.ALL_GATHERS), anchor_args=anchor_args,
                            match=spy, replacement=_gather_hidden, search=_reference,
                            example=Example(local_shape=(4, 8), world_size=2))

    def step(x):
        return funcol.all_gather_tensor(x, gather_dim=0, group=dist.group.WORLD)

    with fake_world(2), tpfuse.pattern_scope(pattern):
        capture(step, torch.randn(4, 8))
    return seen


def test_site_wait_is_none_with_explicit_anchor_args():
    # the functional gather itself, read through anchor_args: an opaque call, no wait
    assert _sites_seen(AnchorArgs(local=0, world_size=1, group=2)) == [None]
    # the control: without anchor_args the same site comes with its wait_tensor
    (wait,) = _sites_seen(None)
    assert wait is not None and "wait_tensor" in str(wait.target)
