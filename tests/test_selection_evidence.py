"""``auto`` takes the flag protocol only on evidence (docs/flag_protocol.md, "Choosing it: on evidence").

Every entry of the evidence table is recomputed from the benchmark log it names, with
``benchmarks/derive_crossover.py``'s own functions, and every suite log it names is parsed:
an entry can claim no more than its committed files show.  Without a passing suite log
``auto`` keeps the barrier push and says why; the overrides still force the protocol.
"""

import importlib.util
import json
import math
import os
import sys

import numpy as np
import pytest
import torch

from tpfuse.compile_ops import dispatch, workspace as workspaces
from tpfuse.compile_ops.backend import Backend
from tpfuse.compile_ops.barrier import slots
from tpfuse.compile_ops.flag import buffers, evidence
from tpfuse.compile_ops.flag.evidence import FLAG_CROSSOVER, FlagEvidence
from tpfuse.compile_ops.groups import Group, GroupFacts
from tpfuse.kernels.flag import MAX_SLAB_BYTES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("derive_crossover", os.path.join(ROOT, "benchmarks",
                                                                                 "derive_crossover.py"))
derive_crossover = importlib.util.module_from_spec(_spec)
sys.modules["derive_crossover"] = derive_crossover  # its dataclasses look their module up by name
_spec.loader.exec_module(derive_crossover)

H200_W2_LOG = "benchmarks/results/bench_gather_w2_h200_flag.json"


# --------------------------------------------------------------------------- the table against its files


def test_every_entry_matches_the_files_it_names():
    assert FLAG_CROSSOVER, "the table is empty: nothing to check"
    assert derive_crossover.check_table(FLAG_CROSSOVER) == []


def test_the_h200_w2_entry_rederived_from_its_log():
    """The documented numbers: no slab at all over both widths; 0 at width 1024 and 8 KiB at 4096 alone."""
    derivation = derive_crossover.derive(derive_crossover.load(H200_W2_LOG))
    assert derivation.key == ("NVIDIA H200", 2) and derivation.crossover_bytes == 0
    assert derive_crossover.per_width(derivation.rows) == {1024: 0, 4096: 8 << 10}
    # graph replay alone would have taken every row: eager decides it
    assert all(r.flag["graph"] < r.barrier_push["graph"] for r in derivation.rows)
    assert FLAG_CROSSOVER[("NVIDIA H200", 2)].crossover_bytes == 0


def test_an_entry_claiming_more_than_its_log_is_caught(monkeypatch):
    """Negative control: the hand-entered 256 KiB, and a log from another device."""
    claims = {("NVIDIA H200", 2): FlagEvidence(256 << 10, H200_W2_LOG),
              ("NVIDIA H100 80GB HBM3", 2): FlagEvidence(0, H200_W2_LOG),
              ("NVIDIA H200", 4): FlagEvidence(0, "benchmarks/results/no_such_log.json")}
    problems = derive_crossover.check_table(claims)
    assert any("the table says 262144 bytes, the rule on" in p and "gives 0" in p for p in problems), problems
    assert any("was measured on ('NVIDIA H200', 2)" in p for p in problems), problems
    assert any("no_such_log.json is not in the repository" in p for p in problems), problems


# --------------------------------------------------------------------------- the rule


def _row(T, width, flag_graph, push_graph, flag_eager, push_eager):
    return {"T": T, "width": width, "graph": {"tpfuse_flag": flag_graph, "tpfuse_both": push_graph},
            "eager": {"tpfuse_flag": flag_eager, "tpfuse_both": push_eager}}


def _log(rows):
    return {"meta": {"card": "GPU", "W": 4}, "rows": rows}


def test_rule_takes_the_largest_slab_below_which_every_row_of_every_width_passes():
    fast = dict(flag_graph=2.0, push_graph=4.0, flag_eager=20.0, push_eager=20.0)  # a tie counts as no slower
    rows = [_row(T, w, **fast) for w in (1024, 4096) for T in (1, 8, 32)]
    assert derive_crossover.derive(_log(rows)).crossover_bytes == 32 * 4096 * 2
    # Width 4096 slower eager at T=8 (64 KiB): the crossover drops below 64 KiB for width 1024 too.
    rows[4] = _row(8, 4096, 2.0, 4.0, 20.1, 20.0)
    assert derive_crossover.derive(_log(rows)).crossover_bytes == 16 << 10
    # Slower in graph replay at the smallest slab: nothing.
    rows[0] = _row(1, 1024, 4.1, 4.0, 20.0, 20.0)
    d = derive_crossover.derive(_log(rows))
    assert d.crossover_bytes == 0 and d.rows[0].verdict == "slower in graph"


