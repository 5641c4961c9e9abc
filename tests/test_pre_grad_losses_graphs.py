"""The training loss's rewrite on Dynamo's graphs of funcol and DTensor gathers (docs/passes.md, "Training").

``rewrite_cross_entropy`` on the torch-IR graph Dynamo hands Inductor's pre-grad passes, on a fake
process group of 2 ranks: every gather form goes with its loss, the gradient's meaning is carried
(``sum_grad_over_ranks`` after a gather whose backward sums over the ranks, none after DTensor's,
whose backward is a local slice), and the controls keep the gather with their reason.  The
numbers of the same forms on real gloo ranks: ``test_pre_grad_losses_gloo.py``.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn as nn
import torch.nn.functional as F
from torch.torch_version import TorchVersion

from tpfuse.passes import pre_grad_losses
from tpfuse.passes.dynamo_compat import allow_funcol_gather_tracing
from tpfuse.passes.pre_grad_losses import rewrite_cross_entropy

from pass_helpers import dynamo_graph, fake_world, torch_ir_text

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # funcol.all_gather_tensor's deprecation

#: torch 2.13 registers funcol's gather backward (a reduce-scatter); without it the rewrite keeps the
#: gather (test_control_funcol_without_autograd_keeps_the_gather runs either way)
needs_funcol_backward = pytest.mark.skipif(
    not pre_grad_losses.funcol_gather_has_autograd(),
    reason=f"torch {torch.__version__}: funcol's gather has no autograd kernel, so the rewrite keeps it")

GATHERS = ("all_gather_into_tensor", "wait_tensor", "redistribute", "full_tensor", "all_gather_hidden")


def funcol_chunk_cat(h, w, t):
    """``torch.cat(all_gather_tensor(y, 0).chunk(W), -1)``, as TP code writes it by hand."""
    gathered = funcol.all_gather_tensor(h @ w.t(), 0, dist.group.WORLD)
    logits = torch.cat(torch.chunk(gathered, 2, dim=0), dim=-1).float()
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), t.view(-1))


def funcol_last_axis(h, w, t):
    """``all_gather_tensor(y, gather_dim=last)``: chunk + cat inside torch, or a view when every
    leading dim is 1."""
    y = h @ w.t()
    logits = funcol.all_gather_tensor(y, y.dim() - 1, dist.group.WORLD).float()
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), t.view(-1))


def funcol_sliced(h, w, t):
    """The shift older transformers wrote: ``logits[..., :-1, :].contiguous()``."""
    y = h @ w.t()
    logits = funcol.all_gather_tensor(y, y.dim() - 1, dist.group.WORLD).float()
    logits = logits[..., :-1, :].contiguous()
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), t[..., 1:].contiguous().view(-1))


def funcol_hf_loss(h, w, t, num_items):
    """transformers' own ``ForCausalLMLoss``: upcast, labels padded and shifted, sum / num_items."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    y = h @ w.t()
    logits = funcol.all_gather_tensor(y, y.dim() - 1, dist.group.WORLD)
    return ForCausalLMLoss(logits, t, vocab_size=logits.shape[-1], num_items_in_batch=num_items)


def funcol_logits_returned(h, w, t):
    y = h @ w.t()
    logits = funcol.all_gather_tensor(y, y.dim() - 1, dist.group.WORLD)
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), t.view(-1)), logits


def _inputs():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 3, 16, generator=g, requires_grad=True)
    return h, torch.randn(8, 16, generator=g, requires_grad=True), torch.randint(0, 16, (2, 3), generator=g)


def _rewrite(fn, *args):
    gm = dynamo_graph(fn, *args)
    records: list = []
    lines = rewrite_cross_entropy(gm.graph, records=records)
    gm.graph.lint()
    return lines, torch_ir_text(gm), records


def _gathers(text: str) -> list[str]:
    return [line for line in text.splitlines() if any(f" = {g}(" in line or f" = {g}." in line for g in GATHERS)]


@pytest.fixture
def world():
    allow_funcol_gather_tracing()  # what enable() does: torch 2.11 traces gather_dim > 0 only with it
    with fake_world(2):
        yield


@needs_funcol_backward
@pytest.mark.parametrize("fn, lead, slab", [(funcol_chunk_cat, (2, 3), "matmul"), (funcol_last_axis, (2, 3), "y"),
                                            (funcol_last_axis, (1, 1), "y"), (funcol_sliced, (2, 3), "y")],
                         ids=["chunk+cat", "gather_dim=last", "view (leading dims 1)", "logits[..., :-1, :]"])
