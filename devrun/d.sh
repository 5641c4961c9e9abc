#!/bin/bash
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=.
T0=$(date +%s)
nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/cards.txt
step() { local name=$1 lim=$2; shift 2; local t0=$(date +%s); timeout $lim "$@" > $OUT/$name.log 2>&1; echo "$name rc=$? $(( $(date +%s)-t0 ))s" | tee -a $OUT/summary.txt; tail -12 $OUT/$name.log; }
step ro_test 100 python -m pytest -q -s tests/gpu/test_push_gather.py -k "reduce_overhead"
step e2e 280 torchrun --nproc-per-node 4 benchmarks/bench_e2e_decode.py --out $OUT
step pass_gpu 100 python -m pytest -q -s -m multigpu tests/test_pass_gpu.py
left=$(( 585 - ($(date +%s)-T0) ))
step linear_rest $left python -m pytest -q -s -v --durations=0 tests/gpu/test_linear_push.py -k "not correctness"
