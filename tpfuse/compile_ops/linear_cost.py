"""The cost rule of ``tpfuse::linear_all_gather_hidden``: fused kernel, or cuBLAS linear + the gather?

One pure function of (T, K, the ranks' widths, dtype, the GPU model) -- what every rank
knows identically -- so every rank decides the same (docs/contract.md §2).  The op
decides per call with the GPU model its group's ranks agreed on (the workspace's
``facts.device_name``); the pass decides whether to rewrite with the local model
(``compile_time_device_name``) and, for a symbolic T, with every T the range allows
(``decide_range``).  ``TPFUSE_LINEAR_PUSH`` may force a path.

**Measured only where ``MEASURED`` says**: a (GPU model, W) with no measurement is not
fused (rule ``not_measured``), since the constants below describe one card's HBM, SM count
and NVLink, and the gather's latency one W each.

**Calibrated on 4xH200** (torch 2.11, Triton 3.6; ``benchmarks/bench_linear_gather.py``
at W=2 and 4, T=1..32, tables in docs/benchmarks.md; the fit is
``benchmarks/fit_linear_cost.py``, and tests/test_linear_cost_fit.py keeps the constants
below equal to what it gives on the committed results).  The model:

- weight floor ``t_w = N_r * K * elem / HBM_BYTES_PER_S``, egress ``T * N_r * elem * (W - 1)``;
- unfused = ``t_w / CUBLAS_EFFICIENCY + CUBLAS_FIXED_US`` + the tpfuse gather
  (``GATHER_LATENCY_US[W] + egress / GATHER_BYTES_PER_S``);
- fused = ``max(t_w / (FUSED_EFFICIENCY * fill), egress / GATHER_BYTES_PER_S) + FUSED_FIXED_US
  + egress / FUSED_TAIL_BYTES_PER_S``, ``fill = min(1, tiles / SMS)``: the weight
  stream, which the pushes can hide behind but not outrun; the barriers and
  ramp; and the part of the pushes and the copy-out that does not hide (the
  last wave's pushes, the exit barrier's wait for them, the copy-out of the
  peers' bands: ``sweep_linear_config.py --diag``);
- fuse iff T <= MAX_TOKENS, the band is wide (``kernels.linear_push.wide_band``: 128-column
  tiles fill the SMs), the shape conditions hold and unfused / fused >= MIN_SPEEDUP.

Fitted by least squares to the LM-head rows (K 4096 and 7168, W=2 and 4,
T=1..32; the kernel of 2026-11-27 with the split entry barrier and the fifth sweep's
launch configs; CUDA graphs of 32 calls, which pay the ranks' host skew once per 32 calls,
as a decode step's graph pays it once per model): four W=4 runs on two different 4-GPU hosts and
one W=2 run, 76 rows.  The model's speedup is within 0.06 of the measured one on every row;
it over-predicts by up to 0.06 at T <= 8 (where it predicts at most 1.16x) and on W=2
(at most 1.16x), and by at most 0.023 on the rows it fuses (hidden 4096, W=4, T = 21..32).
Not fitted, hence not fused: narrow bands (their 16- and 32-column tiles measured
0.46-0.68x on the EAGLE3 projection and 0.98-1.24x on the Llama-8B MLP, one run each at
W=4; cuBLAS's GEMV kernels are fast there, and the model's fixed costs do not describe
them) and T > 32 (0.46-1.00x at T=64 and 128: 64-row tiles stream the weight slowly).  Doubtful: wide bands
with a small weight (K of a few hundred) are extrapolated, not measured.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: where the rule was measured, (``torch.cuda.get_device_name()``, W) -> the runs the constants are
#: fitted to (benchmarks/fit_linear_cost.py prints the same keys from the results files' ``meta``).
#: Anywhere else the rule does not fuse: no constant below describes another card or W.
MEASURED = {
    ("NVIDIA H200", 4): "four runs on two hosts, 2026-11-27 (benchmarks/results/bench_linear_gather_w4_h200_c32*.json)",
    ("NVIDIA H200", 2): "one run, 2026-11-27 (benchmarks/results/bench_linear_gather_w2_h200_c32.json)",
}

#: HBM peak per card (bytes/s), for weight floors in the benchmarks; unknown cards get the H100's
HBM_PEAK_BY_CARD = {"H100": 3.35e12, "H200": 4.8e12}
#: the H200's, the card the constants below were fitted on
HBM_BYTES_PER_S = HBM_PEAK_BY_CARD["H200"]
#: fraction of the HBM peak that cuBLAS reaches on a decode linear, and its fixed cost (graph replay)
CUBLAS_EFFICIENCY = 0.844
CUBLAS_FIXED_US = 3.09
#: the same for the fused kernel: weight stream, and launch + both barriers + pipeline ramp
FUSED_EFFICIENCY = 0.909
FUSED_FIXED_US = 7.81
#: the fused kernel's egress that does not hide behind the weight stream (pushes of the last
#: wave, exit barrier, copy-out), as a rate over the whole egress
FUSED_TAIL_BYTES_PER_S = 572e9
#: multiprocessors of an H100 / H200 SXM (the fill term)
SMS = 132
#: tpfuse gather, both barriers, small messages (linear + gather minus linear, fitted at T=1..32)
GATHER_LATENCY_US = {2: 6.7, 4: 7.2}
#: tpfuse gather, per-GPU egress at decode sizes (fitted with the latencies above)
GATHER_BYTES_PER_S = 241e9
#: the least gain the rule fuses for: 1.2x, the fused op's target (docs/benchmarks.md, "Against the targets").  Below it the unfused path
#: stays, which a profiler shows as cuBLAS and the gather, rounds the logits as cuBLAS does (the fused
#: GEMM is within the bf16 GEMM tolerance of it, not bit-identical) and holds no SM in a spinning barrier
#: while the GEMM runs; TPFUSE_LINEAR_PUSH=fused takes the rows that win by less (docs/benchmarks.md)
TARGET_SPEEDUP = 1.2
#: margin for the model's error near the target: it over-predicts the rows it fuses by at most 0.023
#: (tests/test_linear_cost_fit.py: at most this margin + 0.005), and every measurement of those rows
#: is >= TARGET_SPEEDUP (the same test)
MODEL_MARGIN = 0.02
#: fuse only where the model predicts at least this
MIN_SPEEDUP = TARGET_SPEEDUP + MODEL_MARGIN
#: the largest T the rule fuses: at T=64 and 128 the fused kernel measured 0.46-1.00x on every shape
MAX_TOKENS = 32
FUSED_DTYPES = ("bfloat16", "float16")
#: the model's name, printed with each decision
MODEL = "measured-v5 (4xH200, 2026-11-27)"


@dataclass(frozen=True)
class LinearFusionDecision:
    """Whether to run the fused kernel, which rule said so, and the model's numbers."""

    fuse: bool
    # "predicted_faster", "predicted_slower", "measured_slower", "not_modelled", "not_measured",
    # "unsupported", or (decide_range, symbolic T) "per_call"
    rule: str
    reason: str
    fused_us: float = 0.0
    unfused_us: float = 0.0

    def __str__(self) -> str:
        return f"{'fused' if self.fuse else 'not fused'} [{self.rule}]: {self.reason}"


