"""A tensor-parallel LM head, written the way people write it, for ``python -m tpfuse explain``.

    python -m tpfuse explain examples/tp_lm_head.py:decode_step

Each rank holds a column shard of the vocabulary projection; the logits are
gathered along the hidden (vocab) axis with funcol and the next token is the
argmax. Nothing here knows about tpfuse.
"""

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

HIDDEN, VOCAB_PER_RANK, TOKENS = 64, 96, 4


class LMHead(torch.nn.Module):
    def __init__(self, rank: int):
        super().__init__()
        g = torch.Generator().manual_seed(rank)
        weight = torch.randn(VOCAB_PER_RANK, HIDDEN, generator=g) / HIDDEN**0.5
        self.weight = torch.nn.Parameter(weight, requires_grad=False)  # inference

    def forward(self, hidden):
        local_logits = hidden @ self.weight.t()
        logits = funcol.all_gather_tensor(local_logits, gather_dim=-1, group=dist.group.WORLD)
        return logits.argmax(dim=-1)


def decode_step():
    """Returns (fn, args): explain compiles fn and runs it once."""
    head = LMHead(dist.get_rank())
    hidden = torch.randn(TOKENS, HIDDEN, generator=torch.Generator().manual_seed(0))
    return head, (hidden,)
