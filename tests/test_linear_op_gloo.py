"""``tpfuse::linear_all_gather_hidden`` on real gloo ranks: the reference composite, errors, autograd, opcheck.

The CPU path is the reference the fused CUDA kernel is held to
(tests/gpu/test_linear_push.py).  Here it must equal, bit for bit, each rank
computing every rank's ``linear`` locally and concatenating (the same
``F.linear`` on the same bytes gives the same bits), for even and uneven
widths, with and without bias, and leading dims of any size.
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from multiproc import run_ranks

import tpfuse  # noqa: F401  (registers the ops)
from tpfuse.compile_ops.linear_all_gather_hidden import linear_all_gather_hidden


def _random(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


def _cases(world_size):
    even = [16] * world_size
    uneven = [8 * (r + 1) + 3 * (r % 2) for r in range(world_size)]
    return [
        ("2d-bf16-bias", (7,), 32, even, torch.bfloat16, True),
        ("3d-fp16-nobias-uneven", (2, 3), 24, uneven, torch.float16, False),
        ("T=1-fp32-bias", (1,), 40, uneven, torch.float32, True),
        ("4d-bf16", (2, 1, 3), 16, even, torch.bfloat16, False),
        ("T=0", (0,), 16, even, torch.float32, True),
    ]


def _check_reference(rank, world_size):
    done = []
    for i, (name, lead, k, widths, dtype, has_bias) in enumerate(_cases(world_size)):
        x = _random((*lead, k), dtype, seed=1000 * i)  # the same x on every rank
        weights = [_random((w, k), dtype, seed=1000 * i + 1 + r) for r, w in enumerate(widths)]
        biases = [_random((w,), dtype, seed=1000 * i + 50 + r) if has_bias else None for r, w in enumerate(widths)]
        out = torch.ops.tpfuse.linear_all_gather_hidden(x, weights[rank], biases[rank], widths,
                                                        dist.group.WORLD.group_name)
        expected = torch.cat([F.linear(x, w, b) for w, b in zip(weights, biases)], dim=-1)
        assert out.shape == expected.shape and out.dtype == dtype, (name, out.shape, expected.shape)
        assert torch.equal(out.view(torch.uint8) if out.numel() else out, expected.view(torch.uint8)
                           if expected.numel() else expected), name
        done.append(name)
    # The Python wrapper: default widths from the weight, group by object.
    x = _random((3, 8), torch.float32, seed=5)
    w = _random((4, 8), torch.float32, seed=6 + rank)
    got = linear_all_gather_hidden(x, w, group=dist.group.WORLD)
    expected = torch.cat([F.linear(x, _random((4, 8), torch.float32, seed=6 + r)) for r in range(world_size)], -1)
    assert torch.equal(got, expected)
    done.append("wrapper")
    return done


def _check_autograd(rank, world_size):
    """Backward of the op == backward of linear then all_gather_hidden (the composite), exactly."""
    widths = [4 + 2 * r for r in range(world_size)]
    k = 6

    def leaves():
        x = torch.randint(-4, 4, (2, 3, k)).float()
        w = torch.randint(-4, 4, (widths[rank], k), generator=torch.Generator().manual_seed(rank)).float()
        b = torch.randint(-4, 4, (widths[rank],), generator=torch.Generator().manual_seed(9 + rank)).float()
        return [t.requires_grad_() for t in (x, w, b)]

    torch.manual_seed(0)
    x1, w1, b1 = leaves()
    torch.manual_seed(0)
    x2, w2, b2 = leaves()
    upstream = torch.randint(-4, 4, (2, 3, sum(widths)), generator=torch.Generator().manual_seed(100 + rank)).float()
    name = dist.group.WORLD.group_name
    torch.ops.tpfuse.linear_all_gather_hidden(x1, w1, b1, widths, name).backward(upstream)
    torch.ops.tpfuse.all_gather_hidden(F.linear(x2, w2, b2), widths, name).backward(upstream)
    return all(torch.equal(a.grad, b.grad) for a, b in ((x1, x2), (w1, w2), (b1, b2)))


def _check_opcheck(rank, world_size):
    widths = [8 + r for r in range(world_size)]
    x = _random((3, 5), torch.float32, seed=1).requires_grad_()
    w = _random((widths[rank], 5), torch.float32, seed=2 + rank).requires_grad_()
    b = _random((widths[rank],), torch.float32, seed=3 + rank)
    op = torch.ops.tpfuse.linear_all_gather_hidden.default
    torch.library.opcheck(op, (x, w, b, widths, dist.group.WORLD.group_name))
    torch.library.opcheck(op, (x.detach(), w.detach(), None, widths, dist.group.WORLD.group_name))
    return True


def _check_compile(rank, world_size):
    """The op under torch.compile (fullgraph, dynamic T): no graph break, the eager bytes."""
    torch._dynamo.reset()
    w = _random((8, 16), torch.float32, seed=rank)
    name = dist.group.WORLD.group_name

    def fn(x):
        return torch.relu(torch.ops.tpfuse.linear_all_gather_hidden(x, w, None, [8] * world_size, name)) * 2

    compiled = torch.compile(fn, fullgraph=True, backend="inductor")
    for tokens in (3, 5):
        x = _random((tokens, 16), torch.float32, seed=tokens)
        torch._dynamo.mark_dynamic(x, 0)
        if not torch.equal(compiled(x), fn(x)):
            return False
    return True


def _check_pass_end_to_end(rank, world_size):
    """An unmodified bf16 column linear + funcol gather compiled with ``fuse_linear=True``:
    the fused op is in the graph (report), and the output equals the uncompiled model's bits."""
    import torch._inductor.config
    import torch.distributed._functional_collectives as funcol

    from tpfuse.compile_ops import linear_cost

    torch._dynamo.reset()
    torch._inductor.config.fx_graph_cache = False
    # No GPU here: the pass decides as on the card the rule was measured on (this rank process only).
    linear_cost.compile_time_device_name = lambda: "NVIDIA H200"
    # a shape the calibrated cost rule fuses at W=2 (T=32, K=512, N_r=32768: predicted 1.21x)
    w = _random((32768, 512), torch.bfloat16, seed=40 + rank)
    b = _random((32768,), torch.bfloat16, seed=60 + rank)

    def model(x):
        y = F.linear(x, w, b)
        return funcol.all_gather_tensor(y, gather_dim=-1, group=dist.group.WORLD) * 2

    x = _random((32, 512), torch.bfloat16, seed=3)
    results = {}
    for zero_copy in (False, True):  # zero-copy: the op's lowering and permission on a real compile
        torch._dynamo.reset()
        with torch.no_grad(), tpfuse.enabled(fuse_linear=True, zero_copy=zero_copy):
            out = torch.compile(model, fullgraph=True, dynamic=False)(x)
            rep = tpfuse.report()
        results[zero_copy] = {"equal": bool(torch.equal(out, model(x))),
                              "fused": [m.linear_fusion for m in rep.matches],
                              "zero_copy": [m.zero_copy for m in rep.matches]}
    return results


