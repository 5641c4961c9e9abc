"""The device key: what a tuned config's measurements hold for, W aside (docs/tuning.md).

The GPU model, the link topology between the host's GPUs (NVML, else ``nvidia-smi topo -m``), and the
torch, NCCL and tpfuse versions; ``mismatch`` says why a config measured under one key does not hold
under another.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
from dataclasses import dataclass

import torch

#: the topologies ``detect_topology`` names
TOPOLOGIES = ("nvlink-all-to-all", "nvlink-partial", "pcie", "single-gpu", "unknown")


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
