"""benchmarks/one_gpu.sh on the CPU, with a stand-in interpreter that records what it was asked to run.

Nobody can run its GPU steps here, so ``PYTHON`` names a small script that writes its argv and the
no-multicast environment (docs/safety.md, "Multicast") into the step's log and exits with a chosen
status.  Checked: every group runs its steps with that environment and the multimem kernel pinned
off, each step gets a log in the output folder, a failing step makes the exit status 1, and an
unknown group is refused with rc 2 naming the accepted ones.
"""

from __future__ import annotations

import os
import stat
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "one_gpu.sh")
SAFETY = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1",
          "TPFUSE_ENABLE_MULTIMEM": "0"}
STEPS = {"suite_a": ["suite_a_pytest"], "suite_b": ["suite_b_pytest"], "gpu": ["gpu_pytest"], "tune": ["tune_gpu_tests", "tune_one_gpu"], "lm_head": ["bench_lm_head_fusion"]}

STAND_IN = """#!/usr/bin/env bash
# the header's version line asks python -c: answer it like a real interpreter would
if [ "$1" = "-c" ]; then echo "torch 0.0 triton 0.0 cuda none"; exit 0; fi
echo "ARGV $*"
for name in NCCL_NVLS_ENABLE TORCH_SYMM_MEM_DISABLE_MULTICAST NVSHMEM_DISABLE_NVLS TPFUSE_ENABLE_MULTIMEM; do
  echo "ENV $name=${!name-unset}"
done
exit "${STAND_IN_RC:-0}"
"""


def _run(tmp_path, group, rc=0, env_extra=None):
    stand_in = tmp_path / "python"
    stand_in.write_text(STAND_IN)
    stand_in.chmod(stand_in.stat().st_mode | stat.S_IXUSR)
    env = {k: v for k, v in os.environ.items() if k not in SAFETY}
    env.update(PYTHON=str(stand_in), STAND_IN_RC=str(rc), **(env_extra or {}))
    env.pop("OUT", None)
    out = tmp_path / "out"
    proc = subprocess.run(["bash", SCRIPT, group, str(out)], env=env, capture_output=True, text=True, timeout=60)
    return proc, out


@pytest.mark.parametrize("group", ["suite_a", "suite_b", "gpu", "tune", "lm_head"],
                         ids=["suite_a", "suite_b", "tests-folder-of-the-device", "tune", "lm_head"])
def test_each_step_runs_with_the_no_multicast_environment_and_logs(tmp_path, group):
    proc, out = _run(tmp_path, group)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in STEPS[group]:
        log = (out / f"{name}.log").read_text()
        assert "ARGV" in log, log
        for key, value in SAFETY.items():
            assert f"ENV {key}={value}" in log, (name, key, log)
    ran = {name for name in os.listdir(out) if name.endswith(".log")}
    assert ran == {f"{name}.log" for name in STEPS[group]}


def test_all_runs_every_group_in_order(tmp_path):
    proc, out = _run(tmp_path, "all")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    order = [line.split()[0] for line in proc.stdout.splitlines() if "rc=" in line]
    assert order == STEPS["suite_a"] + STEPS["suite_b"] + STEPS["gpu"] + STEPS["tune"] + STEPS["lm_head"]


def test_the_suite_and_gpu_steps_cover_the_whole_test_folder(tmp_path):
    """The two suite halves and tests/gpu name every test file exactly once."""
    _, out = _run(tmp_path, "all")
    argv = {name: next(line for line in (out / f"{name}.log").read_text().splitlines() if line.startswith("ARGV"))
            for name in ("suite_a_pytest", "suite_b_pytest", "gpu_pytest")}
    flags = ["-m", "pytest", "-v", "-rfE", "-n", "12", "-p", "no:cacheprovider"]
    halves = []
    for name in ("suite_a_pytest", "suite_b_pytest"):
        words = argv[name].split()[1:]
        assert words[:len(flags)] == flags, words
        halves.append([os.path.relpath(os.path.join(ROOT, w), ROOT) for w in words[len(flags):]])
    files = sorted(f"tests/{n}" for n in os.listdir(os.path.join(ROOT, "tests"))
                   if n.startswith("test_") and n.endswith(".py"))
    assert sorted(halves[0] + halves[1]) == files
    assert not set(halves[0]) & set(halves[1]) and halves[0] and halves[1]
    assert argv["gpu_pytest"].split()[1:] == ["-m", "pytest", "-v", "-rfE", "-n", "8", "-p", "no:cacheprovider",
                                              "tests/gpu"]


def test_a_failing_step_makes_the_exit_status_1(tmp_path):
    proc, _ = _run(tmp_path, "tune", rc=3)
    assert proc.returncode == 1
    assert proc.stdout.count("rc=3") == 2  # the next step still runs


def test_an_inherited_multicast_setting_is_overridden(tmp_path):
    proc, out = _run(tmp_path, "lm_head", env_extra={"NCCL_NVLS_ENABLE": "1", "TPFUSE_ENABLE_MULTIMEM": "1"})
    log = (out / "bench_lm_head_fusion.log").read_text()
    assert "ENV NCCL_NVLS_ENABLE=0" in log and "ENV TPFUSE_ENABLE_MULTIMEM=0" in log


def test_an_unknown_group_is_refused_naming_the_accepted_ones(tmp_path):
    proc, out = _run(tmp_path, "everything")
    assert proc.returncode == 2
    assert "'everything'" in proc.stderr and "suite_a, suite_b, gpu, tune, lm_head, all" in proc.stderr
    assert not out.exists()
