#!/bin/bash
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=.
step() { local name=$1 lim=$2; shift 2; local t0=$(date +%s); timeout $lim "$@" > $OUT/$name.log 2>&1; echo "$name rc=$? $(( $(date +%s)-t0 ))s" | tee -a $OUT/summary.txt; grep -v "Warning\|warn" $OUT/$name.log | tail -40; }
step sweep4 165 torchrun --nproc-per-node 4 benchmarks/sweep_linear_config.py --out $OUT
step linear_bench2 85 torchrun --nproc-per-node 2 benchmarks/bench_linear_gather.py --out $OUT
