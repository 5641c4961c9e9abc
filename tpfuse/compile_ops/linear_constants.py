"""The fused-linear cost rule's constants as a value: one card and one W, fitted or shipped.

``linear_cost.py`` holds the model and the constants fitted on 4xH200 as module
constants.  A tuned config (docs/tuning.md) carries its own, fitted on the
machine it was measured on by ``python -m tpfuse tune``; this module is the
value that travels in the config: the same model (``predict``), the same
three least-squares fits as ``benchmarks/fit_linear_cost.py`` (``fit``), and
the card's HBM bandwidth and SM count in place of the H200's.

``LinearConstants.from_module(linear_cost, W)`` is the H200 rule as it stands,
so ``predict`` can be checked against ``linear_cost.predict``
(tests/test_tuned_configs.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch


@dataclass(frozen=True)
class LinearConstants:
    """Every number ``linear_cost.predict`` uses, for one card at one W (names as in linear_cost.py)."""

    hbm_bytes_per_s: float  # the weight floor's bandwidth (HBM_BYTES_PER_S)
    sms: int  # multiprocessors (SMS), the fill term
    cublas_efficiency: float  # CUBLAS_EFFICIENCY
    cublas_fixed_us: float  # CUBLAS_FIXED_US
    fused_efficiency: float  # FUSED_EFFICIENCY
    fused_fixed_us: float  # FUSED_FIXED_US
    fused_tail_bytes_per_s: float  # FUSED_TAIL_BYTES_PER_S
    gather_latency_us: float  # GATHER_LATENCY_US[W]
    gather_bytes_per_s: float  # GATHER_BYTES_PER_S

    @classmethod
    def from_module(cls, module, world_size: int) -> "LinearConstants":
        """The constants a cost-rule module (``linear_cost``) holds for W=``world_size``."""
        if world_size not in module.GATHER_LATENCY_US:
            raise ValueError(f"tpfuse: the cost rule has no gather latency for W={world_size}; it has "
                             f"W={sorted(module.GATHER_LATENCY_US)}")
        return cls(module.HBM_BYTES_PER_S, module.SMS, module.CUBLAS_EFFICIENCY, module.CUBLAS_FIXED_US,
                   module.FUSED_EFFICIENCY, module.FUSED_FIXED_US, module.FUSED_TAIL_BYTES_PER_S,
                   module.GATHER_LATENCY_US[world_size], module.GATHER_BYTES_PER_S)

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str = "linear constants") -> "LinearConstants":
        """From a config's ``linear.constants``; every field a positive number, nothing else."""
        names = [f.name for f in fields(cls)]
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected an object with {', '.join(names)}, got {type(data).__name__}")
        missing, unknown = [n for n in names if n not in data], sorted(set(data) - set(names))
        if missing or unknown:
            raise ValueError(f"{where}: missing {missing}, unknown {unknown}; accepted are exactly {names}")
        bad = [n for n in names if not isinstance(data[n], (int, float)) or isinstance(data[n], bool)
               or not data[n] > 0]
        if bad:
            raise ValueError(f"{where}: {', '.join(f'{n}={data[n]!r}' for n in bad)}: each must be a positive number")
        return cls(**{n: (int(data[n]) if n == "sms" else float(data[n])) for n in names})

    # ------------------------------------------------------------------ the model (linear_cost.py's)

    def weight_floor_us(self, k: int, width: int, elem_size: int = 2) -> float:
        return width * k * elem_size / self.hbm_bytes_per_s * 1e6

    def predict(self, tokens: int, k: int, widths, elem_size: int = 2) -> tuple[float, float]:
        """(fused µs, unfused µs): ``linear_cost.predict``'s model with these constants."""
        from ..kernels.linear_push import launch_config

        world_size, width = len(widths), max(widths)
        floor = self.weight_floor_us(k, width, elem_size)
        egress = tokens * width * elem_size * (world_size - 1)
        gather = self.gather_latency_us + egress / self.gather_bytes_per_s * 1e6
        unfused = floor / self.cublas_efficiency + self.cublas_fixed_us + gather
        fill = min(1.0, launch_config(tokens, k, widths, elem_size)["tiles"] / self.sms)
        fused = (max(floor / (self.fused_efficiency * fill), egress / self.gather_bytes_per_s * 1e6)
                 + self.fused_fixed_us + egress / self.fused_tail_bytes_per_s * 1e6)
        return fused, unfused


def _lstsq(columns, target):
    a = torch.tensor(columns, dtype=torch.float64).T
    b = torch.tensor(target, dtype=torch.float64)[:, None]
    return torch.linalg.lstsq(a, b).solution[:, 0].tolist()


def fit(rows, world_size: int, hbm_bytes_per_s: float, sms: int) -> LinearConstants:
    """The constants fitted to ``rows`` measured at W=``world_size`` on one card.

    ``rows``: ``{"T", "K", "N_r", "graph": {"cublas_only", "cublas_tpfuse", "fused"}}`` (µs, CUDA-graph
    replay, slowest rank), as ``benchmarks/bench_linear_gather.py`` writes them, of which the wide bands at
    T <= ``MAX_TOKENS`` count (the rule fuses no others); the same three fits as
    ``benchmarks/fit_linear_cost.py`` (cuBLAS alone; the gather as the difference; the fused kernel),
    with this card's HBM bandwidth and SM count.  Raises ValueError when the rows cannot fix every
    constant, or when one comes out non-positive (the model does not describe these measurements).
    """
    from ..kernels.linear_push import launch_config, wide_band
    from .linear_cost import MAX_TOKENS

    # the rule fuses only wide bands at T <= MAX_TOKENS, and the model describes only those (linear_cost.py)
    rows = [r for r in rows if r["T"] <= MAX_TOKENS and wide_band(r["T"], [r["N_r"]] * world_size)]
    if len(rows) < 3:
        raise ValueError(f"fitting the linear rule needs at least 3 rows of wide bands at T <= {MAX_TOKENS} "
                         f"(3 constants per fit), got {len(rows)}")
    widths = [[r["N_r"]] * world_size for r in rows]
    floor = [r["N_r"] * r["K"] * 2 / hbm_bytes_per_s * 1e6 for r in rows]
    egress = [r["T"] * r["N_r"] * 2 * (world_size - 1) / 1e6 for r in rows]  # MB: / (B/s) * 1e6 -> µs
    fill = [min(1.0, launch_config(r["T"], r["K"], w)["tiles"] / sms) for r, w in zip(rows, widths)]
    ones = [1.0] * len(rows)
    slope, fixed = _lstsq([floor, ones], [r["graph"]["cublas_only"] for r in rows])
    latency, per_mb = _lstsq([ones, egress], [r["graph"]["cublas_tpfuse"] - r["graph"]["cublas_only"] for r in rows])
    f_slope, f_fixed, f_tail = _lstsq([[f / c for f, c in zip(floor, fill)], ones, egress],
                                      [r["graph"]["fused"] for r in rows])
    fitted = {"cublas_efficiency": 1 / slope if slope > 0 else -1.0, "cublas_fixed_us": fixed,
              "fused_efficiency": 1 / f_slope if f_slope > 0 else -1.0, "fused_fixed_us": f_fixed,
              "fused_tail_bytes_per_s": 1e12 / f_tail if f_tail > 0 else -1.0, "gather_latency_us": latency,
              "gather_bytes_per_s": 1e12 / per_mb if per_mb > 0 else -1.0}
    return LinearConstants.from_dict({"hbm_bytes_per_s": hbm_bytes_per_s, "sms": sms, **fitted},
                                     f"the fit to {len(rows)} rows at W={world_size}")
