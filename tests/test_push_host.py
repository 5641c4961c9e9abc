"""Host-side logic of the barrier push, on the CPU: vector width, slot sizing,
timeout reports, and the rank-consistent backend choice (with a stand-in
workspace, since symmetric memory needs GPUs)."""

import numpy as np
import pytest
import torch

from tpfuse.compile_ops import dispatch, failures, workspace as workspaces
from tpfuse.compile_ops.backend import Backend
from tpfuse.compile_ops.barrier import slots
from tpfuse.compile_ops.groups import Group, GroupFacts
from tpfuse.kernels import failure
from tpfuse.kernels.barrier.push_gather import vector_elements
from tpfuse.kernels.compiler import band_offsets


@pytest.mark.parametrize(
    "elem_size, widths, vec",
    [(2, [1024] * 4, 8), (2, [1000] * 4, 8), (2, [1001, 1003], 1), (2, [1002, 1002], 2),
     (4, [4096] * 2, 4), (1, [1792] * 8, 16), (2, [1024, 1536, 2048], 8), (4, [3, 5], 1)],
)
def test_vector_width_divides_every_band(elem_size, widths, vec):
    offsets = band_offsets(widths)
    assert vector_elements(elem_size, offsets) == vec
    assert vec * elem_size <= 16 and all(o % vec == 0 for o in offsets)


def test_slot_sizes_are_powers_of_two_from_one_mib():
    assert slots.slot_bytes_for(1) == slots.MIN_SLOT_BYTES
    assert slots.slot_bytes_for(slots.MIN_SLOT_BYTES + 1) == 2 * slots.MIN_SLOT_BYTES
    size = slots.slot_bytes_for(131_334_144)  # T=512, 4 x 32064 bf16
    assert size >= 131_334_144 and size & (size - 1) == 0


def _fake_workspace(push_ok=True, slot_bytes=1 << 20, multicast=0, code=0):
    group = Group(pg=None, name="g", rank=2, world_size=4)
    facts = GroupFacts(push_ok, "" if push_ok else "no symmetric memory", 8)
    ws = workspaces.Workspace(group, torch.device("cpu"), facts)
    room = slots.slots_of(ws)
    room.slot_bytes, room.multicast_ptr, ws.timeout_ns = slot_bytes, multicast, 2_000_000_000
    ws.status_view = np.array([code, 0], dtype=np.int32)
    return ws


def test_timeout_report_names_op_rank_and_missing_peer():
    failures.raise_if_failed(_fake_workspace(code=0))  # nothing failed: no error
    code = failure.code(failure.ENTRY_TIMEOUT.value, 300, 3)  # entry barrier, block 300, peer 3
    with pytest.raises(RuntimeError) as err:
        failures.raise_if_failed(_fake_workspace(code=code))
    message = str(err.value)
    assert "tpfuse::all_gather_hidden: rank 2 of group 'g'" in message
    assert "entry barrier (block 300)" in message and "waiting for rank 3" in message
    assert "after 2s" in message


def choose(group, tokens=1, width=256, dtype=torch.bfloat16):
    return dispatch.choose_backend("cuda", dtype, [width] * group.world_size, group, tokens)


def test_push_when_the_group_agreed_on_it(fake_cuda, monkeypatch):
    ws = fake_cuda(_fake_workspace())
    assert choose(ws.group) == Backend.P2P
    monkeypatch.setenv("TPFUSE_BACKEND", "nccl")
    assert choose(ws.group) == Backend.NCCL


def test_nccl_when_a_rank_cannot_push_and_p2p_forcing_says_why(fake_cuda, monkeypatch):
    ws = fake_cuda(_fake_workspace(push_ok=False))
    assert choose(ws.group) == Backend.NCCL
    monkeypatch.setenv("TPFUSE_BACKEND", "p2p")
    with pytest.raises(RuntimeError, match="no symmetric memory"):
        choose(ws.group)


def test_size_policy_and_forcing(fake_cuda, monkeypatch):
    ws = fake_cuda(_fake_workspace(slot_bytes=1 << 30))
    monkeypatch.setenv("TPFUSE_PUSH_MAX_BYTES", str(1 << 20))
    assert choose(ws.group, tokens=1024) == Backend.NCCL  # 2 MiB of bf16 > 1 MiB: NCCL
    monkeypatch.setenv("TPFUSE_BACKEND", "p2p")
    assert choose(ws.group, tokens=1024) == Backend.P2P
    monkeypatch.delenv("TPFUSE_BACKEND")
    assert choose(ws.group, tokens=2**21) == Backend.NCCL  # 2**31 elements: beyond 32-bit indexing


