#!/bin/bash
# Device batch A: issue 4 W=2 stress, issue 7 GPU pass tests + demo, issue 6 linear tests.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=.
nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/cards.txt
step() { local name=$1 lim=$2; shift 2; local t0=$(date +%s); timeout $lim "$@" > $OUT/$name.log 2>&1; echo "$name rc=$? $(( $(date +%s)-t0 ))s" | tee -a $OUT/summary.txt; tail -5 $OUT/$name.log; }
step linear_tests 170 python -m pytest -q -x -s tests/gpu/test_linear_push.py
step stress_w2 200 python -m pytest -q -s tests/gpu/test_barrier_elision_stress.py -k "2]"
step pass_gpu 90 python -m pytest -q -s -m multigpu tests/test_pass_gpu.py
step demo_cuda 90 python -m tpfuse demo --device cuda --nproc 4
