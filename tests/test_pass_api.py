"""The public API of the passes: enable/disable/enabled chaining, uuid, report, dumps, cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch._inductor.config as inductor_config
from expecttest import TestCase

import tpfuse
from tpfuse.passes import TpfusePass
from tpfuse.passes.manager import PassConfig, _installed, _restore_installed

from pass_helpers import capture, fake_world

try:
    from torch._inductor.custom_graph_pass import CustomGraphPass
except ImportError:  # pragma: no cover
    CustomGraphPass = object

class ExpectTest(TestCase):
    """assertExpectedInline outside a TestCase class."""

    def runTest(self):  # noqa: N802 - unittest's name
        pass


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class UserPass(CustomGraphPass):
    def __init__(self):
        self.calls = 0

    def __call__(self, graph):
        self.calls += 1

    def uuid(self):
        return "user-pass-v1"


@pytest.fixture
def clean_hook():
    # no FX graph / AOT cache here: a cache hit skips the passes, and these tests count calls
    import torch._functorch.config as functorch_config

    # enable() installs process-wide (every thread), so save and restore that too
    saved = _installed()
    inductor_config.post_grad_custom_post_pass = None
    with inductor_config.patch(fx_graph_cache=False), \
            functorch_config.patch(enable_autograd_cache=False):
        yield
    _restore_installed(saved)


def test_enable_chains_user_pass_and_disable_restores_it(clean_hook):
    user = UserPass()
    inductor_config.post_grad_custom_post_pass = user
    tpfuse.enable()
    installed = inductor_config.post_grad_custom_post_pass
    assert isinstance(installed, TpfusePass) and installed.previous is user
    tpfuse.enable(dry_run=True)  # re-enabling replaces ours, never stacks it
    assert inductor_config.post_grad_custom_post_pass.previous is user
    assert inductor_config.post_grad_custom_post_pass.config.dry_run
    with fake_world(2):
        torch._dynamo.reset()
        torch.compile(_funcol_gather, fullgraph=True)(torch.randn(4, 16), torch.randn(8, 16))
    assert user.calls == 1  # the user's pass still ran
    assert len(tpfuse.report().matches) == 1
    tpfuse.disable()
    assert inductor_config.post_grad_custom_post_pass is user
    tpfuse.disable()  # idempotent
    assert inductor_config.post_grad_custom_post_pass is user


def test_enabled_context_restores_exactly(clean_hook):
    user = UserPass()
    inductor_config.post_grad_custom_post_pass = user
    with tpfuse.enabled(only_after_linear=True):
        assert isinstance(inductor_config.post_grad_custom_post_pass, TpfusePass)
        assert inductor_config.post_grad_custom_post_pass.config.only_after_linear
    assert inductor_config.post_grad_custom_post_pass is user


def test_unknown_option_and_pattern_fail_at_enable(clean_hook):
    with pytest.raises(TypeError, match="unknown option"):
        tpfuse.enable(fast=True)
    with pytest.raises(ValueError, match="unknown pattern"):
        tpfuse.enable(patterns=["no_such_pattern"])
    with pytest.raises(ValueError, match="accepted are 'inductor' and 'aot_eager'"):
        tpfuse.backend("eager")


def test_uuid_covers_config_patterns_and_chained_pass():
    base = TpfusePass(PassConfig()).uuid()
    assert base == TpfusePass(PassConfig()).uuid()  # deterministic
    assert base == TpfusePass(PassConfig(dump_dir="/tmp/x")).uuid()  # dumps don't change graphs
    assert base != TpfusePass(PassConfig(dry_run=True)).uuid()
    assert base != TpfusePass(PassConfig(patterns=("split_cat",))).uuid()
    assert base != TpfusePass(PassConfig(), previous=UserPass()).uuid()
    # a plain callable has no identity: the chain opts out of caching rather than lie
    assert TpfusePass(PassConfig(), previous=lambda g: None).uuid() is None
    from tpfuse.passes import REGISTRY, BUILTIN_PATTERNS
    from dataclasses import replace

    with REGISTRY.scoped(replace(BUILTIN_PATTERNS[0], name="split_cat_copy")):
        assert TpfusePass(PassConfig()).uuid() != base
    assert TpfusePass(PassConfig()).uuid() == base


def test_backend_takes_torch_compile_mode_and_options():
    """``torch.compile(f, backend=tpfuse.backend(), mode=...)`` passes ``mode`` to the backend:
    it becomes Inductor's config for that mode, as with the plain Inductor backend."""
    from tpfuse.passes.manager import _mode_options

    assert _mode_options("reduce-overhead") == {"triton.cudagraphs": True}
    assert _mode_options(None) == {}
    import torch._inductor.config as inductor_config

    from tpfuse.passes.manager import reset_report

    x = torch.randn(3, 5)
    with inductor_config.patch(fx_graph_cache=False):  # leave no cached-graph records for later reports
        for mode in ("reduce-overhead", "max-autotune-no-cudagraphs", None):
            torch._dynamo.reset()
            compiled = torch.compile(lambda t: (t * 2).relu(), backend=tpfuse.backend(), mode=mode)
            assert torch.equal(compiled(x), (x * 2).relu())
    reset_report()


