"""tpfuse: fast hidden-axis all-gathers for tensor-parallel inference under torch.compile."""

from .compile_ops import all_gather_hidden
from .compile_ops.reduce_hidden import argmax_hidden, argmin_hidden, max_hidden, min_hidden, topk_hidden
from .compile_ops.vocab_parallel_loss import cross_entropy_hidden, entropy_hidden, logsumexp_hidden, target_logprobs_hidden
from .passes import (
    AnchorArgs,
    Candidate,
    Elimination,
    EliminationMatcher,
    Example,
    FusionPattern,
    Precondition,
    Reject,
    backend,
    disable,
    elimination_scope,
    enable,
    enabled,
    pattern_scope,
    register_elimination,
    register_pattern,
    registered_eliminations,
    registered_patterns,
    report,
    unregister_elimination,
    unregister_pattern,
)

__version__ = "0.1.0"
__all__ = [
    "all_gather_hidden", "backend", "disable", "enable", "enabled", "report",
    "FusionPattern", "AnchorArgs", "Candidate", "Reject", "Precondition", "Example",
    "register_pattern", "unregister_pattern", "registered_patterns", "pattern_scope",
    "cross_entropy_hidden", "entropy_hidden", "logsumexp_hidden", "target_logprobs_hidden",
    "argmax_hidden", "argmin_hidden", "max_hidden", "min_hidden", "topk_hidden",
]
