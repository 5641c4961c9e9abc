"""Let Dynamo trace funcol's hidden-axis gather on torch versions that refuse it.

``funcol.all_gather_tensor(x, gather_dim=d)`` with ``d > 0`` ends in
``torch._utils._maybe_view_chunk_cat`` (a view when the leading dims are 1,
else chunk + cat).  torch 2.11 marks that file as skipped, so Dynamo breaks
the graph right at the gather and no pass ever sees it.  Later torch lists the
function in ``trace_rules.manual_torch_name_rule_map`` as inlinable, which is
all this module does, on the versions that lack the entry: the traced graph is
the one newer torch produces (a view, or chunk + cat, both matched by the
built-in patterns).  Nothing changes where the entry already exists.

Applied by ``tpfuse.enable()``, ``tpfuse.enabled()`` and ``tpfuse.backend()``.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

_NAME = "torch._utils._maybe_view_chunk_cat"


def allow_funcol_gather_tracing() -> bool:
    """Add the inline rule if this torch lacks it; True when it was added now."""
    import torch._utils

    try:
        from torch._dynamo import trace_rules
        from torch._dynamo.variables import UserFunctionVariable
    except ImportError:  # pragma: no cover - a torch without these internals: nothing to fix
        return False
    rules = getattr(trace_rules, "manual_torch_name_rule_map", None)
    if not hasattr(torch._utils, "_maybe_view_chunk_cat") or not isinstance(rules, dict) or _NAME in rules:
        return False
    rules[_NAME] = UserFunctionVariable
    cached = getattr(trace_rules, "get_torch_obj_rule_map", None)
    if hasattr(cached, "cache_clear"):
        cached.cache_clear()
    log.info("tpfuse: Dynamo may now inline %s (funcol gathers with gather_dim > 0 compile "
             "without a graph break, as on newer torch)", _NAME)
    return True
