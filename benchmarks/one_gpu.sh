#!/usr/bin/env bash
# The one-GPU checks and micro-benchmarks, in groups that each fit a 10-minute call:
#
#   benchmarks/one_gpu.sh [suite_a|suite_b|gpu|tune|lm_head|all] [OUT_DIR]
#
#   suite_a  the test files tests/test_[a-o]*.py on this host's stack (pytest -n 12, 540 s)
#   suite_b  the other test files, tests/test_[!a-o]*.py (pytest -n 12, 540 s)
#   gpu      tests/gpu (pytest -n 8, 540 s)
#            The suite does not fit one 10-minute call on one H200: all but tests/gpu alone reached
#            1000 of about 1050 results in 540 s at -n 12.  -v, so a log cut short still names every
#            result it reached.
#   tune     tests/gpu/test_tune_gpu.py (the one-GPU smoke of `tune`'s measurement loop) and
#            `python -m tpfuse tune --one-gpu 4` (numbers that are not a config: docs/tuning.md)
#   lm_head  benchmarks/bench_lm_head_fusion.py over its default grid (W = 2 and 4, both vocabularies)
#   all      the five in that order (about 30 minutes: for a machine without a per-call limit)
#
# OUT_DIR (default: $OUT where set, else benchmarks/results/one_gpu_<YYYYMMDD>) gets one log per step,
# each starting with the GPU, the torch and Triton versions and the command.  expecttest is needed
# by the suite: where the host has no network, carry its wheel and install it with
# `pip install --target /tmp/site <wheel>` and PYTHONPATH=.:/tmp/site (docs/benchmark_method.md).
# The exit status is 1 when a step failed or ran past its limit.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# Never NVLink multicast on the shared hosts (docs/safety.md, "Multicast"); the multimem kernel is
# never run (dispatch takes it only when TPFUSE_ENABLE_MULTIMEM=1).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 TPFUSE_ENABLE_MULTIMEM=0
export PYTHONPATH="${PYTHONPATH:-.}"
case ":$PYTHONPATH:" in *:.:*) ;; *) export PYTHONPATH=".:$PYTHONPATH" ;; esac
export TPFUSE_WATCHDOG=report
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"

group="${1:-all}"
case "$group" in suite_a|suite_b|gpu|tune|lm_head|all) ;; *)
  echo "one_gpu.sh: unknown group '$group'; accepted: suite_a, suite_b, gpu, tune, lm_head, all" >&2; exit 2 ;;
esac
out="${2:-${OUT:-benchmarks/results/one_gpu_$(date -u +%Y%m%d)}}"
mkdir -p "$out"
failed=0

header() {
  nvidia-smi -L 2>&1 || echo "nvidia-smi: not found"
  "$PYTHON" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda)'
  echo "\$ $*"
}

# step NAME LIMIT_S COMMAND...: runs COMMAND under timeout (its whole process group), logs into $out/NAME.log
step() {
  local name="$1" limit="$2"; shift 2
  local log="$out/$name.log" start rc
  start=$(date +%s)
  { header "$@"; timeout --kill-after=5 "$limit" "$@"; } >"$log" 2>&1
  rc=$?
  printf '%-22s rc=%-3s %4ss  %s\n' "$name" "$rc" "$(( $(date +%s) - start ))" "$log"
  [ "$rc" -eq 0 ] || failed=1
}

if [ "$group" = suite_a ] || [ "$group" = all ]; then
  step suite_a_pytest 540 "$PYTHON" -m pytest -v -rfE -n 12 -p no:cacheprovider tests/test_[a-o]*.py
fi
if [ "$group" = suite_b ] || [ "$group" = all ]; then
  step suite_b_pytest 540 "$PYTHON" -m pytest -v -rfE -n 12 -p no:cacheprovider tests/test_[!a-o]*.py
fi
if [ "$group" = gpu ] || [ "$group" = all ]; then
  step gpu_pytest 540 "$PYTHON" -m pytest -v -rfE -n 8 -p no:cacheprovider tests/gpu
fi
if [ "$group" = tune ] || [ "$group" = all ]; then
  step tune_gpu_tests 240 "$PYTHON" -m pytest -v -rA -p no:cacheprovider tests/gpu/test_tune_gpu.py
  step tune_one_gpu 240 "$PYTHON" -m tpfuse tune --one-gpu 4 --out "$out/tune_smoke"
fi
if [ "$group" = lm_head ] || [ "$group" = all ]; then
  step bench_lm_head_fusion 540 "$PYTHON" benchmarks/bench_lm_head_fusion.py --out "$out/bench_lm_head_fusion.json"
fi
exit "$failed"
