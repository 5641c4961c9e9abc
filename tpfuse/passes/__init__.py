"""Graph passes: decide what to rewrite and where a barrier is provably redundant.

Public entry points are re-exported by ``tpfuse``: ``enable``, ``disable``,
``enabled``, ``backend``, ``report``.  The pieces:

- ``graph_facts``: normalised meaning of nodes (views as reshapes, non-negative dims).
- ``patterns``: the ``FusionPattern`` object, its sites and anchors, and the registry.
- ``collectives``: which ops are collectives, and which of those gather.
- ``builtin_patterns``: the built-in forms, registered through that API.
- ``hidden_gather``: ``find_hidden_gathers`` (records) and ``rewrite_hidden_gathers``.
- ``gather_elimination``: gathers consumed only by reductions over the gathered axis are not
  gathered (``find_gather_eliminations`` / ``rewrite_gather_eliminations``, the matcher registry).
- ``manager``: ``TpfusePass`` (a ``CustomGraphPass``), enable/disable/backend, report, dumps.
- ``cache_records``: the report of graphs served from Inductor's FX graph cache.
"""

from . import builtin_patterns as _builtin_patterns
from .builtin_patterns import BUILTIN_PATTERNS, DEFAULT_PRECONDITIONS, RankBands, rank_bands
from .gather_elimination import (
    Elimination,
    EliminationMatcher,
    ReductionSite,
    elimination_scope,
    find_gather_eliminations,
    register_builtin_eliminations,
    register_elimination,
    registered_eliminations,
    rewrite_gather_eliminations,
    unregister_elimination,
)
from .hidden_gather import find_hidden_gathers, rewrite_hidden_gathers
from .manager import (
    PassConfig,
    TpfusePass,
    backend,
    disable,
    enable,
    enabled,
    is_enabled,
    report,
    reset_report,
    run_passes,
)
from .patterns import (
    REGISTRY,
    AnchorArgs,
    Candidate,
    FusionPattern,
    GatherSite,
    Precondition,
    Reject,
    default_group_resolver,
    pattern_scope,
    register_pattern,
    registered_patterns,
    unregister_pattern,
)
from .records import GatherElimination, GatherMatch, GraphReport, NearMiss, Producer, Report
from .traced import Example, PatternError

for _pattern in BUILTIN_PATTERNS:  # the built-in forms use the public registration API
    register_pattern(_pattern)
del _pattern


def _builtin_eliminations() -> list:
    """The exact family, then the sum family (``eliminate_sums.py``)."""
    from .eliminate_sums import MATCHERS as SUM_MATCHERS
    from .exact_eliminations import EXACT_MATCHERS

    return [*EXACT_MATCHERS, *SUM_MATCHERS]


register_builtin_eliminations(_builtin_eliminations())

__all__ = [
    "AnchorArgs", "default_group_resolver", "BUILTIN_PATTERNS", "DEFAULT_PRECONDITIONS", "Candidate", "Example", "PatternError", "RankBands", "rank_bands",
    "pattern_scope", "FusionPattern", "GatherMatch", "GatherSite", "GraphReport",
    "NearMiss", "PassConfig", "Precondition", "Producer", "REGISTRY", "Reject", "Report",
    "TpfusePass", "backend", "disable", "enable", "enabled", "find_hidden_gathers", "is_enabled",
    "register_pattern", "registered_patterns", "report", "reset_report", "rewrite_hidden_gathers",
    "run_passes", "unregister_pattern",
    "Elimination", "EliminationMatcher", "GatherElimination", "ReductionSite", "elimination_scope",
    "find_gather_eliminations", "register_elimination", "registered_eliminations",
    "rewrite_gather_eliminations", "unregister_elimination",
]
