"""Float64 accumulators for one streaming pass over task-vector chunks, with no chunk left in them.

A tensor's chunks arrive as consecutive column slices of a (vectors x elements) float64 matrix.
Sums, Gram matrix (dot products, so L2 and cosines) and min/max are reduced per slice and added;
counts are integers, so they do not depend on where chunks start. Statistics relative to the
tensor's own RMS need that RMS before counting: instead of a second read, each tensor's |tau| is
counted per vector on a fixed relative grid (`FineGrid`: the float64 value truncated to
MANTISSA_BITS bits after the leading one), and thresholds and the normalised histogram are
applied to the grid once the tensor is complete. That is exact for |tau| truncated to the grid:
a value is counted below c * RMS when its truncation is, i.e. at a threshold at most 2^-8 (0.4%)
above c * RMS.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

MANTISSA_BITS = 8
_SHIFT = 52 - MANTISSA_BITS
_FIRST_NORMAL = 1 << MANTISSA_BITS  # keys below it: zero or subnormal |tau|, counted as zero


def grid_keys(magnitudes: torch.Tensor) -> torch.Tensor:
    """Monotone integer keys of float64 values >= 0: exponent and the top mantissa bits."""
    return magnitudes.view(torch.int64) >> _SHIFT


class Binning:
    """Histogram edges with numpy.histogram's rule, [e_k, e_k+1) and the last bin closed; values
    below the first edge go to slot 0, bins to slots 1..bins, values above the last (and NaN) to
    bins + 1. The slot is computed from the value (linear or log scale), then corrected against
    the edges themselves, as numpy does: a binary search would cost several times more."""

    def __init__(self, edges: np.ndarray, log: bool, device: torch.device) -> None:
        self.edges = torch.as_tensor(edges, dtype=torch.float64, device=device)
        self.bins = len(edges) - 1
        self.slots_count = self.bins + 2
        self.log = log
        first, last = (np.log(edges[0]), np.log(edges[-1])) if log else (edges[0], edges[-1])
        self.first, self.per_unit = float(first), self.bins / float(last - first)
        infinity = torch.tensor([torch.inf], dtype=torch.float64, device=device)
        self.bounds = torch.cat([-infinity, self.edges, infinity])  # slot k holds [bounds[k], bounds[k+1])

    def slots(self, values: torch.Tensor) -> torch.Tensor:
        position = values.log() if self.log else values - self.first
        if self.log:
            position -= self.first
        position = position.mul_(self.per_unit).nan_to_num_(nan=self.bins, posinf=self.bins, neginf=-1)
        slot = position.floor_().clamp_(-1, self.bins).long().add_(1)
        slot -= (values < self.bounds[slot]).long()
        slot += (values >= self.bounds[slot + 1]).long()
        return slot.clamp_(max=self.bins + 1).masked_fill_(values == self.edges[-1], self.bins)  # inf: above

    def count_rows(self, values: torch.Tensor) -> torch.Tensor:
        """(rows, slots_count) counts of each row of `values`."""
        rows = values.shape[0]
        offsets = torch.arange(rows, device=values.device).unsqueeze(1) * self.slots_count
        flat = (self.slots(values) + offsets).flatten()
        return torch.bincount(flat, minlength=rows * self.slots_count).view(rows, self.slots_count)


class FineGrid:
    """One tensor's |tau| counts per vector on the relative grid, over the keys seen so far."""

    def __init__(self, rows: int, device: torch.device) -> None:
        self.rows, self.device = rows, device
        self.low = 0
        self.counts = torch.zeros(rows, 0, dtype=torch.int64, device=device)
        self.tiny = torch.zeros(rows, dtype=torch.int64, device=device)

    def add(self, keys: torch.Tensor) -> None:
        tiny = keys < _FIRST_NORMAL
        self.tiny += tiny.sum(1)
        low = int(keys.masked_fill(tiny, torch.iinfo(torch.int64).max).min())
        if low == torch.iinfo(torch.int64).max:
            return
        self._cover(low, int(keys.max()) + 1)
        width = self.counts.shape[1]
        offsets = torch.arange(self.rows, device=self.device).unsqueeze(1) * width - self.low
        index = (keys + offsets).masked_fill_(tiny, self.rows * width).flatten()
        self.counts += torch.bincount(index, minlength=self.rows * width + 1)[:-1].view(self.rows, width)

    def _cover(self, low: int, high: int) -> None:
        old_high = self.low + self.counts.shape[1]
        if self.counts.shape[1] and low >= self.low and high <= old_high:
            return
        new_low, new_high = (min(low, self.low), max(high, old_high)) if self.counts.shape[1] else (low, high)
        counts = torch.zeros(self.rows, new_high - new_low, dtype=torch.int64, device=self.device)
        counts[:, self.low - new_low:self.low - new_low + self.counts.shape[1]] = self.counts
        self.low, self.counts = new_low, counts

    def lower_edges(self) -> torch.Tensor:
        """Each grid cell's smallest value: what a |tau| in it is truncated to."""
        keys = torch.arange(self.low, self.low + self.counts.shape[1], dtype=torch.int64, device=self.device)
        return (keys << _SHIFT).view(torch.float64)

    def below(self, thresholds: torch.Tensor) -> torch.Tensor:
        """(rows, len(thresholds)): entries whose truncated |tau| is below each row's thresholds
        (thresholds: rows x k), zeros and subnormals always included."""
        edges = self.lower_edges()
        cumulative = torch.nn.functional.pad(self.counts.cumsum(1), (1, 0))
        cells = torch.searchsorted(edges, thresholds.contiguous().view(-1)).view(thresholds.shape)
        return self.tiny.unsqueeze(1) + cumulative.gather(1, cells)

    def normalised(self, scales: torch.Tensor, binning: Binning) -> torch.Tensor:
        """(rows, slots): the histogram of truncated |tau| / scale (zeros and subnormals as 0)."""
        edges = self.lower_edges()
        result = torch.zeros(self.rows, binning.slots_count, dtype=torch.int64, device=self.device)
        zero_slot = int(binning.slots(torch.zeros(1, dtype=torch.float64, device=self.device)))
        for row in range(self.rows):
            result[row].index_add_(0, binning.slots(edges / scales[row]), self.counts[row])
            result[row, zero_slot] += self.tiny[row]
        return result