def test_rule_counts_a_row_the_flag_protocol_did_not_run_as_failing():
    rows = [_row(1, 4096, 2.0, 4.0, 20.0, 21.0), _row(64, 4096, math.nan, 6.0, math.nan, 22.0)]
    d = derive_crossover.derive(json.loads(json.dumps(_log(rows))))  # NaN survives the bench's JSON
    assert d.crossover_bytes == 8 << 10 and "not run" in d.rows[-1].verdict


def test_a_log_without_the_sweep_is_refused():
    with pytest.raises(ValueError, match="no rows"):
        derive_crossover.derive(_log([]))


# --------------------------------------------------------------------------- the suite log


@pytest.fixture(scope="module")
def w2_suite():
    nodes = derive_crossover.suite_node_ids(2)
    assert any("test_stress_random_delays" in n for n in nodes) and "test_correctness_bit_exact[2]" in " ".join(nodes)
    assert not any(n.endswith(("[4]", "[4-flag]", "[4-p2p]")) for n in nodes)
    return nodes


def _suite_log(nodes, header="flag suite: device=NVIDIA H200 gpus=2 stress_iters=10000",
               summary=None, outcome=lambda node: "PASSED"):
    lines = [header, "$ -m pytest -v -rA tests/gpu/test_flag_gather.py"]
    lines += [f"{n} {outcome(n)} [ 50%]" for n in nodes]
    lines.append("=========================== short test summary info ============================")
    lines += [f"{outcome(n)} {n}" for n in nodes]
    lines.append(summary or f"================= {len(nodes)} passed, 7 skipped in 612.00s (0:10:12) =================")
    return "\n".join(lines)


def test_a_whole_passing_suite_log_is_accepted(w2_suite):
    assert derive_crossover.suite_refusal(_suite_log(w2_suite), "NVIDIA H200", 2, w2_suite) == ""


@pytest.mark.parametrize("change, why", [
    (dict(header="NVIDIA H200 x2"), "no header line"),
    (dict(header="flag suite: device=NVIDIA H100 80GB HBM3 gpus=2 stress_iters=10000"), "not 'NVIDIA H200'"),
    (dict(header="flag suite: device=NVIDIA H200 gpus=2 stress_iters=100"), "ran 100 calls"),
    (dict(outcome=lambda n: "FAILED" if "stress" in n else "PASSED"), "failed, first"),
    (dict(outcome=lambda n: "SKIPPED" if "stress" in n else "PASSED"), "not listed as PASSED"),
    (dict(summary="2 passed, 8 deselected in 42.29s"), "nothing failed or deselected"),
    (dict(summary="5 passed, 1 failed in 42.29s"), "nothing failed or deselected"),
    (dict(summary="(cut short)"), "no pytest summary line"),
])
def test_a_suite_log_short_of_the_whole_suite_is_refused(w2_suite, change, why):
    assert why in derive_crossover.suite_refusal(_suite_log(w2_suite, **change), "NVIDIA H200", 2, w2_suite)


def test_the_suite_must_hold_its_correctness_and_stress_tests(w2_suite):
    without_stress = [n for n in w2_suite if "stress" not in n]
    why = derive_crossover.suite_refusal(_suite_log(without_stress), "NVIDIA H200", 2, without_stress)
    assert "has no test_stress_random_delays_and_interleaving_bit_exact at W=2" in why


def test_the_committed_w2_h200_test_log_is_not_a_suite_pass(w2_suite):
    """The only real-GPU log of the suite ran 2 of its tests ("2 passed, 8 deselected")."""
    with open(os.path.join(ROOT, "benchmarks/results/flag_gather_w2_h200_tests.log"), encoding="utf-8") as f:
        assert derive_crossover.suite_refusal(f.read(), "NVIDIA H200", 2, w2_suite) != ""


def test_a_claimed_suite_log_that_does_not_pass_is_caught(monkeypatch):
    claims = {("NVIDIA H200", 2): FlagEvidence(0, H200_W2_LOG, "benchmarks/results/flag_gather_w2_h200_tests.log")}
    problems = derive_crossover.check_table(claims)
    assert len(problems) == 1 and "flag_gather_w2_h200_tests.log: no header line" in problems[0], problems


# --------------------------------------------------------------------------- what auto does with it


def _workspace(device_name, world_size):
    group = Group(pg=None, name="g", rank=1, world_size=world_size)
    ws = workspaces.Workspace(group, torch.device("cpu"), GroupFacts(True, "", 8, device_name))
    slots.slots_of(ws).slot_bytes, ws.timeout_ns = 1 << 20, 2_000_000_000
    ws.status_view = np.array([0], dtype=np.int32)
    ws.protocols[buffers.NAME] = object()  # set up: no collective needed
    return ws


def _choose(group, tokens, width=4096):
    return dispatch.choose_backend("cuda", torch.bfloat16, [width] * group.world_size, group, tokens)


