"""The flag protocol on the CPU: its layout facts, the kernel in Triton's interpreter (with the
negative controls), and the rank-consistent choice between the flag protocol and the barrier push."""

import numpy as np
import pytest
import torch

from tpfuse.compile_ops import dispatch, failures, workspace as workspaces
from tpfuse.compile_ops.backend import Backend
from tpfuse.compile_ops.barrier import slots
from tpfuse.compile_ops.flag import buffers, evidence
from tpfuse.compile_ops.flag.evidence import FlagEvidence
from tpfuse.compile_ops.groups import Group, GroupFacts
from tpfuse.kernels import failure
from tpfuse.kernels import flag as flag_protocol

import interpreter_support


def test_units_carry_four_data_bytes_and_pad_to_16_byte_pairs():
    assert flag_protocol.UNIT_BYTES == 8 and flag_protocol.DATA_BYTES == 4 and flag_protocol.WIRE_OVERHEAD == 2
    assert flag_protocol.units_for(4096, 2) == 2048  # T=1 x 4096 bf16
    assert flag_protocol.units_for(7, 2) == 4  # 14 bytes -> 4 words -> 2 pairs
    assert flag_protocol.units_for(5, 1) == 2  # 5 bytes -> 2 words
    assert flag_protocol.units_for(3, 4) == 4  # 3 words -> padded to 2 pairs


def test_buffer_holds_both_parities_and_one_region_per_source():
    W, slab = 4, flag_protocol.MAX_SLAB_BYTES
    units = flag_protocol.region_units(slab)
    assert units == flag_protocol.units_for(slab, 1) and units % 2 == 0  # whole 16-byte pairs
    assert flag_protocol.buffer_bytes(W, slab) == flag_protocol.PARITIES * W * units * 8 == 4 << 20  # 4 MiB at W=4
    assert flag_protocol.PARITIES >= 2  # the proof that replaces the entry barrier needs two buffers


@pytest.fixture(scope="module")
def interpreted():
    pytest.importorskip("triton")
    return interpreter_support.interpret("interpret_flag_gather.py")


def test_interpreter_bit_exact_with_T_and_grid_changing(interpreted):
    cases = interpreted["cases"]
    assert cases and all(c["exact"] for c in cases), [c for c in cases if not c["exact"]]
    assert all(not any(c["status"]) for c in cases)
    assert {c["elem"] for c in cases} == {1, 2, 4}
    assert len({c["nblocks"] for c in cases}) > 1  # the grid changed between calls of one group
    assert [c["epoch"] for c in cases[:5]] == [1, 2, 3, 4, 5]


def test_interpreter_parity_lets_a_peer_run_one_call_ahead(interpreted):
    assert interpreted["ahead"] == {"exact": True, "status": 0}


def test_interpreter_negative_control_one_buffer(interpreted):
    # The epoch check refuses the overwritten units (the wait gives up, naming peer 1) ...
    assert not interpreted["ahead_one_buffer"]["exact"]
    assert failure.describe(interpreted["ahead_one_buffer"]["status"]) == ("flag wait", 0, 1)
    # ... and without it the overwrite is silent corruption.
    assert interpreted["ahead_one_buffer_accept_stale"] == {"exact": False, "status": 0}


def test_interpreter_negative_control_stale_epoch(interpreted):
    # Data not there yet: the protocol waits and reports the peer, never reads the old call's units,
    # and the result holds poison, not the old call's bytes ...
    assert not interpreted["stale"]["exact"] and failure.describe(interpreted["stale"]["status"]) == ("flag wait", 0, 1)
    assert interpreted["stale"]["poisoned"] and interpreted["stale"]["call"] == 5
    # ... a receiver that accepts stale epochs returns them silently.
    accepted = interpreted["stale_accepted"]
    assert (accepted["exact"], accepted["status"], accepted["poisoned"]) == (False, 0, False)


def test_interpreter_timed_out_call_poisons_its_whole_result_and_names_the_call(interpreted):
    """Rank 1 never arrives at call 2: rank 0's result is all poison (never its prefill, never rank 0's own
    band alone), the status names the flag wait, block 0, peer 1 (or the first peer that is missing), and call 2."""
    for case in interpreted["missing"]:
        assert case["poisoned"], case
        which, _, peer = failure.describe(case["status"])
        assert which == "flag wait" and case["call"] == 2 and peer in (1, 2), case