def _capture(fn):
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - we return what was raised
        return type(err).__name__, str(err)
    return None


def _error_cases(rank, world_size):
    op = torch.ops.tpfuse.linear_all_gather_hidden
    name = dist.group.WORLD.group_name
    x = torch.randn(3, 8)
    w = torch.randn(4, 8)
    return {
        "weight_shape": _capture(lambda: op(x, torch.randn(4, 7), None, [4, 4], name)),
        "wrong_width": _capture(lambda: op(x, torch.randn(5, 8), None, [4, 4], name)),
        "bias_shape": _capture(lambda: op(x, w, torch.randn(3), [4, 4], name)),
        "mixed_dtype": _capture(lambda: op(x, w.double(), None, [4, 4], name)),
        "int_dtype": _capture(lambda: op(x.int(), w.int(), None, [4, 4], name)),
        "wrong_count": _capture(lambda: op(x, w, None, [4, 4, 4], name)),
        "slot": _capture(lambda: op(x, w, None, [4, 4], name, slot=3)),
    }


ERRORS = {
    "weight_shape": ("ValueError", r"weight.shape=\[4, 7\] on rank \d; expected \[hidden_widths\[\d\]=4, x.shape\[-1\]=8\]"),
    "wrong_width": ("ValueError", r"weight.shape=\[5, 8\] on rank \d; expected \[hidden_widths\[\d\]=4"),
    "bias_shape": ("ValueError", r"bias.shape=\[3\] on rank \d; expected \[4\] or None"),
    "mixed_dtype": ("TypeError", r"x, weight and bias must share one dtype"),
    "int_dtype": ("TypeError", r"needs a floating dtype, got torch.int32"),
    "wrong_count": ("ValueError", r"len\(hidden_widths\)=3 but group '0' has 2 ranks"),
    "slot": ("ValueError", r"slot=3 is not one of \(-1, 0, 1\)"),
}


