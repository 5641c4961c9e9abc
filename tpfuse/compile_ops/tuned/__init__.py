"""Tuned configs: what ``auto`` may do on one machine, measured there (docs/tuning.md).

Three ideas, one module each, imported downwards only:

- ``device_key.py``: what a measurement holds for (GPU model, W, the links between the host's GPUs, the
  torch, NCCL and tpfuse versions) and why one key's config does not hold under another;
- ``config_file.py``: the JSON file ``python -m tpfuse tune`` writes (correctness records, rows, the
  crossovers derived from them, the linear constants), its checks, and where the files are looked up;
- ``selection.py``: what ``auto`` may do on a group from the config every rank found, agreed across the
  ranks by content hash, else the conservative default.

Callers use the names below from this package (``from tpfuse.compile_ops import tuned``).
"""

from __future__ import annotations

from .config_file import (
    CROSSOVERS,
    FORMAT,
    FORMAT_VERSION,
    FUSED_LINEAR,
    MIN_STRESS_CALLS,
    PROTOCOLS,
    SHIPPED_DIR,
    SMOKE_FORMAT,
    ConfigError,
    CorrectnessRecord,
    TunedConfig,
    content_hash,
    derive_crossovers,
    file_name,
    find_config,
    json_safe,
    load_config,
    parse_config,
    search_dirs,
    write_config,
)
from .device_key import (
    TOPOLOGIES,
    DeviceKey,
    classify_links,
    detect_topology,
    local_device_key,
    mismatch,
    nccl_version,
    parse_topo_matrix,
    release,
    tpfuse_version,
)
from .selection import (
    DEFAULT_WHY,
    WORLD_SIZES,
    Selection,
    agree,
    forget,
    group_selection,
    local_selection,
    selection_for,
    selection_key,
    selection_of,
)

__all__ = [
    # the device key
    "TOPOLOGIES", "DeviceKey", "classify_links", "detect_topology", "local_device_key", "mismatch",
    "nccl_version", "parse_topo_matrix", "release", "tpfuse_version",
    # the config file
    "CROSSOVERS", "FORMAT", "FORMAT_VERSION", "FUSED_LINEAR", "MIN_STRESS_CALLS", "PROTOCOLS", "SHIPPED_DIR",
    "SMOKE_FORMAT", "ConfigError", "CorrectnessRecord", "TunedConfig", "content_hash", "derive_crossovers",
    "file_name", "find_config", "json_safe", "load_config", "parse_config", "search_dirs", "write_config",
    # the selection
    "DEFAULT_WHY", "WORLD_SIZES", "Selection", "agree", "forget", "group_selection", "local_selection",
    "selection_for", "selection_key", "selection_of",
]