@dataclass
class Totals:
    """Sums and counts of a set of entries (a tensor, a group, all): per vector and across vectors."""

    n: int
    s1: np.ndarray  # sum tau, per vector
    sa: np.ndarray  # sum |tau|
    sp: np.ndarray  # sum |tau|^p
    gram: np.ndarray  # sum tau_v * tau_w; the diagonal is sum tau^2
    mx: np.ndarray
    mn: np.ndarray
    zeros: np.ndarray  # entries with tau == 0
    below_abs: np.ndarray  # (vectors, thresholds)
    below_rms: np.ndarray  # (vectors, rms fractions)
    below_std: np.ndarray  # (vectors, std fractions)
    agree: np.ndarray  # entries where tau_v and tau_w have one nonzero sign
    all_agree: int  # entries where every fine-tune has one nonzero sign

    def __add__(self, other: Totals) -> Totals:
        return Totals(self.n + other.n, self.s1 + other.s1, self.sa + other.sa, self.sp + other.sp,
                      self.gram + other.gram, np.maximum(self.mx, other.mx), np.minimum(self.mn, other.mn),
                      self.zeros + other.zeros, self.below_abs + other.below_abs, self.below_rms + other.below_rms,
                      self.below_std + other.below_std, self.agree + other.agree, self.all_agree + other.all_agree)


