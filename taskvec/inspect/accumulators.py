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

from taskvec.inspect.keys import FIRST_NORMAL, SHIFT


def grid_keys(magnitudes: torch.Tensor) -> torch.Tensor:
    """Monotone integer keys of float64 values >= 0: exponent and the top mantissa bits."""
    return magnitudes.view(torch.int64) >> SHIFT


class Binning:
    """Histogram edges with numpy.histogram's rule, [e_k, e_k+1) and the last bin closed; values
    below the first edge go to slot 0, bins to slots 1..bins, values above the last (and NaN, +inf)
    to bins + 1. Values are magnitudes (>= 0, or NaN).

    The slot is computed from the value (linear or log scale), then corrected against the edges
    themselves, as numpy does (a binary search would cost several times more). The position is
    lowered by SHIFT (2^-20 of a bin), far more than its rounding error, so the computed slot is
    the true one or one below it, and one comparison with the slot's upper edge settles it; for
    settings whose rounding error could exceed SHIFT (over 2^25 bins, or log bins a tiny fraction
    of a decade wide) both neighbours are checked instead."""

    SHIFT = 2.0**-20

    def __init__(self, edges: np.ndarray, log: bool, device: torch.device) -> None:
        self.edges = torch.as_tensor(edges, dtype=torch.float64, device=device)
        self.bins = len(edges) - 1
        self.slots_count = self.bins + 2
        self.log = log
        first, last = (np.log(edges[0]), np.log(edges[-1])) if log else (edges[0], edges[-1])
        self.first, self.per_unit = float(first), self.bins / float(last - first)
        rounding = self.per_unit * max(abs(float(first)), abs(float(last)), float(last - first)) * 2.0**-45
        self.one_sided = rounding < self.SHIFT
        top = float(np.nextafter(edges[-1], np.inf))  # the last bin is closed: its edge belongs to it
        nan = torch.tensor([torch.nan], dtype=torch.float64, device=device)
        # slot k holds [lower[k], upper[k]); no value is >= NaN, so nothing leaves slot bins + 1
        self.upper = torch.cat([self.edges[:-1], self.edges.new_tensor([top]), nan])
        self.lower = torch.cat([self.edges.new_tensor([-torch.inf]), self.edges[:-1], self.edges.new_tensor([top])])

    def slots(self, values: torch.Tensor) -> torch.Tensor:
        position = values.log().sub_(self.first) if self.log else values - self.first
        offset = 1.0 - self.SHIFT if self.one_sided else 1.0
        position.mul_(self.per_unit).add_(offset).clamp_(0, self.bins + 1).nan_to_num_(nan=self.bins + 1)
        slot = position.long()  # floor: position >= 0
        if self.one_sided:
            return slot.add_(values >= self.upper.take(slot))
        below, above = values < self.lower.take(slot), values >= self.upper.take(slot)
        return slot.add_(above).sub_(below.long())

    def count_rows(self, values: torch.Tensor) -> torch.Tensor:
        """(rows, slots_count) counts of each row of `values`."""
        return torch.stack([torch.bincount(self.slots(row), minlength=self.slots_count) for row in values])


