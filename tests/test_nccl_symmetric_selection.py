"""The nccl_symmetric backend on the CPU (compile_ops/nccl_symmetric/; docs/op.md, docs/tuning.md).

What its refusals say (with stand-in version facts and torch features), how the group's windows are agreed on,
grown and released (with a stand-in registration), that ``auto`` takes it only where the agreed tuned config has
a passing nccl_symmetric record and a crossover for it, that ``TPFUSE_BACKEND=nccl_symmetric`` forces it or
raises its reason, what the plan reports, and that the tune measures the backend's own code.  The windows and
NCCL's kernels themselves run on GPUs only: tests/gpu/test_nccl_symmetric.py.
"""

import inspect
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist

from test_tuned_configs import make_config, record
from tpfuse import tune_gpu
from tpfuse.compile_ops import dispatch, launchers, tuned
from tpfuse.compile_ops import workspace as workspaces
from tpfuse.compile_ops.backend import Backend, GatherCall
from tpfuse.compile_ops.barrier import slots
from tpfuse.compile_ops.groups import Group, GroupFacts
from tpfuse.compile_ops.nccl_symmetric import NCCL_SYMMETRIC, support, windows

GPU = "FAKE GPU 80GB"
#: the stand-in config's crossovers (W=2, bf16, width 1024): p2p up to 128 KiB of output, nccl_symmetric to 512 KiB
P2P_UP_TO, SYMMETRIC_UP_TO = 128 << 10, 512 << 10


# --------------------------------------------------------------------------- stand-ins


class FakeNcclBackend:
    """A ProcessGroupNCCL as the windows see it: its allocator, and (de)registration it records."""

    mem_allocator = "ncclMemAlloc"

    def __init__(self):
        self.registered, self.deregistered = [], []

    def register_mem_pool(self, pool, symm=False):
        assert symm, "windows must be registered as symmetric"
        self.registered.append(pool)

    def deregister_mem_pool(self, pool):
        self.deregistered.append(pool)


class OldTorchBackend(FakeNcclBackend):
    def register_mem_pool(self, pool):  # a torch whose register_mem_pool takes no symm
        self.registered.append(pool)


@pytest.fixture
def software(monkeypatch):
    """This process has NCCL 2.27.3, a torch that registers symmetric windows and NVLS off; its ranks all answer
    alike (``every_rank``); allocation hands out stand-in pools on ``software.backend``."""
    monkeypatch.setattr(support, "nccl_version", lambda: (2, 27, 3))
    monkeypatch.setattr(support, "torch_refusal", lambda: "")
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "0")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(windows, "every_rank", lambda ws, text: [text] * ws.group.world_size)
    state = type("Software", (), {})()
    state.backend, state.allocated = FakeNcclBackend(), []

    def allocate(ws, slab_bytes):
        state.allocated.append(slab_bytes)
        pool = f"pool{len(state.allocated)}"
        return (state.backend, pool, torch.empty(slab_bytes, dtype=torch.uint8),
                torch.empty(ws.group.world_size * slab_bytes, dtype=torch.uint8)), ""

    monkeypatch.setattr(windows, "_allocate", allocate)
    return state


def fake_workspace(selection=None, backend="nccl", W=2):
    group = Group(pg=None, name="g", rank=0, world_size=W, backend=backend)
    ws = workspaces.Workspace(group, torch.device("cpu"), GroupFacts(True, "", 8, GPU, selection))
    slots.slots_of(ws).slot_bytes, ws.timeout_ns = 64 << 20, 2_000_000_000  # p2p's slots: no growth here
    ws.status_view = np.array([0, 0], dtype=np.int32)
    return ws


def symmetric_config(**record_change):
    """make_config's machine, with nccl_symmetric measured: no slower than nccl up to 512 KiB of output."""
    data = make_config()
    for row, us in zip(data["rows"], (10.0, 10.0, 10.0, 10.0)):
        for mode in ("graph", "eager"):
            row[mode]["nccl_symmetric"] = us
    data["protocols"]["nccl_symmetric"] = {"unavailable": "", "correctness": record(**record_change)}
    data["crossovers"]["nccl_symmetric"] = SYMMETRIC_UP_TO
    return data


