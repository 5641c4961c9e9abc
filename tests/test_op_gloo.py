import torch
from multiproc import run_ranks

import tpfuse


def _basic(rank, world_size):
    torch.manual_seed(rank)
    x = torch.randn(5, 8, dtype=torch.bfloat16)
    out = tpfuse.all_gather_hidden(x)
    ref = [torch.empty_like(x) for _ in range(world_size)]
    torch.distributed.all_gather(ref, x)
    assert torch.equal(out.view(torch.int16), torch.cat(ref, -1).view(torch.int16))
    return out.shape


def test_smoke_w2():
    assert run_ranks(2, _basic) == [torch.Size([5, 16])] * 2
