"""``python -m tpfuse tune`` on GPUs (docs/tuning.md).

- one GPU: the smoke mode runs the whole loop (stress with random per-rank delays and the negative controls,
  the T x width grid in graph replay and eager) on W ranks emulated by streams, and writes an output that is
  never taken for a config;
- two GPUs: a real (short-grid) tune writes a config that ``selection_for`` follows on this machine.

    pytest -q tests/gpu/test_tune_gpu.py
"""

import json
import os

import pytest
import torch

from tpfuse import tune
from tpfuse.compile_ops import tuned


@pytest.mark.gpu
@pytest.mark.parametrize("W", [2, 4])
def test_the_one_gpu_smoke_run_measures_everything_and_writes_no_config(tmp_path, capsys, W):
    rc = tune.main(["--one-gpu", str(W), "--out", str(tmp_path), "--tokens", "1,32,128", "--widths", "1024,4096"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "stress flag: passes" in out and "stress p2p: passes" in out, out
    path = os.path.join(str(tmp_path), "one_gpu_smoke", f"one_gpu_w{W}.json")
    with open(path) as f:
        data = json.load(f)
    assert data["format"] == tuned.SMOKE_FORMAT and data["key"]["world_size"] == W
    for name in ("flag", "p2p"):
        record = data["protocols"][name]["correctness"]
        assert record["calls"] >= 1000 and record["mismatches"] == 0 and record["control_detected"], (name, record)
    flag_served = [r for r in data["rows"] if r["T"] * r["width"] * 2 <= 256 << 10]
    assert all(r[m]["flag"] > 0 for r in flag_served for m in ("graph", "eager"))
    assert all(r[m]["p2p"] > 0 for r in data["rows"] for m in ("graph", "eager"))
    with pytest.raises(tuned.ConfigError, match="not a config"):
        tuned.load_config(path)
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".json")]  # nothing among the configs


@pytest.mark.multigpu
def test_a_real_tune_writes_a_config_that_selection_follows(tmp_path, capsys):
    rc = tune.main(["--nproc", "2", "--out", str(tmp_path), "--tokens", "1,8,32,128", "--widths", "1024,4096"])
    assert rc == 0
    out = capsys.readouterr().out
    print(out)
    (name,) = [n for n in os.listdir(tmp_path) if n.endswith(".json")]
    config = tuned.load_config(os.path.join(str(tmp_path), name))
    for protocol in ("flag", "p2p", "p2p_entry_elided", "nccl"):
        assert not config.record_failure(protocol), config.record_failure(protocol)
    key = tuned.local_device_key(torch.cuda.get_device_name(0))
    chosen = tuned.selection_for(key, 2, None, [("user tuned config", str(tmp_path))])
    print(chosen.describe())
    # nccl_symmetric's crossover counts only where this host has NCCL symmetric windows and its record passed
    symmetric = {"nccl_symmetric"} if not config.record_failure("nccl_symmetric") else set()
    assert chosen.config_path == config.path and set(chosen.crossovers) == {"flag", "p2p"} | symmetric