def selection_of(data, path="/cfg/fake.json"):
    return tuned.selection_of(tuned.parse_config(data, path), "user tuned config")


def choose(ws, tokens, width=1024):
    return dispatch.choose_backend("cuda", torch.bfloat16, [width] * ws.group.world_size, ws.group, tokens)


# --------------------------------------------------------------------------- what it needs, and says


@pytest.mark.parametrize("version, why", [
    ((2, 26, 5), "NCCL 2.26 has no symmetric kernels (2.27 or later)"),
    ((2, 21, 5), "NCCL 2.21 has no symmetric kernels (2.27 or later)"),
    ((2, 27, 3), ""),
    ((2, 28, 9), ""),
    ((3, 0, 0), ""),
    (None, "this torch has no NCCL"),
])
def test_the_nccl_release_decides(version, why):
    assert support.nccl_refusal(version) == why


def test_a_torch_without_symmetric_registration_is_named(monkeypatch):
    class NoSymm:
        def register_mem_pool(self, pool):
            """register_mem_pool(self: ProcessGroupNCCL, pool: torch.cuda.MemPool) -> None"""

    class WithSymm:
        def register_mem_pool(self, pool, symm=False):
            """register_mem_pool(self: ProcessGroupNCCL, pool: torch.cuda.MemPool, symm: bool = False) -> None"""

    monkeypatch.setattr(dist, "ProcessGroupNCCL", WithSymm, raising=False)
    assert support.torch_refusal() == ""
    monkeypatch.setattr(dist, "ProcessGroupNCCL", NoSymm, raising=False)
    assert support.torch_refusal() == (f"this torch cannot register symmetric windows (torch {torch.__version__}: "
                                       "ProcessGroupNCCL.register_mem_pool takes no symm)")
    monkeypatch.delattr(dist, "ProcessGroupNCCL", raising=False)
    assert "no ProcessGroupNCCL.register_mem_pool" in support.torch_refusal()
    monkeypatch.delattr(torch.cuda, "MemPool")
    assert support.torch_refusal().startswith("this torch cannot register symmetric windows")


@pytest.mark.parametrize("value, refused", [("0", False), ("1", True), ("", True), (None, True)])
def test_windows_are_made_only_with_nccl_nvlink_sharp_off(monkeypatch, value, refused):
    if value is None:
        monkeypatch.delenv("NCCL_NVLS_ENABLE", raising=False)
    else:
        monkeypatch.setenv("NCCL_NVLS_ENABLE", value)
    why = support.nvls_refusal()
    assert bool(why) == refused
    assert not refused or why.startswith("NCCL_NVLS_ENABLE is not 0") and "docs/safety.md" in why


def test_a_group_that_is_not_nccl_is_refused():
    assert support.group_refusal(Group(None, "g", 0, 2, "nccl")) == ""
    assert support.group_refusal(Group(None, "g", 0, 2, "cpu:gloo,cuda:nccl")) == ""
    assert support.group_refusal(Group(None, "g", 0, 2, "gloo")).startswith("not a CUDA group (group 'g' runs gloo")


# --------------------------------------------------------------------------- the windows


def test_windows_grow_by_powers_of_two_and_keep_what_they_outgrew(software):
    ws = fake_workspace()
    assert windows.room_refusal(ws, 1000) == ""
    assert software.allocated == [windows.MIN_WINDOW_BYTES] and software.backend.registered == ["pool1"]
    assert windows.room_refusal(ws, windows.MIN_WINDOW_BYTES) == "" and len(software.allocated) == 1  # it fits
    assert windows.room_refusal(ws, 3 * windows.MIN_WINDOW_BYTES) == ""
    state = windows.windows_of(ws)
    assert state.slab_bytes == 4 * windows.MIN_WINDOW_BYTES and state.pool == "pool2"
    assert state.recv.numel() == 2 * state.send.numel() == 2 * state.slab_bytes
    assert [pool for pool, _, _ in state.retired] == ["pool1"]  # queued calls and captured graphs still use it
    launchers.keep("key", None, "nccl_symmetric", lambda x: x)
    windows.release(ws)
    assert software.backend.deregistered == ["pool2", "pool1"] and windows.NAME not in ws.protocols
    assert launchers.find("key", None) is None  # kept launchers held views of the windows