def test_funcol_gather_goes_with_its_loss_and_sums_the_gradient(world, fn, lead, slab):
    h, w, t = _inputs()
    h = h.detach()[: lead[0], : lead[1]].requires_grad_()
    lines, text, records = _rewrite(fn, h, w, t[: lead[0], : lead[1]])
    assert lines == [f"rewrote cross_entropy: tpfuse::cross_entropy_hidden of {slab}"]
    assert _gathers(text) == [], text
    # funcol's backward is a reduce-scatter (a sum over ranks): kept by sum_grad_over_ranks
    assert "cross_entropy_hidden.default(" in text and "sum_grad_over_ranks.default(" in text
    (record,) = records
    assert record.consumers == ("cross_entropy, before autograd",) and record.hidden_widths == (8, 8)


@needs_funcol_backward
def test_funcol_sliced_replays_the_slice_on_the_slab(world):
    _, text, _ = _rewrite(funcol_sliced, *_inputs())
    assert "getitem_4 = getitem(y, (Ellipsis, slice(None, -1, None), slice(None, None, None)))" in text
    assert "cross_entropy_hidden.default(flatten, view_1, [8, 8], '0', -100, 'mean', 0.0)" in text


@needs_funcol_backward
def test_hf_for_causal_lm_loss(world):
    pytest.importorskip("transformers")
    h, w, t = _inputs()
    lines, text, _ = _rewrite(funcol_hf_loss, h, w, t, torch.tensor(4))
    assert lines == ["rewrote loss: tpfuse::cross_entropy_hidden of y"]
    assert _gathers(text) == []
    # reduction sum, then divided by num_items_in_batch, as HF wrote it
    assert "cross_entropy_hidden.default(reshape, shift_labels_2, [8, 8], '0', -100, 'sum', 0.0)" in text
    assert "truediv(sum_grad_over_ranks_default, num_items_in_batch)" in text


def test_control_funcol_without_autograd_keeps_the_gather(world, monkeypatch):
    """A torch whose funcol gather has no backward gives the slab no gradient: not rewritten."""
    monkeypatch.setattr(pre_grad_losses, "funcol_gather_has_autograd", lambda: False)
    lines, text, records = _rewrite(funcol_chunk_cat, *_inputs())
    assert lines == ["kept cross_entropy: this torch's _c10d_functional.all_gather_into_tensor has no autograd "
                     "kernel: no gradient passes through the gather, and the rewrite would give the slab one"]
    assert "all_gather_into_tensor" in text and "cross_entropy_hidden" not in text
    assert [r.pattern for r in records] == ["cross_entropy_before_autograd"]


def test_funcol_on_this_torch_has_a_backward():
    """torch 2.13 registers funcol's gather backward; where a torch does not, the control above applies."""
    if TorchVersion(torch.__version__) < "2.13":
        pytest.skip(f"torch {torch.__version__}: whether funcol's gather has autograd is what the rewrite detects")
    assert pre_grad_losses.funcol_gather_has_autograd()


def test_control_no_gradient_is_left_to_the_post_grad_matchers(world):
    h, w, t = _inputs()
    lines, text, _ = _rewrite(funcol_chunk_cat, h.detach(), w.detach(), t)
    assert lines == ["kept cross_entropy: the gather's input needs no gradient (post-grad matchers serve it)"]
    assert "all_gather_into_tensor" in text


@needs_funcol_backward
def test_logits_returned_split_the_loss_and_keep_the_gather(world):
    lines, text, records = _rewrite(funcol_logits_returned, *_inputs())
    assert lines == ["split cross_entropy: tpfuse::cross_entropy_hidden of y; the gather stays before autograd "
                     "for its other use, the graph output"]
    assert "all_gather_into_tensor" in text and "cross_entropy_hidden.default(" in text
    assert [type(r).__name__ for r in records] == ["NearMiss"]


def test_a_loss_of_logits_no_gather_made_is_not_mentioned(world):
    def plain(h, w, t):
        return F.cross_entropy((h @ w.t()).view(-1, 8), t.view(-1))

    h, w, t = _inputs()
    lines, _, records = _rewrite(plain, h, w, t % 8)
    assert lines == [] and records == []


# --------------------------------------------------------------------------- DTensor


def _colwise_head(replicated_output: bool = True):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    torch.manual_seed(0)
    mesh = init_device_mesh("cpu", (2,))
    style = ColwiseParallel(output_layouts=Replicate() if replicated_output else Shard(-1))
    return parallelize_module(nn.Linear(16, 16, bias=False), mesh, style), mesh


