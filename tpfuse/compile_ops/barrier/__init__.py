"""The barrier protocol, host side: its backends, its slots and its one launcher.

- ``backends.py``: ``p2p`` and ``multimem``: what they refuse, and how they prepare and launch a call;
- ``slots.py``: the two ping-pong slots each group keeps for it, and their alternation;
- ``launcher.py``: the one launcher of a gather, used by the backends and the tests alike.

Device side: tpfuse/kernels/barrier/.  Safety argument: docs/safety.md, "Barriers"; the proof
that lets a pass skip an entry barrier: docs/barrier_elision.md.
"""

from .backends import MULTIMEM, P2P

__all__ = ["MULTIMEM", "P2P"]
