"""A backend is one object: adding one takes this file and one registration line.

Two gloo ranks register a toy backend (it moves int32 CPU tensors, through gloo, and
counts its calls) in front of gloo, and the op uses it exactly where it does not refuse;
forcing it where it refuses raises its reason; unregistered, gloo is back."""

import os

import torch
import torch.distributed as dist

from multiproc import run_ranks
from tpfuse.compile_ops import collective, dispatch
from tpfuse.compile_ops.backend import GatherBackend, GatherCall


class ToyBackend(GatherBackend):
    name = "toy"
    devices = ("cpu",)

    def __init__(self):
        self.calls = 0

    def refusal(self, call: GatherCall) -> str:
        return "" if call.dtype == torch.int32 else f"the toy moves int32 only, not {call.dtype}"

    def gather(self, x, hidden_widths, group, slot, skip_entry_sync, zero_copy):
        self.calls += 1
        return collective.gather_hidden(x, hidden_widths, group)


def _ranks(rank, world_size):
    name = dist.group.WORLD.group_name
    toy = ToyBackend()
    dispatch.register_backend(toy, before="gloo")  # the one registration line
    out = {}
    try:
        ints = torch.arange(6, dtype=torch.int32).reshape(2, 3) + 10 * rank
        got = torch.ops.tpfuse.all_gather_hidden(ints, [3] * world_size, name)
        want = torch.cat([torch.arange(6, dtype=torch.int32).reshape(2, 3) + 10 * r for r in range(world_size)], -1)
        out["int32_exact"] = torch.equal(got, want)
        out["toy_calls_after_int32"] = toy.calls
        torch.ops.tpfuse.all_gather_hidden(torch.ones(2, 3), [3] * world_size, name)  # the toy refuses: gloo
        out["toy_calls_after_float32"] = toy.calls
        os.environ["TPFUSE_BACKEND"] = "toy"
        try:
            torch.ops.tpfuse.all_gather_hidden(torch.ones(2, 3), [3] * world_size, name)
            out["forced_refusal"] = ""
        except RuntimeError as err:
            out["forced_refusal"] = str(err)
        finally:
            del os.environ["TPFUSE_BACKEND"]
    finally:
        dispatch.unregister_backend("toy")
    torch.ops.tpfuse.all_gather_hidden(torch.ones(2, 3, dtype=torch.int32), [3] * world_size, name)
    out["toy_calls_after_unregister"] = toy.calls
    out["order"] = [b.name for b in dispatch.BACKENDS]
    return out


def test_a_toy_backend_in_one_file():
    for res in run_ranks(2, _ranks):
        assert res["int32_exact"] and res["toy_calls_after_int32"] == 1
        assert res["toy_calls_after_float32"] == 1
        assert "TPFUSE_BACKEND=toy but that path is unavailable: the toy moves int32 only" in res["forced_refusal"]
        assert res["toy_calls_after_unregister"] == 1
        assert res["order"] == ["gloo", "flag", "multimem", "p2p", "nccl_symmetric", "nccl"]


def test_registration_errors_say_what_is_registered():
    import pytest

    with pytest.raises(ValueError, match="no registered backend named 'nope'; registered are"):
        dispatch.register_backend(ToyBackend(), before="nope")
    with pytest.raises(ValueError, match="a backend named 'gloo' is already registered"):
        dispatch.register_backend(type("Gloo", (ToyBackend,), {"name": "gloo"})(), before="nccl")


def test_dispatch_counts_the_backend_each_call_ran():
    from tpfuse.compile_ops.groups import Group

    dispatch.chosen.clear()
    group = Group(pg=None, name="g", rank=0, world_size=2)
    dispatch.choose(GatherCall("cpu", torch.float32, 2, (2, 2), group, "auto"))
    dispatch.choose(GatherCall("cpu", torch.float32, 2, (2, 2), group, "gloo"))
    assert dispatch.chosen == {"gloo": 2}
