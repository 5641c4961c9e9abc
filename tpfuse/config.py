"""Every ``TPFUSE_*`` environment variable and every ``tpfuse.enable()`` option, in one place.

For each variable: its default, what it accepts, who reads it; for the options,
``PassConfig``.

Variables are read when they are used, never at import, so a variable set after
``import tpfuse`` (or changed between two calls, by a benchmark) takes effect.
Parsing is cached per raw string, so the op's hot path pays one dictionary
lookup per read.  Precedence: an explicit ``tpfuse.enable(...)`` argument beats
the variable (``dump_dir`` is the only setting that has both), which beats the
default.  Variables that change what a call does on the GPU must be set alike
on every rank (torchrun passes the parent's environment to all of them); the
table in docs/api.md lists them.
"""

from __future__ import annotations

import functools
import os
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable


@dataclass(frozen=True)
class Variable:
    """One ``TPFUSE_*`` variable: its default (as the raw string would be), its parser and what it is for."""

    name: str
    default: str | None
    parse: Callable[[str], object]
    doc: str


_ON, _OFF = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


def _flag(raw: str) -> bool:
    # Anything else is refused: "off" read as "not empty, so on" would turn a switch the wrong way.
    value = raw.strip().lower()
    if value not in _ON + _OFF:
        raise ValueError("must be 1 or 0 (also true/false, yes/no, on/off)")
    return value in _ON


def _one_or_zero(raw: str) -> bool:
    value = raw.strip()
    if value not in ("1", "0", ""):
        raise ValueError("must be 1 (allow it) or 0")
    return value == "1"


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value <= 0:
        raise ValueError("must be a positive integer")
    return value


def _positive_float(raw: str) -> float:
    value = float(raw)
    if not value > 0:
        raise ValueError("must be a positive number")
    return value


def _watchdog_mode(raw: str) -> str:
    mode = raw.strip().lower()
    if mode not in ("teardown", "report", "off"):
        raise ValueError("must be one of teardown, report, off")
    return mode


VARIABLES = {v.name: v for v in (
    Variable("TPFUSE_BACKEND", "auto", str.strip,  # its choices are the registered backends (compile_ops/dispatch.py)
             "force a backend: auto, flag, p2p, nccl, gloo (or a registered one)"),
    Variable("TPFUSE_DISABLE_PUSH", "0", _flag, "never use the symmetric-memory push (NCCL on CUDA)"),
    Variable("TPFUSE_CHECK", "0", _flag,
             "1: the cross-rank agreement check on CUDA calls too, every path (docs/op.md)"),
    Variable("TPFUSE_PUSH_MAX_BYTES", str(256 << 20), _positive_int,
             "above this output size auto leaves the gather to NCCL"),
    Variable("TPFUSE_ENABLE_MULTIMEM", "0", _one_or_zero,
             "1 allows NVLink multicast where every rank has an address (docs/safety.md)"),
    Variable("TPFUSE_FLAG_MAX_BYTES", None, lambda raw: max(0, int(raw)),
             "the flag protocol's crossover for this run, in slab bytes (unset: the measured table)"),
    Variable("TPFUSE_BARRIER_TIMEOUT_S", "60", _positive_float, "bound on every barrier spin and flag wait, seconds"),
    Variable("TPFUSE_WATCHDOG", "teardown", _watchdog_mode,
             "what the watchdog does when a push call timed out: teardown (print, exit 134), report (print once; "
             "later calls raise), off (no watchdog thread)"),
    Variable("TPFUSE_WATCHDOG_INTERVAL_S", "1", _positive_float, "how often the watchdog reads the status words"),
    Variable("TPFUSE_LINEAR_PUSH", "auto", str.strip,  # validated by the fused op, with its own message
             "the fused linear + push: auto (the cost rule), fused, unfused"),
    Variable("TPFUSE_PUSH_BLOCKS_PER_SM", "2", _positive_int, "grid cap of the push kernels, blocks per SM"),
    Variable("TPFUSE_PUSH_BLOCK_V", "256", _positive_int, "p2p / multimem push kernels: vectors per tile"),
    Variable("TPFUSE_PUSH_NUM_WARPS", "4", _positive_int, "p2p / multimem push kernels: warps per block"),
    Variable("TPFUSE_PUSH_CHUNK_TILES", "4", _positive_int, "p2p / multimem push kernels: tiles per exit exchange"),
    Variable("TPFUSE_FLAG_BLOCK_U", "256", _positive_int, "flag protocol: units per tile (a power of two)"),
    Variable("TPFUSE_FLAG_NUM_WARPS", "4", _positive_int, "flag protocol: warps per block"),
    Variable("TPFUSE_DUMP_DIR", None, str, "write before/after graph code per rank and graph (as enable(dump_dir=))"),
    Variable("TPFUSE_TUNED_CONFIG_DIR", None, str,
             "where python -m tpfuse tune writes tuned configs and auto looks first (unset: $XDG_CACHE_HOME/tpfuse, "
             "else ~/.cache/tpfuse; docs/tuning.md)"),
)}


#: the variables that the op reads on every call (the choice of backend; the agreement check,
#: last): it keeps a call shape's launcher per their raw values (compile_ops/launchers.py), so
#: changing one takes effect at once
DISPATCH_VARIABLES = ("TPFUSE_BACKEND", "TPFUSE_PUSH_MAX_BYTES", "TPFUSE_ENABLE_MULTIMEM", "TPFUSE_FLAG_MAX_BYTES",
                      "TPFUSE_CHECK")


