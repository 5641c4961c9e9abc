"""tpfuse: fast hidden-axis all-gathers for tensor-parallel inference under torch.compile."""

from .compile_ops import all_gather_hidden
from .passes import (
    AnchorArgs,
    Candidate,
    Example,
    FusionPattern,
    Precondition,
    Reject,
    backend,
    disable,
    enable,
    enabled,
    pattern_scope,
    register_pattern,
    registered_patterns,
    report,
    unregister_pattern,
)

__version__ = "0.1.0"
__all__ = [
    "all_gather_hidden", "backend", "disable", "enable", "enabled", "report",
    "FusionPattern", "AnchorArgs", "Candidate", "Reject", "Precondition", "Example",
    "register_pattern", "unregister_pattern", "registered_patterns", "pattern_scope",
]
