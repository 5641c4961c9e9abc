"""The op on real gloo ranks: bit-exact gathers, errors, autograd, opcheck, compile.

Each world size runs in one spawned group (process start-up dominates the
cost); the per-rank functions return what the tests then assert on.
"""

import pytest
import torch
import torch.distributed as dist
from multiproc import run_ranks

import tpfuse

DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.int32)


def _random(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    return torch.randint(-(2**30), 2**30, shape, generator=g, dtype=torch.int64).to(dtype)


def _bits(t):
    """Compare bytes, not values: a gather must not even canonicalise NaNs."""
    return t.contiguous().view(torch.uint8)


def _gather_cases(world_size):
    """(name, leading shape, widths, dtype) for every case at this world size."""
    even = [16] * world_size
    uneven = [8 * (r + 1) + (r % 2) * 3 for r in range(world_size)]  # 8, 19, 24, 35...
    cases = []
    for dtype in DTYPES:
        cases.append((f"2d-even-{dtype}", (7,), even, dtype))
        cases.append((f"3d-uneven-{dtype}", (2, 3), uneven, dtype))
    cases += [
        ("T=1", (1,), uneven, torch.bfloat16),
        ("T=0", (0,), even, torch.float32),
        ("4d", (2, 1, 3), even, torch.float16),
        ("fp8", (5,), uneven, torch.float8_e4m3fn),
        ("width-1", (4,), [1] * world_size, torch.float32),
    ]
    return cases


def _check_gathers(rank, world_size):
    """Each rank gathers its slab; compare against torch.cat of all ranks' slabs."""
    checked = []
    for i, (name, lead, widths, dtype) in enumerate(_gather_cases(world_size)):
        slabs = [_random((*lead, w), dtype, seed=1000 * i + r) for r, w in enumerate(widths)]
        out = tpfuse.all_gather_hidden(slabs[rank], hidden_widths=widths)
        expected = torch.cat(slabs, dim=-1)
        assert out.shape == expected.shape, (name, out.shape, expected.shape)
        assert out.dtype == dtype, name
        assert torch.equal(_bits(out), _bits(expected)), name
        checked.append(name)
    # A non-contiguous x (a strided column view) is accepted and copied once.
    base = _random((6, 2 * 16), torch.bfloat16, seed=7 + rank)
    strided = base[:, ::2]
    assert not strided.is_contiguous()
    out = tpfuse.all_gather_hidden(strided)
    parts = [_random((6, 2 * 16), torch.bfloat16, seed=7 + r)[:, ::2] for r in range(world_size)]
    assert torch.equal(_bits(out), _bits(torch.cat(parts, -1)))
    # The result is fresh memory the caller owns, and the group may be given
    # as a ProcessGroup or by name.
    x = _random((3, 16), torch.float32, seed=rank)
    a = tpfuse.all_gather_hidden(x, dist.group.WORLD)
    b = tpfuse.all_gather_hidden(x, dist.group.WORLD.group_name)
    assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    checked.append("strided+owned")
    return checked


def _check_autograd(rank, world_size):
    """Backward = reduce-scatter over the hidden axis, checked against a
    single-process reference.  Integer-valued data makes the sums exact."""
    widths = [4 + 3 * r for r in range(world_size)]
    offsets = [sum(widths[:r]) for r in range(world_size)]

    def upstream(r):  # every rank's own gradient of its own loss
        g = torch.Generator().manual_seed(100 + r)
        return torch.randint(-8, 8, (2, 5, sum(widths)), generator=g).float()

    x = torch.randint(-8, 8, (2, 5, widths[rank])).float().requires_grad_()
    y = tpfuse.all_gather_hidden(x, hidden_widths=widths)
    y.backward(upstream(rank))
    total = sum(upstream(r) for r in range(world_size))
    expected = total[..., offsets[rank] : offsets[rank] + widths[rank]]
    assert torch.equal(x.grad, expected)
    return True


def _check_compile(rank, world_size):
    """fullgraph=True, static and dynamic T, aot_eager and Inductor: no graph
    break and the same bytes as eager."""
    torch._dynamo.reset()
    w = 16

    def fn(x):
        return tpfuse.all_gather_hidden(torch.relu(x), dist.group.WORLD) * 2

    results = {}
    for backend in ("aot_eager", "inductor"):
        compiled = torch.compile(fn, fullgraph=True, backend=backend)
        for tokens in (3, 5):
            x = _random((tokens, w), torch.float32, seed=rank + tokens)
            torch._dynamo.mark_dynamic(x, 0)
            assert torch.equal(compiled(x), fn(x)), (backend, tokens)
        x = _random((4, w), torch.float32, seed=rank)  # static T
        assert torch.equal(torch.compile(fn, fullgraph=True, backend=backend, dynamic=False)(x), fn(x))
        results[backend] = True
    explanation = torch._dynamo.explain(fn)(_random((4, w), torch.float32, seed=0))
    results["graph_breaks"] = explanation.graph_break_count
    return results


def _check_opcheck(rank, world_size):
    widths = [8 + r for r in range(world_size)]
    x = _random((3, widths[rank]), torch.float32, seed=rank).requires_grad_()
    torch.library.opcheck(
        torch.ops.tpfuse.all_gather_hidden.default,
        (x, widths, dist.group.WORLD.group_name),
    )
    grad = _random((3, sum(widths)), torch.float32, seed=9)
    torch.library.opcheck(
        torch.ops.tpfuse.reduce_scatter_hidden.default,
        (grad, widths, widths[rank], dist.group.WORLD.group_name),
    )
    return True


def _capture(fn):
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - we return what was raised
        return type(err).__name__, str(err)
    return None


def _error_cases(rank, world_size):
    from tpfuse.compile_ops.dispatch import choose_backend
    from tpfuse.compile_ops.validation import check_device_matches_group
    from tpfuse.compile_ops.groups import resolve_group

    name = dist.group.WORLD.group_name
    op = torch.ops.tpfuse.all_gather_hidden
    x = _random((3, 4), torch.float32, seed=rank)
    group = resolve_group(name)
    return {
        "wrong_width": _capture(lambda: op(x, [5, 4] if rank == 0 else [4, 5], name)),
        "wrong_count": _capture(lambda: op(x, [4] * (world_size + 1), name)),
        "width_zero": _capture(lambda: op(x, [4, 0], name)),
        "width_negative": _capture(lambda: op(x, [4, -2], name)),
        "unknown_group": _capture(lambda: op(x, [4, 4], "no-such-group")),
        "dtype": _capture(lambda: op(x.double(), [4, 4], name)),
        "device": _capture(lambda: check_device_matches_group("cuda", group)),
        "no_backend": _capture(lambda: choose_backend("mps", torch.float32, [4, 4], group)),
        "scalar": _capture(lambda: op(torch.tensor(1.0), [4, 4], name)),
        "scalar_default_widths": _capture(lambda: tpfuse.all_gather_hidden(torch.tensor(1.0))),
        "scalar_given_widths": _capture(lambda: tpfuse.all_gather_hidden(torch.tensor(1.0), hidden_widths=[4, 4])),
        "scalar_compiled": _capture(lambda: torch.compile(lambda t: tpfuse.all_gather_hidden(t, name, [4, 4]),
                                                          backend="aot_eager")(torch.tensor(1.0))),
        "bad_group_type": _capture(lambda: tpfuse.all_gather_hidden(x, group=3)),
        "slot": _capture(lambda: op(x, [4, 4], name, slot=7)),
    }


@pytest.fixture(scope="module")
def w2():
    return run_ranks(2, _w2_all)


def _w2_all(rank, world_size):
    return {
        "gathers": _check_gathers(rank, world_size),
        "autograd": _check_autograd(rank, world_size),
        "errors": _error_cases(rank, world_size),
        "opcheck": _check_opcheck(rank, world_size),
        "compile": _check_compile(rank, world_size),
    }


def _gathers_and_autograd(rank, world_size):
    return _check_gathers(rank, world_size), _check_autograd(rank, world_size)


@pytest.mark.parametrize("world_size", [3, 4, 8])  # 8: TP=8, gloo ranks on the CPU
def test_gather_bit_exact_and_autograd(world_size):
    results = run_ranks(world_size, _gathers_and_autograd)
    names = [name for name, *_ in _gather_cases(world_size)] + ["strided+owned"]
    assert results == [(names, True)] * world_size


def test_gather_bit_exact_w2(w2):
    names = [name for name, *_ in _gather_cases(2)] + ["strided+owned"]
    assert [r["gathers"] for r in w2] == [names, names]


def test_autograd_w2(w2):
    assert all(r["autograd"] for r in w2)


def test_opcheck(w2):
    assert all(r["opcheck"] for r in w2)


def test_compile_fullgraph_static_and_dynamic(w2):
    for r in w2:
        assert r["compile"] == {"aot_eager": True, "inductor": True, "graph_breaks": 0}


ERRORS = {
    # The ranks' lists differ: every rank raises the agreement error, which shows every rank's view.
    "wrong_width": ("ValueError", r"disagree on the gather: rank 0: dtype float32, leading dims \[3\], "
                                  r"hidden_widths \[5, 4\], x.shape\[-1\]=4; rank 1: .*hidden_widths \[4, 5\]"),
    "wrong_count": ("ValueError", r"len\(hidden_widths\)=3 but group '0' has 2 ranks; give exactly one width per rank"),
    "width_zero": ("ValueError", r"has width\(s\) \[0\] <= 0; every rank must contribute a positive number of columns"),
    "width_negative": ("ValueError", r"has width\(s\) \[-2\] <= 0"),
    "unknown_group": ("ValueError", r"unknown process group name 'no-such-group'; accepted are the group_name of an initialised ProcessGroup"),
    "dtype": ("TypeError", r"cannot move dtype torch.float64; accepted dtypes are float32, float16, bfloat16, int32"),
    "device": ("ValueError", r"x is on 'cuda' but group '0' uses the 'gloo' backend; accepted are cpu tensors with a gloo group, cuda tensors with a nccl group"),
    "no_backend": ("ValueError", r"no backend for 'mps' tensors; accepted devices are cpu \(gloo\) and cuda"),
    "scalar": ("ValueError", r"x is a scalar \(0-d\); it needs a last \(hidden\) dimension"),
    "scalar_default_widths": ("ValueError", r"x is a scalar \(0-d\); it needs a last \(hidden\) dimension"),
    "scalar_given_widths": ("ValueError", r"x is a scalar \(0-d\); it needs a last \(hidden\) dimension"),
    "scalar_compiled": ("ValueError", r"x is a scalar \(0-d\); it needs a last \(hidden\) dimension"),
    "bad_group_type": ("TypeError", r"group must be a ProcessGroup, a group name \(str\) or None, got int"),
    "slot": ("ValueError", r"slot=7 is not one of \(-1, 0, 1\)"),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_error_message(w2, case):
    import re

    kind, pattern = ERRORS[case]
    for r in w2:
        got = r["errors"][case]
        assert got is not None, f"{case}: no error raised"
        assert got[0] == kind and re.search(pattern, got[1]), got


def test_fake_kernel_shapes_without_process_group():
    """The fake kernel derives the shape with no process group at all,
    including symbolic leading dims."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    assert not dist.is_initialized()
    real = torch.empty(5, 3, 8)
    with FakeTensorMode(shape_env=ShapeEnv()) as mode:
        from torch.fx.experimental.symbolic_shapes import DimDynamic, StatelessSymbolicContext

        dynamic = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC, DimDynamic.STATIC, DimDynamic.STATIC])
        x = mode.from_tensor(real, symbolic_context=dynamic)
        y = torch.ops.tpfuse.all_gather_hidden(x, [8, 8, 4], "never-registered")
        assert y.shape[-1] == 20 and y.shape[:-1] == x.shape[:-1]
        assert isinstance(y.shape[0], torch.SymInt)
        g = torch.ops.tpfuse.reduce_scatter_hidden(y, [8, 8, 4], 8, "never-registered")
        assert g.shape[-1] == 8
