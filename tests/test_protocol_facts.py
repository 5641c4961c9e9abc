"""The elision pass takes the protocols' facts from their one home (the packages kernels/barrier/ and
kernels/flag/) instead of restating them: change a fact there and the decisions follow."""

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

import tpfuse  # noqa: F401  (registers the op)
from tpfuse.kernels import barrier
from tpfuse.kernels import flag as flag_protocol
from tpfuse.passes import barrier_elision


def _chain(x, a, b):
    h1 = torch.ops.tpfuse.all_gather_hidden(x @ a, [8, 8], "0")
    return torch.ops.tpfuse.all_gather_hidden(torch.relu(h1) @ b, [8, 8], "0")


def _decisions():
    with FakeTensorMode():
        args = [torch.empty(s, device="cuda", dtype=torch.bfloat16) for s in ((4, 16), (16, 8), (16, 8))]
        graph = make_fx(_chain)(*args).graph
    return barrier_elision.decide_barriers(graph)


def test_skips_rest_on_the_barrier_protocols_facts(planning):
    monkeypatch = planning
    first, second = _decisions()
    assert first.protocol == second.protocol == "p2p"  # no evidence for the stand-in GPU: auto keeps p2p
    assert second.skip_entry_sync and barrier.EXIT_FENCE.format(gather=first.gather) in second.reason
    assert second.slot == barrier.next_slot(first.slot)
    # Were a slot's reads to outlive the kernel (say, a copy-out moved out of it), no skip would hold.
    monkeypatch.setattr(barrier_elision, "READS_END_IN_KERNEL", False)
    assert not any(d.skip_entry_sync for d in _decisions())


def test_a_flag_gather_is_named_by_the_flag_protocols_fence_fact(planning):
    planning.setenv("TPFUSE_FLAG_MAX_BYTES", str(64 << 10))
    first, second = _decisions()
    assert first.protocol == second.protocol == "flag"
    assert flag_protocol.FENCE.format(gather=first.gather) in second.reason
    assert not any(d.saves_a_barrier for d in (first, second))  # the flag protocol has no barrier to save
