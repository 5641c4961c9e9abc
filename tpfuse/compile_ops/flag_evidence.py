"""The evidence ``auto`` needs before it sends a gather through the flag protocol.

One entry per (GPU model, W), each naming the committed files it rests on
(docs/flag_protocol.md, "Choosing it: on evidence"):

- ``crossover_bytes``: the largest slab at which the flag protocol was no slower
  than the barrier push, derived from ``benchmark_log`` (a JSON written by
  ``benchmarks/bench_gather.py``) by ``benchmarks/derive_crossover.py``;
- ``suite_log``: the log of the protocol's multi-GPU correctness and stress suite
  (``tests/gpu/test_flag_gather.py``) passing on that GPU model at that W, written
  by ``benchmarks/flag_suite_log.py``.  Until one is committed, ``auto`` keeps the
  barrier push there, whatever the crossover says.

``tests/test_selection_evidence.py`` recomputes every crossover from its log and
parses every suite log, so an entry cannot claim more than its files show.  The
paths are relative to the repository root; the installed package carries only
this table, never the logs.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FlagEvidence:
    """What one (GPU model, W) has shown for the flag protocol."""

    #: the largest slab (bytes per rank) at which every measured row up to it had the flag protocol no
    #: slower than the barrier push, in graph replay and eager; 0: not even the smallest row
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
