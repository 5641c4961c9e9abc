"""``python -m tpfuse tune`` on the CPU: the loop on 2 gloo ranks with a fake timer, fake protocol runners and a
fake linear probe writes a config that ``selection_for`` then follows; the ranks agree on a config by its content
hash, and fall back to the default when they do not (docs/tuning.md)."""

import json
import os

import pytest
import torch

from multiproc import run_ranks
from tpfuse import tune
from tpfuse.compile_ops import tuned
from tpfuse.compile_ops.linear_constants import LinearConstants
from tpfuse.compile_ops.tuned import CorrectnessRecord, DeviceKey

KEY = DeviceKey("FAKE GPU 80GB", "nvlink-all-to-all", torch.__version__, "2.27.3", tuned.tpfuse_version())
TRUTH = LinearConstants(3e12, 100, 0.8, 3.0, 0.9, 8.0, 500e9, 6.0, 200e9)
#: the fake machine: the flag protocol wins up to a 16 KiB slab, the barrier push up to 1 MiB of output
FLAG_WINS_UP_TO, PUSH_WINS_UP_TO = 16 << 10, 1 << 20


class FakeRunner:
    """A protocol that moves nothing; its stress reports what the test says, differently on each rank."""

    def __init__(self, ctx, name, control_caught_on=(1,), unavailable=""):
        self.ctx, self.name, self.control_caught_on, self.reason = ctx, name, control_caught_on, unavailable

    def unavailable(self):
        return self.reason

    def serves(self, T, width):
        return self.name != "flag" or T * width * 2 <= 256 << 10

    def call(self, T, width):
        return lambda: None

    def stress(self, calls, control_calls, seed):
        # only rank 1 catches the control: the group's record must still say it was caught
        return CorrectnessRecord(calls, True, "bit-exact", 0, "fake control", self.ctx.rank in self.control_caught_on)


class FakeTimer:
    """µs from the row, not from a clock; rank 1 is 0.5 µs slower, so the slowest rank's time is rank 1's."""

    def __init__(self, ctx):
        self.ctx = ctx

    def time(self, fn, timing):
        slab = timing.T * timing.width * 2
        output = slab * self.ctx.world_size
        us = {"flag": 3.0 if slab <= FLAG_WINS_UP_TO else 9.0,
              "p2p": 5.0 if output <= PUSH_WINS_UP_TO else 50.0,
              "p2p_entry_elided": 4.0, "nccl": 20.0}[timing.protocol]
        return us + (15.0 if timing.mode == "eager" else 0.0) + 0.5 * self.ctx.rank


class FakeLinearProbe:
    """Rows the model gives exactly under TRUTH: the fit must find TRUTH again."""

    def __init__(self, ctx):
        self.ctx = ctx

    def unavailable(self):
        return ""

    def stress(self, calls, control_calls, seed):
        return CorrectnessRecord(calls, True, "bf16 GEMM tolerance", 0, "fake control", True)

    def measure(self):
        rows = []
        for k, n in ((4096, 128256), (7168, 129280)):
            width = n // self.ctx.world_size
            for T in (1, 8, 16, 32):
                fused, unfused = TRUTH.predict(T, k, [width] * self.ctx.world_size)
                only = TRUTH.weight_floor_us(k, width) / TRUTH.cublas_efficiency + TRUTH.cublas_fixed_us
                rows.append({"T": T, "K": k, "N_r": width,
                             "graph": {"fused": fused, "cublas_tpfuse": unfused, "cublas_only": only}})
        return {"hbm_bytes_per_s": TRUTH.hbm_bytes_per_s, "sms": TRUTH.sms, "rows": rows}


def fake_runners(ctx, plan):
    return [FakeRunner(ctx, "flag"), FakeRunner(ctx, "p2p"), FakeRunner(ctx, "p2p_entry_elided"),
            FakeRunner(ctx, "nccl"), FakeRunner(ctx, "nccl_symmetric", unavailable="NCCL 2.21 has no symmetric kernels"
                                                if ctx.rank == 1 else "")]


def runners_whose_flag_control_escapes(ctx, plan):
    return [FakeRunner(ctx, "flag", control_caught_on=()), *fake_runners(ctx, plan)[1:]]


def fake_timer(ctx, plan):
    return FakeTimer(ctx)


def fake_probe(ctx, plan):
    return FakeLinearProbe(ctx)


def fake_key(ctx):
    return KEY


def dry_plan(out_dir, runners=fake_runners):
    return tune.TunePlan(tokens=(1, 8, 32, 128), widths=(1024, 4096), out_dir=str(out_dir), runners=runners,
                         timer=fake_timer, linear_probe=fake_probe, device_key=fake_key, host="cpu-test-host")