def hbm_peak(card_name: str) -> float:
    """The HBM peak of a card named like ``torch.cuda.get_device_name()`` (H100's when unknown)."""
    return next((v for k, v in HBM_PEAK_BY_CARD.items() if k in card_name), HBM_PEAK_BY_CARD["H100"])


def weight_floor_us(k: int, width: int, elem_size: int = 2) -> float:
    """Reading this rank's weight band once from HBM at the peak: no linear can be faster."""
    return width * k * elem_size / HBM_BYTES_PER_S * 1e6


def _gather_us(tokens, width, world_size, elem_size):
    egress = tokens * width * elem_size * (world_size - 1)
    # An unmeasured W gets a guess, for the benchmarks' "predicted" columns only: decide()
    # stops at ``not_measured`` before it predicts anything for such a W.
    latency = GATHER_LATENCY_US.get(world_size, GATHER_LATENCY_US[4] + 0.6 * (world_size - 4))
    return latency + egress / GATHER_BYTES_PER_S * 1e6, egress


def predict(tokens: int, k: int, widths, elem_size: int = 2) -> tuple[float, float]:
    """(fused µs, unfused µs) under the model above."""
    from ..kernels.linear_push import launch_config

    world_size, width = len(widths), max(widths)
    floor = weight_floor_us(k, width, elem_size)
    gather, egress = _gather_us(tokens, width, world_size, elem_size)
    unfused = floor / CUBLAS_EFFICIENCY + CUBLAS_FIXED_US + gather
    fill = min(1.0, launch_config(tokens, k, widths, elem_size)["tiles"] / SMS)
    fused = (max(floor / (FUSED_EFFICIENCY * fill), egress / GATHER_BYTES_PER_S * 1e6) + FUSED_FIXED_US
             + egress / FUSED_TAIL_BYTES_PER_S * 1e6)
    return fused, unfused


def compile_time_device_name() -> str:
    """The GPU model the pass decides for: this process's, "" without CUDA (then nothing is measured).

    Only the rewrite depends on it; the op decides again per call from the model every rank
    agreed on, and its unfused path is the plain gather, so ranks stay consistent.  CPU graph
    tests replace this function to say which card to assume."""
    try:
        return torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    except Exception:  # noqa: BLE001 - no driver: nothing measured applies
        return ""


def _not_measured(device_name: str, world_size: int) -> LinearFusionDecision | None:
    if (device_name, world_size) in MEASURED:
        return None
    return LinearFusionDecision(False, "not_measured",
                                f"not measured on {device_name or 'this device'} at W={world_size}")


