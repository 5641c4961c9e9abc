"""The cost rule of ``tpfuse::linear_all_gather_hidden``: fused kernel, or cuBLAS linear + the gather?

One pure function of (T, K, the ranks' widths, dtype) -- what every rank knows
identically -- so every rank decides the same (CONTEXT §2.2).  The pass uses it
to decide whether to rewrite; the op uses it again per call (T may be
symbolic at compile time), unless ``TPFUSE_LINEAR_PUSH`` forces a path.

**Calibrated on 4xH200** (torch 2.11, Triton 3.6; ``benchmarks/bench_linear_gather.py``
and ``benchmarks/sweep_linear_config.py``, tables in docs/benchmarks.md).  The model:

- weight floor ``t_w = N_r * K * elem / HBM_BYTES_PER_S``;
- unfused = ``t_w / CUBLAS_EFFICIENCY + CUBLAS_FIXED_US`` + the tpfuse gather
  (``GATHER_LATENCY_US[W] + egress / GATHER_BYTES_PER_S``);
- fused = ``max(t_w / (FUSED_EFFICIENCY * fill), x re-reads / L2_BYTES_PER_S,
  egress / GATHER_BYTES_PER_S) + FUSED_FIXED_US`` + the local copy-out of the
  peers' bands, where ``fill = min(1, tiles / SMS)`` (few tiles leave
  multiprocessors idle: no split-K);
- fuse iff T <= MAX_TOKENS, every shape condition holds and
  unfused / fused >= MIN_SPEEDUP.

The efficiencies and fixed costs are fitted to two rows at T=1, W=4: the LM
head (K=4096, N_r=32064) and the Llama-8B MLP projection (K=4096, N_r=3584),
with the launch configs of the sweep.  At T=128 the fused kernel measured
0.54-0.78x of linear + gather on every shape (its pushes, which the model lets
overlap the weight stream, evidently do not at that size; not diagnosed),
hence MAX_TOKENS.
"""

from __future__ import annotations

from dataclasses import dataclass

#: HBM peak per card (bytes/s), for weight floors in the benchmarks; unknown cards get the H100's
HBM_PEAK_BY_CARD = {"H100": 3.35e12, "H200": 4.8e12}
#: the H200's, the card the constants below were fitted on
HBM_BYTES_PER_S = HBM_PEAK_BY_CARD["H200"]
#: fraction of the HBM peak that cuBLAS reaches on a decode linear, and its fixed cost (graph replay)
CUBLAS_EFFICIENCY = 0.88
CUBLAS_FIXED_US = 5.0
#: the same for the fused kernel: weight stream, and launch + both barriers + pipeline ramp
FUSED_EFFICIENCY = 0.84
FUSED_FIXED_US = 10.3
#: multiprocessors of an H100 / H200 SXM (the fill term)
SMS = 132
#: tpfuse gather, both barriers, small messages (4xH200: linear + gather minus linear, at T=1)
GATHER_LATENCY_US = {2: 6.5, 4: 7.6}
#: tpfuse gather, per-GPU egress at decode sizes (4xH200, T=1..32 of a 32064-column band)
GATHER_BYTES_PER_S = 236e9
#: L2 read bandwidth for the re-reads of x (one per N tile)
L2_BYTES_PER_S = 6.0e12
#: local copy bandwidth of the copy-out (read + write of the peers' bands)
LOCAL_COPY_BYTES_PER_S = 2.0e12
#: fuse only where the model predicts at least this gain: its error on the measured decode rows is up to
#: ~20 % (Llama-8B MLP at T=32: predicted 1.15x, measured 0.94x)
MIN_SPEEDUP = 1.20
#: the largest T the rule fuses: at T=128 the fused kernel measured slower on every shape
MAX_TOKENS = 32
FUSED_DTYPES = ("bfloat16", "float16")
#: the model's name, printed with each decision
MODEL = "measured-v1 (4xH200, 2026-11-27)"


@dataclass(frozen=True)
class LinearFusionDecision:
    """Whether to run the fused kernel, which rule said so, and the model's numbers."""

    fuse: bool
    rule: str  # "predicted_faster", "predicted_slower", "measured_slower" or "unsupported"
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
    latency = GATHER_LATENCY_US.get(world_size, GATHER_LATENCY_US[4] + 0.6 * (world_size - 4))
    return latency + egress / GATHER_BYTES_PER_S * 1e6, egress


def predict(tokens: int, k: int, widths, elem_size: int = 2) -> tuple[float, float]:
    """(fused µs, unfused µs) under the model above."""
    from ..kernels.linear_push import launch_config

    world_size, width = len(widths), max(widths)
    floor = weight_floor_us(k, width, elem_size)
    gather, egress = _gather_us(tokens, width, world_size, elem_size)
    unfused = floor / CUBLAS_EFFICIENCY + CUBLAS_FIXED_US + gather
    config = launch_config(tokens, k, widths, elem_size)
    fill = min(1.0, config["tiles"] / SMS)
    x_rereads = -(-width // config["BLOCK_N"]) * tokens * k * elem_size
    copy_out = 2 * tokens * width * elem_size * (world_size - 1) / LOCAL_COPY_BYTES_PER_S * 1e6
    fused = max(floor / (FUSED_EFFICIENCY * fill), x_rereads / L2_BYTES_PER_S * 1e6,
                egress / GATHER_BYTES_PER_S * 1e6) + FUSED_FIXED_US + copy_out
    return fused, unfused


def decide(tokens: int, k: int, widths, dtype_name: str, elem_size: int = 2) -> LinearFusionDecision:
    """The rule.  Rank-consistent: a function of T, K, the widths (hence W) and the dtype only."""
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
    if tokens > MAX_TOKENS:
        return LinearFusionDecision(False, "measured_slower", f"T={tokens} > {MAX_TOKENS} (the fused kernel "
                                    "measured 0.54-0.78x of linear + gather at T=128)")
    fused, unfused = predict(max(int(tokens), 1), k, widths, elem_size)
    speedup = unfused / fused
    text = (f"T={tokens} K={k} N_r={max(widths)} W={world_size}: predicted fused {fused:.1f} us vs "
            f"linear+gather {unfused:.1f} us ({speedup:.2f}x, threshold {MIN_SPEEDUP:.2f}x; {MODEL})")
    if speedup >= MIN_SPEEDUP:
        return LinearFusionDecision(True, "predicted_faster", text, fused, unfused)
    return LinearFusionDecision(False, "predicted_slower", text, fused, unfused)
