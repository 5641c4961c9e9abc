#!/usr/bin/env bash
# Every multi-GPU check and benchmark for world size W, one group per 10-minute call:
#
#   benchmarks/multi_gpu.sh W [correctness|flag|stress|elimination|perf|e2e|e2e_elimination|tune|all]
#                             [--dry-run] [--out DIR]
#
# The steps, their time limits and the budget are in benchmarks/multi_gpu.py; the commands to run
# are in docs/benchmarks.md, "Multi-GPU runs: one script".  PYTHON names the interpreter (default:
# python, else python3).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# Never NVLink multicast on the shared hosts (docs/safety.md, "Multicast"); every step gets these
# again explicitly, and TPFUSE_ENABLE_MULTIMEM=0.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 TPFUSE_ENABLE_MULTIMEM=0
export PYTHONPATH=.
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
exec "$PYTHON" benchmarks/multi_gpu.py "$@"
