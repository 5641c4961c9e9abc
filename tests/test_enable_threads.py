"""``tpfuse.enable()`` reaches compiles in every thread (docs/api.md, "Threads").

Later torch keeps Inductor's config per thread (a ContextVar per entry), so an
assignment in the main thread is invisible to a ``torch.compile`` in a worker thread;
torch 2.11 keeps one value per process.  These tests compile on the CPU with a fake
process group, in a worker thread, on whichever torch is installed.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch._functorch.config as functorch_config
import torch._inductor.config as inductor_config
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

import tpfuse
from tpfuse.passes import manager
from tpfuse.passes.dynamo_compat import allow_funcol_gather_tracing

from pass_helpers import fake_world


@pytest.fixture
def nothing_installed():
    """No tpfuse pass in this thread or process-wide (an earlier test may have left one); restored after."""
    saved = manager._installed()
    tpfuse.disable()
    manager.reset_report()
    try:
        with fake_world(2):
            yield
    finally:
        manager._restore_installed(saved)
        manager.reset_report()


def _in_worker(fn):
    """``fn()`` in a new thread (a fresh context, as every ``threading.Thread`` has); its result or error."""
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


def _gather_after_linear(x, w):
    return funcol.all_gather_tensor(x @ w.t(), gather_dim=-1, group=dist.group.WORLD)


def _compile_gather() -> None:
    # Caches off in the compiling thread itself (a patch in another thread would not reach
    # it): a cache hit would skip the pass, and these tests look for its run.
    torch._dynamo.reset()
    with inductor_config.patch(fx_graph_cache=False), functorch_config.patch(enable_autograd_cache=False):
        torch.compile(_gather_after_linear, fullgraph=True)(torch.randn(4, 16), torch.randn(8, 16))


def _patterns(report) -> list[list[str]]:
    return [[m.pattern for m in g.matches] for g in report.graphs]


def test_enable_in_main_thread_rewrites_a_compile_in_a_worker_thread(nothing_installed):
    tpfuse.enable()
    _compile_gather()
    _in_worker(_compile_gather)
    assert _patterns(tpfuse.report()) == [["split_cat"], ["split_cat"]]  # main's graph, then the worker's


def test_without_enable_a_worker_compile_is_not_rewritten(nothing_installed):
    """The control: the worker's graph above was rewritten because of enable(), nothing else.

    enable() also lets Dynamo trace funcol's hidden-axis gather where torch (2.11) refuses it; that
    rule alone is applied here, so the control differs from the test above only in the pass."""
    allow_funcol_gather_tracing()
    _in_worker(_compile_gather)
    assert tpfuse.report().graphs == []


def test_disable_reaches_a_thread_that_read_the_pass_while_enabled(nothing_installed):
    """One long-lived worker: a value it read while enabled must not outlive disable()."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        tpfuse.enable()
        assert pool.submit(tpfuse.passes.is_enabled).result()
        tpfuse.disable()
        assert not pool.submit(tpfuse.passes.is_enabled).result()
        assert not tpfuse.passes.is_enabled()


def test_enabled_block_is_process_wide_and_restores_exactly(nothing_installed):
    assert not _in_worker(tpfuse.passes.is_enabled)
    with tpfuse.enabled(dry_run=True):
        installed = _in_worker(lambda: inductor_config.post_grad_custom_post_pass)
        assert isinstance(installed, manager.TpfusePass) and installed.config.dry_run
        assert tpfuse.passes.is_enabled()
    assert not _in_worker(tpfuse.passes.is_enabled)
    assert not tpfuse.passes.is_enabled()