def test_every_rank_refuses_alike_with_the_same_reason(software, monkeypatch):
    ws = fake_workspace()
    # rank 1 runs an older NCCL: every rank gets rank 1's reason, and nothing is allocated or registered
    monkeypatch.setattr(windows, "every_rank", lambda ws, text: [text, "NCCL 2.26 has no symmetric kernels (2.27 "
                                                                       "or later)"])
    why = windows.room_refusal(ws, 1000)
    assert why == "rank 1: NCCL 2.26 has no symmetric kernels (2.27 or later)"
    assert software.allocated == [] and software.backend.registered == []
    monkeypatch.setattr(windows, "every_rank", lambda ws, text: [text] * 2)
    assert windows.room_refusal(ws, 1000) == why  # the refusal sticks to the group: no second set-up
    assert windows.agreed_reason(["x", "x"]) == "x" and windows.agreed_reason(["", ""]) == ""


def test_a_torch_that_rejects_symm_at_registration_is_refused_everywhere(software):
    software.backend = OldTorchBackend()
    ws = fake_workspace()
    why = windows.room_refusal(ws, 1000)
    assert why.startswith("this torch cannot register symmetric windows (") and "symm" in why
    assert software.backend.registered == []


def test_no_collective_under_graph_capture(software, monkeypatch):
    ws = fake_workspace()
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert windows.room_refusal(ws, 1000) == ("the group's NCCL windows must be registered for a 1000-byte slab "
                                              "by an eager call before graph capture")
    assert software.allocated == []


# --------------------------------------------------------------------------- auto and forcing


def test_auto_never_takes_it_by_default(fake_cuda, software, monkeypatch):
    ws = fake_cuda(fake_workspace(tuned.selection_of(None)))
    assert choose(ws, 1) == Backend.P2P
    monkeypatch.setenv("TPFUSE_PUSH_MAX_BYTES", str(1 << 10))  # p2p refuses: the next is nccl, not nccl_symmetric
    assert choose(ws, 64) == Backend.NCCL
    call = GatherCall("cuda", torch.bfloat16, 64, (1024, 1024), ws.group, "auto")
    assert NCCL_SYMMETRIC.refusal(call) == ("auto takes it only from a tuned config with a passing nccl_symmetric "
                                            "record and its crossover (no tuned config (the default): none)")
    assert software.allocated == []  # no windows where auto does not take it


def test_auto_takes_it_within_the_crossover_of_a_passing_record(fake_cuda, software):
    selection = selection_of(symmetric_config())
    assert selection.crossovers == {"flag": 16 << 10, "p2p": P2P_UP_TO, "nccl_symmetric": SYMMETRIC_UP_TO}
    assert "nccl_symmetric up to 524288-byte outputs where p2p does not take the call" in selection.describe()
    ws = fake_cuda(fake_workspace(selection))
    assert choose(ws, 32) == Backend.P2P  # 128 KiB: p2p's
    assert choose(ws, 64) == Backend.NCCL_SYMMETRIC  # 256 KiB: above p2p's crossover, within nccl_symmetric's
    assert choose(ws, 128) == Backend.NCCL_SYMMETRIC  # 512 KiB: at its crossover
    assert choose(ws, 256) == Backend.NCCL  # 1 MiB: above it
    call = GatherCall("cuda", torch.bfloat16, 256, (1024, 1024), ws.group, "auto")
    assert NCCL_SYMMETRIC.refusal(call) == ("a 1048576-byte output is above its crossover with nccl (524288 bytes, "
                                            "user tuned config /cfg/fake.json)")
    assert software.backend.registered == ["pool1"]  # registered once, at the first call it took


