"""The report of a graph that Inductor served from its FX graph cache.

On a cache hit Inductor loads the compiled graph and skips the post-grad
passes, so the tpfuse passes do not run in that compile.  Inductor does
replay one thing from the cache entry: the increments of
``counters["inductor"]`` made while the entry was compiled
(``FxGraphCache.cache_hit_post_compile``, used by the FX graph cache and the
AOTAutograd cache alike).  So, while the pass runs, it

- writes the graph's records to ``<Inductor cache dir>/tpfuse_records/<digest>.pkl``
  (the directory every rank sharing the cache shares), and
- increments ``counters["inductor"]["tpfuse_records:<digest>"]``, which becomes
  part of the cache entry.

Every later hit of that entry (a second compile after
``torch._dynamo.reset()``, another process, another rank) increments the
counter again.  ``loaded_since_last_look`` compares the counters with those
already seen and loads the records of every graph served from the cache since.
The cache stays on; nothing here changes a cache key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import pickle
import tempfile
import threading
from dataclasses import dataclass

from .records import GraphReport

TAG = "tpfuse_records:"


@dataclass
class Stored:
    """What the pass stored for one graph: its records, and its code when it was dumped."""

    report: GraphReport
    before: str | None = None
    after: str | None = None


def records_dir() -> pathlib.Path:
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir
    except ImportError:  # pragma: no cover - older torch
        from torch._inductor.runtime.runtime_utils import cache_dir
    return pathlib.Path(cache_dir()) / "tpfuse_records"


def cache_in_use() -> bool:
    """Inductor may save this compile in a cache (so its records should be stored)."""
    import torch._inductor.config as config

    if getattr(config, "force_disable_caches", False):
        return False
    return bool(config.fx_graph_cache or getattr(config, "fx_graph_remote_cache", False))


def _counters():
    from torch._dynamo.utils import counters

    return counters["inductor"]


class _Seen:
    """Counts of our counter keys already accounted for.

    Keyed by name only: Inductor replaces ``counters["inductor"]`` by a copy of
    itself (its pattern matcher's lazy init), so the object is not a stable
    identity.  A count below what was seen means the counters were cleared
    (torch's test cases do): what is there now is new."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: dict[str, int] = {}

    def unseen(self, key: str, count: int) -> int:
        seen = self.counts.get(key, 0)
        return count if count < seen else count - seen


_SEEN = _Seen()


def store(graph_report: GraphReport, before: str | None, after: str | None) -> str:
    """Write the records for later cache hits; returns their digest."""
    kept = dataclasses.replace(graph_report, dump_path=None, from_cache=False,
                               cached_from=f"{graph_report.compile_id} on rank {graph_report.rank}")
    payload = pickle.dumps(Stored(kept, before, after))
    digest = hashlib.sha256(payload).hexdigest()[:24]
    directory = records_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{digest}.pkl"
    if not path.exists():  # ranks may write the same records at once: write, then rename
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.replace(tmp, path)
    counter = _counters()
    with _SEEN.lock:
        counter[TAG + digest] += 1
        _SEEN.counts[TAG + digest] = counter[TAG + digest]  # this compile, not a cache hit
    return digest


def loaded_since_last_look() -> list[Stored | str]:
    """The stored records of every graph served from the cache since the last look;
    a string (the reason) where the records cannot be read."""
    counter = _counters()
    out: list[Stored | str] = []
    with _SEEN.lock:
        for key, count in list(counter.items()):
            new = _SEEN.unseen(key, count) if key.startswith(TAG) else 0
            if new:
                out += [_load(key[len(TAG):])] * new
            if key.startswith(TAG):
                _SEEN.counts[key] = count
    return out


def mark_all_seen() -> None:
    """Forget cache hits so far (``enable()`` / ``reset_report()`` start a new report)."""
    counter = _counters()
    with _SEEN.lock:
        _SEEN.counts.update({k: v for k, v in counter.items() if k.startswith(TAG)})


def _load(digest: str) -> Stored | str:
    path = records_dir() / f"{digest}.pkl"
    try:
        with open(path, "rb") as f:
            stored = pickle.load(f)
    except (OSError, pickle.UnpicklingError, AttributeError, EOFError) as err:
        return (f"a graph was loaded from the FX graph cache, but its tpfuse records ({path}) "
                f"cannot be read: {type(err).__name__}: {err}; the cache entry was written "
                "elsewhere (a remote cache) or the records were deleted")
    return stored if isinstance(stored, Stored) else f"{path} does not hold tpfuse records"
