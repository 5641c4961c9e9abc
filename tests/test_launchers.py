"""A repeated eager call runs the launcher its first call prepared, and only where a full dispatch would agree.

Two gloo ranks and a counting toy backend: a repeated call shape prepares once and
launches each time; a new shape, a changed dispatch variable, a registered or removed
backend and a re-created group each prepare again; a call made under a mode or on a
tensor subclass still goes through the dispatcher's second hop.
"""

import os

import torch
import torch.distributed as dist

from multiproc import free_port, run_ranks
from tpfuse.compile_ops import collective, dispatch, launchers
from tpfuse.compile_ops.backend import GatherBackend, GatherCall


class CountingToy(GatherBackend):
    """Moves int32 CPU tensors through gloo when TPFUSE_BACKEND is unset or "toy"; counts prepares and launches."""

    name = "toy"
    devices = ("cpu",)

    def __init__(self):
        self.prepared, self.launched, self.groups = 0, 0, []

    def refusal(self, call: GatherCall) -> str:
        return "" if call.dtype == torch.int32 else "int32 only"

    def prepare(self, x, hidden_widths, group, slot, skip_entry_sync, zero_copy):
        self.prepared += 1
        self.groups.append(group)

        def launch(x):
            self.launched += 1
            return collective.gather_hidden(x, hidden_widths, group)

        return launch


def _ints(rank, T, width=3):
    return torch.arange(T * width, dtype=torch.int32).reshape(T, width) + 100 * rank


def _want(world_size, T, width=3):
    return torch.cat([_ints(r, T, width) for r in range(world_size)], -1)


def _ranks(rank, world_size):
    name = dist.group.WORLD.group_name
    toy = CountingToy()
    dispatch.register_backend(toy, before="gloo")
    op = torch.ops.tpfuse.all_gather_hidden
    seen = {}
    exact = True
    try:
        for _ in range(5):
            exact &= torch.equal(op(_ints(rank, 2), [3] * world_size, name), _want(world_size, 2))
        seen["repeated"] = (toy.prepared, toy.launched)
        exact &= torch.equal(op(_ints(rank, 4), [3] * world_size, name), _want(world_size, 4))
        seen["new_shape"] = (toy.prepared, toy.launched)
        os.environ["TPFUSE_BACKEND"] = "gloo"  # a dispatch variable changed: gloo runs, the toy is not asked
        try:
            gloo_before = dispatch.chosen["gloo"]
            exact &= torch.equal(op(_ints(rank, 2), [3] * world_size, name), _want(world_size, 2))
            seen["forced_gloo"] = (toy.prepared, toy.launched, dispatch.chosen["gloo"] - gloo_before)
        finally:
            del os.environ["TPFUSE_BACKEND"]
        exact &= torch.equal(op(_ints(rank, 2), [3] * world_size, name), _want(world_size, 2))
        seen["unset_again"] = (toy.prepared, toy.launched)
        # A mode below Autograd sees the call (the second dispatcher hop is kept for it).
        from torch.utils._python_dispatch import TorchDispatchMode

        class Recorder(TorchDispatchMode):
            ops = []

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                self.ops.append(str(func))
                return func(*args, **(kwargs or {}))

        with Recorder():
            exact &= torch.equal(op(_ints(rank, 2), [3] * world_size, name), _want(world_size, 2))
        seen["mode_saw"] = [o for o in Recorder.ops if "all_gather_hidden" in o]
    finally:
        dispatch.unregister_backend("toy")
    seen["after_unregister_kept"] = len(launchers._launchers)
    exact &= torch.equal(op(_ints(rank, 2), [3] * world_size, name), _want(world_size, 2))
    seen["toy_after_unregister"] = (toy.prepared, toy.launched)
    seen["exact"] = exact
    return seen


def test_a_repeated_call_launches_what_its_first_call_prepared():
    for res in run_ranks(2, _ranks):
        assert res["exact"]
        assert res["repeated"] == (1, 5)  # prepared once, launched five times
        assert res["new_shape"] == (2, 6)  # another T: prepared again
        assert res["forced_gloo"] == (2, 6, 1)  # TPFUSE_BACKEND=gloo: the kept toy launcher is not used
        assert res["unset_again"] == (2, 7)  # back to the first key: its launcher again
        assert res["mode_saw"] == ["tpfuse.all_gather_hidden.default"]
        assert res["after_unregister_kept"] == 0  # removing a backend drops every launcher
        assert res["toy_after_unregister"] == (2, 8)  # the mode's call still reached the toy once


def _recreated(rank, world_size, second_port):
    toy = CountingToy()
    dispatch.register_backend(toy, before="gloo")
    try:
        outs = []
        for round_ in range(2):
            if round_:
                dist.destroy_process_group()
                os.environ["MASTER_PORT"] = str(second_port)
                dist.init_process_group("gloo", rank=rank, world_size=world_size)
            name = dist.group.WORLD.group_name
            outs.append(torch.equal(torch.ops.tpfuse.all_gather_hidden(_ints(rank, 2), [3] * world_size, name),
                                    _want(world_size, 2)))
        return {"exact": outs, "prepared": toy.prepared, "same_group": toy.groups[0] is toy.groups[1],
                "new_pg": toy.groups[1].pg is dist.group.WORLD}
    finally:
        dispatch.unregister_backend("toy")


def test_a_recreated_group_never_reaches_the_old_groups_launcher():
    for res in run_ranks(2, _recreated, free_port()):
        assert res["exact"] == [True, True]
        assert res["prepared"] == 2 and not res["same_group"] and res["new_pg"]