def _funcol_gather(x, w):
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol

    return funcol.all_gather_tensor(x @ w.t(), gather_dim=-1, group=dist.group.WORLD)


def test_report_table_and_dump_files(tmp_path, monkeypatch):
    monkeypatch.setenv("TPFUSE_DUMP_DIR", str(tmp_path))
    with fake_world(2):
        _, graph_report = capture(_funcol_gather, torch.randn(4, 16), torch.randn(8, 16))
    text = str(tpfuse.passes.Report([graph_report]))
    # CPU tensors run gloo's all_gather: no slot, barrier or zero-copy column, no why: lines
    table = text.splitlines()[1:4]
    ExpectTest().assertExpectedInline("\n".join(table), """\
  node                      | pattern   | output         | group   | widths | dtype   | producer              | backend
  --------------------------+-----------+----------------+---------+--------+---------+-----------------------+--------
  all_gather_hidden_default | split_cat | cat (replaced) | '0' W=2 | 2x8    | float32 | mm(arg1_1 @ arg0_1.T) | gloo""")
    assert "why:" not in text and "slot" not in text and "zero-copy" not in text
    (dump,) = tmp_path.iterdir()
    assert dump.name.startswith("rank0_graph") and dump == tmp_path / os.path.basename(graph_report.dump_path)
    code = dump.read_text()
    before, after = code.split("# ===== after tpfuse =====")
    assert "all_gather_into_tensor" in before and "split" in before
    assert "tpfuse.all_gather_hidden.default" in after and "all_gather_into_tensor" not in after
    match = graph_report.matches[0]
    # one gather, nothing before it on the group: no proof the entry barrier can go
    assert match.skip_entry_sync is False and match.reason.startswith("entry barrier kept: ")
    assert any("all_gather_hidden" in line for line in match.after)


def test_report_rows_and_why_lines_share_the_node_key_on_cuda():
    """On CUDA tensors the push path runs: the decisions and their reasons are shown,
    the why: lines keyed by the same node name as the table's first column."""
    with fake_world(2):
        _, graph_report = capture(_funcol_gather, torch.randn(4, 16), torch.randn(8, 16))
    graph_report.devices = {name: "cuda" for name in graph_report.devices}  # as a CUDA graph records it
    lines = str(tpfuse.passes.Report([graph_report])).splitlines()
    ExpectTest().assertExpectedInline("\n".join(lines[1:]), """\
  node                      | pattern   | output         | group   | widths | dtype   | producer              | backend  | slot | entry barrier | result
  --------------------------+-----------+----------------+---------+--------+---------+-----------------------+----------+------+---------------+-------
  all_gather_hidden_default | split_cat | cat (replaced) | '0' W=2 | 2x8    | float32 | mm(arg1_1 @ arg0_1.T) | per call | -1   | kept          | copied
  why:
    all_gather_hidden_default: entry barrier kept: no fence on group '0' precedes it in the graph, so a peer may still be reading the slot for a call before this graph
                               result copied: the result (or a view of it) is a graph output""")
    row_key = lines[3].split("|")[0].strip()
    assert lines[5].strip().startswith(row_key + ":")


def test_report_says_when_nothing_ran():
    assert "no graph passed through the tpfuse passes" in str(tpfuse.passes.Report([]))


# ---- FX graph cache, in fresh processes ---------------------------------------------

