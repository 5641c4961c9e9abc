"""``tpfuse.enable()`` installs the training loss's rewrite before AOTAutograd (docs/passes.md, "Training").

``enable()`` / ``disable()`` / ``enabled()`` / ``backend()`` install ``TpfusePreGradPass`` in
Inductor's ``pre_grad_custom_pass`` the way they install ``TpfusePass`` in the post-grad hook:
process-wide (every thread), a user's pass chained after ours and restored, in the uuid that
keys Inductor's caches.  A compiled training step (``F.cross_entropy`` of logits gathered by
``tpfuse.all_gather_hidden``) then gathers nothing of full width, in the forward or the
backward; ``eliminate_gathers=False`` and ``disable()`` keep the gather (the controls).

Graphs on a fake process group (fast); the numbers on 2 gloo ranks against eager torch on the
gathered logits, within the published bound of the sum family.
"""

from __future__ import annotations

import threading

import pytest
import torch
import torch._functorch.config as functorch_config
import torch._inductor.config as inductor_config
import torch.distributed as dist
import torch.nn.functional as F

import tpfuse
from tpfuse.passes import manager
from tpfuse.passes.manager import PassConfig, TpfusePass, TpfusePreGradPass

from multiproc import run_ranks
from pass_helpers import fake_world

try:
    from torch._inductor.custom_graph_pass import CustomGraphPass
except ImportError:  # pragma: no cover
    CustomGraphPass = object

#: docs/passes.md, "Gather elimination: the sum family's error" (relative to the largest |reference|)
BOUND = 1e-5
CONSUMER = ("cross_entropy, before autograd",)


def training_loss(h, w, t):
    """A training step's loss as HF writes it, on logits gathered by tpfuse's differentiable gather."""
    logits = tpfuse.all_gather_hidden(h @ w.t(), dist.group.WORLD).float()
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), t.view(-1), label_smoothing=0.1)


def _inputs(world_size: int = 2, rank: int = 0):
    g = torch.Generator().manual_seed(5)  # the same hidden states and targets on every rank
    h = torch.randn(2, 3, 16, generator=g)
    t = torch.randint(0, 8 * world_size, (2, 3), generator=g)
    t[0, 1] = -100
    w = torch.randn(8, 16, generator=torch.Generator().manual_seed(30 + rank))
    return h.requires_grad_(), w.requires_grad_(), t


class Recorder(CustomGraphPass):
    """A user's post-grad pass: runs after tpfuse's (chained) and keeps every graph's text."""

    def __init__(self):
        self.texts = []

    def __call__(self, graph):
        from pass_helpers import graph_text

        self.texts.append(graph_text(graph))

    def uuid(self):
        return None  # no caching: every compile runs the passes


class UserPreGradPass(CustomGraphPass):
    def __init__(self, name="user-pre-grad-v1"):
        self.calls, self.name = 0, name

    def __call__(self, graph):
        self.calls += 1

    def uuid(self):
        return self.name


def _compile_step(fn=training_loss, backend="inductor"):
    """Compile and run forward and backward, caches off in the compiling thread (a cache hit skips the passes)."""
    torch._dynamo.reset()
    with inductor_config.patch(fx_graph_cache=False), functorch_config.patch(enable_autograd_cache=False):
        h, w, t = _inputs()
        torch.compile(fn, fullgraph=True, backend=backend)(h, w, t).backward()


def _gathers_of_full_width(text: str) -> list[str]:
    return [line for line in text.splitlines() if "all_gather_hidden" in line or "reduce_scatter" in line]


@pytest.fixture
def recorder():
    """Nothing of tpfuse installed, a ``Recorder`` installed process-wide as the user's post-grad
    pass (so a worker thread's compile reaches it too); everything restored after."""
    saved = manager._installed()
    tpfuse.disable()
    rec = Recorder()
    manager._change_installed("post_grad_custom_post_pass", lambda _: rec)
    manager.reset_report()
    try:
        with fake_world(2):
            yield rec
    finally:
        manager._restore_installed(saved)
        manager.reset_report()


# --------------------------------------------------------------------------- install and uninstall


