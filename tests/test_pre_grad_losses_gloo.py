"""Training steps with funcol, DTensor and HF Llama gathers, compiled under ``tpfuse.enable()`` on gloo ranks.

Each step's loss and gradients against the same step run eagerly (the gather, torch's loss and
the gather's own backward), within the sum family's published bound (docs/passes.md, "Gather
elimination: the sum family's error"); where only the loss is returned, neither the forward nor
the backward graph gathers (or reduce-scatters) anything; where the logits are returned too, the
gather stays and the loss is split (docs/passes.md, "Training").  A rewrite given the wrong
gradient meaning (a sum over ranks for DTensor's local slice) is caught by the same comparison.

W=2 for every form, W=4 for funcol's and DTensor's; HF Llama (``tp_plan``, transformers
needed) at W=2.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch
import torch._functorch.config as functorch_config
import torch._inductor.config as inductor_config
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn as nn
import torch.nn.functional as F

import tpfuse

from multiproc import run_ranks

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

#: docs/passes.md, "Gather elimination: the sum family's error": the cross-entropy and its gradient,
#: relative to the largest magnitude of the reference
BOUND = 1e-5
WIDTH = 8  # vocabulary columns per rank
COLLECTIVES_OF_FULL_WIDTH = ("all_gather", "reduce_scatter")


class Recorder:
    """A post-grad pass chained after tpfuse's: the text of every graph (forward, backward)."""

    def __init__(self):
        self.texts = []

    def __call__(self, graph):
        self.texts.append(str(graph))

    def uuid(self):
        return None


def _inputs(world_size, rank, lead=(2, 3)):
    g = torch.Generator().manual_seed(5)  # hidden states and targets: the same on every rank
    h = torch.randn(*lead, 16, generator=g)
    t = torch.randint(0, WIDTH * world_size, lead, generator=g)
    if t.numel() > 2:
        t.view(-1)[1] = -100
    w = torch.randn(WIDTH, 16, generator=torch.Generator().manual_seed(30 + rank)) / 2  # this rank's rows
    return h.requires_grad_(), w.requires_grad_(), t


# --------------------------------------------------------------------------- the steps


def funcol_chunk_cat(h, w, t):
    gathered = funcol.all_gather_tensor(h @ w.t(), 0, dist.group.WORLD)
    logits = torch.cat(torch.chunk(gathered, dist.get_world_size(), dim=0), dim=-1).float()
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), t.view(-1), label_smoothing=0.1)


def funcol_sliced_sum(h, w, t):
    y = h @ w.t()
    logits = funcol.all_gather_tensor(y, y.dim() - 1, dist.group.WORLD).float()[..., :-1, :].contiguous()
    labels = t[..., 1:].contiguous()
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), reduction="sum") / 3


def funcol_logits_returned(h, w, t):
    y = h @ w.t()
    logits = funcol.all_gather_tensor(y, y.dim() - 1, dist.group.WORLD)
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), t.view(-1)), logits


def _colwise_head(world_size):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    torch.manual_seed(0)  # the full weight, the same on every rank before it is sharded
    head = nn.Linear(16, WIDTH * world_size, bias=False)
    return parallelize_module(head, init_device_mesh("cpu", (world_size,)), ColwiseParallel(output_layouts=Replicate()))


def dtensor_step(head, returns_logits):
    def step(h, w, t):  # w unused: the head's weight is the DTensor parameter
        logits = head(h)
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), t.view(-1))
        return (loss, logits) if returns_logits else loss

    return step


def _local(grad):
    return grad.to_local() if hasattr(grad, "to_local") else grad


@dataclasses.dataclass
class Case:
    name: str
    builder: str  # how the step is made on the rank: "funcol" or "dtensor"
    step: str
    returns_logits: bool = False
    wrong_meaning: bool = False  # the negative control: DTensor's gather treated as a sum over ranks


CASES = [
    Case("funcol chunk+cat, smoothing", "funcol", "funcol_chunk_cat"),
    Case("funcol [..., :-1, :], sum / n", "funcol", "funcol_sliced_sum"),
    Case("funcol, logits returned", "funcol", "funcol_logits_returned", returns_logits=True),
    Case("DTensor ColwiseParallel", "dtensor", "loss"),
    Case("DTensor ColwiseParallel, logits returned", "dtensor", "loss", returns_logits=True),
    Case("DTensor, wrong gradient meaning", "dtensor", "loss", wrong_meaning=True),
]


def _make(case, world_size):
    if case.builder == "funcol":
        return globals()[case.step], None
    head = _colwise_head(world_size)
    return dtensor_step(head, case.returns_logits), head