def test_graph_capture_never_sets_up_or_grows(fake_cuda, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    group = Group(pg=None, name="unseen", rank=0, world_size=2)
    assert choose(group) == Backend.NCCL  # not set up: no collective inside a capture
    ws = fake_cuda(_fake_workspace(slot_bytes=1 << 20))
    assert choose(ws.group, tokens=1) == Backend.P2P  # fits: fine under capture
    assert choose(ws.group, tokens=1 << 14) == Backend.NCCL  # 32 MiB would grow the slots: NCCL
    monkeypatch.setenv("TPFUSE_BACKEND", "p2p")
    with pytest.raises(RuntimeError, match="eager call"):
        choose(ws.group, tokens=1 << 14)


def test_multimem_only_with_a_multicast_address_and_opt_in(fake_cuda, monkeypatch):
    ws = fake_cuda(_fake_workspace(multicast=0))
    monkeypatch.setenv("TPFUSE_ENABLE_MULTIMEM", "1")
    assert choose(ws.group) == Backend.P2P  # our hosts: multicast_ptr == 0
    slots.slots_of(ws).multicast_ptr = 0x7F0000000000
    assert choose(ws.group) == Backend.MULTIMEM
    # One multimem.st moves 16 bytes: bands of 1001 bf16 (2002 bytes) go through p2p on every rank, chosen
    # by the multimem backend's own refusal, not by a second choice in its launcher.
    assert choose(ws.group, width=1001) == Backend.P2P
    monkeypatch.delenv("TPFUSE_ENABLE_MULTIMEM")
    assert choose(ws.group) == Backend.P2P


def test_w8_signal_pads_and_status_word_fit():
    """TP=8 without an 8-GPU machine: the sizing arithmetic at W=8.

    H100 and H200 have 132 SMs; the grid cap is 2 blocks per SM by default."""
    from tpfuse.compile_ops.workspace import MAX_PUSH_WORLD_SIZE
    from tpfuse.kernels.barrier import blocks_that_fit, signal_pad_bytes

    assert MAX_PUSH_WORLD_SIZE >= 8
    blocks = 132 * 2
    need = signal_pad_bytes(blocks, 8)
    assert need == 264 * 8 * 4 == 8448
    assert need <= 9216  # torch's default signal pad: no resize needed at W=8
    assert blocks_that_fit(blocks, 8, 9216) == blocks
    # 3 blocks per SM would need a larger pad; if it could not be enlarged (a
    # symmetric allocation came first) the grid shrinks to what the pad holds.
    assert signal_pad_bytes(132 * 3, 8) == 12672 > 9216
    assert blocks_that_fit(132 * 3, 8, 9216) == 9216 // 32 == 288
    # The status word names every block and peer of W=8 (kernels/failure.py encodes it).
    code = failure.code(failure.EXIT_TIMEOUT.value, blocks - 1, 7)
    assert failure.describe(code) == ("exit barrier", blocks - 1, 7)


def test_tma_scratch_is_the_plans_own_buffer_and_the_allocator_is_restored():
    """The fused kernel's TMA variant: Triton's launcher asks its allocator for descriptor
    scratch at every launch; the plan answers with one buffer it keeps (valid across CUDA-graph
    replays), refuses a request larger than it, and leaves the user's allocator as it was."""
    from triton.runtime import _allocation

    from tpfuse.compile_ops import linear_push
    from tpfuse.compile_ops.compiled import Compiled

    got = []

    def run(*args):  # stands in for Triton's launcher: asks for grid x per-block bytes
        got.append(_allocation._allocator.get()(args[0] * 128, 64, None))  # torch's CPU allocations: 64-aligned

    plan = linear_push.LinearPlan(Compiled(run, None, None, (), None), {}, False,
                                  scratch=torch.empty(4 * 128, dtype=torch.uint8))
    before = _allocation._allocator.get()
    linear_push._launch_with_scratch(plan, (4, 1, 1))
    assert got[0] is plan.scratch and _allocation._allocator.get() is before
    with pytest.raises(RuntimeError, match="TMA scratch of 640 bytes .* the plan keeps 512 bytes"):
        linear_push._launch_with_scratch(plan, (5, 1, 1))
    assert _allocation._allocator.get() is before


def test_a_workspace_dies_with_its_group(monkeypatch):
    """destroy_process_group + a new group under the same name: the old workspace is never reached again."""
    old_pg, new_pg = object(), object()
    old = workspaces.Workspace(Group(pg=old_pg, name="tp", rank=0, world_size=2), torch.device("cpu"),
                               GroupFacts(True, "", 8))
    monkeypatch.setitem(workspaces._workspaces, ("tp", 0), old)
    assert workspaces.workspace(Group(pg=old_pg, name="tp", rank=0, world_size=2), 0, establish=False) is old
    made = []

    def establish(group, device):
        made.append(group.pg)
        return workspaces.Workspace(group, device, GroupFacts(True, "", 8))

    monkeypatch.setattr(workspaces, "_establish", establish)
    new_group = Group(pg=new_pg, name="tp", rank=0, world_size=2)
    assert workspaces.workspace(new_group, 0, establish=False) is None  # the old one is not handed out
    fresh = workspaces.workspace(new_group, 0)
    assert made == [new_pg] and fresh is not old and fresh.group.pg is new_pg
    assert old in workspaces._retired_workspaces
    workspaces._retired_workspaces.remove(old)