class FineGrid:
    """One tensor's |tau| counts per vector on the relative grid, over the keys seen so far."""

    def __init__(self, rows: int, device: torch.device) -> None:
        self.rows, self.device = rows, device
        self.low = 0
        self.counts = torch.zeros(rows, 0, dtype=torch.int64, device=device)
        self.tiny = torch.zeros(rows, dtype=torch.int64, device=device)

    def add(self, keys: torch.Tensor, high: int) -> None:
        """Count `keys` (rows x elements); `high`: their largest key (from the slice's extremes)."""
        tiny = keys < FIRST_NORMAL
        low = int(keys.masked_fill(tiny, torch.iinfo(torch.int64).max).amin())
        if low == torch.iinfo(torch.int64).max:
            self.tiny += tiny.sum(1)
            return
        self._cover(low, high + 1)
        width = self.counts.shape[1]
        for row in range(self.rows):  # cell 0 collects the tiny keys: all are below self.low
            index = (keys[row] - (self.low - 1)).clamp_(min=0)
            counted = torch.bincount(index, minlength=width + 1)
            self.tiny[row] += counted[0]
            self.counts[row] += counted[1:]

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
        return (keys << SHIFT).view(torch.float64)

    def below(self, thresholds: torch.Tensor) -> torch.Tensor:
        """(rows, len(thresholds)): entries whose truncated |tau| is below each row's thresholds
        (thresholds: rows x k), zeros and subnormals included; none below a NaN threshold (a
        tensor's RMS where it holds a NaN), as |tau| < NaN is false."""
        edges = self.lower_edges()
        cumulative = torch.nn.functional.pad(self.counts.cumsum(1), (1, 0))
        cells = torch.searchsorted(edges, thresholds.contiguous().view(-1)).view(thresholds.shape)
        return (self.tiny.unsqueeze(1) + cumulative.gather(1, cells)).masked_fill_(thresholds.isnan(), 0)

    def normalised(self, scales: torch.Tensor, binning: Binning) -> torch.Tensor:
        """(rows, slots): the histogram of truncated |tau| / scale (zeros and subnormals as 0)."""
        edges = self.lower_edges()
        result = torch.zeros(self.rows, binning.slots_count, dtype=torch.int64, device=self.device)
        zero_slot = int(binning.slots(torch.zeros(1, dtype=torch.float64, device=self.device)))
        slots = binning.slots(edges / scales.unsqueeze(1))  # (rows, cells): every row in one call
        slots += torch.arange(self.rows, device=self.device).unsqueeze(1) * binning.slots_count
        result.view(-1).index_add_(0, slots.view(-1), self.counts.reshape(-1))
        result[:, zero_slot] += self.tiny
        return result