def _run_case(case, rank, world_size):
    """(errors of loss and gradients against eager, forward and backward texts, report facts)."""
    from tpfuse.passes import pre_grad_losses

    outs, texts, facts = {}, [], {}
    for compiled in (False, True):
        torch._dynamo.reset()
        fn, head = _make(case, world_size)
        h, w, t = _inputs(world_size, rank)
        params = [h] + ([w] if head is None else [head.weight])
        if compiled:
            rec = Recorder()
            inductor_config.post_grad_custom_post_pass = rec
            saved_forms = pre_grad_losses._FORMS
            if case.wrong_meaning:
                pre_grad_losses._FORMS = (_as_sum_over_ranks(pre_grad_losses._dtensor_gather),)
            try:
                with inductor_config.patch(fx_graph_cache=False), \
                        functorch_config.patch(enable_autograd_cache=False), tpfuse.enabled():
                    loss = _loss_backward(torch.compile(fn)(h, w, t))  # the backward compiles here
                    rep = tpfuse.report(all=True)
            finally:
                pre_grad_losses._FORMS = saved_forms
                inductor_config.post_grad_custom_post_pass = None
            texts = rec.texts
            facts = {"eliminated": [e.consumers for e in rep.eliminations],
                     "split": [n.reason for n in rep.near_misses if n.pattern == "cross_entropy_before_autograd"]}
        else:
            loss = _loss_backward(fn(h, w, t))
        outs[compiled] = [loss] + [_local(p.grad) for p in params]
    errors = [_rel_error(a, b) for a, b in zip(outs[True], outs[False])]
    return {"errors": errors, "graphs": texts, **facts}


def _loss_backward(out):
    """The backward of the loss alone (returned logits get no gradient, as in a training step)."""
    loss = out[0] if isinstance(out, tuple) else out
    loss.backward()
    return loss.detach()


def _as_sum_over_ranks(recognise):
    from tpfuse.passes.pre_grad_losses import SUM_OVER_RANKS, Gathered

    def wrong(node):
        found = recognise(node)
        return dataclasses.replace(found, gradient=SUM_OVER_RANKS) if isinstance(found, Gathered) else found

    return wrong


def _rel_error(ours, ref):
    diff = (ours.double() - ref.double()).abs().max().item()
    return diff / max(ref.double().abs().max().item(), 1e-30)


def _all_cases(rank, world_size, names):
    return {case.name: _run_case(case, rank, world_size) for case in CASES if case.name in names}


def _full_width(text):
    return [line.strip() for line in text.splitlines() if any(c in line for c in COLLECTIVES_OF_FULL_WIDTH)]


def _params(names):
    """``names`` as test parameters; funcol's skip where torch registers no backward for its gather
    (the rewrite keeps the gather there, tests/test_pre_grad_losses_graphs.py)."""
    from tpfuse.passes.pre_grad_losses import funcol_gather_has_autograd

    skip = pytest.mark.skipif(not funcol_gather_has_autograd(),
                              reason=f"torch {torch.__version__}: funcol's gather has no autograd kernel")
    builders = {c.name: c.builder for c in CASES}
    return [pytest.param(n, marks=skip) if builders[n] == "funcol" else n for n in names]


def _runnable(names):
    from tpfuse.passes.pre_grad_losses import funcol_gather_has_autograd

    builders = {c.name: c.builder for c in CASES}
    return [n for n in names if builders[n] != "funcol" or funcol_gather_has_autograd()]


@pytest.fixture(scope="module")
def gloo_w2():
    return run_ranks(2, _all_cases, _runnable([c.name for c in CASES]), timeout=900)


@pytest.fixture(scope="module")
def gloo_w4():
    return run_ranks(4, _all_cases, _runnable(["funcol chunk+cat, smoothing", "DTensor ColwiseParallel"]), timeout=900)


def _loss_only_cases():
    return [c.name for c in CASES if not c.returns_logits and not c.wrong_meaning]


def _assert_loss_only_step(ranks, name):
    """On every rank: the loss rewritten before autograd, within BOUND of eager, and no full-width
    collective in the forward or the backward graph."""
    for rank in ranks:
        result = rank[name]
        assert result["eliminated"] == [("cross_entropy, before autograd",)], result
        assert max(result["errors"]) <= BOUND, result["errors"]
        forward, backward = result["graphs"]
        assert _full_width(forward) == [] and _full_width(backward) == []


@pytest.mark.parametrize("name", _params(_loss_only_cases()))
def test_loss_only_step_matches_eager_and_gathers_nothing(gloo_w2, name):
    _assert_loss_only_step(gloo_w2, name)
    for rank in gloo_w2:
        forward, _ = rank[name]["graphs"]
        assert "tpfuse.softmax_stats_hidden.default" in forward, forward


@pytest.mark.parametrize("name", _params(["funcol chunk+cat, smoothing", "DTensor ColwiseParallel"]))
def test_loss_only_step_at_w4(gloo_w4, name):
    _assert_loss_only_step(gloo_w4, name)


