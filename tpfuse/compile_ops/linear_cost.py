"""The cost rule of ``tpfuse::linear_all_gather_hidden``: fused kernel, or cuBLAS linear + the gather?

One pure function of (T, K, the ranks' widths, dtype) -- what every rank knows
identically -- so every rank decides the same (CONTEXT §2.2).  The pass uses it
to decide whether to rewrite; the op uses it again per call (T may be
symbolic at compile time), unless ``TPFUSE_LINEAR_PUSH`` forces a path.

**Every constant below is a PREDICTION, not a measurement** (no GPU time was
available when this was written).  They come from the weight-bandwidth floors
(benchmarks/NOTES.md, "fused linear+push: floors and predictions") and from
the gather's measured latency and bandwidth (docs/benchmarks.md, 4xH100).
Replace them with measured values from ``benchmarks/bench_linear_gather.py``
and keep the function's shape.

The model:

- weight floor ``t_w = N_r * K * elem / HBM_BYTES_PER_S``;
- unfused = ``t_w / CUBLAS_EFFICIENCY`` + the tpfuse gather
  (``GATHER_LATENCY_US[W] + egress / GATHER_BYTES_PER_S``) + one launch gap;
- fused = ``max(t_w / (FUSED_EFFICIENCY * fill), x re-reads / L2_BYTES_PER_S,
  egress / GATHER_BYTES_PER_S)`` + one exit barrier + the local copy-out of
  the peers' bands, where ``fill = min(1, tiles / SMS)`` (few tiles leave
  multiprocessors idle: no split-K) and every N tile re-reads ``x [T, K]``
  from L2 -- the pushes overlap the weight stream, tile by tile;
- fuse iff every shape condition holds and unfused / fused >= MIN_SPEEDUP.
"""

from __future__ import annotations

from dataclasses import dataclass

#: H100 SXM HBM3 peak (bytes/s).  PREDICTION input: the spec sheet, not a measurement.
HBM_BYTES_PER_S = 3.35e12
#: fraction of the HBM peak that cuBLAS reaches on a decode linear.  PREDICTION.
CUBLAS_EFFICIENCY = 0.90
#: fraction of the HBM peak that the fused Triton GEMM reaches when it fills the GPU.  PREDICTION.
FUSED_EFFICIENCY = 0.75
#: multiprocessors of an H100 SXM (the fill term)
SMS = 132
#: tpfuse gather, both barriers, small messages (measured, docs/benchmarks.md, 4xH100)
GATHER_LATENCY_US = {2: 5.3, 4: 6.5}
#: tpfuse gather, per-GPU egress at mid sizes (measured 220-264 GB/s at T=32..128, w=32064)
GATHER_BYTES_PER_S = 250e9
#: one exit barrier (CONTEXT §6: 2.5 us at W=2 and 4) and a graph launch gap (0.8 us)
EXIT_BARRIER_US = 2.5
LAUNCH_US = 0.8
#: L2 read bandwidth for the re-reads of x (one per N tile).  PREDICTION (H100 L2, ~2x HBM).
L2_BYTES_PER_S = 6.0e12
#: local copy bandwidth of the copy-out (read + write of the peers' bands).  PREDICTION.
LOCAL_COPY_BYTES_PER_S = 2.0e12
#: fuse only where the model predicts at least this gain (leaves room for its errors)
MIN_SPEEDUP = 1.10
#: the largest T the fused kernel is configured for (beyond it the GEMM is compute-bound)
MAX_TOKENS = 512
FUSED_DTYPES = ("bfloat16", "float16")
#: the model's name, printed with each decision
MODEL = "floors-v0 (predicted, unmeasured)"


@dataclass(frozen=True)
class LinearFusionDecision:
    """Whether to run the fused kernel, which rule said so, and the model's numbers."""

    fuse: bool
    rule: str  # "predicted_faster", "predicted_slower", or "unsupported"
    reason: str
    fused_us: float = 0.0
    unfused_us: float = 0.0

    def __str__(self) -> str:
        return f"{'fused' if self.fuse else 'not fused'} [{self.rule}]: {self.reason}"


def weight_floor_us(k: int, width: int, elem_size: int = 2) -> float:
    """Reading this rank's weight band once from HBM at the peak: no linear can be faster."""
    return width * k * elem_size / HBM_BYTES_PER_S * 1e6


def _gather_us(tokens, width, world_size, elem_size):
    egress = tokens * width * elem_size * (world_size - 1)
    latency = GATHER_LATENCY_US.get(world_size, GATHER_LATENCY_US[4] + 0.6 * (world_size - 4))
    return latency + egress / GATHER_BYTES_PER_S * 1e6, egress


def predict(tokens: int, k: int, widths, elem_size: int = 2) -> tuple[float, float]:
    """(fused µs, unfused µs) under the model above (predictions)."""
    from ..kernels.linear_push import launch_config

    world_size, width = len(widths), max(widths)
    floor = weight_floor_us(k, width, elem_size)
    gather, egress = _gather_us(tokens, width, world_size, elem_size)
    unfused = floor / CUBLAS_EFFICIENCY + LAUNCH_US + gather
    config = launch_config(tokens, k, widths, elem_size)
    fill = min(1.0, config["tiles"] / SMS)
    x_rereads = -(-width // config["BLOCK_N"]) * tokens * k * elem_size
    copy_out = 2 * tokens * width * elem_size * (world_size - 1) / LOCAL_COPY_BYTES_PER_S * 1e6
    fused = max(floor / (FUSED_EFFICIENCY * fill), x_rereads / L2_BYTES_PER_S * 1e6,
                egress / GATHER_BYTES_PER_S * 1e6) + EXIT_BARRIER_US + copy_out
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
        return LinearFusionDecision(False, "unsupported", f"T={tokens} > {MAX_TOKENS} (compute-bound: "
                                    "cuBLAS + the gather)")
    fused, unfused = predict(max(int(tokens), 1), k, widths, elem_size)
    speedup = unfused / fused
    text = (f"T={tokens} K={k} N_r={max(widths)} W={world_size}: predicted fused {fused:.1f} us vs "
            f"linear+gather {unfused:.1f} us ({speedup:.2f}x, threshold {MIN_SPEEDUP:.2f}x; {MODEL})")
    if speedup >= MIN_SPEEDUP:
        return LinearFusionDecision(True, "predicted_faster", text, fused, unfused)
    return LinearFusionDecision(False, "predicted_slower", text, fused, unfused)