def _w2_all(rank, world_size):
    return {
        "reference": _check_reference(rank, world_size),
        "autograd": _check_autograd(rank, world_size),
        "opcheck": _check_opcheck(rank, world_size),
        "compile": _check_compile(rank, world_size),
        "errors": _error_cases(rank, world_size),
        "pass": _check_pass_end_to_end(rank, world_size),
    }


@pytest.fixture(scope="module")
def w2():
    return run_ranks(2, _w2_all)


def _reference_and_autograd(rank, world_size):
    return _check_reference(rank, world_size), _check_autograd(rank, world_size)


def test_reference_and_autograd_w8():
    # TP=8 on the CPU: even and uneven bands, bias, 3-D leading dims, backward
    names = [c[0] for c in _cases(8)] + ["wrapper"]
    assert run_ranks(8, _reference_and_autograd) == [(names, True)] * 8


def test_reference_equals_local_linear_then_cat(w2):
    names = [c[0] for c in _cases(2)] + ["wrapper"]
    assert [r["reference"] for r in w2] == [names, names]


def test_autograd_is_the_composites(w2):
    assert all(r["autograd"] for r in w2)


def test_opcheck(w2):
    assert all(r["opcheck"] for r in w2)


def test_compile_fullgraph_dynamic(w2):
    assert all(r["compile"] for r in w2)


def test_pass_end_to_end_fused_and_bit_exact(w2):
    for r in w2:
        for zero_copy, got in r["pass"].items():
            assert got["equal"], r["pass"]
            assert len(got["fused"]) == 1 and got["fused"][0].startswith("fused [predicted_faster]"), r
            assert got["zero_copy"] == [zero_copy], r  # the pass grants it to the fused op (gloo copies anyway)


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_error_message(w2, case):
    import re

    kind, pattern = ERRORS[case]
    for r in w2:
        got = r["errors"][case]
        assert got is not None, f"{case}: no error raised"
        assert got[0] == kind and re.search(pattern, got[1]), got


def test_fake_kernel_shapes_without_process_group():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    with FakeTensorMode(shape_env=ShapeEnv()) as mode:
        dynamic = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC, DimDynamic.STATIC, DimDynamic.STATIC])
        x = mode.from_tensor(torch.empty(5, 3, 64, dtype=torch.bfloat16), symbolic_context=dynamic)
        w = mode.from_tensor(torch.empty(32, 64, dtype=torch.bfloat16))
        y = torch.ops.tpfuse.linear_all_gather_hidden(x, w, None, [32, 48], "never-registered")
        assert y.shape[-1] == 80 and y.shape[:-1] == x.shape[:-1] and y.dtype == torch.bfloat16


def test_cost_rule_is_a_pure_function_and_off_for_unsupported_shapes():
    from tpfuse.compile_ops import linear_cost

    H200 = "NVIDIA H200"
    a = linear_cost.decide(1, 4096, [32064] * 4, "bfloat16", device_name=H200)
    assert a == linear_cost.decide(1, 4096, [32064] * 4, "bfloat16", device_name=H200)
    assert a.rule in ("predicted_faster", "predicted_slower") and "predicted" in a.reason
    assert linear_cost.decide(1, 4096, [3584] * 4, "bfloat16", device_name=H200).rule == "not_modelled"  # narrow band
    assert linear_cost.decide(1, 4096, [3584] * 4, "float32", device_name=H200).rule == "unsupported"
    assert linear_cost.decide(1, 4100, [3584] * 4, "bfloat16", device_name=H200).rule == "unsupported"
    assert linear_cost.decide(1, 4096, [3584], "bfloat16", device_name=H200).rule == "unsupported"
    assert linear_cost.decide(4096, 4096, [3584] * 4, "bfloat16", device_name=H200).rule == "measured_slower"
    # the calibrated rule on the measured rows (4xH200): fuse the LM head at T=32 (1.25-1.27x), not at T=1 (1.06-1.08x) or 128
    assert linear_cost.decide(32, 4096, [32064] * 4, "bfloat16", device_name=H200).fuse
    assert not linear_cost.decide(1, 4096, [32064] * 4, "bfloat16", device_name=H200).fuse
    assert not linear_cost.decide(128, 4096, [32064] * 4, "bfloat16", device_name=H200).fuse
    assert not linear_cost.decide(32, 4096, [3584] * 4, "bfloat16", device_name=H200).fuse  # measured 0.97x


