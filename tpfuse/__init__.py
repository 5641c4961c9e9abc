"""tpfuse: fast hidden-axis all-gathers for tensor-parallel inference under torch.compile."""

from .compile_ops import all_gather_hidden
from .passes import backend, disable, enable, enabled, report

__version__ = "0.1.0"
__all__ = ["all_gather_hidden", "backend", "disable", "enable", "enabled", "report"]
