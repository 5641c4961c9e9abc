"""Tuned configs: what ``auto`` may do on one machine, measured there (docs/tuning.md).

A config is a JSON file written by ``python -m tpfuse tune``.  It is keyed by
the GPU model, W, the link topology between the host's GPUs and the torch,
NCCL and tpfuse versions (``DeviceKey``), and holds, per protocol, a
correctness record (``CorrectnessRecord``), the measured T x width rows, the
crossovers derived from them under the documented rule
(``crossover_rule.py``) and the fused-linear rule's constants
(``linear_constants.py``).

**Precedence** (``search_dirs``): the user's tuned configs
(``config.tuned_config_dir()``: ``TPFUSE_TUNED_CONFIG_DIR``, else
``$XDG_CACHE_HOME/tpfuse``, else ``~/.cache/tpfuse``), then the configs shipped
in ``tpfuse/configs/*.json``, then the conservative default: p2p (the barrier push),
never nccl_symmetric, and the linear rule as ``linear_cost.MEASURED`` has it.

**Only what passed counts**: a crossover is used only when the protocol it
sends traffic to has a passing correctness record (>= ``MIN_STRESS_CALLS``
calls with random per-rank delays, bit-exact, and a negative control that the
check caught); the linear constants only when the fused kernel's record passes.

**Rank agreement** (docs/contract.md §2): ``selection_for(key, W, group)`` is
collective.  Every rank looks its config up on its own (ranks may see other
files, or other versions), then the ranks exchange a hash of what they found;
unless every rank found the same content, every rank takes the default and
says why.  Call it where every rank sets the group up, at the same point.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import logging
import math
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field

import torch

from .. import config as settings
from . import crossover_rule
from .groups import all_gather_single
from .linear_constants import LinearConstants

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
#: the topologies ``detect_topology`` names
TOPOLOGIES = ("nvlink-all-to-all", "nvlink-partial", "pcie", "single-gpu", "unknown")
SHIPPED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
DEFAULT_WHY = \
    ("the conservative default: p2p, the barrier push (the flag protocol only where compile_ops/flag/evidence.py "
     "allows; nccl_symmetric never)")


class ConfigError(ValueError):
    """A config file that cannot be read: says which file, which field, and what is accepted."""


# --------------------------------------------------------------------------- the key


@dataclass(frozen=True)
class DeviceKey:
    """What a measurement holds for, W aside: the GPU model, the links between the host's GPUs, the versions."""

    gpu: str
    topology: str
    torch: str
    nccl: str
    tpfuse: str

    def as_dict(self, world_size: int) -> dict:
        return {"gpu": self.gpu, "world_size": world_size, "topology": self.topology, "torch": self.torch,
                "nccl": self.nccl, "tpfuse": self.tpfuse}

    def describe(self, world_size: int) -> str:
        return (f"{self.gpu or 'no GPU'}, W={world_size}, {self.topology}, torch {self.torch}, NCCL {self.nccl}, "
                f"tpfuse {self.tpfuse}")


def release(version: str) -> str:
    """``major.minor`` of a version string (``2.11.0+cu128`` -> ``2.11``): the part a config must share."""
    parts = re.findall(r"\d+", version.split("+", 1)[0])
    return ".".join(parts[:2]) if len(parts) >= 2 else version


def mismatch(found: DeviceKey, found_w: int, wanted: DeviceKey, wanted_w: int) -> str:
    """Why a config measured for (``found``, ``found_w``) does not hold for (``wanted``, ``wanted_w``); "" if it does.

    GPU model, W, topology and the tpfuse version must be equal (the kernels and protocols are
    tpfuse's, so their correctness record is that version's); torch and NCCL must share their
    major.minor release (a patch release keeps the collectives' and the compiler's code paths)."""
    exact = (("GPU", found.gpu, wanted.gpu), ("W", found_w, wanted_w), ("topology", found.topology, wanted.topology),
             ("tpfuse", found.tpfuse, wanted.tpfuse))
    for what, a, b in exact:
        if a != b:
            return f"measured for {what} {a}, this is {b}"
    for what, a, b in (("torch", found.torch, wanted.torch), ("NCCL", found.nccl, wanted.nccl)):
        if release(a) != release(b):
            return f"measured under {what} {a}, this is {what} {b} (the major.minor release must match)"
    return ""


