"""Tuned configs (docs/tuning.md): the format and its errors, the key and its versions, the precedence of the
user's folder over the shipped one over the default, and the rule that only what passed its stress counts."""

import copy
import importlib.util
import json
import math
import os
import sys
import tomllib

import pytest
import torch

from tpfuse import config
from tpfuse.compile_ops import crossover_rule, linear_cost, tuned
from tpfuse.compile_ops.linear_constants import LinearConstants, fit
from tpfuse.compile_ops.tuned import ConfigError, DeviceKey

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = DeviceKey("FAKE GPU 80GB", "nvlink-all-to-all", "2.11.0+cu128", "2.27.3", tuned.tpfuse_version())
TRUTH = LinearConstants(3e12, 100, 0.8, 3.0, 0.9, 8.0, 500e9, 6.0, 200e9)


def record(**change):
    base = {"calls": 1000, "random_delays": True, "check": "bit-exact", "mismatches": 0,
            "negative_control": "stale epochs accepted", "control_detected": True, "error": ""}
    return {**base, **change}


def row(T, width, flag, push, nccl):
    return {"T": T, "width": width, "graph": {"flag": flag, "p2p": push, "nccl": nccl},
            "eager": {"flag": flag, "p2p": push, "nccl": nccl}}


def make_config(key=KEY, world_size=2, **change):
    """A valid config: the flag protocol no slower up to a 16 KiB slab, the barrier push up to 128 KiB of output."""
    rows = [row(1, 1024, 2.0, 4.0, 20.0), row(8, 1024, 3.0, 4.0, 20.0), row(32, 1024, 9.0, 5.0, 20.0),
            row(128, 1024, None, 30.0, 20.0)]
    data = {"format": tuned.FORMAT, "format_version": tuned.FORMAT_VERSION,
            "key": key.as_dict(world_size),
            "measured": {"host": "gpu-host-a", "date": "2026-12-01T10:00:00+00:00"},
            "protocols": {"flag": {"unavailable": "", "correctness": record()},
                          "p2p": {"unavailable": "", "correctness": record()},
                          "nccl": {"unavailable": "", "correctness": record(negative_control="reversed bands")},
                          "nccl_symmetric": {"unavailable": "NCCL 2.21 has no symmetric kernels", "correctness": None}},
            "rows": rows,
            "crossovers": {"flag": 16 << 10, "p2p": 128 << 10},
            "linear": {"constants": TRUTH.as_dict(), "correctness": record(check="bf16 GEMM tolerance")}}
    data.update(change)
    return data


def write(folder, name, data):
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        f.write(data if isinstance(data, str) else json.dumps(data))
    return path


# --------------------------------------------------------------------------- the format


def test_a_valid_config_parses_and_its_crossovers_match_its_rows():
    cfg = tuned.parse_config(make_config(), "a.json")
    assert cfg.key == KEY and cfg.world_size == 2
    assert cfg.crossovers == {"flag": 16 << 10, "p2p": 128 << 10}
    assert math.isnan(cfg.rows[-1]["graph"]["flag"])  # null: the flag protocol did not run that row
    assert cfg.linear_constants == TRUTH


def _broken(change):
    data = make_config()
    change(data)
    return data


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(format="something"), "format 'something'; accepted is 'tpfuse-tuned-config'"),
    (lambda d: d.update(format=tuned.SMOKE_FORMAT), "a one-GPU smoke output"),
    (lambda d: d.update(format_version=99), "format_version 99; this tpfuse reads 2"),
    (lambda d: d["key"].pop("nccl"), "key: missing 'nccl'"),
    (lambda d: d["key"].update(world_size=16), "world_size: 16; accepted are 2..8"),
    (lambda d: d["key"].update(topology="nvswitch"), "topology: 'nvswitch'; accepted are ['nvlink-all-to-all'"),
    (lambda d: d["key"].update(gpu=""), "key.gpu: empty"),
    (lambda d: d["protocols"].update(multimem={"unavailable": "", "correctness": None}),
     "protocols ['multimem'] unknown; accepted are ['flag', 'p2p'"),
    (lambda d: d["protocols"]["flag"]["correctness"].update(calls="many"), "correctness.calls: 'many' is not a int"),
    (lambda d: d["protocols"]["flag"]["correctness"].pop("negative_control"), "missing ['negative_control']"),
    (lambda d: d["crossovers"].update(flag=256 << 10),
     "a crossover claims more or less than its rows show (flag: the file says 262144 bytes, the rule on its rows "
     "gives 16384)"),
    (lambda d: d["crossovers"].update(multimem=0), "accepted are non-negative byte counts named ['flag'"),
    (lambda d: d["rows"][0]["graph"].update(flag=-1.0), "every time must be a positive number"),
    (lambda d: d["linear"]["constants"].update(sms=0), "sms=0: each must be a positive number"),
    (lambda d: d["linear"]["constants"].pop("sms"), "missing ['sms']"),
])
def test_a_broken_config_says_which_file_which_field_and_what_is_accepted(change, message):
    with pytest.raises(ConfigError) as err:
        tuned.parse_config(_broken(change), "/x/broken.json")
    assert str(err.value).startswith("/x/broken.json") and message in str(err.value), str(err.value)


