"""The documented crossover rule: up to which size one protocol may replace another.

The rule (docs/flag_protocol.md, "Choosing it: on evidence"), for a *candidate*
protocol against the *baseline* it would replace:

- a measured row (T, width) **passes** when the candidate's median time is no
  higher than the baseline's in graph replay *and* in eager mode; a row the
  candidate did not serve (NaN) fails, and so does one the baseline did not;
- the **crossover** is the largest size S such that every row of every width
  with a size of at most S passes; 0 when a row at the smallest size fails.
  Widths that disagree never raise it: one failing row caps it below that
  row's size for all widths.  There is no noise band: a tie passes.

The flag protocol against the barrier push measures size as the slab per rank
(``T * width * itemsize``, the unit of ``flag_limit``); the barrier push
against NCCL measures it as the output (``T * width * W * itemsize``, the unit
of ``TPFUSE_PUSH_MAX_BYTES``).  ``benchmarks/derive_crossover.py`` applies this
rule to ``bench_gather.py`` logs, ``python -m tpfuse tune`` to its own
measurements (docs/tuning.md), so a committed log and a tuned config can never
be read under two different rules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

#: the two timing modes every row holds; a candidate must be no slower in both
MODES = ("graph", "eager")
#: bench_gather.py's column names for the flag protocol and the barrier push (both barriers)
FLAG, BARRIER_PUSH = "tpfuse_flag", "tpfuse_both"
#: bench_gather.py times bf16 rows only
BENCH_ITEMSIZE = 2


@dataclass(frozen=True)
class Row:
    """One measured row judged under the rule."""

    T: int
    width: int
    size: int  # the bytes the crossover is counted in (slab per rank, or output)
    candidate: dict  # mode -> median µs
    baseline: dict  # mode -> median µs
    verdict: str  # "" when it passes, else why not

    # The flag protocol's reading, under the names the evidence table and its tests use.
    @property
    def slab(self) -> int:
        return self.size

    @property
    def flag(self) -> dict:
        return self.candidate

    @property
    def barrier_push(self) -> dict:
        return self.baseline


def slab_bytes(row: dict, itemsize: int = BENCH_ITEMSIZE) -> int:
    """A row's slab per rank: ``T * width * itemsize``."""
    return row["T"] * row["width"] * itemsize


def judge(row: dict, candidate: str = FLAG, baseline: str = BARRIER_PUSH,
          size: Callable[[dict], int] = slab_bytes) -> Row:
    """One row (``{"T", "width", "graph": {column: µs}, "eager": {...}}``) against the rule."""
    cand = {mode: row[mode].get(candidate, math.nan) for mode in MODES}
    base = {mode: row[mode].get(baseline, math.nan) for mode in MODES}
    verdict = ""
    for mode in MODES:
        if math.isnan(cand[mode]):
            verdict = f"{candidate} not run"
        elif math.isnan(base[mode]) or cand[mode] > base[mode]:
            verdict = f"slower in {mode}"
        if verdict:
            break
    return Row(row["T"], row["width"], size(row), cand, base, verdict)


def judge_all(rows: list[dict], candidate: str = FLAG, baseline: str = BARRIER_PUSH,
              size: Callable[[dict], int] = slab_bytes) -> list[Row]:
    """Every row judged, smallest size first (then width, then T)."""
    return sorted((judge(r, candidate, baseline, size) for r in rows), key=lambda r: (r.size, r.width, r.T))


def crossover(rows: list[Row]) -> int:
    """The largest size at and below which every row (every width) passes; 0 if the smallest size fails."""
    best = 0
    for size in sorted({r.size for r in rows}):
        if any(r.verdict for r in rows if r.size == size):
            break
        best = size
    return best


def per_width(rows: list[Row]) -> dict[int, int]:
    """Each width's own crossover, for tables only: the rule takes all widths together."""
    return {w: crossover([r for r in rows if r.width == w]) for w in sorted({r.width for r in rows})}
