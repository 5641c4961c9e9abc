"""The config file: one machine's measurements and correctness records, as ``python -m tpfuse tune`` writes
them (docs/tuning.md).

A config is keyed by the device key (``device_key.py``) and W, and holds, per protocol, a correctness
record (``CorrectnessRecord``), the measured T x width rows, the crossovers derived from them under the
documented rule (``crossover_rule.py``) and the fused-linear rule's constants (``linear_constants.py``).
A file that claims what its rows do not show, or that is not a config at all (the one-GPU smoke output),
is refused with the file, the field and what is accepted (``ConfigError``).

**Precedence** (``search_dirs``): the user's tuned configs
(``config.tuned_config_dir()``: ``TPFUSE_TUNED_CONFIG_DIR``, else
``$XDG_CACHE_HOME/tpfuse``, else ``~/.cache/tpfuse``), then the configs shipped
in ``tpfuse/configs/*.json``, then the conservative default (``selection.py``).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field

from ... import config as settings
from .. import crossover_rule
from ..linear_constants import LinearConstants
from .device_key import TOPOLOGIES, DeviceKey, mismatch

log = logging.getLogger(__name__)

#: the ``format`` of a config, and of the one-GPU smoke output that must never be taken for one
FORMAT = "tpfuse-tuned-config"
SMOKE_FORMAT = "tpfuse-tune-smoke"
#: 2: the protocols and crossovers are named by their backends (1 named them barrier_push, ...)
FORMAT_VERSION = 2
#: the protocols a config may hold, in the tune's order, by their backends' names (``p2p_entry_elided``:
#: the ``p2p`` backend with the entry barrier a pass may elide, docs/barrier_elision.md)
PROTOCOLS = ("flag", "p2p", "p2p_entry_elided", "nccl", "nccl_symmetric")
#: the fused linear + push kernel's record sits next to the gathers'
FUSED_LINEAR = "fused_linear"
#: a correctness record passes only with at least this many stressed calls
MIN_STRESS_CALLS = 1000
#: crossover name -> (candidate, baseline, the size it is counted in, the protocol whose record it needs)
#: (each is named by the backend whose calls it caps)
CROSSOVERS = {
    # the largest slab per rank auto sends through the flag protocol instead of p2p (the barrier push)
    "flag": ("flag", "p2p", "slab", "flag"),
    # the largest output p2p keeps; above it auto uses NCCL
    "p2p": ("p2p", "nccl", "output", "nccl"),
    # the largest output auto sends through NCCL's symmetric windows where p2p does not take the call, instead
    # of NCCL's classic path; never by default (compile_ops/nccl_symmetric/)
    "nccl_symmetric": ("nccl_symmetric", "nccl", "output", "nccl_symmetric"),
}
#: the configs shipped with the package (pyproject.toml's package data): tpfuse/configs/, above compile_ops/
SHIPPED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")


class ConfigError(ValueError):
    """A config file that cannot be read: says which file, which field, and what is accepted."""


# --------------------------------------------------------------------------- the records


@dataclass(frozen=True)
class CorrectnessRecord:
    """A protocol's stress on the machine: the calls, what was checked, and the negative control."""

    calls: int
    random_delays: bool
    check: str  # "bit-exact", or for the fused linear "bf16 GEMM tolerance"
    mismatches: int  # calls whose result differed from the reference, summed over ranks
    negative_control: str  # what the control broke
    control_detected: bool  # the check caught the control
    error: str = ""  # what stopped the stress, if anything

    def failure(self) -> str:
        """Why this record does not pass; "" when it does."""
        if self.error:
            return f"the stress failed: {self.error}"
        if self.calls < MIN_STRESS_CALLS:
            return f"{self.calls} stressed calls, fewer than {MIN_STRESS_CALLS}"
        if not self.random_delays:
            return "stressed without random per-rank delays"
        if self.mismatches:
            return f"{self.mismatches} wrong result(s) in {self.calls} calls"
        if not self.control_detected:
            return f"the negative control ({self.negative_control}) was not detected: the check proves nothing"
        return ""

    def as_dict(self) -> dict:
        return {"calls": self.calls, "random_delays": self.random_delays, "check": self.check,
                "mismatches": self.mismatches, "negative_control": self.negative_control,
                "control_detected": self.control_detected, "error": self.error}


_RECORD_FIELDS = {"calls": int, "random_delays": bool, "check": str, "mismatches": int, "negative_control": str,
                  "control_detected": bool, "error": str}


def _record(data, where: str) -> CorrectnessRecord:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected an object with {', '.join(_RECORD_FIELDS)}, got {type(data).__name__}")
    unknown = sorted(set(data) - set(_RECORD_FIELDS))
    missing = [k for k in _RECORD_FIELDS if k not in data and k != "error"]
    if unknown or missing:
        raise ConfigError(f"{where}: missing {missing}, unknown {unknown}; accepted are {list(_RECORD_FIELDS)}")
    for name, kind in _RECORD_FIELDS.items():
        value = data.get(name, "")
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(f"{where}.{name}: {value!r} is not a {kind.__name__}")
    return CorrectnessRecord(**data)