def decide(tokens: int, k: int, widths, dtype_name: str, elem_size: int = 2, *,
           device_name: str, constants=None, constants_from: str | None = None) -> LinearFusionDecision:
    """The rule.  Rank-consistent: a function of T, K, the widths (hence W), the dtype and
    ``device_name`` (``torch.cuda.get_device_name()`` of every rank, "" when unknown or mixed).

    ``constants`` (``linear_constants.LinearConstants``, from the tuned config every rank agreed on,
    ``constants_from`` its path; docs/tuning.md) replace the module's H200 constants: the config was
    measured on this GPU model at this W, so it stands for the ``MEASURED`` entry too.  None: the
    module's own rule."""
    widths = tuple(int(w) for w in widths)
    world_size = len(widths)
    if dtype_name not in FUSED_DTYPES:
        return LinearFusionDecision(False, "unsupported", f"dtype {dtype_name} (the fused kernel takes "
                                    f"{' / '.join(FUSED_DTYPES)})")
    if not 2 <= world_size <= 8:
        return LinearFusionDecision(False, "unsupported", f"W={world_size} (the fused kernel takes 2..8 ranks)")
    if k % 8 or any(w % 8 for w in widths):
        return LinearFusionDecision(False, "unsupported", f"K={k} or a width in {list(widths)} is not a "
                                    "multiple of 8 elements (16-byte rows)")
    unmeasured = None if constants is not None else _not_measured(device_name, world_size)
    if unmeasured is not None:
        return unmeasured
    if tokens > MAX_TOKENS:
        return LinearFusionDecision(False, "measured_slower", f"T={tokens} > {MAX_TOKENS} (the fused kernel "
                                    "measured 0.46-1.00x of linear + gather at T=64 and 128)")
    from ..kernels.linear_push import launch_config, wide_band

    if not wide_band(max(int(tokens), 1), widths):
        block_n = launch_config(max(int(tokens), 1), k, widths, elem_size)["BLOCK_N"]
        return LinearFusionDecision(False, "not_modelled", f"N_r={max(widths)} at T={tokens}: too narrow for "
                                    f"128-column tiles to fill the SMs; the model is fitted to wide bands only, and "
                                    f"these {block_n}-column tiles measured 0.46-1.24x of linear + gather (EAGLE3 "
                                    "projection 0.46-0.68x, Llama-8B MLP 0.98-1.24x)")
    model = (predict, MODEL) if constants is None else (constants.predict, f"tuned constants of {constants_from}")
    fused, unfused = model[0](max(int(tokens), 1), k, widths, elem_size)
    speedup = unfused / fused
    text = (f"T={tokens} K={k} N_r={max(widths)} W={world_size}: predicted fused {fused:.1f} us vs "
            f"linear+gather {unfused:.1f} us ({speedup:.2f}x, threshold {MIN_SPEEDUP:.2f}x; {model[1]})")
    if speedup >= MIN_SPEEDUP:
        return LinearFusionDecision(True, "predicted_faster", text, fused, unfused)
    return LinearFusionDecision(False, "predicted_slower", text, fused, unfused)


def _runs(values) -> str:
    """``[21..32]``, or ``[3..4, 9..12]``: the T that fuse, as ranges."""
    runs, start = [], None
    for i, v in enumerate(values):
        start = v if start is None else start
        if i + 1 == len(values) or values[i + 1] != v + 1:
            runs.append(f"{start}..{v}")
            start = None
    return f"[{', '.join(runs)}]"


def decide_range(lo: int, hi: int | None, k: int, widths, dtype_name: str, elem_size: int = 2, *,
                 device_name: str, constants=None, constants_from: str | None = None) -> LinearFusionDecision:
    """The rule for a symbolic T in ``lo..hi`` (``hi`` None: unbounded): fuse (rule ``per_call``)
    when any T there fuses, since the op decides again with each call's T.  Only T <= MAX_TOKENS
    can fuse, so at most 32 T are tried.  ``constants``: as in ``decide``."""
    span = f"T symbolic (range {lo}..{'inf' if hi is None else hi})"
    first, last = max(int(lo), 1), MAX_TOKENS if hi is None else min(int(hi), MAX_TOKENS)
    tuned = {"constants": constants, "constants_from": constants_from}
    tried = {t: decide(t, k, widths, dtype_name, elem_size, device_name=device_name, **tuned)
             for t in range(first, last + 1)}
    fusing = [t for t, d in tried.items() if d.fuse]
    if fusing:
        return LinearFusionDecision(True, "per_call", f"{span}: fused op, decided per call; fuses at T in "
                                    f"{_runs(fusing)} on {device_name} W={len(tuple(widths))}")
    # No T fuses: say why at the most promising T (the largest tried; the lowest when none is <= 32).
    t = last if tried else max(int(lo), 1)
    why = tried.get(t) or decide(t, k, widths, dtype_name, elem_size, device_name=device_name, **tuned)
    if why.rule in ("unsupported", "not_measured"):  # the same at every T
        return LinearFusionDecision(False, why.rule, f"{why.reason} ({span})")
    tried_text = f"no T in {first}..{last} fuses" if tried else f"no T <= {MAX_TOKENS} in range"
    return LinearFusionDecision(False, why.rule, f"{span}: {tried_text}; at T={t}: {why.reason}",
                                why.fused_us, why.unfused_us)