def test_interpreter_clear_every_call_stays_exact(interpreted):
    assert interpreted["clear"] == {"exact": True, "parity0_zeroed": True, "status": [0, 0, 0]}


def test_interpreter_epochs_skip_zero_and_keep_alternating_parity_across_the_wrap(interpreted):
    """The kernel's own ``next_epoch``, run from slots at 0xFFFFFFFE: 0xFFFFFFFF (odd), then 2 (even) and 3,
    never 0 ("never written") nor 1 (a second odd call in a row would land in the buffer just read)."""
    calls = interpreted["wrap"]
    assert [c["epoch"] for c in calls] == [0xFFFFFFFF, 2, 3]
    assert all(c["exact"] and c["slots_agree"] and not any(c["status"]) for c in calls), calls


def test_interpreter_units_land_in_the_documented_regions(interpreted):
    """The kernel's own ``region_offset``: source s's units in region (parity, s) of each receiver, parity-major,
    nothing elsewhere (docs/flag_protocol.md, "Units and layout").  A layout that every rank gets equally wrong
    still returns exact results, so only this check sees it."""
    assert interpreted["layout"] == {"exact": True, "placed": [True, True, True], "status": [0, 0, 0]}


# --------------------------------------------------------------------------- the choice


def _fake_workspace(device_name="NVIDIA H200", world_size=4, flags=True):
    group = Group(pg=None, name="g", rank=1, world_size=world_size)
    ws = workspaces.Workspace(group, torch.device("cpu"), GroupFacts(True, "", 8, device_name))
    slots.slots_of(ws).slot_bytes, ws.timeout_ns = 1 << 20, 2_000_000_000
    ws.status_view = np.array([0], dtype=np.int32)
    if flags:  # set up: no collective needed
        ws.protocols[buffers.NAME] = object()
    return ws


#: a stand-in evidence entry: measured and suite-passed (the files are never read at run time)
SHOWN = FlagEvidence(64 << 10, "benchmarks/results/stand_in.json", "benchmarks/results/stand_in.log")


@pytest.fixture
def fake_cuda(fake_cuda, monkeypatch):
    """The shared stand-in (tests/conftest.py), with evidence for H200 at W=4 only (not the real table's)."""
    monkeypatch.setattr(evidence, "FLAG_CROSSOVER", {("NVIDIA H200", 4): SHOWN})
    return fake_cuda


def choose(group, tokens, width=4096, dtype=torch.bfloat16, fused_linear=False):
    return dispatch.choose_backend("cuda", dtype, [width] * group.world_size, group, tokens, fused_linear)


def test_flag_up_to_the_measured_crossover_then_barrier_push(fake_cuda):
    ws = fake_cuda(_fake_workspace())
    assert choose(ws.group, 1) == Backend.FLAG  # 8 KiB slab
    assert choose(ws.group, 8) == Backend.FLAG  # 64 KiB: at the crossover
    assert choose(ws.group, 9) == Backend.P2P  # above it
    # The flag protocol has no fused linear kernel: the fused op's calls never take it.
    assert choose(ws.group, 1, fused_linear=True) == Backend.P2P


def test_unmeasured_device_or_world_size_keeps_the_barrier_push_and_says_why(fake_cuda):
    for ws in (_fake_workspace(device_name="NVIDIA H100 80GB HBM3"), _fake_workspace(world_size=2)):
        fake_cuda(ws)
        assert choose(ws.group, 1) == Backend.P2P
    limit, why = evidence.flag_limit("NVIDIA H100 80GB HBM3", 4)
    assert limit == 0 and why == "flag protocol not measured on NVIDIA H100 80GB HBM3 at W=4"
    limit, why = evidence.flag_limit("", 4)  # ranks with different GPU models: no agreed name
    assert limit == 0 and "this device" in why