# --------------------------------------------------------------------------- a config


@dataclass(frozen=True)
class TunedConfig:
    """One parsed config file."""

    key: DeviceKey
    world_size: int
    protocols: dict  # name -> {"unavailable": str, "correctness": CorrectnessRecord | None}
    rows: list  # {"T", "width", "graph": {protocol: µs}, "eager": {...}}; NaN where not run
    crossovers: dict  # crossover name -> bytes, as the file states them (checked against the rows)
    linear_constants: LinearConstants | None
    linear_correctness: CorrectnessRecord | None
    measured: dict  # host, date, command, seconds, grid: for people, never for the decision
    path: str = ""
    content_hash: str = ""
    notes: tuple = field(default_factory=tuple)

    def record_failure(self, protocol: str) -> str:
        """Why ``protocol`` may not be used from this config; "" when its record passes."""
        if protocol == FUSED_LINEAR:
            record = self.linear_correctness
        else:
            entry = self.protocols.get(protocol)
            if entry is None:
                return f"{protocol}: not in the config"
            if entry["unavailable"]:
                return f"{protocol}: not available when tuned ({entry['unavailable']})"
            record = entry["correctness"]
        if record is None:
            return f"{protocol}: no correctness record"
        why = record.failure()
        return f"{protocol}: {why}" if why else ""