@pytest.mark.parametrize("broken, why", [
    (dict(control_detected=False), "the negative control (stale epochs accepted) was not detected"),
    (dict(mismatches=3), "3 wrong result(s) in 1000 calls"),
    (dict(calls=10), "10 stressed calls, fewer than 1000"),
])
def test_a_record_that_does_not_pass_keeps_auto_off_it(fake_cuda, software, broken, why):
    selection = selection_of(symmetric_config(**broken))
    assert "nccl_symmetric" not in selection.crossovers
    assert f"nccl_symmetric crossover unused (nccl_symmetric: {why}" in selection.describe()
    ws = fake_cuda(fake_workspace(selection))
    assert choose(ws, 64) == Backend.NCCL
    call = GatherCall("cuda", torch.bfloat16, 64, (1024, 1024), ws.group, "auto")
    assert NCCL_SYMMETRIC.refusal(call).endswith("(user tuned config /cfg/fake.json: none)")


def test_forcing_takes_it_without_a_config_or_raises_what_is_missing(fake_cuda, software, monkeypatch):
    ws = fake_cuda(fake_workspace(tuned.selection_of(None)))
    monkeypatch.setenv("TPFUSE_BACKEND", "nccl_symmetric")
    assert choose(ws, 1) == Backend.NCCL_SYMMETRIC
    assert choose(ws, 4096) == Backend.NCCL_SYMMETRIC  # no crossover when forced: the windows grow
    assert software.allocated == [windows.MIN_WINDOW_BYTES, 8 << 20]
    gloo = fake_cuda(fake_workspace(backend="gloo"))
    with pytest.raises(RuntimeError, match=r"TPFUSE_BACKEND=nccl_symmetric but that path is unavailable: not a "
                                           r"CUDA group \(group 'g' runs gloo"):
        choose(gloo, 1)


@pytest.mark.parametrize("change, why", [
    (lambda mp: mp.setattr(support, "nccl_version", lambda: (2, 26, 5)),
     "NCCL 2.26 has no symmetric kernels (2.27 or later)"),
    (lambda mp: mp.setattr(support, "torch_refusal",
                           lambda: "this torch cannot register symmetric windows (torch 2.x: no symm)"),
     "this torch cannot register symmetric windows"),
    (lambda mp: mp.setenv("NCCL_NVLS_ENABLE", "1"), "NCCL_NVLS_ENABLE is not 0"),
])
def test_a_forced_call_raises_the_agreed_reason(fake_cuda, software, monkeypatch, change, why):
    ws = fake_cuda(fake_workspace(tuned.selection_of(None)))
    monkeypatch.setenv("TPFUSE_BACKEND", "nccl_symmetric")
    change(monkeypatch)
    with pytest.raises(RuntimeError) as err:
        choose(ws, 1)
    assert str(err.value).startswith(f"tpfuse: TPFUSE_BACKEND=nccl_symmetric but that path is unavailable: {why}")
    assert software.allocated == []


def test_the_fused_op_is_not_forced_onto_it(fake_cuda, software, monkeypatch):
    """No fused kernel here: a fused call chooses as under auto, and its gather (where it runs one) is forced."""
    ws = fake_cuda(fake_workspace(tuned.selection_of(None)))
    monkeypatch.setenv("TPFUSE_BACKEND", "nccl_symmetric")
    fused = dispatch.choose_backend("cuda", torch.bfloat16, [1024, 1024], ws.group, 1, fused_linear=True)
    assert fused == Backend.P2P


# --------------------------------------------------------------------------- the plan and its report


