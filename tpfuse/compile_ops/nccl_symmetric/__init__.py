"""NCCL's symmetric kernels, host side: the ``nccl_symmetric`` backend, its windows and its one launcher.

NCCL 2.27 and later run small collectives with symmetric kernels when both buffers lie in windows
registered on the communicator as symmetric.  This backend gathers through such windows: the slab is
copied into a send window, ``all_gather_into_tensor`` fills a receive window, and the bands are
rearranged into the caller's ``[T, sum(widths)]`` (NCCL's ``[W, T, w]`` is not that layout for T > 1).

- ``backend.py``: ``nccl_symmetric``: what it refuses, and how it prepares and launches a call; ``auto``
  takes it only from a tuned config with a passing record and a crossover for it (docs/tuning.md);
- ``support.py``: what the windows need from this process's NCCL and torch, and ``NCCL_NVLS_ENABLE=0``;
- ``windows.py``: the registered staging buffers each group keeps, and ``release``;
- ``launcher.py``: the one launcher, used by the backend, the tune's runner and the benchmark alike.

No device side of tpfuse's own: NCCL's kernels move the bytes.  Safety argument (NVLink multicast stays
off): docs/safety.md, "NCCL symmetric windows".
"""

from .backend import NCCL_SYMMETRIC
from .windows import release_group as release

__all__ = ["NCCL_SYMMETRIC", "release"]
