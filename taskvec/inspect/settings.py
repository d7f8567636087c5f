"""What `taskvec inspect` measures: norms' p, near-zero thresholds and histogram bins, checked once.

Defaults follow the original research scripts where they had one (`p: 1` of
cal_task_vector_norm, `num_bin: 500` and `bin_max: 0.01` of get_task_vector_histogram).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from taskvec.errors import TaskvecError


@dataclass(frozen=True)
class Settings:
    p: float = 1.0  # the p of the p-norm (cal_task_vector_norm's p)
    thresholds: tuple[float, ...] = (1e-5, 1e-4, 1e-3)  # absolute: |tau| < t
    rms_fractions: tuple[float, ...] = (0.01, 0.1)  # relative: |tau| < c * RMS of the tensor's tau
    std_fractions: tuple[float, ...] = (0.01, 0.1)  # relative: |tau| < c * std of the base tensor
    bins: int = 500  # num_bin
    range: float = 0.01  # bin_max: the absolute histogram's top edge
    norm_range: float = 5.0  # the normalised histogram's top edge, in units of the tensor's RMS
    log_bins: bool = False  # log-spaced edges over `log_decades` decades below the top edge
    log_decades: float = 4.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.p) and self.p > 0):
            raise TaskvecError(f"--p must be a positive finite number, got {self.p}")
        for option, values in (("--thresholds", self.thresholds), ("--rms-fractions", self.rms_fractions),
                               ("--std-fractions", self.std_fractions)):
            if not values or not all(math.isfinite(v) and v > 0 for v in values):
                raise TaskvecError(f"{option} must be one or more positive finite numbers, got {list(values)}")
        if self.bins < 1:
            raise TaskvecError(f"--bins must be at least 1, got {self.bins}")
        for option, value in (("--range", self.range), ("--norm-range", self.norm_range),
                              ("--log-decades", self.log_decades)):
            if not (math.isfinite(value) and value > 0):
                raise TaskvecError(f"{option} must be a positive finite number, got {value}")
        for option, top in (("--range", self.range), ("--norm-range", self.norm_range)):
            if not self._representable(top):
                spacing = f"log-spaced over {self.log_decades:g} decades" if self.log_bins else "linear"
                raise TaskvecError(f"{option} {top:g} in {self.bins} bins ({spacing}): bins too narrow for float64 "
                                   "(every edge above 0 must be a normal number above the one before)")

    def _representable(self, top: float) -> bool:
        """Whether the edges up to `top` are distinct normal floats (or 0): bins in the subnormal
        range would lose the histogram's rule (and the grid counts subnormal |tau| as 0)."""
        try:
            edges = self.edges(top)
        except (OverflowError, ValueError):
            return False
        positive = edges[edges > 0]
        return bool(len(positive) and positive[0] >= np.finfo(np.float64).tiny and np.all(np.diff(edges) > 0))

    def edges(self, top: float) -> np.ndarray:
        """Bin edges up to `top`: numpy.histogram's linspace(0, top), or log-spaced."""
        if self.log_bins:
            return np.geomspace(top / 10**self.log_decades, top, self.bins + 1)
        return np.linspace(0.0, top, self.bins + 1)

    def as_dict(self) -> dict:
        return {**asdict(self), "thresholds": list(self.thresholds), "rms_fractions": list(self.rms_fractions),
                "std_fractions": list(self.std_fractions)}
