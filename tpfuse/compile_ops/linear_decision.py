"""Whether a ``tpfuse::linear_all_gather_hidden`` call runs the fused kernel: ``TPFUSE_LINEAR_PUSH``, else the cost rule.

Decided once per call, where the barrier backends prepare it (barrier/backends.py,
``prepare_linear``), from what every rank of the group knows identically: T, K, the
widths, the dtype, and the GPU model and tuned config the ranks agreed on (the
workspace's facts).  So every rank decides alike (docs/contract.md §2).  The rule is
``linear_cost.decide``; what a fused call launches is the launcher's
(linear_push.py), which asks no rule.
"""

from __future__ import annotations

import functools

import torch

from .. import config as settings
from . import linear_cost

_MODES = ("auto", "fused", "unfused")


def linear_push_mode() -> str:
    """``TPFUSE_LINEAR_PUSH``: ``auto`` (the cost rule), ``fused`` or ``unfused``; same on every rank."""
    return _parse_mode(settings.get("TPFUSE_LINEAR_PUSH"))


@functools.lru_cache(maxsize=None)
def _parse_mode(raw: str) -> str:
    mode = raw.strip().lower()
    if mode not in _MODES:
        raise ValueError(f"tpfuse: TPFUSE_LINEAR_PUSH={mode!r} is not one of {', '.join(_MODES)}")
    return mode


@functools.lru_cache(maxsize=4096)
def fused_decision(tokens: int, k: int, widths: tuple, dtype: torch.dtype, device_name: str, constants=None,
                   constants_from: str | None = None) -> linear_cost.LinearFusionDecision:
    """The cost rule for one call shape on one GPU model (cached: the eager hot path)."""
    return linear_cost.decide(tokens, k, widths, str(dtype).removeprefix("torch."), dtype.itemsize,
                              device_name=device_name, constants=constants, constants_from=constants_from)


def fuses(tokens: int, k: int, hidden_widths, dtype: torch.dtype, device_name: str, constants=None,
          constants_from: str | None = None) -> bool:
    """Whether this call runs the fused kernel: ``TPFUSE_LINEAR_PUSH``, else the cost rule on the GPU model
    the group's ranks agreed on (with the agreed tuned config's constants, where it has them).
    Rank-consistent: T, K, the widths, the dtype and agreed facts only."""
    mode = linear_push_mode()
    if mode == "unfused":
        return False
    decision = fused_decision(tokens, k, tuple(hidden_widths), dtype, device_name, constants, constants_from)
    if mode == "fused":
        if decision.rule == "unsupported":
            raise RuntimeError(f"tpfuse: TPFUSE_LINEAR_PUSH=fused but the fused kernel cannot run: {decision.reason}")
        return True
    return decision.fuse


def fuses_call(ws, x: torch.Tensor, hidden_widths) -> bool:
    """``fuses`` for the call on ``x`` on workspace ``ws``: the GPU model its ranks agreed on, and the agreed
    tuned config's constants where it has them.  A call with no rows never fuses: the op's composite
    returns its empty result on every rank alike."""
    k = x.shape[-1]
    tokens = x.numel() // k if k else 0
    if tokens == 0:
        return False
    selection = ws.facts.selection
    constants = (selection.linear_constants, selection.config_path) if selection is not None else (None, None)
    return fuses(tokens, k, hidden_widths, x.dtype, ws.facts.device_name, *constants)
