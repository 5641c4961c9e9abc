"""The flag protocol, host side: its backend, its evidence, its buffers and its one launcher.

- ``backend.py``: ``flag``: what it refuses, and how it prepares and launches a call;
- ``evidence.py``: the measured crossover per GPU model and W, and the limit ``auto`` takes from it;
- ``buffers.py``: the buffers and epoch slots each group keeps for it;
- ``launcher.py``: the one launcher, used by the backend and the tests alike.

Device side: tpfuse/kernels/flag/.  Safety argument: docs/flag_protocol.md.
"""

from .backend import FLAG

__all__ = ["FLAG"]