# ``os.environ.get`` of an unset name raises and catches a KeyError inside (~1.5 µs): the
# hot path reads the mapping that ``os.environ`` keeps in step with every change made
# through it (its ``_data``, keyed by encoded names), falling back to ``get`` elsewhere.
_ENVIRON_DATA = getattr(os.environ, "_data", None)
_ENCODED = ({name: os.environ.encodekey(name) for name in VARIABLES}
            if isinstance(_ENVIRON_DATA, dict) and hasattr(os.environ, "encodekey") else None)
_DISPATCH_ENCODED = tuple(_ENCODED[name] for name in DISPATCH_VARIABLES) if _ENCODED else ()


def _raw(name: str):
    """The raw value of variable ``name`` now, or None where unset."""
    environ = os.environ
    if _ENCODED is None or getattr(environ, "_data", None) is not _ENVIRON_DATA:
        return environ.get(name)
    value = _ENVIRON_DATA.get(_ENCODED[name])
    return None if value is None else environ.decodevalue(value)


def raw_dispatch_values() -> tuple:
    """The raw values of ``DISPATCH_VARIABLES`` now (None where unset)."""
    if _ENCODED is None or getattr(os.environ, "_data", None) is not _ENVIRON_DATA:
        return tuple(map(os.environ.get, DISPATCH_VARIABLES))
    return tuple(map(_ENVIRON_DATA.get, _DISPATCH_ENCODED))


def get(name: str):
    """The parsed value of ``name`` now (its default when unset; None for an unset variable without one)."""
    raw = _raw(name)
    if raw is None:
        raw = VARIABLES[name].default
    return None if raw is None else _parse(name, raw)


@functools.lru_cache(maxsize=None)
def _parse(name: str, raw: str):
    try:
        return VARIABLES[name].parse(raw)
    except ValueError as err:
        raise ValueError(f"tpfuse: {name}={raw!r} {err} ({VARIABLES[name].doc})") from None


# --------------------------------------------------------------------------- enable() options


@dataclass(frozen=True)
class PassConfig:
    """What ``tpfuse.enable(**config)``, ``enabled(**config)`` and ``backend(**config)`` accept.

    dry_run: find and report, but rewrite nothing.
    patterns: names of the patterns to run (default: every registered one).
    only_after_linear: rewrite only gathers whose producer is a column linear.
    dump_dir: write before/after graph code here (default ``$TPFUSE_DUMP_DIR``).
    elide_barriers: assign ping-pong slots and skip entry barriers where proven
        (passes/barrier_elision.py); False leaves every gather with both barriers.
    fuse_linear: rewrite a column linear + gather into ``tpfuse::linear_all_gather_hidden``
        where the cost rule predicts a gain (passes/linear_fusion.py).  Off by default: the
        measured gain is small (docs/benchmarks.md).
    zero_copy: where the pass proves every reader of a gather's result finishes before its
        slot is written again, let the op return a view of the slot (no copy-out).
        Experimental and off by default (docs/barrier_elision.md §8).
    eliminate_gathers: where every consumer of a gathered tensor reduces over the gathered
        axis (argmax, max, topk, ...; passes/gather_elimination.py), do not gather it: each
        rank reduces its own band and only small partials travel (docs/passes.md,
        "Gather elimination").
    """

    dry_run: bool = False
    patterns: tuple[str, ...] | None = None
    only_after_linear: bool = False
    dump_dir: str | None = None
    elide_barriers: bool = True
    fuse_linear: bool = False
    zero_copy: bool = False
    eliminate_gathers: bool = True

    def cache_key(self) -> str:
        # dump_dir only decides where text goes, never what the graph becomes.
        key = {k: v for k, v in asdict(self).items() if k != "dump_dir"}
        return repr(sorted(key.items()))


def pass_config(**options: Any) -> PassConfig:
    """A ``PassConfig`` from ``enable()``'s keyword options; an unknown option fails with the accepted ones."""
    known = {f.name for f in fields(PassConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"tpfuse: unknown option(s) {unknown}; accepted are {sorted(known)}")
    if options.get("patterns") is not None:
        names = options["patterns"]
        options["patterns"] = (names,) if isinstance(names, str) else tuple(names)
    return PassConfig(**options)


def tuned_config_dir() -> str:
    """The user's tuned-config folder: ``TPFUSE_TUNED_CONFIG_DIR``, else ``$XDG_CACHE_HOME/tpfuse``, else
    ``~/.cache/tpfuse`` (the XDG cache convention; read here, the one reader of the environment)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return get("TPFUSE_TUNED_CONFIG_DIR") or os.path.join(cache, "tpfuse")


def nccl_nvls_off() -> bool:
    """Whether ``NCCL_NVLS_ENABLE=0`` is set: NCCL then makes no NVLink SHARP (multicast) object for a
    communicator it creates, so no window registered on one is bound to multicast (docs/safety.md, "NCCL
    symmetric windows"; the nccl_symmetric backend runs only then).  Read here, the one reader of the environment."""
    return (os.environ.get("NCCL_NVLS_ENABLE") or "").strip() == "0"


def dump_dir(option: str | None) -> str | None:
    """Where dumps go: the ``dump_dir`` option, else ``$TPFUSE_DUMP_DIR``, else nowhere."""
    return option or get("TPFUSE_DUMP_DIR") or None