def test_a_dry_run_writes_a_config_that_selection_then_follows(tmp_path, capfd):
    path = run_ranks(2, tune.spawned_rank, dry_plan(tmp_path), timeout=240)[0]
    assert path == os.path.join(str(tmp_path), "fake-gpu-80gb_w2_nvlink-all-to-all.json")
    progress = capfd.readouterr().out
    assert "tune: [  1/" in progress and "stress flag: passes" in progress and "linear rule: fitted" in progress

    cfg = tuned.load_config(path)
    assert cfg.rows[0]["graph"]["flag"] == 3.5  # the slowest rank's
    assert cfg.protocols["nccl_symmetric"]["unavailable"] == "rank 1: NCCL 2.21 has no symmetric kernels"
    assert cfg.protocols["flag"]["correctness"].control_detected  # caught on rank 1 only
    chosen = tuned.selection_for(KEY, 2, None, [("user tuned config", str(tmp_path))])
    assert chosen.config_path == path
    assert chosen.crossovers == {"flag": FLAG_WINS_UP_TO, "p2p": 512 << 10}  # the grid's largest <= 1 MiB
    for name, value in TRUTH.as_dict().items():
        assert getattr(chosen.linear_constants, name) == pytest.approx(value, rel=1e-6), name
    assert f"user tuned config {path}" in chosen.describe() and "cpu-test-host" in chosen.describe()
    # another key (another W) does not take it
    assert tuned.selection_for(KEY, 4, None, [("user", str(tmp_path))]).config_path is None


def test_a_dry_run_whose_flag_control_escapes_writes_a_config_auto_uses_without_the_flag(tmp_path):
    path = run_ranks(2, tune.spawned_rank, dry_plan(tmp_path, runners_whose_flag_control_escapes), timeout=240)[0]
    chosen = tuned.selection_for(KEY, 2, None, [("user", str(tmp_path))])
    assert chosen.config_path == path and "flag" not in chosen.crossovers
    assert "flag crossover unused (flag: the negative control (fake control) was not detected" in chosen.why


# --------------------------------------------------------------------------- agreement across ranks


def _select(rank, world_size, folders):
    from tpfuse.compile_ops.groups import resolve_group
    import torch.distributed as dist

    group = resolve_group(dist.group.WORLD.group_name)
    chosen = tuned.selection_for(KEY, world_size, group, [("user tuned config", folders[rank])])
    return chosen.config_path, chosen.crossovers, chosen.why


def _config(folder, host):
    from test_tuned_configs import make_config

    data = make_config(key=KEY)
    data["measured"]["host"] = host
    return tuned.write_config(data, folder)


def test_ranks_with_the_same_config_agree_wherever_it_lies(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _config(a, "gpu-host-a"), _config(b, "gpu-host-a")  # the same content at two paths
    results = run_ranks(2, _select, [a, b], timeout=120)
    assert [r[0] for r in results] == [os.path.join(a, os.listdir(a)[0]), os.path.join(b, os.listdir(b)[0])]
    assert all(r[1] == {"flag": 16 << 10, "p2p": 128 << 10} for r in results)


@pytest.mark.parametrize("rank1_has", ["another config", "none"])
def test_ranks_that_found_different_configs_all_take_the_default_and_say_so(tmp_path, rank1_has):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _config(a, "gpu-host-a")
    if rank1_has == "another config":
        _config(b, "gpu-host-b")  # other content: another measurement
    results = run_ranks(2, _select, [a, b], timeout=120)
    for path, crossovers, why in results:
        assert path is None and crossovers == {}
        assert why.startswith("the ranks found different tuned configs (rank 0: ") and "barrier push" in why
    assert ("rank 1: no config" in results[0][2]) == (rank1_has == "none")


# --------------------------------------------------------------------------- the command


def test_the_command_refuses_bad_arguments_and_a_machine_without_gpus(capsys, monkeypatch):
    with pytest.raises(SystemExit):
        tune.main(["--tokens", "1,x"])
    assert "expected comma-separated positive integers" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert tune.main([]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_the_smoke_output_is_written_beside_the_configs_never_among_them(tmp_path):
    plan = dry_plan(tmp_path)
    data = json.loads(json.dumps(tuned.json_safe(tuned_configs_sample())))
    data["format"] = tuned.SMOKE_FORMAT
    path = tune.write(data, plan)
    assert os.path.dirname(path) == os.path.join(str(tmp_path), "one_gpu_smoke")
    with pytest.raises(tuned.ConfigError, match="not a config"):
        tuned.load_config(path)
    assert tuned.find_config(KEY, 2, [("user", str(tmp_path))])[0] is None


def tuned_configs_sample():
    from test_tuned_configs import make_config

    return make_config(key=KEY)