def test_dtensor_colwise_gather_goes_with_its_loss_and_keeps_the_local_slice(world):
    head, _ = _colwise_head()

    def loss(h, t):
        logits = head(h).float()
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), t.view(-1))

    h, _, t = _inputs()
    lines, text, records = _rewrite(loss, h, t)
    assert lines == ["rewrote cross_entropy: tpfuse::cross_entropy_hidden of linear"]
    assert _gathers(text) == []
    assert re.search(r"^to_local(_\d+)? = to_local\(linear\)$", text, re.M)  # the slab, not a gather
    # DTensor's Shard -> Replicate backward is a local slice: the op's own gradient, nothing summed
    assert "cross_entropy_hidden.default(flatten, view_1, [8, 8], '0', -100, 'mean', 0.0)" in text
    assert "sum_grad_over_ranks" not in text
    (record,) = records
    assert record.gather == "outputs" and record.gathered_bytes == str(6 * 16 * 4)


def test_dtensor_full_tensor(world):
    from torch.distributed.tensor import DTensor, Replicate

    head, mesh = _colwise_head()

    def loss(h, t):
        sharded = F.linear(DTensor.from_local(h, mesh, [Replicate()], run_check=False), head.weight)
        logits = sharded.full_tensor().float()
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), t.view(-1))

    h, _, t = _inputs()
    lines, text, _ = _rewrite(loss, h, t)
    assert len(lines) == 1 and lines[0].startswith("rewrote cross_entropy"), lines
    assert _gathers(text) == [] and "sum_grad_over_ranks" not in text


def test_control_dtensor_partial_gradient_keeps_the_gather(world):
    """``to_local(grad_placements=[Partial()])`` makes the gather's backward a reduce-scatter: not this rewrite."""
    from torch.distributed.tensor import DTensor, Partial, Replicate

    head, mesh = _colwise_head()

    def loss(h, t):
        sharded = F.linear(DTensor.from_local(h, mesh, [Replicate()], run_check=False), head.weight)
        logits = sharded.redistribute(placements=[Replicate()]).to_local(grad_placements=[Partial()]).float()
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), t.view(-1))

    h, _, t = _inputs()
    lines, text, _ = _rewrite(loss, h, t)
    assert len(lines) == 1 and lines[0].startswith("kept cross_entropy: to_local(grad_placements="), lines
    assert lines[0].endswith("the gather's backward is not a local slice")
    assert "redistribute" in text and "cross_entropy_hidden" not in text


def _prim(method, args_as_value, kwargs_as_value):
    def prim(x):
        return getattr(x, method)(*args_as_value, **kwargs_as_value)

    prim.__name__ = f"prim_{method}"
    return prim


def _as_earlier_dynamo(gm):
    """The graph as Dynamo before torch 2.13 writes DTensor's methods: a ``call_function`` of a
    function named ``prim_<method>``, its arguments in its closure."""
    for node in list(gm.graph.nodes):
        if node.op == "call_method" and node.target in ("redistribute", "to_local"):
            with gm.graph.inserting_before(node):
                prim = gm.graph.call_function(_prim(node.target, list(node.args[1:]), dict(node.kwargs)),
                                              (node.args[0],))
            prim.meta.update(node.meta)
            node.replace_all_uses_with(prim)
            gm.graph.erase_node(node)
    gm.recompile()
    return gm


@pytest.mark.parametrize("grad_placements", [None, "partial"])
def test_dtensor_as_earlier_dynamo_writes_it(world, grad_placements):
    """torch 2.11's spelling (``prim_redistribute`` / ``prim_to_local``) reads as the method calls do."""
    from torch.distributed.tensor import DTensor, Partial, Replicate

    head, mesh = _colwise_head()
    grad = None if grad_placements is None else [Partial()]

    def loss(h, t):
        sharded = F.linear(DTensor.from_local(h, mesh, [Replicate()], run_check=False), head.weight)
        logits = sharded.redistribute(placements=[Replicate()]).to_local(grad_placements=grad).float()
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), t.view(-1))

    h, _, t = _inputs()
    gm = _as_earlier_dynamo(dynamo_graph(loss, h, t))
    before = torch_ir_text(gm)
    assert "prim_redistribute(" in before and "prim_to_local(" in before and " redistribute(" not in before
    assert pre_grad_losses.might_rewrite(gm.graph)
    lines = rewrite_cross_entropy(gm.graph)
    gm.graph.lint()
    if grad is None:
        assert lines == ["rewrote cross_entropy: tpfuse::cross_entropy_hidden of sharded"]
        after = torch_ir_text(gm)  # Dynamo 2.11 also writes the input's from_local as prim_from_local: it stays
        assert "prim_redistribute" not in after and "prim_to_local" not in after and "sum_grad_over_ranks" not in after
    else:
        assert lines[0].startswith("kept cross_entropy: to_local(grad_placements="), lines  # the method's own name
        assert torch_ir_text(gm) == before