def test_enable_installs_the_pre_grad_pass_chained_and_disable_restores(recorder):
    user = UserPreGradPass()
    inductor_config.pre_grad_custom_pass = user
    tpfuse.enable()
    installed = inductor_config.pre_grad_custom_pass
    assert isinstance(installed, TpfusePreGradPass) and installed.previous is user
    tpfuse.enable(dry_run=True)  # re-enabling replaces ours, never stacks it
    assert inductor_config.pre_grad_custom_pass.previous is user
    assert inductor_config.pre_grad_custom_pass.config.dry_run
    _compile_step()
    assert user.calls == 1  # the user's pass still ran, after ours
    tpfuse.disable()
    assert inductor_config.pre_grad_custom_pass is user
    tpfuse.disable()  # idempotent
    assert inductor_config.pre_grad_custom_pass is user


def test_enabled_block_restores_the_pre_grad_hook_exactly(recorder):
    user = UserPreGradPass()
    inductor_config.pre_grad_custom_pass = user
    with tpfuse.enabled(eliminate_gathers=False):
        installed = inductor_config.pre_grad_custom_pass
        assert isinstance(installed, TpfusePreGradPass) and not installed.config.eliminate_gathers
    assert inductor_config.pre_grad_custom_pass is user


def test_uuid_covers_config_sources_and_chained_pass():
    base = TpfusePreGradPass(PassConfig()).uuid()
    assert base == TpfusePreGradPass(PassConfig()).uuid()  # deterministic
    assert base == TpfusePreGradPass(PassConfig(dump_dir="/tmp/x")).uuid()  # dumps don't change graphs
    assert base != TpfusePreGradPass(PassConfig(eliminate_gathers=False)).uuid()
    assert base != TpfusePreGradPass(PassConfig(dry_run=True)).uuid()
    # Inductor sees only ours: a changed user pass behind it must change the key
    assert TpfusePreGradPass(PassConfig(), UserPreGradPass("a")).uuid() != \
        TpfusePreGradPass(PassConfig(), UserPreGradPass("b")).uuid()
    assert TpfusePreGradPass(PassConfig(), previous=lambda g: None).uuid() is None
    assert base != TpfusePass(PassConfig()).uuid()  # the two hooks are keyed apart


# --------------------------------------------------------------------------- what a compile does


def _forward_backward(rec: Recorder) -> tuple[str, str]:
    forward, backward = rec.texts
    return forward, backward


def test_enable_rewrites_the_training_loss(recorder):
    tpfuse.enable()
    _compile_step()
    forward, backward = _forward_backward(recorder)
    assert "tpfuse.softmax_stats_hidden(" in forward and _gathers_of_full_width(forward) == []
    assert "tpfuse.softmax_stats_hidden_backward(" in backward and _gathers_of_full_width(backward) == []
    (elimination,) = tpfuse.report().eliminations
    assert elimination.consumers == CONSUMER and elimination.matchers == ("cross_entropy_before_autograd",)
    assert elimination.replacement is not None
    # [6, 16] float32 logits no longer gathered; 4 float32 per row and rank travel instead
    assert (elimination.gathered_bytes, elimination.partial_bytes, elimination.partials) == \
        ("384", "192", "[6, 4] float32")


def test_report_lists_the_rewrite_with_the_forward_graph(recorder):
    tpfuse.enable()
    _compile_step()
    graphs = tpfuse.report().graphs
    assert [len(g.eliminations) for g in graphs] == [1, 0]  # the forward's, then the backward's
    assert "cross_entropy, before autograd" in str(tpfuse.passes.Report(graphs[:1]))


def test_control_eliminate_gathers_false_keeps_the_gather(recorder):
    tpfuse.enable(eliminate_gathers=False)
    _compile_step()
    forward, backward = _forward_backward(recorder)
    assert "all_gather_hidden" in forward and "reduce_scatter" in backward
    assert tpfuse.report().eliminations == []


def test_dry_run_reports_and_rewrites_nothing(recorder):
    tpfuse.enable(dry_run=True)
    _compile_step()
    forward, _ = _forward_backward(recorder)
    assert "all_gather_hidden" in forward and "softmax_stats_hidden" not in forward
    (elimination,) = tpfuse.report().eliminations
    assert elimination.consumers == CONSUMER and elimination.replacement is None


def test_disable_uninstalls(recorder):
    tpfuse.enable()
    tpfuse.disable()
    assert not isinstance(inductor_config.pre_grad_custom_pass, TpfusePreGradPass)
    _compile_step()
    forward, backward = _forward_backward(recorder)
    assert "all_gather_hidden" in forward and "reduce_scatter" in backward