class SignCodes:
    """Each entry's signs across the vectors as one base-3 number (digit 2: tau > 0, 1: tau < 0,
    0: zero or NaN), so that a slice's zeros, pairwise sign agreements and all-N agreement come
    from one bincount of its codes (3^rows cells) instead of rows^2 comparisons."""

    MAX_ROWS = 10  # 59049 cells; beyond, the accumulator compares signs directly

    def __init__(self, rows: int, n_finetuned: int, device: torch.device) -> None:
        self.rows, self.enabled = rows, rows <= self.MAX_ROWS
        if not self.enabled:
            return
        self.cells = 3**rows
        digits = torch.arange(self.cells, device=device).unsqueeze(1) // 3 ** torch.arange(rows, device=device) % 3
        self.positive, self.negative = (digits == 2).double(), (digits == 1).double()
        self.zero = (digits == 0).double()
        n = n_finetuned
        everyone = ((digits[:, :n] == 2).all(1) | (digits[:, :n] == 1).all(1)) if n >= 2 else digits[:, 0] < 0
        self.everyone = everyone.double()

    def codes(self, tau: torch.Tensor) -> torch.Tensor | None:
        """(elements,) codes of a (rows x elements) matrix, or None where there are too many rows."""
        if not self.enabled:
            return None
        digits = (tau > 0).view(torch.uint8).mul(2).add_((tau < 0).view(torch.uint8))
        code = digits[-1].int()
        for row in range(self.rows - 2, -1, -1):
            code.mul_(3).add_(digits[row])
        return code

    def count(self, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Zeros (and NaNs) per vector, the agreement matrix and the all-N agreement of a slice."""
        counts = torch.bincount(codes, minlength=self.cells).double()  # exact below 2^53
        weighted_positive, weighted_negative = self.positive * counts.unsqueeze(1), self.negative * counts.unsqueeze(1)
        agree = weighted_positive.T @ self.positive + weighted_negative.T @ self.negative
        return ((counts @ self.zero).round().long(), agree, (counts @ self.everyone).round().long())


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


class BaseSpread:
    """A base tensor's spread from its slices, by Chan et al.'s pairwise update of mean and
    squared deviations, of the values less `pivot`, the tensor's first value: a LayerNorm weight
    near 1 with a spread of 1e-7 would otherwise keep the slices' means, and so the deviations
    between them, only to float64 rounding of 1 (1e-9 of its spread, not 1e-16)."""

    def __init__(self) -> None:
        self.n, self.mean, self.m2 = 0, 0.0, 0.0
        self.pivot: float | None = None

    def add(self, base: torch.Tensor) -> None:
        if self.pivot is None:
            self.pivot = float(base[0])
        shifted = base - self.pivot
        mean = float(shifted.mean())
        self.add_moments(base.numel(), mean, float(((shifted - mean) ** 2).sum()))

    def add_moments(self, count: int, mean: float, m2: float) -> None:
        """A slice given by its size, mean and sum of squared deviations from that mean."""
        total = self.n + count
        delta = mean - self.mean
        self.mean += delta * count / total
        self.m2 += m2 + delta * delta * self.n * count / total
        self.n = total

    @property
    def std(self) -> float:
        """The population standard deviation."""
        return (self.m2 / self.n) ** 0.5


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
        self.base = BaseSpread()

    def add(self, tau: torch.Tensor, magnitude: torch.Tensor, keys: torch.Tensor, codes: torch.Tensor | None,
            signs: SignCodes, base: torch.Tensor) -> None:
        """One slice: tau and |tau| (rows x elements, float64), their grid keys and sign codes."""
        sums = tau.sum(1)
        self.s1 += sums
        self.sa += magnitude.sum(1)
        if self.settings.p not in (1.0, 2.0):
            self.sp += magnitude.pow(self.settings.p).sum(1)
        self.gram += tau @ tau.T
        mx, mn = tau.amax(1), tau.amin(1)
        torch.maximum(self.mx, mx, out=self.mx)
        torch.minimum(self.mn, mn, out=self.mn)
        for k, threshold in enumerate(self.settings.thresholds):
            self.below_abs[:, k] += (magnitude < threshold).sum(1)
        if codes is None:  # too many vectors for one code per entry
            self.zeros += (tau == 0).sum(1)
            positive, negative = (tau > 0).double(), (tau < 0).double()
            self.agree += positive @ positive.T + negative @ negative.T
            n = self.n_finetuned
            if n >= 2:
                self.all_agree += ((positive[:n].sum(0) == n) | (negative[:n].sum(0) == n)).sum()
        else:
            zeros, agree, all_agree = signs.count(codes)
            if not bool(sums.isfinite().all()):  # NaN has the code of 0: take NaNs out of the zeros
                zeros -= tau.isnan().sum(1)
            self.zeros += zeros
            self.agree += agree
            self.all_agree += all_agree
        linf = torch.maximum(mx, -mn).max()
        high = int(grid_keys(linf)) if bool(linf.isfinite()) else int(keys.amax())
        self.grid.add(keys, high)
        self.base.add(base)

    @property
    def base_std(self) -> float:
        return self.base.std

    def finish(self, norm_binning: Binning, norm_hist: torch.Tensor) -> Totals:
        """Close the tensor: apply the relative thresholds to its grid, add its normalised histogram."""
        sp = {1.0: self.sa, 2.0: self.gram.diagonal()}.get(self.settings.p, self.sp)
        return close_tensor(self.numel, self.s1, self.sa, sp, self.gram, self.mx, self.mn, self.zeros, self.below_abs,
                            self.agree, int(self.all_agree), self.grid, self.base_std, self.settings, norm_binning,
                            norm_hist)


def close_tensor(numel: int, s1, sa, sp, gram, mx, mn, zeros, below_abs, agree, all_agree: int, grid: FineGrid,
                 base_std: float, settings, norm_binning: Binning, norm_hist: torch.Tensor) -> Totals:
    """A complete tensor's Totals (arrays: torch or numpy): the relative thresholds applied to its
    grid, its normalised histogram added to `norm_hist`."""
    device = grid.counts.device
    squares = np.diagonal(gram).copy() if isinstance(gram, np.ndarray) else gram.diagonal()
    diagonal = torch.as_tensor(squares, device=device)
    rms = (diagonal / numel).sqrt()
    rms_thresholds = rms.unsqueeze(1) * torch.tensor(settings.rms_fractions, dtype=torch.float64, device=device)
    std_thresholds = torch.tensor(settings.std_fractions, dtype=torch.float64, device=device) * base_std
    norm_hist += grid.normalised(rms, norm_binning).to(norm_hist.device)
    cpu = _numpy
    return Totals(numel, cpu(s1), cpu(sa), cpu(sp), cpu(gram), cpu(mx), cpu(mn), cpu(zeros), cpu(below_abs),
                  cpu(grid.below(rms_thresholds)), cpu(grid.below(std_thresholds.expand(rms.shape[0], -1))),
                  cpu(agree).round().astype(np.int64), all_agree)


def _numpy(values) -> np.ndarray:
    return np.array(values) if isinstance(values, np.ndarray) else values.cpu().numpy().copy()