def test_a_file_that_is_not_json_or_not_there_says_so(tmp_path):
    path = write(tmp_path, "bad.json", '{"format": ')
    with pytest.raises(ConfigError, match=r"bad.json: not JSON \(Expecting value at line 1"):
        tuned.load_config(path)
    with pytest.raises(ConfigError, match="missing.json: cannot be read"):
        tuned.load_config(os.path.join(tmp_path, "missing.json"))


def test_write_refuses_what_it_could_not_read_back_and_names_files_by_key(tmp_path):
    path = tuned.write_config(make_config(), str(tmp_path))
    assert os.path.basename(path) == "fake-gpu-80gb_w2_nvlink-all-to-all.json"
    assert tuned.load_config(path).key == KEY
    with pytest.raises(ConfigError, match="a crossover claims"):
        tuned.write_config(_broken(lambda d: d["crossovers"].update(flag=1)), str(tmp_path))


def test_the_rule_is_the_documented_one_on_the_committed_h200_log():
    """The same rows read as a bench log and as a config's rows give the same crossover (0 bytes)."""
    with open(os.path.join(ROOT, "benchmarks/results/bench_gather_w2_h200_flag.json")) as f:
        log = json.load(f)
    names = {crossover_rule.FLAG: "flag", crossover_rule.BARRIER_PUSH: "p2p", "nccl_rearrange": "nccl"}
    rows = [{"T": r["T"], "width": r["width"],
             **{m: {names[k]: v for k, v in r[m].items() if k in names} for m in crossover_rule.MODES}}
            for r in log["rows"]]
    assert tuned.derive_crossovers(rows, 2)["flag"] == 0
    assert crossover_rule.crossover(crossover_rule.judge_all(log["rows"])) == 0


# --------------------------------------------------------------------------- the key


@pytest.mark.parametrize("other, why", [
    (dict(torch="2.11.3"), ""),  # a patch release keeps the config
    (dict(torch="2.12.0"), "measured under torch 2.11.0+cu128, this is torch 2.12.0"),
    (dict(nccl="2.28.1"), "measured under NCCL 2.27.3, this is NCCL 2.28.1"),
    (dict(tpfuse="0.0.9"), "measured for tpfuse"),
    (dict(gpu="NVIDIA H100 80GB HBM3"), "measured for GPU FAKE GPU 80GB, this is NVIDIA H100 80GB HBM3"),
    (dict(topology="pcie"), "measured for topology nvlink-all-to-all, this is pcie"),
])
def test_the_key_holds_gpu_w_topology_and_versions(other, why):
    here = DeviceKey(**{**KEY.__dict__, **other})
    found = tuned.mismatch(KEY, 2, here, 2)
    assert found.startswith(why) and bool(found) == bool(why), found
    assert tuned.mismatch(KEY, 2, KEY, 4) == "measured for W 2, this is 4"


TOPO_NVLINK = """\
\tGPU0\tGPU1\tGPU2\tGPU3\tCPU Affinity\tNUMA Affinity
GPU0\t X \tNV18\tNV18\tNV18\t0-47\t0
GPU1\tNV18\t X \tNV18\tNV18\t0-47\t0
GPU2\tNV18\tNV18\t X \tNV18\t48-95\t1
GPU3\tNV18\tNV18\tNV18\t X \t48-95\t1

Legend:
  X    = Self
"""


def test_the_topology_is_read_from_nvidia_smi_or_unknown():
    assert tuned.parse_topo_matrix(TOPO_NVLINK) == "nvlink-all-to-all"
    pcie = TOPO_NVLINK.replace("NV18", "SYS")
    assert tuned.parse_topo_matrix(pcie) == "pcie"
    partial = TOPO_NVLINK.replace("GPU0\t X \tNV18", "GPU0\t X \tPIX")
    assert tuned.parse_topo_matrix(partial) == "nvlink-partial"
    assert tuned.parse_topo_matrix(TOPO_NVLINK.replace("NV18", "??")) == "unknown"
    assert tuned.parse_topo_matrix("No devices were found") == "unknown"
    assert tuned.classify_links([]) == "single-gpu"