def test_a_kept_loss_is_a_near_miss_with_its_reason(recorder):
    def weighted(h, w, t):
        logits = tpfuse.all_gather_hidden(h @ w.t(), dist.group.WORLD).float()
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), t.view(-1), weight=torch.ones(logits.shape[-1]))

    tpfuse.enable()
    _compile_step(weighted)
    (miss,) = [n for n in tpfuse.report().near_misses if n.pattern == "cross_entropy_before_autograd"]
    assert miss.reason == "class weights or the legacy size_average/reduce arguments"
    assert miss.doc == "docs/passes.md#training"
    assert tpfuse.report(all=True).eliminations == []
    forward, backward = _forward_backward(recorder)
    assert "all_gather_hidden" in forward and "reduce_scatter" in backward


def test_logits_used_elsewhere_split_the_loss_and_keep_the_gather(recorder):
    """The loss goes onto the slabs; the gather stays for the other use, and says so."""
    def logits_also_used(h, w, t):
        logits = tpfuse.all_gather_hidden(h @ w.t(), dist.group.WORLD).float()
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), t.view(-1)) + 1e-3 * logits.sum()

    tpfuse.enable()
    _compile_step(logits_also_used)
    (miss,) = [n for n in tpfuse.report().near_misses if n.pattern == "cross_entropy_before_autograd"]
    assert miss.reason.startswith("loss split (computed on each rank's slab); the gather stays before autograd")
    assert miss.reason.endswith("for its other use, sum_1 (sum)"), miss.reason
    assert tpfuse.report(all=True).eliminations == []
    forward, _ = _forward_backward(recorder)
    assert "all_gather_hidden" in forward and "tpfuse.softmax_stats_hidden(" in forward