@pytest.mark.parametrize("name", _params([c.name for c in CASES if c.returns_logits]))
def test_control_logits_returned_keep_the_gather_and_split_the_loss(gloo_w2, name):
    for rank in gloo_w2:
        result = rank[name]
        assert result["eliminated"] == []
        (reason,) = result["split"]
        assert reason == ("loss split (computed on each rank's slab); the gather stays before autograd for its "
                          "other use, the graph output")
        forward, _ = result["graphs"]
        assert any("all_gather" in line for line in _full_width(forward)), forward
        assert "tpfuse.softmax_stats_hidden.default" in forward
        assert max(result["errors"]) <= BOUND, result["errors"]


def test_control_a_wrong_gradient_meaning_is_caught(gloo_w2):
    """Summing DTensor's slice over the ranks doubles the gradients at W=2: the comparison sees it."""
    for rank in gloo_w2:
        loss_error, *grad_errors = rank["DTensor, wrong gradient meaning"]["errors"]
        assert loss_error <= BOUND and min(grad_errors) > 0.5, rank["DTensor, wrong gradient meaning"]["errors"]


# --------------------------------------------------------------------------- HF Llama under tp_plan

HF_MISSING = [m for m in ("transformers", "accelerate") if importlib.util.find_spec(m) is None]


def _hf_steps(rank, world_size, path):
    from transformers import LlamaConfig, LlamaForCausalLM

    if rank == 0:
        cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                          vocab_size=256, num_hidden_layers=1, tie_word_embeddings=False)
        torch.manual_seed(0)
        LlamaForCausalLM._from_config(cfg, dtype=torch.float32).save_pretrained(path)
    dist.barrier()
    model = _load_tp(path)
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(1))

    def loss_only(ids):
        return model(input_ids=ids, labels=ids, use_cache=False).loss

    def hf_forward(ids):  # HF's own training forward: the loss and the logits
        out = model(input_ids=ids, labels=ids, use_cache=False)
        return out.loss, out.logits

    return {fn.__name__: _hf_step(model, fn, ids) for fn in (loss_only, hf_forward)}


def _load_tp(path):
    from transformers import LlamaForCausalLM

    try:
        from transformers.distributed import DistributedConfig

        return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                distributed_config=DistributedConfig(tp_plan="auto"))
    except ImportError:  # a transformers without DistributedConfig
        return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, tp_plan="auto")


def _hf_step(model, fn, ids):
    outs, texts, rep = {}, [], None
    for compiled in (False, True):
        torch._dynamo.reset()
        model.zero_grad(set_to_none=True)
        if compiled:
            rec = Recorder()
            inductor_config.post_grad_custom_post_pass = rec
            try:
                with inductor_config.patch(fx_graph_cache=False), \
                        functorch_config.patch(enable_autograd_cache=False), tpfuse.enabled():
                    loss = _loss_backward(torch.compile(fn)(ids))
                    rep = tpfuse.report(all=True)
            finally:
                inductor_config.post_grad_custom_post_pass = None
            texts = rec.texts
        else:
            loss = _loss_backward(fn(ids))
        outs[compiled] = [loss] + [_local(p.grad) for p in model.parameters()]
    return {"errors": [_rel_error(a, b) for a, b in zip(outs[True], outs[False])], "graphs": texts,
            "eliminated": [e.consumers for e in rep.eliminations],
            "split": [n.reason for n in rep.near_misses if n.pattern == "cross_entropy_before_autograd"]}


@pytest.fixture(scope="module")
def hf_w2(tmp_path_factory):
    if HF_MISSING:
        pytest.skip(f"HF's TP plan needs {' and '.join(HF_MISSING)} (pip install transformers accelerate)")
    path = str(tmp_path_factory.mktemp("llama") / "ckpt")
    return run_ranks(2, _hf_steps, path, timeout=900)


def test_hf_llama_loss_only_step_is_vocab_parallel(hf_w2):
    for rank in hf_w2:
        result = rank["loss_only"]
        assert result["eliminated"] == [("cross_entropy, before autograd",)]
        assert max(result["errors"]) <= BOUND, result["errors"]
        forward, backward = result["graphs"]
        assert "tpfuse.softmax_stats_hidden.default" in forward
        assert _full_width(forward) == [] and _full_width(backward) == []


def test_hf_llama_training_forward_keeps_the_gather_for_its_logits(hf_w2):
    for rank in hf_w2:
        result = rank["hf_forward"]
        assert result["eliminated"] == []
        assert [r.split("; ")[1] for r in result["split"]] == \
            ["the gather stays before autograd for its other use, the graph output"]
        forward, _ = result["graphs"]
        assert any("all_gather" in line for line in _full_width(forward))
        assert max(result["errors"]) <= BOUND, result["errors"]
