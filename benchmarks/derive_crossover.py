"""The flag protocol's evidence: derive a crossover entry from a committed benchmark log, and check the table.

    python benchmarks/derive_crossover.py benchmarks/results/bench_gather_w2_h200_flag.json
    python benchmarks/derive_crossover.py --check

The first form reads a JSON written by ``benchmarks/bench_gather.py`` and prints the
derivation table and the entry for ``tpfuse/compile_ops/flag/evidence.py``.  ``--check``
recomputes every entry of that table from its benchmark log and parses its suite log
(``tests/test_selection_evidence.py`` runs the same check); it exits 1 on any mismatch.

The rule (docs/flag_protocol.md, "Choosing it: on evidence"):
- a row (T, width) **passes** when the flag protocol's time is no higher than the barrier
  push's (both barriers: ``tpfuse_both``) in graph replay *and* in eager mode, both the
  medians the log holds; a row the flag protocol did not serve (NaN) fails;
- the **crossover** is the largest slab S (``T * width * 2`` bytes: the bench times bf16)
  such that every row of every width with a slab of at most S passes; 0 when a row at the
  smallest slab fails.  Widths that disagree thus never raise it: one failing row caps
  it below that row's slab for all widths.

A suite log stands for the protocol's multi-GPU suite on (GPU model, W) when its header
(written by ``benchmarks/flag_suite_log.py``) names that GPU model and the full stress
length, every test of ``tests/gpu/test_flag_gather.py`` collected at that W is listed as
PASSED in pytest's ``-rA`` summary, the correctness and stress tests among them, and
nothing failed, errored or was deselected.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as a script from a checkout: the rule lives in the library
# The rule itself is the library's (tpfuse/compile_ops/crossover_rule.py), so that this script and
# ``python -m tpfuse tune`` can never read a measurement under two different rules.
from tpfuse.compile_ops.crossover_rule import (  # noqa: E402,F401  (re-exported for the evidence tests)
    BARRIER_PUSH, BENCH_ITEMSIZE, FLAG, MODES, Row, crossover, judge, judge_all, per_width)

SUITE_FILE = "tests/gpu/test_flag_gather.py"
#: without these two a log cannot stand for the suite, whatever collection finds
CORE_TESTS = ("test_correctness_bit_exact", "test_stress_random_delays_and_interleaving_bit_exact")
#: the stress test's default length (``TPFUSE_STRESS_ITERS`` shortens it for quick runs)
STRESS_CALLS = 10_000
SUITE_HEADER = re.compile(r"^flag suite: device=(?P<device>.+?) gpus=(?P<gpus>\d+) stress_iters=(?P<iters>\d+)\s*$",
                          re.MULTILINE)
#: pytest's -rA short summary: one line per test with its outcome
SUMMARY_LINE = re.compile(r"^(?P<outcome>PASSED|FAILED|ERROR|XFAIL|XPASS) (?P<node>\S+::\S+)", re.MULTILINE)
#: the verbose progress line of a failure, in case the short summary was cut off
VERBOSE_FAILURE = re.compile(r"^(?P<node>\S+::\S+) (?P<outcome>FAILED|ERROR)\b", re.MULTILINE)
FINAL_LINE = re.compile(r"^=*\s*(?P<counts>\d+ \w+(?:, \d+ \w+)*) in [\d.]+s", re.MULTILINE)


# --------------------------------------------------------------------------- the crossover


@dataclass(frozen=True)
class Derivation:
    key: tuple[str, int]  # (GPU model, W), from the log's own header
    rows: list[Row]
    crossover_bytes: int


def load(path: str) -> dict:
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return json.load(f)  # the bench writes NaN for rows a method did not serve; json reads it back


def derive(log: dict) -> Derivation:
    if not log.get("rows"):
        raise ValueError("the log has no rows: bench_gather.py was run with --skip-sweep; a crossover needs the "
                         "T x width sweep")
    rows = judge_all(log["rows"])
    return Derivation((log["meta"]["card"], int(log["meta"]["W"])), rows, crossover(rows))


def crossover_bytes(path: str) -> tuple[tuple[str, int], int]:
    """(GPU model, W) and the crossover that the rule gives for the bench log at ``path`` (repo-relative)."""
    d = derive(load(path))
    return d.key, d.crossover_bytes


def format_derivation(d: Derivation, path: str) -> str:
    device, W = d.key
    lines = [f"{path}: {W} x {device} (W={W})",
             "a row passes when the flag protocol is no slower than the barrier push (both barriers) in graph "
             "replay and in eager; the crossover is the largest slab at and below which every row passes",
             f"{'T':>4} {'width':>6} {'slab':>8} | {'graph flag':>10} {'push':>6} | {'eager flag':>10} {'push':>6} "
             f"| verdict"]
    for r in d.rows:
        lines.append(f"{r.T:>4} {r.width:>6} {r.slab:>8} | {r.flag['graph']:10.2f} {r.barrier_push['graph']:6.2f} "
                     f"| {r.flag['eager']:10.2f} {r.barrier_push['eager']:6.2f} | {r.verdict or 'passes'}")
    lines.append("each width alone (for comparison only): "
                 + ", ".join(f"{w}: {b} bytes" for w, b in per_width(d.rows).items()))
    lines.append(f"crossover: {d.crossover_bytes} bytes")
    lines.append(f'entry: ("{device}", {W}): FlagEvidence(crossover_bytes={d.crossover_bytes}, '
                 f'benchmark_log="{path}", suite_log=None)  # suite_log: a passing benchmarks/flag_suite_log.py log')
    return "\n".join(lines)


# --------------------------------------------------------------------------- the suite log


def suite_header(device: str, gpus: int, stress_iters: int) -> str:
    """The first line of a suite log (benchmarks/flag_suite_log.py writes it)."""
    return f"flag suite: device={device} gpus={gpus} stress_iters={stress_iters}"


def _params(node: str) -> list[str]:
    match = re.search(r"\[(.*)\]$", node)
    return match.group(1).split("-") if match else []


def suite_node_ids(world_size: int) -> list[str]:
    """The suite's tests at W=``world_size``, as pytest collects them now (no GPU needed to collect)."""
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          SUITE_FILE], cwd=ROOT, capture_output=True, text=True, timeout=300)
    nodes = [line.strip() for line in out.stdout.splitlines() if line.startswith(SUITE_FILE + "::")]
    if not nodes:
        raise RuntimeError(f"collecting {SUITE_FILE} found no tests:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    return [n for n in nodes if str(world_size) in _params(n)]


def suite_refusal(text: str, device: str, world_size: int, required: list[str]) -> str:
    """Why ``text`` does not show the suite passing on ``device`` at W=``world_size``; "" when it does.

    ``required``: the suite's node ids at that W (``suite_node_ids``)."""
    header = SUITE_HEADER.search(text)
    if header is None:
        return ("no header line 'flag suite: device=... gpus=... stress_iters=...' "
                "(write the log with benchmarks/flag_suite_log.py)")
    if header["device"] != device:
        return f"the log is from {header['device']!r}, not {device!r}"
    if int(header["iters"]) < STRESS_CALLS:
        return f"the stress test ran {header['iters']} calls, fewer than the suite's {STRESS_CALLS}"
    names = {n.split("::", 1)[1].split("[", 1)[0] for n in required}
    if not required or not set(CORE_TESTS) <= names:
        return f"{SUITE_FILE} has no {' or '.join(sorted(set(CORE_TESTS) - names))} at W={world_size}"
    failed = sorted({m["node"] for pattern in (SUMMARY_LINE, VERBOSE_FAILURE) for m in pattern.finditer(text)
                     if m["outcome"] in ("FAILED", "ERROR")})
    if failed:
        return f"{len(failed)} test(s) failed, first {failed[0]}"
    finals = FINAL_LINE.findall(text)
    if not finals:
        return "no pytest summary line ('N passed ... in Xs')"
    if re.search(r"\b(failed|errors?|deselected)\b", finals[-1]):
        return f"the run's summary is '{finals[-1]}': the suite must run whole, with nothing failed or deselected"
    passed = {m["node"] for m in SUMMARY_LINE.finditer(text) if m["outcome"] == "PASSED"}
    missing = [n for n in required if n not in passed]
    if missing:
        return (f"{len(missing)} of the suite's {len(required)} tests at W={world_size} are not listed as PASSED "
                f"(run with -rA), first {missing[0]}")
    return ""


# --------------------------------------------------------------------------- the table


def check_table(table: dict) -> list[str]:
    """Every entry's problems: its crossover against the rule on its log, and its suite log; [] when all hold."""
    problems = []
    for (device, W), evidence in table.items():
        where = f"({device!r}, {W})"
        if not os.path.isfile(os.path.join(ROOT, evidence.benchmark_log)):
            problems.append(f"{where}: benchmark log {evidence.benchmark_log} is not in the repository")
            continue
        key, derived = crossover_bytes(evidence.benchmark_log)
        if key != (device, W):
            problems.append(f"{where}: {evidence.benchmark_log} was measured on {key}")
        if derived != evidence.crossover_bytes:
            problems.append(f"{where}: the table says {evidence.crossover_bytes} bytes, the rule on "
                            f"{evidence.benchmark_log} gives {derived}")
        if evidence.suite_log is not None:
            path = os.path.join(ROOT, evidence.suite_log)
            if not os.path.isfile(path):
                problems.append(f"{where}: suite log {evidence.suite_log} is not in the repository")
                continue
            with open(path, encoding="utf-8", errors="replace") as f:
                why = suite_refusal(f.read(), device, W, suite_node_ids(W))
            if why:
                problems.append(f"{where}: suite log {evidence.suite_log}: {why}")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("logs", nargs="*", help="bench_gather.py JSON logs, relative to the repository root")
    parser.add_argument("--check", action="store_true", help="check every entry of the evidence table")
    args = parser.parse_args(argv)
    for path in args.logs:
        print(format_derivation(derive(load(path)), os.path.relpath(os.path.join(ROOT, path), ROOT)))
        print()
    if not args.check:
        return 0
    sys.path.insert(0, ROOT)
    from tpfuse.compile_ops.flag.evidence import FLAG_CROSSOVER

    problems = check_table(FLAG_CROSSOVER)
    for (device, W), evidence in FLAG_CROSSOVER.items():
        print(f"({device!r}, {W}): crossover {evidence.crossover_bytes} bytes from {evidence.benchmark_log}; "
              f"suite log {evidence.suite_log or 'none: auto keeps the barrier push'}")
    print("\n".join(problems) if problems else "every entry matches its logs")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