def _in_worker(fn):
    outcome = {}

    def target():
        try:
            outcome["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - re-raised in the calling thread
            outcome["error"] = err

    worker = threading.Thread(target=target, name="tpfuse-test-worker")
    worker.start()
    worker.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def test_a_worker_thread_compile_gets_the_rewrite(recorder):
    tpfuse.enable()
    _in_worker(_compile_step)
    forward, backward = _forward_backward(recorder)
    assert "tpfuse.softmax_stats_hidden(" in forward and _gathers_of_full_width(forward + backward) == []
    assert [e.consumers for e in tpfuse.report().eliminations] == [CONSUMER]


def test_control_a_worker_thread_compile_after_disable_keeps_the_gather(recorder):
    tpfuse.enable()
    tpfuse.disable()
    _in_worker(_compile_step)
    forward, backward = _forward_backward(recorder)
    assert "all_gather_hidden" in forward and "reduce_scatter" in backward


@pytest.mark.parametrize("inner", ["inductor", "aot_eager"])
def test_backend_rewrites_the_training_loss(recorder, inner):
    """``backend()`` touches no installed pass: the user's pre-grad pass stays installed and runs after ours."""
    user = UserPreGradPass()
    inductor_config.pre_grad_custom_pass = user
    _compile_step(backend=tpfuse.backend(inner))
    assert inductor_config.pre_grad_custom_pass is user
    assert user.calls == (1 if inner == "inductor" else 0)  # aot_eager runs no Inductor hook
    assert [e.consumers for e in tpfuse.report().eliminations] == [CONSUMER]


def test_backend_control_eliminate_gathers_false(recorder):
    _compile_step(backend=tpfuse.backend(eliminate_gathers=False))
    forward, backward = _forward_backward(recorder)
    assert "all_gather_hidden" in forward and "reduce_scatter" in backward


# --------------------------------------------------------------------------- Inductor's caches


def test_a_cached_compile_still_reports_the_rewrite(tmp_path, monkeypatch):
    """Served from the caches, no pass runs: the forward graph's stored records carry the rewrite."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    saved = manager._installed()
    seen = []
    try:
        with fake_world(2), inductor_config.patch(fx_graph_cache=True), \
                functorch_config.patch(enable_autograd_cache=True):
            tpfuse.enable()
            for _ in range(2):
                torch._dynamo.reset()
                h, w, t = _inputs()
                torch.compile(training_loss, fullgraph=True)(h, w, t).backward()
                seen.append([(g.from_cache, [e.consumers for e in g.eliminations]) for g in tpfuse.report().graphs])
    finally:
        manager._restore_installed(saved)
        manager.reset_report()
    assert seen[0] == [(False, [CONSUMER]), (False, [])], seen
    assert sorted(seen[1]) == [(True, []), (True, [CONSUMER])], seen


SCALE = 2.0


def loss_then_a_graph_break(h, w, t):
    loss = training_loss(h, w, t)
    torch._dynamo.graph_break()
    return loss * SCALE  # a second graph in the same frame's compile, keyed by SCALE


_TIMINGS = ["early", "late"] if hasattr(inductor_config, "pre_grad_pass_timing") else [None]


@pytest.mark.parametrize("timing", _TIMINGS)
def test_a_graph_served_from_the_cache_is_reported_once_at_either_pre_grad_timing(tmp_path, monkeypatch, timing):
    """Run 2: the loss's graph is served from the cache, the graph after the break is not (SCALE
    changed).  With "early" timing (the pre-grad pass runs before the cache lookup, as older
    torch always does) the pass runs on the served graph too: its records must not be listed
    beside the stored ones, nor with the next graph."""
    global SCALE
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    saved = manager._installed()
    seen = []
    timing_patch = {} if timing is None else {"pre_grad_pass_timing": timing}
    try:
        with fake_world(2), inductor_config.patch(fx_graph_cache=True, **timing_patch), \
                functorch_config.patch(enable_autograd_cache=True):
            tpfuse.enable()
            for SCALE in (2.0, 3.0):
                torch._dynamo.reset()
                h, w, t = _inputs()
                torch.compile(loss_then_a_graph_break)(h, w, t).backward()
                seen.append([(g.from_cache, len(g.eliminations)) for g in tpfuse.report().graphs])
    finally:
        SCALE = 2.0
        manager._restore_installed(saved)
        manager.reset_report()
    assert sorted(seen[0]) == [(False, 0), (False, 0), (False, 0), (False, 1)], seen
    assert sorted(seen[1]) == [(False, 0), (False, 0), (True, 0), (True, 1)], seen


# --------------------------------------------------------------------------- numbers on 2 gloo ranks


def _training(rank, world_size):
    """Per config: the compiled step under ``enable()`` against eager torch on the gathered logits."""
    results = {}
    for name, config in (("rewrite", {}), ("control", {"eliminate_gathers": False})):
        outs = {}
        for compiled in (False, True):
            torch._dynamo.reset()
            h, w, t = _inputs(world_size, rank)
            rec = Recorder()
            inductor_config.post_grad_custom_post_pass = rec
            with inductor_config.patch(fx_graph_cache=False), functorch_config.patch(enable_autograd_cache=False):
                if compiled:
                    with tpfuse.enabled(**config):
                        loss = torch.compile(training_loss, fullgraph=True)(h, w, t)
                        loss.backward()
                        eliminated = [e.consumers for e in tpfuse.report(all=True).eliminations]
                else:
                    loss = training_loss(h, w, t)  # eager: the gather, torch's loss, the reduce-scatter
                    loss.backward()
            outs[compiled] = (loss.detach(), h.grad, w.grad)
        errors = [_rel_error(a, b) for a, b in zip(outs[True], outs[False])]
        results[name] = {"errors": errors, "graphs": rec.texts, "eliminated": eliminated}
    return results


def _rel_error(ours, ref):
    diff = (ours.double() - ref.double()).abs().max().item()
    return diff / max(ref.double().abs().max().item(), 1e-30)


@pytest.fixture(scope="module")
def gloo_w2():
    return run_ranks(2, _training, timeout=600)


def test_enabled_training_step_matches_eager_within_the_bound(gloo_w2):
    for rank in gloo_w2:
        assert rank["rewrite"]["eliminated"] == [CONSUMER]
        assert max(rank["rewrite"]["errors"]) <= BOUND, rank["rewrite"]["errors"]


def test_enabled_training_graphs_gather_nothing_of_full_width(gloo_w2):
    for rank in gloo_w2:
        forward, backward = rank["rewrite"]["graphs"]
        assert "tpfuse.softmax_stats_hidden(" in forward and "tpfuse.softmax_stats_hidden_backward(" in backward
        assert _gathers_of_full_width(forward) == [] and _gathers_of_full_width(backward) == []


def test_control_keeps_the_gather_and_matches_eager(gloo_w2):
    for rank in gloo_w2:
        forward, backward = rank["control"]["graphs"]
        assert "all_gather_hidden" in forward and "reduce_scatter" in backward
        assert rank["control"]["eliminated"] == []
        assert max(rank["control"]["errors"]) <= BOUND, rank["control"]["errors"]