LM_HEAD_W4 = (4096, [32064] * 4, "bfloat16")  # fused on the H200 at T = 21..32


def test_cost_rule_does_not_fuse_where_nothing_was_measured():
    from tpfuse.compile_ops import linear_cost

    assert linear_cost.decide(32, *LM_HEAD_W4, device_name="NVIDIA H200").fuse  # the measured key
    h100 = linear_cost.decide(32, *LM_HEAD_W4, device_name="NVIDIA H100 80GB HBM3")
    assert (h100.fuse, h100.rule, h100.reason) == (False, "not_measured", "not measured on NVIDIA H100 80GB HBM3 at W=4")
    w8 = linear_cost.decide(32, 4096, [16032] * 8, "bfloat16", device_name="NVIDIA H200")
    assert (w8.fuse, w8.rule, w8.reason) == (False, "not_measured", "not measured on NVIDIA H200 at W=8")
    unknown = linear_cost.decide(32, *LM_HEAD_W4, device_name="")  # no CUDA, or the ranks' models differ
    assert (unknown.rule, unknown.reason) == ("not_measured", "not measured on this device at W=4")
    # what the kernel cannot run stays "unsupported" (TPFUSE_LINEAR_PUSH=fused refuses only that)
    assert linear_cost.decide(32, 4096, [32064] * 4, "float32", device_name="").rule == "unsupported"


def test_cost_rule_over_a_symbolic_token_range():
    from tpfuse.compile_ops import linear_cost

    wide = linear_cost.decide_range(2, None, *LM_HEAD_W4, device_name="NVIDIA H200")
    assert (wide.fuse, wide.rule) == (True, "per_call")
    assert wide.reason == ("T symbolic (range 2..inf): fused op, decided per call; fuses at T in [21..32] "
                           "on NVIDIA H200 W=4")
    narrow = linear_cost.decide_range(2, 16, *LM_HEAD_W4, device_name="NVIDIA H200")  # every T predicted < 1.22x
    assert (narrow.fuse, narrow.rule) == (False, "predicted_slower")
    assert narrow.reason.startswith("T symbolic (range 2..16): no T in 2..16 fuses; at T=16: T=16 K=4096")
    above = linear_cost.decide_range(33, None, *LM_HEAD_W4, device_name="NVIDIA H200")
    assert (above.fuse, above.rule) == (False, "measured_slower")
    h100 = linear_cost.decide_range(2, None, *LM_HEAD_W4, device_name="NVIDIA H100 80GB HBM3")
    assert (h100.rule, h100.reason) == ("not_measured", "not measured on NVIDIA H100 80GB HBM3 at W=4 "
                                        "(T symbolic (range 2..inf))")


def test_op_decides_with_the_model_its_ranks_agreed_on(monkeypatch):
    """The op asks the chosen backend for its fused kernel; the barrier backends ask the rule with the
    workspace's agreed GPU model, not the local one, and the c10d backends have no fused kernel."""
    from tpfuse.compile_ops import linear_push, workspace
    from tpfuse.compile_ops.barrier import P2P
    from tpfuse.compile_ops.collective import NCCL
    from tpfuse.compile_ops.groups import Group, GroupFacts

    monkeypatch.delenv("TPFUSE_LINEAR_PUSH", raising=False)
    monkeypatch.setattr(linear_push, "launcher", lambda ws, *args: "the fused kernel's launcher")
    group = Group(pg=None, name="agreed-model-test", rank=0, world_size=4)
    x, weight = torch.empty(32, 4096, dtype=torch.bfloat16), torch.empty(32064, 4096, dtype=torch.bfloat16)

    def use_fused(agreed, backend=P2P, x=x):
        ws = workspace.Workspace(group, x.device, GroupFacts(True, "", 264, agreed))
        monkeypatch.setitem(workspace._workspaces, (group.name, x.device.index), ws)
        return backend.prepare_linear(x, weight, None, [32064] * 4, group) is not None

    assert use_fused("NVIDIA H200")
    assert not use_fused("")  # the ranks' models differ
    assert not use_fused("NVIDIA H100 80GB HBM3")
    assert not use_fused("NVIDIA H200", NCCL)
    monkeypatch.setenv("TPFUSE_LINEAR_PUSH", "fused")  # forcing still works where nothing was measured
    assert use_fused("NVIDIA H100 80GB HBM3")
    # a call with no rows never fuses, even forced: the composite returns its empty result on every rank
    assert not use_fused("NVIDIA H200", x=torch.empty(0, 4096, dtype=torch.bfloat16))