def test_without_a_gpu_the_key_names_none_and_nothing_matches():
    key = tuned.local_device_key("")
    assert key.gpu == "" and key.topology == "unknown" and key.torch == torch.__version__


# --------------------------------------------------------------------------- precedence


def test_the_user_folder_wins_then_the_shipped_one_then_the_default(tmp_path):
    user, shipped = str(tmp_path / "user"), str(tmp_path / "shipped")
    dirs = [("user tuned config", user), ("shipped config", shipped)]
    default = tuned.selection_for(KEY, 2, None, dirs)
    assert default.config_path is None and default.crossovers == {} and default.linear_constants is None
    assert "no tuned config" in default.describe() and "barrier push" in default.describe()

    shipped_path = write(shipped, "h.json", make_config())
    chosen = tuned.selection_for(KEY, 2, None, dirs)
    assert chosen.config_path == shipped_path and chosen.describe().startswith(f"shipped config {shipped_path}")

    faster = make_config(crossovers={"flag": 16 << 10, "p2p": 128 << 10})
    faster["measured"]["host"] = "user-host"
    user_path = write(user, "mine.json", faster)
    chosen = tuned.selection_for(KEY, 2, None, dirs)
    assert chosen.config_path == user_path and chosen.describe().startswith(f"user tuned config {user_path}")
    assert chosen.crossovers == {"flag": 16 << 10, "p2p": 128 << 10} and chosen.linear_constants == TRUTH
    assert "flag protocol up to 16384-byte slabs" in chosen.why and "user-host" in chosen.why


def test_a_user_file_for_another_setup_or_broken_falls_through_with_a_note(tmp_path, caplog):
    user, shipped = str(tmp_path / "user"), str(tmp_path / "shipped")
    write(user, "old_torch.json", make_config(DeviceKey(**{**KEY.__dict__, "torch": "2.9.1"})))
    write(user, "broken.json", "not json")
    shipped_path = write(shipped, "h.json", make_config())
    found, what, notes = tuned.find_config(KEY, 2, [("user tuned config", user), ("shipped config", shipped)])
    assert found.path == shipped_path and what == "shipped config"
    assert any("broken.json: not JSON" in n for n in notes) and any("torch 2.9.1" in n for n in notes), notes
    assert "ignored a tuned config" in caplog.text


def test_of_two_matching_files_the_most_recently_measured_decides(tmp_path):
    older, newer = make_config(), make_config()
    newer["measured"]["date"] = "2026-12-02T10:00:00+00:00"
    write(tmp_path, "b_older.json", older)
    newer_path = write(tmp_path, "a_newer.json", newer)
    assert tuned.find_config(KEY, 2, [("user", str(tmp_path))])[0].path == newer_path