class TensorAccumulator:
    """One tensor's statistics, fed slice by slice (`add`), closed once complete (`finish`)."""

    def __init__(self, numel: int, rows: int, n_finetuned: int, settings, device: torch.device) -> None:
        self.numel, self.n_finetuned, self.settings = numel, n_finetuned, settings
        zeros = {"dtype": torch.float64, "device": device}
        self.s1, self.sa, self.sp = (torch.zeros(rows, **zeros) for _ in range(3))
        self.gram = torch.zeros(rows, rows, **zeros)
        self.agree = torch.zeros(rows, rows, **zeros)  # integer-valued: exact below 2^53
        self.mx = torch.full((rows,), -torch.inf, **zeros)
        self.mn = torch.full((rows,), torch.inf, **zeros)
        counts = {"dtype": torch.int64, "device": device}
        self.zeros = torch.zeros(rows, **counts)
        self.below_abs = torch.zeros(rows, len(settings.thresholds), **counts)
        self.thresholds = torch.tensor(settings.thresholds, **zeros)
        self.all_agree = torch.zeros((), **counts)
        self.grid = FineGrid(rows, device)
        self.base_n, self.base_mean, self.base_m2 = 0, 0.0, 0.0

    def add(self, tau: torch.Tensor, magnitude: torch.Tensor, keys: torch.Tensor, base: torch.Tensor) -> None:
        self.s1 += tau.sum(1)
        self.sa += magnitude.sum(1)
        if self.settings.p not in (1.0, 2.0):
            self.sp += magnitude.pow(self.settings.p).sum(1)
        self.gram += tau @ tau.T
        torch.maximum(self.mx, tau.amax(1), out=self.mx)
        torch.minimum(self.mn, tau.amin(1), out=self.mn)
        self.zeros += (tau == 0).sum(1)
        self.below_abs += (magnitude.unsqueeze(2) < self.thresholds).sum(1)
        positive, negative = (tau > 0).double(), (tau < 0).double()
        self.agree += positive @ positive.T + negative @ negative.T
        n = self.n_finetuned
        if n >= 2:
            self.all_agree += ((positive[:n].sum(0) == n) | (negative[:n].sum(0) == n)).sum()
        self.grid.add(keys)
        self._add_base(base)

    def _add_base(self, base: torch.Tensor) -> None:
        """Chan et al.'s pairwise update of mean and squared deviations: no cancellation for a
        LayerNorm weight near 1 with a small spread."""
        count = base.numel()
        mean = float(base.mean())
        m2 = float(((base - mean) ** 2).sum())
        total = self.base_n + count
        delta = mean - self.base_mean
        self.base_mean += delta * count / total
        self.base_m2 += m2 + delta * delta * self.base_n * count / total
        self.base_n = total

    @property
    def base_std(self) -> float:
        """The base tensor's population standard deviation."""
        return (self.base_m2 / self.base_n) ** 0.5

    def finish(self, norm_binning: Binning, norm_hist: torch.Tensor) -> Totals:
        """Close the tensor: apply the relative thresholds to its grid, add its normalised histogram."""
        rms = (self.gram.diagonal() / self.numel).sqrt()
        rms_thresholds = rms.unsqueeze(1) * torch.tensor(self.settings.rms_fractions, dtype=torch.float64,
                                                         device=rms.device)
        std_thresholds = torch.tensor(self.settings.std_fractions, dtype=torch.float64, device=rms.device) \
            * self.base_std
        norm_hist += self.grid.normalised(rms, norm_binning)
        sp = {1.0: self.sa, 2.0: self.gram.diagonal()}.get(self.settings.p, self.sp)
        cpu = _numpy
        return Totals(self.numel, cpu(self.s1), cpu(self.sa), cpu(sp), cpu(self.gram), cpu(self.mx), cpu(self.mn),
                      cpu(self.zeros), cpu(self.below_abs), cpu(self.grid.below(rms_thresholds)),
                      cpu(self.grid.below(std_thresholds.expand(rms.shape[0], -1))),
                      cpu(self.agree).round().astype(np.int64), int(self.all_agree))


def _numpy(values: torch.Tensor) -> np.ndarray:
    return values.cpu().numpy().copy()
