#!/bin/bash
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=.
step() { local name=$1 lim=$2; shift 2; local t0=$(date +%s); timeout $lim "$@" > $OUT/$name.log 2>&1; echo "$name rc=$? $(( $(date +%s)-t0 ))s" | tee -a $OUT/summary.txt; grep -v "Warning\|warn\|^W1127" $OUT/$name.log | tail -22; }
step linear_bench4 50 torchrun --nproc-per-node 4 benchmarks/bench_linear_gather.py --out $OUT --tag v2
step corr4 70 python -m pytest -q -x tests/gpu/test_linear_push.py -k "correctness and 4]"
step linear_bench2 40 torchrun --nproc-per-node 2 benchmarks/bench_linear_gather.py --out $OUT --tag v2