def test_forcing_and_the_override(fake_cuda, monkeypatch):
    ws = fake_cuda(_fake_workspace(device_name="unmeasured"))
    monkeypatch.setenv("TPFUSE_BACKEND", "flag")
    assert choose(ws.group, 32) == Backend.FLAG
    # The fused op's calls are not forced onto a backend that takes none: they choose as under auto.
    assert choose(ws.group, 1, fused_linear=True) == Backend.P2P
    with pytest.raises(RuntimeError, match="exceeds the flag buffers"):
        choose(ws.group, 33)  # 264 KiB slab > 256 KiB
    monkeypatch.setenv("TPFUSE_BACKEND", "p2p")
    assert choose(ws.group, 1) == Backend.P2P
    monkeypatch.delenv("TPFUSE_BACKEND")
    monkeypatch.setenv("TPFUSE_FLAG_MAX_BYTES", str(16 << 10))
    assert choose(ws.group, 2) == Backend.FLAG and choose(ws.group, 3) == Backend.P2P


def test_capture_never_sets_the_flag_buffers_up(fake_cuda, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    ws = fake_cuda(_fake_workspace(flags=False))
    assert choose(ws.group, 1) == Backend.P2P  # every rank captures the same calls: the same choice
    monkeypatch.setenv("TPFUSE_BACKEND", "flag")
    with pytest.raises(RuntimeError, match="eager call before graph capture"):
        choose(ws.group, 1)


def test_flag_timeout_report_names_the_missing_rank():
    ws = _fake_workspace()
    ws.status_view = np.array([failure.code(failure.FLAG_TIMEOUT.value, 5, 2), 12], dtype=np.int32)
    with pytest.raises(RuntimeError, match=r"timed out in the flag wait \(block 5\) of call 12 .* after 2s waiting for rank 2"):
        failures.raise_if_failed(ws)


# --------------------------------------------------------------------------- the passes


def test_pass_reports_the_protocol_and_never_claims_a_barrier_the_flag_protocol_lacks(planning):
    """A post-grad-like graph on (fake) CUDA tensors: the small gather is reported as the flag protocol,
    with no saved barrier and as a fence without an exit barrier; the large one as p2p (the barrier push),
    whose skipped entry barrier is a real saving."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    from tpfuse.passes.barrier_elision import decide_barriers

    planning.setenv("TPFUSE_FLAG_MAX_BYTES", str(64 << 10))

    def two_gathers(x, y, a, b):
        h1 = torch.ops.tpfuse.all_gather_hidden(x @ a, [8, 8], "0")  # 4 x 8 bf16: a 64-byte slab
        h2 = torch.ops.tpfuse.all_gather_hidden(y @ b + h1.sum(), [8, 8], "0")  # 8192 x 8: 128 KiB
        return h2

    with FakeTensorMode():
        args = [torch.empty(s, device="cuda", dtype=torch.bfloat16) for s in ((4, 16), (8192, 16), (16, 8), (16, 8))]
        graph = make_fx(two_gathers)(*args).graph
    small, large = decide_barriers(graph)
    assert small.protocol == "flag" and "TPFUSE_FLAG_MAX_BYTES" in small.protocol_reason
    assert not small.saves_a_barrier
    assert str(small).startswith(f"{small.gather} group '0': no barriers, flag protocol")
    assert large.protocol == "p2p", large.protocol_reason
    assert large.protocol_reason.startswith("flag refuses: a 131072-byte slab is above the crossover "
                                            "(TPFUSE_FLAG_MAX_BYTES: 65536 bytes)")
    assert large.skip_entry_sync and large.saves_a_barrier
    assert "flag protocol: finished on one rank = started on every rank" in large.reason
    assert "exit barrier of" not in large.reason

    planning.delenv("TPFUSE_FLAG_MAX_BYTES")  # nothing measured (the table is empty here)
    with FakeTensorMode():
        args = [torch.empty(s, device="cuda", dtype=torch.bfloat16) for s in ((4, 16), (8192, 16), (16, 8), (16, 8))]
        graph = make_fx(two_gathers)(*args).graph
    assert [d.protocol for d in decide_barriers(graph)] == ["p2p"] * 2
    assert ("flag refuses: flag protocol not measured on stand-in GPU at W=2"
            in decide_barriers(graph)[0].protocol_reason)


def test_planned_backend_asks_the_backends_own_refusals(planning):
    """The plan walks the backends in dispatch's order and takes the first whose refusal is empty, giving the
    refusals it passed: no rule of its own that could drift from the choice."""
    plan = dispatch.planned_backend
    assert plan("cuda", torch.bfloat16, 4, [8, 8]) == (
        "p2p", "flag refuses: flag protocol not measured on stand-in GPU at W=2; "
               "multimem refuses: TPFUSE_ENABLE_MULTIMEM is not 1")
    assert plan("cuda", torch.bfloat16, None, [8, 8])[0] == "per call"  # T symbolic: the sizes decide per call
    assert plan("cpu", torch.bfloat16, 4, [8, 8]) == ("gloo", "cpu tensors go through gloo")
    assert plan("mps", torch.bfloat16, 4, [8, 8])[0] == "none"
    planning.setenv("TPFUSE_ENABLE_MULTIMEM", "1")  # the multicast push, where the group has an address
    assert plan("cuda", torch.bfloat16, 4, [8, 8])[0] == "multimem"
    assert plan("cuda", torch.bfloat16, 4, [9, 9])[0] == "p2p"  # 18-byte bands: no whole 16-byte vectors
    planning.delenv("TPFUSE_ENABLE_MULTIMEM")
    planning.setenv("TPFUSE_PUSH_MAX_BYTES", str(1 << 10))
    name, why = plan("cuda", torch.bfloat16, 64, [8, 8])  # 2 KiB of output
    assert name == "nccl" and "p2p refuses: 2048 output bytes are above TPFUSE_PUSH_MAX_BYTES" in why
    planning.delenv("TPFUSE_PUSH_MAX_BYTES")
    planning.setenv("TPFUSE_BACKEND", "flag")
    assert plan("cuda", torch.bfloat16, 4, [8, 8]) == ("flag", "TPFUSE_BACKEND=flag")
    name, why = plan("cuda", torch.bfloat16, 1 << 20, [8, 8])  # a 16 MiB slab: the forced protocol refuses
    assert name == "none" and "exceeds the flag buffers" in why and "the call raises" in why
    planning.setenv("TPFUSE_BACKEND", "nccl")
    assert plan("cuda", torch.bfloat16, 4, [8, 8]) == ("nccl", "TPFUSE_BACKEND=nccl")


def test_planned_backend_follows_the_evidence_for_the_local_gpu_model(planning):
    """The local GPU model stands in for the group's agreed one: an entry that shows the protocol is taken."""
    planning.setattr(evidence, "FLAG_CROSSOVER", {("stand-in GPU", 2): SHOWN})
    assert dispatch.planned_backend("cuda", torch.bfloat16, 4, [8, 8]) == (
        "flag", "a 64-byte slab, within the flag protocol's 65536 bytes (measured crossover on stand-in GPU at W=2)")
    assert dispatch.planned_backend("cuda", torch.bfloat16, 4, [8, 8, 8, 8])[0] == "p2p"  # W=4: not measured


def test_report_shows_no_barrier_for_a_flag_gather(planning):
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    from tpfuse.passes import Report
    from tpfuse.passes.barrier_elision import decide_barriers
    from tpfuse.passes.records import GraphReport

    planning.setenv("TPFUSE_FLAG_MAX_BYTES", str(64 << 10))

    def one_gather(x, a):
        return torch.ops.tpfuse.all_gather_hidden(x @ a, [8, 8], "0")

    with FakeTensorMode():
        graph = make_fx(one_gather)(torch.empty(4, 16, device="cuda", dtype=torch.bfloat16),
                                    torch.empty(16, 8, device="cuda", dtype=torch.bfloat16)).graph
    decisions = decide_barriers(graph)
    report = GraphReport(0, "0/0", 0, barriers=decisions, devices={d.gather: "cuda" for d in decisions})
    text = str(Report([report]))
    assert "| flag    | -    | none (flag)   | copied" in text, text
    assert "no barriers, flag protocol: a 64-byte slab" in text, text
    assert "skipped" not in text, text
