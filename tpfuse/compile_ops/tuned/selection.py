"""The selection: what ``auto`` may do on one group, from the tuned config every rank found (docs/tuning.md).

**Only what passed counts**: a crossover is used only when the protocol it
sends traffic to has a passing correctness record (>= ``MIN_STRESS_CALLS``
calls with random per-rank delays, bit-exact, and a negative control that the
check caught); the linear constants only when the fused kernel's record passes.
Without a config: p2p (the barrier push), never nccl_symmetric, and the linear
rule as ``linear_cost.MEASURED`` has it.

**Rank agreement** (docs/contract.md §2): ``selection_for(key, W, group)`` is
collective.  Every rank looks its config up on its own (ranks may see other
files, or other versions), then the ranks exchange a hash of what they found;
unless every rank found the same content, every rank takes the default and
says why.  Call it where every rank sets the group up, at the same point.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from dataclasses import dataclass

import torch

from ..groups import all_gather_single
from ..linear_constants import LinearConstants
from .config_file import CROSSOVERS, FUSED_LINEAR, TunedConfig, find_config, search_dirs
from .device_key import DeviceKey, local_device_key

log = logging.getLogger(__name__)

DEFAULT_WHY = \
    ("the conservative default: p2p, the barrier push (the flag protocol only where compile_ops/flag/evidence.py "
     "allows; nccl_symmetric never)")


@dataclass(frozen=True)
class Selection:
    """What ``auto`` may do on this group, and which config decided it."""

    config_path: str | None  # None: the default decided
    crossovers: dict  # CROSSOVERS names -> bytes, only those whose protocol's record passed
    linear_constants: LinearConstants | None  # None: linear_cost's own constants and MEASURED table
    why: str  # which config, what it allows, what it dropped and why
    content_hash: str = ""  # "" for the default
    kind: str = ""  # "user tuned config" or "shipped config"; "" for the default

    def describe(self) -> str:
        """One line for the report and ``explain``: the config that decided and its path."""
        return self.why

    def source(self) -> str:
        """Which config decided, with its path, in a few words (the refusals' reasons name it)."""
        if self.config_path:
            return f"{self.kind or 'tuned config'} {self.config_path}"
        return "no tuned config (the default)" if self.why.startswith("no tuned config") else \
            "the default: the ranks found different tuned configs"

    def crossover(self, name: str) -> int | None:
        """The crossover ``name`` (``CROSSOVERS``) in bytes where a passing record backs it; None: the default."""
        return self.crossovers.get(name)


def _default(why: str) -> Selection:
    return Selection(None, {}, None, why)


def _allowed(config: TunedConfig) -> tuple[dict, LinearConstants | None, list[str]]:
    crossovers, dropped = {}, []
    for name, (*_, needs) in CROSSOVERS.items():
        why = config.record_failure(needs)
        if why:
            dropped.append(f"{name} crossover unused ({why})")
        elif name not in config.crossovers:  # not measured: the default's choice stands, not a 0-byte cap
            dropped.append(f"{name} crossover not in the file")
        else:
            crossovers[name] = config.crossovers[name]
    constants = config.linear_constants
    if constants is not None:
        why = config.record_failure(FUSED_LINEAR)
        if why:
            dropped.append(f"linear constants unused ({why})")
            constants = None
    return crossovers, constants, dropped


def _what_it_allows(crossovers: dict, constants: LinearConstants | None) -> str:
    parts = []
    if "flag" in crossovers:
        parts.append(f"flag protocol up to {crossovers['flag']}-byte slabs" if crossovers["flag"]
                     else "flag protocol nowhere (slower already at the smallest slab)")
    if "p2p" in crossovers:
        parts.append(f"p2p (the barrier push) up to {crossovers['p2p']}-byte outputs, NCCL above")
    if "nccl_symmetric" in crossovers:
        parts.append(f"nccl_symmetric up to {crossovers['nccl_symmetric']}-byte outputs where p2p does not take "
                     "the call" if crossovers["nccl_symmetric"] else
                     "nccl_symmetric nowhere (slower than nccl already at the smallest output)")
    parts.append("linear rule with its tuned constants" if constants else "linear rule as linear_cost.py has it")
    return ", ".join(parts)


def selection_of(config: TunedConfig | None, what: str = "", looked: str = "") -> Selection:
    """The selection one rank would make from ``config`` (None: the default), before agreement."""
    if config is None:
        return _default(f"no tuned config{f' (looked in {looked})' if looked else ''}: {DEFAULT_WHY}")
    crossovers, constants, dropped = _allowed(config)
    when = config.measured.get("date", "an unknown date")
    host = config.measured.get("host", "an unknown host")
    why = (f"{what or 'tuned config'} {config.path} ({config.key.describe(config.world_size)}; measured {when} on "
           f"{host}): {_what_it_allows(crossovers, constants)}")
    if dropped:
        why += "; " + "; ".join(dropped)
    return Selection(config.path, crossovers, constants, why, config.content_hash, what)


def _group_of(group):
    """A ``Group`` (groups.py) from a Group, a ProcessGroup or its name; None stays None."""
    from ..groups import Group, group_name_of, resolve_group

    if group is None or isinstance(group, Group):
        return group
    return resolve_group(group_name_of(group))


def _hash_word(selection: Selection) -> int:
    return int(selection.content_hash[:15], 16) if selection.content_hash else 0


def agree(selection: Selection, group) -> Selection:
    """Collective: ``selection`` if every rank of ``group`` made the same one, else the default, saying so."""
    import torch.distributed as dist

    group = _group_of(group)
    if group is None or group.world_size == 1 or group.backend == "fake":
        return selection
    device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in group.backend else torch.device("cpu")
    mine = torch.tensor([_hash_word(selection)], dtype=torch.int64, device=device)
    everyone = torch.empty(group.world_size, dtype=torch.int64, device=device)
    all_gather_single(everyone, mine, group=group.pg)
    words = everyone.tolist()
    if all(w == words[0] for w in words):
        return selection
    paths = [None] * group.world_size
    dist.all_gather_object(paths, selection.config_path or "no config", group=group.pg)
    seen = "; ".join(f"rank {r}: {p}" + (f" ({w:x})" if w else "") for r, (p, w) in enumerate(zip(paths, words)))
    why = f"the ranks found different tuned configs ({seen}): {DEFAULT_WHY}"
    log.warning("tpfuse: %s", why)
    return _default(why)


def selection_for(device_key: DeviceKey, world_size: int, group=None, dirs=None) -> Selection:
    """What ``auto`` may do for (``device_key``, W) on ``group``: collective over ``group`` (None: this
    process alone, e.g. a compile-time prediction), so every rank must call it at the same point."""
    try:
        config, what, _ = find_config(device_key, world_size, dirs)
        looked = ", ".join(folder for _, folder in (search_dirs() if dirs is None else dirs))
        mine = selection_of(config, what, looked)
    except Exception as err:  # noqa: BLE001 - this rank must still reach the exchange, or its peers wait there
        log.warning("tpfuse: looking up a tuned config failed: %s", err)
        mine = _default(f"no tuned config (looking one up failed: {err}): {DEFAULT_WHY}")
    return agree(mine, group)


def group_selection(group, device_name: str) -> Selection:
    """The selection a group agrees on at set-up (the workspace keeps it in its facts): collective over
    ``group``, every rank at the same point.  ``device_name``: the GPU model every rank agreed on."""
    try:
        key = local_device_key(device_name)
    except Exception as err:  # noqa: BLE001 - never leave the peers waiting in the exchange
        return agree(_default(f"no tuned config (this machine's key failed: {err}): {DEFAULT_WHY}"), group)
    return selection_for(key, group.world_size, group)


#: the W a tuned config may hold (the push kernels' ranks)
WORLD_SIZES = range(2, 9)


@functools.lru_cache(maxsize=None)
def selection_key(device_name: str) -> str:
    """A hash of what the local selections decide for ``device_name`` at every W: a compiled graph depends
    on it (the linear rule's constants, the report's planned backend), so the passes' cache key holds it.
    "" when no config applies anywhere (then it is the default everywhere)."""
    if not device_name:
        return ""
    hashes = [local_selection(w, device_name).content_hash for w in WORLD_SIZES]
    return hashlib.sha256(",".join(hashes).encode()).hexdigest() if any(hashes) else ""


def forget() -> None:
    """Drop the cached local selections (a config was written or removed in this process)."""
    local_selection.cache_clear()
    selection_key.cache_clear()


@functools.lru_cache(maxsize=None)
def local_selection(world_size: int, device_name: str | None = None) -> Selection:
    """This process's selection without an exchange, for predictions at compile time (the op decides with the
    agreed one).  Cached: the files are read once per process."""
    return selection_for(local_device_key(device_name), world_size, None)
