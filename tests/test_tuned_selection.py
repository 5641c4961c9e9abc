"""A tuned config decides ``auto`` (docs/tuning.md, "What ``auto`` reads"): a dry run of ``python -m tpfuse tune``
on 2 gloo ranks (fake timer, fake runners) writes a config; the ranks agree on it at set-up
(``tuned.group_selection``, what the workspace keeps in its facts), and then the flag backend's limit,
the p2p backend's crossover with NCCL, ``dispatch.planned_backend`` and the linear rule follow it, each naming the
config and its path.  A rank that found another config makes every rank fall back to the default, saying so.
The passes' cache key changes with the config the process finds.

The CPU ranks run gloo, never a CUDA backend, so the decisions are asked of the backends' own refusals with the
agreed facts, as dispatch asks them (a CUDA group's workspace hands them the same selection).
"""

import os

import pytest
import torch

from multiproc import run_ranks
from test_tune import TRUTH, fake_probe, fake_runners, fake_timer
from tpfuse import tune
from tpfuse.compile_ops import dispatch, linear_cost
from tpfuse.compile_ops.backend import GatherCall
from tpfuse.compile_ops.barrier import P2P
from tpfuse.compile_ops.flag import FLAG
from tpfuse.compile_ops.groups import GroupFacts
from tpfuse.compile_ops.tuned import forget, group_selection, local_device_key, selection_for, write_config

GPU = "FAKE GPU 80GB"
#: the fake machine of test_tune: the flag protocol no slower up to 16 KiB slabs; the barrier push up to
#: 512 KiB of output (the grid's largest row within its 1 MiB)
FLAG_UP_TO, P2P_UP_TO = 16 << 10, 512 << 10


def this_machine(ctx):
    """The key this process computes for a GPU named ``GPU``: the one the set-up looks the config up by."""
    return local_device_key(GPU)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """(folder, path) of a config written by a dry tune on 2 gloo ranks for this machine's key."""
    folder = tmp_path_factory.mktemp("tuned")
    plan = tune.TunePlan(tokens=(1, 8, 32, 128), widths=(1024, 4096), out_dir=str(folder), runners=fake_runners,
                         timer=fake_timer, linear_probe=fake_probe, device_key=this_machine, host="cpu-test-host")
    path = run_ranks(2, tune.spawned_rank, plan, timeout=240)[0]
    return str(folder), path


@pytest.fixture
def finds(monkeypatch):
    """``finds(folder)``: this process's tuned configs are ``folder``'s and its GPU is ``GPU`` (None: no GPU)."""

    def use(folder, gpu=GPU):
        monkeypatch.setenv("TPFUSE_TUNED_CONFIG_DIR", folder)
        monkeypatch.setattr(dispatch, "local_device_name", lambda: gpu or "")
        monkeypatch.setattr(linear_cost, "compile_time_device_name", lambda: gpu or "")
        forget()

    yield use
    forget()


def _call(tokens, width, selection, W=2):
    facts = GroupFacts(True, "", 0, GPU, selection)
    return GatherCall("cuda", torch.bfloat16, tokens, (width,) * W, None, "auto", planned_facts=facts)


def _decisions(selection) -> dict:
    """What the flag and p2p backends answer under ``selection``, at sizes either side of the crossovers."""
    return {"flag small": FLAG.refusal(_call(4, 1024, selection)),  # 8 KiB slab
            "flag above": FLAG.refusal(_call(16, 1024, selection)),  # 32 KiB slab
            "p2p within": P2P.refusal(_call(128, 1024, selection)),  # 512 KiB output
            "p2p above": P2P.refusal(_call(256, 1024, selection))}  # 1 MiB output


def _agree(rank, world_size, folders):
    """One rank: the set-up's agreement over the gloo group, then the backends' answers under it."""
    import torch.distributed as dist

    from tpfuse.compile_ops.groups import resolve_group

    os.environ["TPFUSE_TUNED_CONFIG_DIR"] = folders[rank]
    selection = group_selection(resolve_group(dist.group.WORLD.group_name), GPU)
    return selection.config_path, selection.source(), selection.describe(), _decisions(selection)


def test_the_ranks_agree_on_the_config_the_tune_wrote_and_the_backends_follow_it(tuned):
    folder, path = tuned
    results = run_ranks(2, _agree, [folder, folder], timeout=120)
    assert results[0] == results[1]  # every rank decides alike
    config_path, source, describe, answers = results[0]
    assert config_path == path and source == f"user tuned config {path}" and "cpu-test-host" in describe
    assert answers["flag small"] == ""
    assert answers["flag above"] == (f"a {32 << 10}-byte slab is above the crossover (measured crossover in user "
                                     f"tuned config {path}: {FLAG_UP_TO} bytes)")
    assert answers["p2p within"] == ""
    assert answers["p2p above"] == (f"a {1 << 20}-byte output is above its crossover with nccl ({P2P_UP_TO} bytes, "
                                    f"user tuned config {path})")


