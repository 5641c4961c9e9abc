"""The evidence ``auto`` needs before it sends a gather through the flag protocol, and the limit it sets.

One entry per (GPU model, W), each naming the committed files it rests on
(docs/flag_protocol.md, "Choosing it: on evidence"):

- ``crossover_bytes``: the largest slab at which the flag protocol was no slower
  than the p2p backend (the barrier push), derived from ``benchmark_log`` (a JSON written by
  ``benchmarks/bench_gather.py``) by ``benchmarks/derive_crossover.py``;
- ``suite_log``: the log of the protocol's multi-GPU correctness and stress suite
  (``tests/gpu/test_flag_gather.py``) passing on that GPU model at that W, written
  by ``benchmarks/flag_suite_log.py``.  Until one is committed, ``auto`` keeps
  p2p there, whatever the crossover says.

A tuned config (docs/tuning.md) measured on the machine takes the table's place
there (``flag_limit``'s ``selection``).

``tests/test_selection_evidence.py`` recomputes every crossover from its log and
parses every suite log, so an entry cannot claim more than its files show.  The
paths are relative to the repository root; the installed package carries only
this table, never the logs.
"""

from __future__ import annotations

from dataclasses import dataclass

from ... import config as settings
from ...kernels.flag import MAX_SLAB_BYTES


@dataclass(frozen=True)
class FlagEvidence:
    """What one (GPU model, W) has shown for the flag protocol."""

    #: the largest slab (bytes per rank) at which every measured row up to it had the flag protocol no
    #: slower than p2p (the barrier push), in graph replay and eager; 0: not even the smallest row
    crossover_bytes: int
    #: the ``bench_gather.py`` JSON the crossover was derived from
    benchmark_log: str
    #: the passing multi-GPU suite log; None: none committed, so ``auto`` never takes the protocol here
    suite_log: str | None = None


#: per (device name every rank agreed on, W)
FLAG_CROSSOVER: dict[tuple[str, int], FlagEvidence] = {
    # 2 x H200, 2026-11-29: graph replay faster at every row (2.7-4.4 us against 4.3-5.7), but eager
    # (host-bound, ~22 us) the flag protocol was slower already at the smallest row, 1 x 1024 (2 KiB:
    # 22.6 us against 21.9), so no slab qualifies.  No multi-GPU suite log yet.
    ("NVIDIA H200", 2): FlagEvidence(
        crossover_bytes=0,
        benchmark_log="benchmarks/results/bench_gather_w2_h200_flag.json",
        suite_log=None,
    ),
}


def flag_limit(device_name: str, world_size: int, selection=None) -> tuple[int, str]:
    """The largest slab (bytes) ``auto`` sends through the flag protocol, and where that number comes from.

    In order: ``TPFUSE_FLAG_MAX_BYTES`` (benchmarks, tuning, tests; set alike on every rank); the
    tuned config's flag crossover, where ``selection`` (the group's agreed
    ``tuned.Selection``) holds one, which it does only where the protocol passed its stress
    on that machine (docs/tuning.md); else ``FLAG_CROSSOVER``, per (device name, W): the measured
    crossover and the multi-GPU suite log.  ``auto`` takes the protocol from the table only where
    both are there: a (device, W) not in the table was never measured, and one without a suite
    log has not shown the protocol correct across its GPUs.
    """
    override = settings.get("TPFUSE_FLAG_MAX_BYTES")
    if override is not None:
        return min(override, MAX_SLAB_BYTES), "TPFUSE_FLAG_MAX_BYTES"
    tuned = selection.crossover("flag") if selection is not None else None
    if tuned is not None:
        if tuned == 0:
            return 0, f"flag protocol: slower than p2p already at the smallest slab in {selection.source()}"
        return min(tuned, MAX_SLAB_BYTES), f"measured crossover in {selection.source()}"
    where = f"{device_name or 'this device'} at W={world_size}"
    evidence = FLAG_CROSSOVER.get((device_name, world_size))
    if evidence is None:
        return 0, f"flag protocol not measured on {where}"
    if evidence.suite_log is None:
        return 0, f"flag protocol: no committed passing multi-GPU suite for {where}"
    if evidence.crossover_bytes == 0:
        return 0, f"flag protocol: slower than p2p already at the smallest measured slab on {where}"
    return min(evidence.crossover_bytes, MAX_SLAB_BYTES), f"measured crossover on {where}"