def _require(data: dict, name: str, kind: type, where: str):
    if name not in data:
        raise ConfigError(f"{where}: missing {name!r}")
    value = data[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{where}.{name}: {value!r} is not a {kind.__name__}")
    return value


def _key(data, where: str) -> tuple[DeviceKey, int]:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected an object")
    accepted = ("gpu", "world_size", "topology", "torch", "nccl", "tpfuse")
    unknown = sorted(set(data) - set(accepted))
    if unknown:
        raise ConfigError(f"{where}: unknown {unknown}; accepted are {list(accepted)}")
    world_size = _require(data, "world_size", int, where)
    if not 2 <= world_size <= 8:
        raise ConfigError(f"{where}.world_size: {world_size}; accepted are 2..8 (the push kernels' ranks)")
    topology = _require(data, "topology", str, where)
    if topology not in TOPOLOGIES:
        raise ConfigError(f"{where}.topology: {topology!r}; accepted are {list(TOPOLOGIES)}")
    strings = {k: _require(data, k, str, where) for k in ("gpu", "torch", "nccl", "tpfuse")}
    if not strings["gpu"]:
        raise ConfigError(f"{where}.gpu: empty; a config is for one GPU model (torch.cuda.get_device_name())")
    return DeviceKey(strings["gpu"], topology, strings["torch"], strings["nccl"], strings["tpfuse"]), world_size


def _nan(value):
    return math.nan if value is None else value


def _rows(data, where: str) -> list:
    if not isinstance(data, list):
        raise ConfigError(f"{where}: expected a list of rows")
    rows = []
    for i, row in enumerate(data):
        here = f"{where}[{i}]"
        if not isinstance(row, dict) or not {"T", "width", "graph", "eager"} <= set(row):
            raise ConfigError(f"{here}: expected an object with T, width, graph and eager")
        if any(not isinstance(row[k], int) or isinstance(row[k], bool) or row[k] <= 0 for k in ("T", "width")):
            raise ConfigError(f"{here}: T={row['T']!r}, width={row['width']!r}; each must be a positive integer")
        for mode in crossover_rule.MODES:
            times = row[mode]
            if not isinstance(times, dict) or set(times) - set(PROTOCOLS):
                raise ConfigError(f"{here}.{mode}: expected {{protocol: µs or null}} with protocols in "
                                  f"{list(PROTOCOLS)}")
            if any(v is not None and (not isinstance(v, (int, float)) or v <= 0) for v in times.values()):
                raise ConfigError(f"{here}.{mode}: every time must be a positive number of µs, or null (not run)")
        rows.append({"T": int(row["T"]), "width": int(row["width"]),
                     **{m: {p: _nan(v) for p, v in row[m].items()} for m in crossover_rule.MODES}})
    return rows


def derive_crossovers(rows: list, world_size: int, itemsize: int = 2) -> dict:
    """Every crossover of ``CROSSOVERS`` from the rows, under the documented rule (crossover_rule.py)."""
    sizes = {"slab": lambda r: r["T"] * r["width"] * itemsize,
             "output": lambda r: r["T"] * r["width"] * itemsize * world_size}
    out = {}
    for name, (candidate, baseline, size, _) in CROSSOVERS.items():
        judged = crossover_rule.judge_all(rows, candidate, baseline, sizes[size])
        out[name] = crossover_rule.crossover(judged) if judged else 0
    return out


def content_hash(data: dict) -> str:
    """A hash of a config's content (not its path or layout): equal files on every rank hash alike."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def parse_config(data, path: str = "<config>") -> TunedConfig:
    """A ``TunedConfig`` from a config's JSON value; ``ConfigError`` naming the file and field otherwise."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config is a JSON object, got {type(data).__name__}")
    if data.get("format") == SMOKE_FORMAT:
        raise ConfigError(f"{path}: a one-GPU smoke output (python -m tpfuse tune --one-gpu), not a config: its ranks "
                          "shared one GPU, so it says nothing about the links")
    if data.get("format") != FORMAT:
        raise ConfigError(f"{path}: format {data.get('format')!r}; accepted is {FORMAT!r}")
    if data.get("format_version") != FORMAT_VERSION:
        raise ConfigError(f"{path}: format_version {data.get('format_version')!r}; this tpfuse reads "
                          f"{FORMAT_VERSION} (re-run python -m tpfuse tune)")
    key, world_size = _key(data.get("key"), f"{path}: key")
    protocols = _require(data, "protocols", dict, path)
    unknown = sorted(set(protocols) - set(PROTOCOLS))
    if unknown:
        raise ConfigError(f"{path}: protocols {unknown} unknown; accepted are {list(PROTOCOLS)}")
    parsed = {}
    for name, entry in protocols.items():
        where = f"{path}: protocols.{name}"
        if not isinstance(entry, dict) or set(entry) - {"unavailable", "correctness"}:
            raise ConfigError(f"{where}: expected an object with 'unavailable' and 'correctness'")
        record = entry.get("correctness")
        parsed[name] = {"unavailable": str(entry.get("unavailable") or ""),
                        "correctness": None if record is None else _record(record, f"{where}.correctness")}
    rows = _rows(data.get("rows", []), f"{path}: rows")
    stated = _require(data, "crossovers", dict, path)
    if set(stated) - set(CROSSOVERS) or any(not isinstance(v, int) or isinstance(v, bool) or v < 0
                                            for v in stated.values()):
        raise ConfigError(f"{path}: crossovers {stated}; accepted are non-negative byte counts named "
                          f"{list(CROSSOVERS)}")
    derived = derive_crossovers(rows, world_size)
    claims = [f"{n}: the file says {v} bytes, the rule on its rows gives {derived[n]}"
              for n, v in stated.items() if v != derived[n]]
    if claims:
        raise ConfigError(f"{path}: a crossover claims more or less than its rows show ({'; '.join(claims)})")
    linear = data.get("linear") or {}
    if not isinstance(linear, dict):
        raise ConfigError(f"{path}: linear: expected an object")
    try:
        constants = (None if linear.get("constants") is None
                     else LinearConstants.from_dict(linear["constants"], f"{path}: linear.constants"))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    record = linear.get("correctness")
    linear_record = None if record is None else _record(record, f"{path}: linear.correctness")
    measured = data.get("measured") or {}
    return TunedConfig(key, world_size, parsed, rows, dict(stated), constants, linear_record,
                       measured if isinstance(measured, dict) else {}, path, content_hash(data))


def load_config(path: str) -> TunedConfig:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as err:
        raise ConfigError(f"{path}: cannot be read ({err.strerror})") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None
    return parse_config(data, path)


def json_safe(value):
    """NaN (a protocol that did not run a row) as null: the files stay standard JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def file_name(key: DeviceKey, world_size: int) -> str:
    """``nvidia-h200_w2_nvlink-all-to-all.json``: one file per GPU model, W and topology in a folder."""
    slug = re.sub(r"[^a-z0-9]+", "-", key.gpu.lower()).strip("-") or "gpu"
    return f"{slug}_w{world_size}_{key.topology}.json"


def write_config(data: dict, folder: str) -> str:
    """Write a config (checked by parsing it first) into ``folder``; returns its path.  Atomic: a rank
    reading the folder meanwhile sees the old file or the new one, never half of one."""
    data = json_safe(data)
    parse_config(json.loads(json.dumps(data)), "<the config being written>")  # never write what cannot be read
    key, world_size = _key(data["key"], "key")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, file_name(key, world_size))
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------- lookup


def search_dirs() -> list[tuple[str, str]]:
    """(what, folder), first match wins: the user's tuned configs, then the shipped ones."""
    return [("user tuned config", settings.tuned_config_dir()), ("shipped config", SHIPPED_DIR)]


def find_config(key: DeviceKey, world_size: int, dirs=None) -> tuple[TunedConfig | None, str, list[str]]:
    """The config for (``key``, W): (config or None, which kind of folder it came from, notes on files passed over).

    In each folder, in order, the files that parse and match; of several, the most recently measured
    (then the last name).  A file that does not parse is passed over with a warning, never raised on:
    one rank raising while its peers set the group up would leave them waiting."""
    notes = []
    for what, folder in (search_dirs() if dirs is None else dirs):
        matches = []
        for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
            try:
                found = load_config(path)
            except ConfigError as err:
                notes.append(f"ignored {err}")
                log.warning("tpfuse: ignored a tuned config: %s", err)
                continue
            why = mismatch(found.key, found.world_size, key, world_size)
            if why:
                notes.append(f"{path}: {why}")
            else:
                matches.append(found)
        if matches:
            best = max(matches, key=lambda c: (str(c.measured.get("date", "")), c.path))
            return best, what, notes
    return None, "", notes