_CACHE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch, torch.distributed as dist
    import torch.distributed._functional_collectives as funcol
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from torch._dynamo.utils import counters
    import tpfuse

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    tpfuse.enable(**json.loads(sys.argv[1]))

    def f(x, w):
        return funcol.all_gather_tensor(x @ w.t(), gather_dim=-1, group=dist.group.WORLD)

    # count calls of the op's CPU implementation (a dispatch mode cannot wrap a compile)
    from tpfuse.compile_ops import collective
    calls = []
    real_gather = collective.gather_hidden
    collective.gather_hidden = lambda *a, **k: calls.append(1) or real_gather(*a, **k)

    compiled = torch.compile(f, fullgraph=True)
    compiled(torch.randn(4, 16), torch.randn(8, 16))
    print(json.dumps({
        "hit": counters["inductor"]["fxgraph_cache_hit"],
        "miss": counters["inductor"]["fxgraph_cache_miss"],
        "bypass": counters["inductor"]["fxgraph_cache_bypass"],
        "op_calls": len(calls),
        "graphs": [(g.from_cache, [m.pattern for m in g.matches], g.dump_path is not None)
                   for g in tpfuse.report(all=True).graphs],
    }))
    """
)


def _compile_in_fresh_process(cache_dir, config, trace_dir=None, dump_dir=None):
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache_dir), PYTHONPATH=REPO)
    env.pop("TPFUSE_DUMP_DIR", None)
    env.pop("TORCH_TRACE", None)
    if trace_dir is not None:
        env["TORCH_TRACE"] = str(trace_dir)
    if dump_dir is not None:
        env["TPFUSE_DUMP_DIR"] = str(dump_dir)
    out = subprocess.run(
        [sys.executable, "-c", _CACHE_SCRIPT, json.dumps(config)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_fx_graph_cache_hit_in_fresh_process_keeps_rewrite_and_report(tmp_path):
    trace_dir = tmp_path / "trace"
    first = _compile_in_fresh_process(tmp_path / "cache", {}, trace_dir=trace_dir)
    assert (first["miss"], first["hit"], first["bypass"]) == (1, 0, 0), first
    assert first["op_calls"] == 1 and first["graphs"] == [[False, ["split_cat"], False]]
    # TORCH_TRACE (tlparse) carries the before/after graphs and the report as artifacts
    trace = "".join(p.read_text() for p in trace_dir.iterdir())
    for artifact in ("tpfuse_before", "tpfuse_after", "tpfuse_report"):
        assert f'"name": "{artifact}"' in trace, artifact

    dumps = tmp_path / "dumps"
    second = _compile_in_fresh_process(tmp_path / "cache", {}, dump_dir=dumps)
    assert (second["hit"], second["miss"], second["bypass"]) == (1, 0, 0), second
    assert second["op_calls"] == 1  # the cached graph still calls the tpfuse op
    # served from the cache, the pass did not run; its stored records are reported, marked
    assert second["graphs"] == [[True, ["split_cat"], True]], second
    (dump,) = dumps.iterdir()
    text = dump.read_text()
    assert "loaded from the FX graph cache" in text and "split_cat" in text
    # the first run traced its graphs (TORCH_TRACE), so their code was stored with the records
    assert "# ===== after tpfuse =====" in text and "tpfuse.all_gather_hidden.default" in text

    changed = _compile_in_fresh_process(tmp_path / "cache", {"dry_run": True})
    assert (changed["miss"], changed["hit"]) == (1, 0), changed  # new key, not the cached rewrite
    assert changed["op_calls"] == 0 and changed["graphs"] == [[False, ["split_cat"], False]]


def test_second_compile_in_one_process_reports_the_cached_graph(tmp_path, monkeypatch):
    """``torch._dynamo.reset()`` then the same compile: Inductor serves the graph from its
    cache, the pass does not run, and report() still lists the match, marked."""
    import torch._functorch.config as functorch_config
    from torch._dynamo.utils import counters

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    saved = _installed()
    x, w = torch.randn(4, 16), torch.randn(8, 16)
    try:
        with fake_world(2), inductor_config.patch(fx_graph_cache=True), \
                functorch_config.patch(enable_autograd_cache=True):
            tpfuse.enable()
            reports = []
            for _ in range(2):
                torch._dynamo.reset()
                hits = counters["inductor"]["fxgraph_cache_hit"]
                torch.compile(_funcol_gather, fullgraph=True)(x, w)
                rep = tpfuse.report()
                reports.append((counters["inductor"]["fxgraph_cache_hit"] - hits,
                                [(g.from_cache, [m.pattern for m in g.matches]) for g in rep.graphs]))
            # Inductor's pattern matcher replaces the counters by a copy: no hit is new
            counters["inductor"] = counters["inductor"].copy()
            assert tpfuse.report().graphs == []
    finally:
        _restore_installed(saved)
    assert reports == [(0, [(False, ["split_cat"])]), (1, [(True, ["split_cat"])])], reports