def tpfuse_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("tpfuse")
    except metadata.PackageNotFoundError:  # a checkout on sys.path, not installed
        return "unknown"


def nccl_version() -> str:
    try:
        return ".".join(map(str, torch.cuda.nccl.version()))
    except Exception:  # noqa: BLE001 - a CPU build has no NCCL
        return "none"


def classify_links(nvlink_pairs: list[bool]) -> str:
    """The topology name of a host from whether each pair of its GPUs is joined by NVLink."""
    if not nvlink_pairs:
        return "single-gpu"
    if all(nvlink_pairs):
        return "nvlink-all-to-all"
    return "nvlink-partial" if any(nvlink_pairs) else "pcie"


#: ``nvidia-smi topo -m`` cells between two GPUs: NV<n> is NVLink, the rest PCIe / CPU paths
_PCIE_CELLS = {"PIX", "PXB", "PHB", "NODE", "SYS", "SOC"}


def parse_topo_matrix(text: str) -> str:
    """The topology from ``nvidia-smi topo -m`` output, or "unknown" when the matrix cannot be read."""
    lines = [line for line in text.splitlines() if line.strip()]
    header = next((line for line in lines if re.match(r"^\s+GPU0\b", line)), None)
    if header is None:
        return "unknown"
    gpus = [c for c in header.split() if re.fullmatch(r"GPU\d+", c)]
    rows = {}
    for line in lines:
        cells = line.split()
        if cells and re.fullmatch(r"GPU\d+", cells[0]) and len(cells) > len(gpus):
            rows[cells[0]] = cells[1:1 + len(gpus)]
    pairs = []
    for i, a in enumerate(gpus):
        for j in range(i + 1, len(gpus)):
            cell = rows.get(a, [None] * len(gpus))[j]
            if cell is None or not (cell.startswith("NV") or cell in _PCIE_CELLS):
                return "unknown"
            pairs.append(cell.startswith("NV"))
    return classify_links(pairs)


def _nvml_topology() -> str | None:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        try:
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            nvlink = pynvml.NVML_P2P_CAPS_INDEX_NVLINK
            pairs = [pynvml.nvmlDeviceGetP2PStatus(a, b, nvlink) == pynvml.NVML_P2P_STATUS_OK
                     for i, a in enumerate(handles) for b in handles[i + 1:]]
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - an old NVML or no driver: try the next source
        return None
    return classify_links(pairs)


@functools.lru_cache(maxsize=1)
def detect_topology() -> str:
    """How this host's GPUs are linked (``TOPOLOGIES``): from NVML, else ``nvidia-smi topo -m``, else unknown.

    A host property (every GPU NVML lists, whatever this process sees), so every rank on the host
    names the same; ranks on other hosts may not, and the agreement then falls back."""
    found = _nvml_topology()
    if found is not None:
        return found
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "unknown"
    try:
        out = subprocess.run([smi, "topo", "-m"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return parse_topo_matrix(out.stdout) if out.returncode == 0 else "unknown"


def local_device_key(device_name: str | None = None) -> DeviceKey:
    """This process's key: ``device_name`` (the GPU model the group agreed on; default this process's)."""
    if device_name is None:
        try:
            device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
        except Exception:  # noqa: BLE001 - no driver: no GPU model, no config applies
            device_name = ""
    topology = detect_topology() if device_name else "unknown"
    return DeviceKey(device_name, topology, torch.__version__, nccl_version(), tpfuse_version())


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


# --------------------------------------------------------------------------- the selection


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
    from .groups import Group, group_name_of, resolve_group

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