@pytest.fixture
def planning(monkeypatch, tmp_path, software):
    """Compile time on a stand-in GPU whose tuned config (in ``tmp_path``) measured nccl_symmetric."""
    for name in ("TPFUSE_BACKEND", "TPFUSE_FLAG_MAX_BYTES", "TPFUSE_ENABLE_MULTIMEM", "TPFUSE_PUSH_MAX_BYTES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(dispatch, "local_device_name", lambda: GPU)
    data = symmetric_config()
    data["key"] = tuned.local_device_key(GPU).as_dict(2)
    path = tuned.write_config(data, str(tmp_path))
    monkeypatch.setenv("TPFUSE_TUNED_CONFIG_DIR", str(tmp_path))
    tuned.forget()
    yield path
    tuned.forget()


def test_the_plan_names_it_and_the_config_that_decided(planning, monkeypatch):
    path = planning
    name, why = dispatch.planned_backend("cuda", torch.bfloat16, 64, [1024, 1024])
    assert name == "nccl_symmetric", why
    assert "p2p refuses: a 262144-byte output is above its crossover with nccl (131072 bytes" in why
    assert why.endswith(f"a 262144-byte output, within its crossover with nccl (524288 bytes, user tuned config "
                        f"{path})")
    assert dispatch.planned_backend("cuda", torch.bfloat16, None, [1024, 1024])[0] == "per call"
    name, why = dispatch.planned_backend("cuda", torch.bfloat16, 256, [1024, 1024])
    assert name == "nccl" and "nccl_symmetric refuses: a 1048576-byte output is above its crossover" in why
    # this process's NCCL stands in for the group's: an older one plans nccl, saying why
    monkeypatch.setattr(support, "nccl_version", lambda: (2, 26, 5))
    name, why = dispatch.planned_backend("cuda", torch.bfloat16, 64, [1024, 1024])
    assert name == "nccl" and "nccl_symmetric refuses: NCCL 2.26 has no symmetric kernels (2.27 or later)" in why


def test_the_plan_of_a_forced_call(planning, monkeypatch):
    monkeypatch.setenv("TPFUSE_BACKEND", "nccl_symmetric")
    assert dispatch.planned_backend("cuda", torch.bfloat16, 4096, [1024, 1024]) == (
        "nccl_symmetric", "TPFUSE_BACKEND=nccl_symmetric")
    monkeypatch.setattr(support, "nccl_version", lambda: (2, 26, 5))
    name, why = dispatch.planned_backend("cuda", torch.bfloat16, 1, [1024, 1024])
    assert name == "none" and "NCCL 2.26 has no symmetric kernels" in why and "the call raises" in why


# --------------------------------------------------------------------------- the tune measures the backend


def test_the_tune_runner_is_the_backends_code():
    """The runner runs the backend's refusal and launcher: no registration or collective of its own to drift."""
    source = inspect.getsource(tune_gpu.NcclSymmetricRunner)
    assert "NCCL_SYMMETRIC.refusal" in source and "NCCL_SYMMETRIC.prepare" in source
    for copy in ("register_mem_pool", "all_gather", "MemPool", "nccl.version"):
        assert copy not in source, copy
    assert tune_gpu.NcclSymmetricRunner.name == NCCL_SYMMETRIC.name == "nccl_symmetric"
    assert NCCL_SYMMETRIC.name in tuned.PROTOCOLS and NCCL_SYMMETRIC.crossover in tuned.CROSSOVERS


def test_one_name_per_backend_in_the_config_format():
    """The config's protocols and crossovers are the registered backends' names (p2p_entry_elided: p2p with the
    entry barrier a pass elides)."""
    names = {b.name for b in dispatch.BACKENDS}
    assert set(tuned.PROTOCOLS) - {"p2p_entry_elided"} <= names
    assert set(tuned.CROSSOVERS) <= names
    assert all({candidate, baseline, needs} <= names for candidate, baseline, _, needs in
               tuned.CROSSOVERS.values())
    assert os.path.isfile(os.path.join(os.path.dirname(dispatch.__file__), "nccl_symmetric", "backend.py"))


def test_the_report_counts_no_saved_barrier_for_it():
    """A gather planned for nccl_symmetric has no entry barrier: a skip the pass proved saves nothing there."""
    from tpfuse.passes.barrier_elision import BarrierDecision

    def decision(protocol):
        return BarrierDecision("g0", "0", 1, "alternating", True, "proved", False, "", protocol, "")

    assert decision("p2p").saves_a_barrier  # the control: the barrier protocol does save one
    assert not decision("nccl_symmetric").saves_a_barrier and not decision("nccl").saves_a_barrier