def test_the_user_folder_follows_the_variable_then_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.delenv("TPFUSE_TUNED_CONFIG_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert config.tuned_config_dir() == str(tmp_path / "xdg" / "tpfuse")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert config.tuned_config_dir() == str(tmp_path / "home" / ".cache" / "tpfuse")
    monkeypatch.setenv("TPFUSE_TUNED_CONFIG_DIR", str(tmp_path / "mine"))
    assert config.tuned_config_dir() == str(tmp_path / "mine")
    assert tuned.search_dirs()[0] == ("user tuned config", str(tmp_path / "mine"))


# --------------------------------------------------------------------------- only what passed


@pytest.mark.parametrize("broken, why", [
    (dict(mismatches=2), "2 wrong result(s) in 1000 calls"),
    (dict(control_detected=False), "the negative control (stale epochs accepted) was not detected"),
    (dict(calls=999), "999 stressed calls, fewer than 1000"),
    (dict(random_delays=False), "stressed without random per-rank delays"),
    (dict(error="timed out in the flag wait"), "the stress failed: timed out"),
])
def test_a_crossover_is_used_only_when_its_protocol_passed_its_stress(tmp_path, broken, why):
    data = make_config()
    data["protocols"]["flag"]["correctness"].update(broken)
    write(tmp_path, "c.json", data)
    chosen = tuned.selection_for(KEY, 2, None, [("user", str(tmp_path))])
    assert "flag" not in chosen.crossovers and chosen.crossovers["p2p"] == 128 << 10
    assert f"flag crossover unused (flag: {why}" in chosen.why, chosen.why


def test_no_record_or_an_unavailable_protocol_counts_as_not_passed(tmp_path):
    data = make_config()
    data["protocols"]["nccl"]["correctness"] = None
    data["linear"]["correctness"]["mismatches"] = 1
    write(tmp_path, "c.json", data)
    chosen = tuned.selection_for(KEY, 2, None, [("user", str(tmp_path))])
    assert "p2p" not in chosen.crossovers and "nccl: no correctness record" in chosen.why
    assert chosen.linear_constants is None and "linear constants unused (fused_linear: 1 wrong" in chosen.why


# --------------------------------------------------------------------------- the linear constants


def test_the_constants_predict_as_linear_cost_does():
    for W in (2, 4):
        constants = LinearConstants.from_module(linear_cost, W)
        for T, k, n in ((1, 4096, 128256), (8, 7168, 129280), (32, 4096, 14336)):
            assert constants.predict(T, k, [n // W] * W) == pytest.approx(linear_cost.predict(T, k, [n // W] * W))
    with pytest.raises(ValueError, match="no gather latency for W=8"):
        LinearConstants.from_module(linear_cost, 8)


def test_the_fit_is_benchmarks_fit_on_the_committed_w4_results():
    spec = importlib.util.spec_from_file_location("fit_linear_cost", os.path.join(ROOT, "benchmarks",
                                                                                  "fit_linear_cost.py"))
    bench_fit = importlib.util.module_from_spec(spec)
    sys.modules["fit_linear_cost"] = bench_fit
    spec.loader.exec_module(bench_fit)
    rows = bench_fit.load_rows([p for p in bench_fit.DEFAULT_FILES if "_w4_" in p])
    theirs = bench_fit.fit(rows)
    ours = fit([r for _, r in rows], 4, linear_cost.HBM_BYTES_PER_S, linear_cost.SMS)
    assert ours.cublas_efficiency == pytest.approx(theirs["CUBLAS_EFFICIENCY"])
    assert ours.fused_fixed_us == pytest.approx(theirs["FUSED_FIXED_US"])
    assert ours.gather_latency_us == pytest.approx(theirs["GATHER_LATENCY_US"][4])
    assert ours.fused_tail_bytes_per_s == pytest.approx(theirs["FUSED_TAIL_BYTES_PER_S"])


def test_a_fit_the_model_cannot_describe_is_refused():
    rows = [{"T": T, "K": 4096, "N_r": 32064, "graph": {"cublas_only": 50.0, "cublas_tpfuse": 40.0, "fused": 60.0}}
            for T in (1, 8, 32)]  # the gather "costs" -10 us: no positive bandwidth fits
    with pytest.raises(ValueError, match="each must be a positive number"):
        fit(rows, 4, 3e12, 132)


# --------------------------------------------------------------------------- what ships


def test_the_package_ships_its_configs_folder_and_every_shipped_config_parses():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        package_data = tomllib.load(f)["tool"]["setuptools"]["package-data"]["tpfuse"]
    assert "configs/*.json" in package_data
    assert os.path.isdir(tuned.SHIPPED_DIR)
    for name in os.listdir(tuned.SHIPPED_DIR):
        if name.endswith(".json"):
            cfg = tuned.load_config(os.path.join(tuned.SHIPPED_DIR, name))
            assert all(not cfg.record_failure(p) for p in ("flag", "p2p", "nccl")), name


def test_a_smoke_output_is_never_a_config(tmp_path):
    smoke = copy.deepcopy(make_config(format=tuned.SMOKE_FORMAT))
    write(tmp_path, "one_gpu_w2.json", smoke)
    chosen = tuned.selection_for(KEY, 2, None, [("user", str(tmp_path))])
    assert chosen.config_path is None


def test_a_crossover_the_file_leaves_out_is_not_a_zero_byte_cap(tmp_path):
    """A passing record without its crossover is 'not measured': the default's choice stands for that
    protocol (p2p uncapped, no flag protocol), never a 0-byte cap that would send every gather to NCCL."""
    user = str(tmp_path / "user")
    write(user, "partial.json", make_config(crossovers={"flag": 16 << 10}))
    chosen = tuned.selection_for(KEY, 2, None, [("user tuned config", user)])
    assert chosen.crossovers == {"flag": 16 << 10}, chosen.crossovers
    assert "p2p crossover not in the file" in chosen.why, chosen.why
    whole = tuned.selection_for(KEY, 2, None, [("user tuned config", str(tmp_path / "none"))])
    assert "p2p" not in whole.crossovers  # the control: the default has no p2p cap either