@pytest.fixture
def planning(monkeypatch):
    """The compile-time plan on a stand-in H200, whatever machine runs the test; no forcing variable."""
    for name in ("TPFUSE_BACKEND", "TPFUSE_FLAG_MAX_BYTES", "TPFUSE_ENABLE_MULTIMEM", "TPFUSE_PUSH_MAX_BYTES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(dispatch, "local_device_name", lambda: "NVIDIA H200")
    return monkeypatch


MEASURED = FlagEvidence(64 << 10, "bench.json")  # the files are read by the checks above, never at run time
PASSED = FlagEvidence(64 << 10, "bench.json", "suite.log")


def test_without_a_suite_log_auto_keeps_the_barrier_push_and_says_why(fake_cuda, planning):
    monkeypatch = planning
    monkeypatch.setattr(evidence, "FLAG_CROSSOVER", {("NVIDIA H200", 2): MEASURED})
    ws = fake_cuda(_workspace("NVIDIA H200", 2))
    assert _choose(ws.group, 1) == Backend.P2P
    why = "flag protocol: no committed passing multi-GPU suite for NVIDIA H200 at W=2"
    assert evidence.flag_limit("NVIDIA H200", 2) == (0, why)
    name, reason = dispatch.planned_backend("cuda", torch.bfloat16, 1, [4096, 4096])
    assert name == "p2p" and reason.startswith(f"flag refuses: {why};"), reason
    # The moment a passing suite log is named, the measured crossover applies.
    monkeypatch.setattr(evidence, "FLAG_CROSSOVER", {("NVIDIA H200", 2): PASSED})
    assert _choose(ws.group, 8) == Backend.FLAG and _choose(ws.group, 9) == Backend.P2P
    assert dispatch.planned_backend("cuda", torch.bfloat16, 8, [4096, 4096])[0] == "flag"


def test_a_zero_crossover_keeps_the_barrier_push_even_with_a_suite(fake_cuda, monkeypatch):
    monkeypatch.setattr(evidence, "FLAG_CROSSOVER", {("NVIDIA H200", 2): FlagEvidence(0, "b.json", "s.log")})
    ws = fake_cuda(_workspace("NVIDIA H200", 2))
    assert _choose(ws.group, 1) == Backend.P2P
    assert "slower than p2p already at the smallest measured slab" in evidence.flag_limit("NVIDIA H200", 2)[1]


def test_the_overrides_still_force_the_protocol_without_evidence(fake_cuda, planning):
    monkeypatch = planning
    monkeypatch.setattr(evidence, "FLAG_CROSSOVER", {("NVIDIA H200", 2): MEASURED})
    ws = fake_cuda(_workspace("NVIDIA H200", 2))
    monkeypatch.setenv("TPFUSE_FLAG_MAX_BYTES", str(16 << 10))
    assert _choose(ws.group, 2) == Backend.FLAG and _choose(ws.group, 3) == Backend.P2P
    monkeypatch.delenv("TPFUSE_FLAG_MAX_BYTES")
    monkeypatch.setenv("TPFUSE_BACKEND", "flag")
    assert _choose(ws.group, 32) == Backend.FLAG
    assert dispatch.planned_backend("cuda", torch.bfloat16, 32, [4096, 4096]) == ("flag", "TPFUSE_BACKEND=flag")


def test_the_shipped_table_takes_the_protocol_only_where_a_suite_log_is_named(monkeypatch):
    monkeypatch.delenv("TPFUSE_FLAG_MAX_BYTES", raising=False)
    for (device, W), entry in FLAG_CROSSOVER.items():
        limit, why = evidence.flag_limit(device, W)
        if entry.suite_log is None:
            assert (limit, why) == (0, f"flag protocol: no committed passing multi-GPU suite for {device} at W={W}")
        else:
            assert limit == min(entry.crossover_bytes, MAX_SLAB_BYTES)


def test_the_pass_report_says_why_the_flag_protocol_was_not_planned(planning):
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    from tpfuse.passes.barrier_elision import decide_barriers

    planning.setattr(evidence, "FLAG_CROSSOVER", {("NVIDIA H200", 2): MEASURED})

    def one_gather(x, a):
        return torch.ops.tpfuse.all_gather_hidden(x @ a, [8, 8], "0")  # a 64-byte slab at W=2

    with FakeTensorMode():
        graph = make_fx(one_gather)(torch.empty(4, 16, device="cuda", dtype=torch.bfloat16),
                                    torch.empty(16, 8, device="cuda", dtype=torch.bfloat16)).graph
    (decision,) = decide_barriers(graph)
    assert decision.protocol == "p2p"
    assert decision.protocol_reason.startswith(
        "flag refuses: flag protocol: no committed passing multi-GPU suite for NVIDIA H200 at W=2;")
