"""The exact reductions and gather elimination on real GPUs (NCCL ranks): the same adversarial cases as
on gloo (tests/test_reduce_hidden_gloo.py), on CUDA tensors, with the partials moved by whatever backend
dispatch picks; and the compiled samplers of tests/test_gather_elimination.py with Inductor's GPU code,
bit for bit against tpfuse off.  One spawned run per world size.
"""

import pytest
import torch

from multiproc import run_ranks

pytestmark = [pytest.mark.gpu, pytest.mark.multigpu]


def _on_gpus(rank, world_size):
    from test_gather_elimination import compiled_samplers
    from test_reduce_hidden_gloo import _cases, _check_case

    ops = dict(_check_case(rank, world_size, i, case, device="cuda") for i, case in enumerate(_cases(world_size)))
    torch.cuda.synchronize()
    return ops, compiled_samplers(rank, world_size, "cuda")


@pytest.mark.parametrize("world_size", [2, 4])
def test_exact_reductions_and_compiled_samplers_on_gpus(world_size):
    if torch.cuda.device_count() < world_size:
        pytest.skip(f"needs {world_size} GPUs")
    from test_reduce_hidden_gloo import _assert_exact

    per_rank = run_ranks(world_size, _on_gpus, backend="nccl", timeout=600)
    _assert_exact([ops for ops, _ in per_rank], world_size)
    for rank, (_, samplers) in enumerate(per_rank):
        for (label, fn), r in samplers.items():
            assert r["equal"], (rank, label, fn)
            expected = [] if fn == "_samplers_and_logits" else [("amin", "argmax", "argmin", "max.dim", "topk")]
            assert r["eliminated"] == expected, (rank, label, fn, r["eliminated"], r["near_misses"])
    first = per_rank[0][1]
    for rank, (_, samplers) in enumerate(per_rank[1:], 1):
        for key in first:
            assert samplers[key]["outputs"] == first[key]["outputs"], (rank, key)