def test_a_rank_that_found_no_config_makes_every_rank_take_the_default_and_say_so(tuned, tmp_path):
    folder, _ = tuned
    results = run_ranks(2, _agree, [folder, str(tmp_path)], timeout=120)
    assert results[0] == results[1]
    config_path, source, describe, answers = results[0]
    assert config_path is None and source == "the default: the ranks found different tuned configs"
    assert describe.startswith("the ranks found different tuned configs (rank 0: ") and "rank 1: no config" in describe
    # the default: no flag protocol where evidence.py has no entry, p2p at any size up to TPFUSE_PUSH_MAX_BYTES
    assert answers["flag small"] == f"flag protocol not measured on {GPU} at W=2"
    assert answers["p2p above"] == ""


def test_a_forced_backend_ignores_the_config(tuned):
    folder, _ = tuned
    selection = selection_for(this_machine(None), 2, None, [("user tuned config", folder)])
    call = _call(256, 1024, selection)
    forced = GatherCall(call.device_type, call.dtype, call.tokens, call.hidden_widths, None, "p2p",
                        planned_facts=call.planned_facts)
    assert P2P.refusal(call) and not P2P.refusal(forced)


def test_planned_backend_follows_the_config_this_process_finds(tuned, finds, tmp_path):
    folder, path = tuned
    finds(folder)
    assert dispatch.planned_backend("cuda", torch.bfloat16, 4, [1024, 1024]) == (
        "flag", f"a {8 << 10}-byte slab, within the flag protocol's {FLAG_UP_TO} bytes (measured crossover in "
                f"user tuned config {path})")
    name, why = dispatch.planned_backend("cuda", torch.bfloat16, 64, [1024, 1024])
    assert name == "p2p" and why.endswith(f"selection: user tuned config {path}"), why
    name, why = dispatch.planned_backend("cuda", torch.bfloat16, 256, [1024, 1024])
    assert name == "nccl" and f"above its crossover with nccl ({P2P_UP_TO} bytes, user tuned config {path})" in why
    # the control: without the config the same calls plan the default
    finds(str(tmp_path))
    assert dispatch.planned_backend("cuda", torch.bfloat16, 4, [1024, 1024])[0] == "p2p"
    assert dispatch.planned_backend("cuda", torch.bfloat16, 256, [1024, 1024])[0] == "p2p"


def test_the_linear_rule_takes_the_configs_constants(tuned):
    folder, path = tuned
    selection = selection_for(this_machine(None), 2, None, [("user tuned config", folder)])
    args = (32, 4096, [64128, 64128], "bfloat16")
    assert linear_cost.decide(*args, device_name=GPU).rule == "not_measured"  # the default: not this card
    decision = linear_cost.decide(*args, device_name=GPU, constants=selection.linear_constants,
                                  constants_from=selection.config_path)
    fused, unfused = TRUTH.predict(32, 4096, [64128, 64128])
    assert decision.fuse == (unfused / fused >= linear_cost.MIN_SPEEDUP)
    assert decision.fused_us == pytest.approx(fused, rel=1e-6) and f"tuned constants of {path}" in decision.reason
    ranged = linear_cost.decide_range(1, None, 4096, [64128, 64128], "bfloat16", device_name=GPU,
                                      constants=selection.linear_constants, constants_from=path)
    assert ranged.rule != "not_measured"


def test_the_pass_cache_key_changes_with_the_config_this_process_finds(tuned, finds, tmp_path):
    from test_tuned_configs import make_config

    from tpfuse.passes import TpfusePass, linear_fusion
    from tpfuse.passes.manager import PassConfig

    folder, _ = tuned
    key = lambda: (TpfusePass(PassConfig()).uuid(), linear_fusion.cache_key())  # noqa: E731
    finds(str(tmp_path / "none"))
    without = key()
    finds(folder)
    with_config = key()
    assert with_config[0] != without[0] and with_config[1] != without[1]
    assert key() == with_config  # the control: the same config, the same key
    other = str(tmp_path / "other")
    data = make_config(key=this_machine(None))
    data["measured"]["host"] = "another-host"
    write_config(data, other)
    finds(other)
    assert key()[0] not in (without[0], with_config[0])
    finds(folder, gpu=None)  # no GPU: no config applies, the default's key
    assert key()[0] == without[0]


def test_the_pass_fuses_only_where_a_rank_without_the_config_would_too(tuned):
    """The graph must be the same on every rank: a tuned rule that fuses where the default rule does not
    leaves linear + gather (a rank without the config would), and the reverse keeps the fused op, decided per
    call with the agreed config."""
    from dataclasses import replace

    from tpfuse.passes.linear_fusion import graph_verdict

    folder, path = tuned
    selection = selection_for(this_machine(None), 2, None, [("user tuned config", folder)])
    args = (32, 4096, [64128, 64128], "bfloat16")
    tuned_rule = linear_cost.decide(*args, device_name=GPU, constants=selection.linear_constants,
                                    constants_from=path)
    default = linear_cost.decide(*args, device_name=GPU)
    assert default.rule == "not_measured" and not default.fuse  # this card is not in the default rule's table
    verdict = graph_verdict(replace(tuned_rule, fuse=True), default)
    assert not verdict.fuse and "every rank must hold the same graph" in verdict.reason
    # the reverse: the default fuses, the tuned rule does not -> the fused op, deciding per call
    reverse = graph_verdict(replace(tuned_rule, fuse=False), replace(default, fuse=True))
    assert reverse.fuse and reverse.rule == "per_call"
    agreeing = replace(tuned_rule, fuse=False)
    assert graph_verdict(agreeing, default) is agreeing  # the control: agreeing rules, the tuned decision
