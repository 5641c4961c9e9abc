"""Real multi-process ranks for the tests (see ``tpfuse.ranks``)."""

from tpfuse.ranks import SAFE_GPU_ENV, free_port, run_ranks

__all__ = ["SAFE_GPU_ENV", "free_port", "run_ranks"]
