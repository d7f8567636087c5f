"""The CPU pass as compiled loops: every statistic of a slice from one read of its inputs.

The torch accumulators (taskvec.inspect.accumulators) take some forty passes over a float64
(vectors x elements) matrix per chunk; on a CPU that is memory traffic, not arithmetic, and it
made inspect ten times slower than reading its inputs. Here numba compiles the work of a tile
of TILE elements: the task vectors (tau_i = ft_i - base, their mean, M - base) are formed once,
from each input's row read at its address (a mapped file's page cache or a stacked buffer),
into a float64 tile that stays in the core's cache, and a few tight loops over it add to every
accumulator: sums of tau, |tau| and |tau|^p, the Gram matrix, extremes, zeros, sign agreement,
absolute thresholds, the relative grid, the absolute histogram and the base's spread. Counts and
extremes come from the entries' bits by integer operations (they vectorize, where float
comparisons with NaN's rules did not), signs as bits (64 entries a word: agreement is popcounts),
the grid in int32 (half the cache its scattered increments touch). The
histogram is counted per half grid cell (the grid is counted anyway; an edge of the histogram
splits a cell in two) and each half binned once when its tensor closes; only entries of the
cells two edges cut (with many bins) are binned one by one. A slice is split into one block per
core, each with its own accumulators, run on Python threads (the loops release the GIL) and
summed when the tensor closes. The torch accumulators stay the reference (and the CUDA pass);
tests hold the two to the same counts and to float64 rounding on sums.

Semantics are the torch accumulators': a NaN tau is no zero and agrees with nothing, goes to the
histograms' last slot and to the grid at NaN's key; the mean is the fine-tunes' rows added in
order, divided by N; histogram slots are numpy.histogram's, found by position and settled
against the edges themselves (so the rounding of the position never decides a slot).
"""

from __future__ import annotations

import ctypes
import math
import os
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
import torch
from numba import types
from numba.extending import intrinsic

from taskvec.inspect.accumulators import _FIRST_NORMAL, _SHIFT, BaseSpread, Binning, FineGrid, Totals, close_tensor

KEYS = 1 << (63 - _SHIFT)  # every key of a float64 >= 0, NaN's included
_MAGNITUDE = np.int64(0x7FFFFFFFFFFFFFFF)
_NORMAL = np.int64(_FIRST_NORMAL << _SHIFT)  # the bits of the smallest normal float64
_NO_KEY = _MAGNITUDE  # no smaller |tau| seen: its key, KEYS - 1, is at least every key seen
_INF = np.int64(0x7FF0000000000000)  # the bits of inf: larger |t| bits are NaN's
_NOTHING_ABOVE, _NOTHING_BELOW = np.iinfo(np.int64).min, np.iinfo(np.int64).max  # extremes of no entry
GRID_LIMIT = 2**31 - 1  # entries a tensor adds to the int32 grid before it is added to the int64 one

# sums[..., k]: tau, |tau|, |tau|^p; ordered[..., k]: max, min as order-preserving integers
_SUM, _ABS, _POW = range(3)


TILE = 2048  # elements per step: the (vectors x TILE) float64 task vectors stay in a core's L2
PARALLEL_MIN = 1 << 14  # elements per block below which threads cost more than they save
MAX_BLOCKS = 8


@intrinsic
def _float32_at(typingctx, address):
    """The float32 pointer at an integer address."""
    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(types.CPointer(types.float32)))
    return types.CPointer(types.float32)(types.int64), codegen


@intrinsic
def _float64_at(typingctx, address):
    """The float64 pointer at an integer address."""
    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(types.CPointer(types.float64)))
    return types.CPointer(types.float64)(types.int64), codegen


@numba.njit(nogil=True, cache=True)
def _differences(address, wide, j0, m, base, out):
    """out[:m] = elements j0..j0+m of the float64 (`wide`) or float32 row at `address`, minus
    `base` (none: zeros), in float64."""
    if wide:
        values = _float64_at(address)
        for j in range(m):
            out[j] = values[j0 + j] - base[j]
    else:
        narrow = _float32_at(address)
        for j in range(m):
            out[j] = np.float64(narrow[j0 + j]) - base[j]


@numba.njit(nogil=True, cache=True)
def _tile(addresses, wide, j0, m, n_finetuned, with_mean, tau, base, zero):
    """tau[:, :m]: the task vectors of elements j0..j0+m (row 0 of `addresses`: the base, into
    `base`), exactly as the torch pass forms them (the mean: the fine-tunes' rows added in order
    to a copy of the first, then divided by N)."""
    _differences(addresses[0], wide, j0, m, zero, base)
    for i in range(1, addresses.shape[0]):
        row = i - 1 if i <= n_finetuned or not with_mean else i
        _differences(addresses[i], wide, j0, m, base, tau[row])
    if with_mean:
        mean = tau[n_finetuned]
        for j in range(m):
            mean[j] = tau[0, j]
        for i in range(1, n_finetuned):
            for j in range(m):
                mean[j] += tau[i, j]
        for j in range(m):
            mean[j] /= n_finetuned


@numba.njit(nogil=True, cache=True)
def _shifted(base, m, pivot, out):
    """out[:m] = base - pivot, as written (no fastmath: reassociated with the mean's subtraction,
    it would round at the values' scale again)."""
    for j in range(m):
        out[j] = base[j] - pivot


@numba.njit(nogil=True, cache=True, fastmath={"reassoc", "contract"})
def _spread(shifted, m, spread):
    """Add m base values, as shifted by the tensor's pivot (BaseSpread), to spread = (count,
    mean, sum of squared deviations): the tile's own two passes, then Chan et al.'s pairwise
    update (as BaseSpread.add_moments)."""
    total = 0.0
    for j in range(m):
        total += shifted[j]
    mean = total / m
    m2 = 0.0
    for j in range(m):
        deviation = shifted[j] - mean
        m2 += deviation * deviation
    count = spread[0] + m
    delta = mean - spread[1]
    spread[1] += delta * m / count
    spread[2] += m2 + delta * delta * spread[0] * m / count
    spread[0] = count


@numba.njit(nogil=True, cache=True, fastmath={"reassoc", "contract"})
def _moments(tau, m, power, sums, gram):
    """Sums of tau, |tau|, |tau|^p and the Gram matrix's upper triangle (reassociated: float64
    rounding in another order, which the tests' tolerance allows; counts never come from here)."""
    rows = tau.shape[0]
    for r in range(rows):
        total, absolute, powered = 0.0, 0.0, 0.0
        for j in range(m):
            t = tau[r, j]
            total += t
            absolute += abs(t)
        if power > 0.0:
            for j in range(m):
                powered += abs(tau[r, j]) ** power
        sums[r, _SUM] += total
        sums[r, _ABS] += absolute
        sums[r, _POW] += powered
        for w in range(r + 1):
            dot = 0.0
            for j in range(m):
                dot += tau[w, j] * tau[r, j]
            gram[w, r] += dot


@numba.njit(nogil=True, cache=True, inline="always")
def _reduce_bits(b, zero, nan, high, low, top, bottom):
    """One entry's float64 bits added to the row's integer reductions: zeros, NaNs, the largest
    |t| bits, the smallest normal |t| bits, and the extremes as order-preserving integers."""
    a = b & _MAGNITUDE
    ordered = b ^ ((b >> 63) & _MAGNITUDE)  # as signed integers, ordered as the floats are
    return (zero + (a == 0), nan + (a > _INF), max(high, a), min(low, a if a >= _NORMAL else _NO_KEY),
            max(top, ordered), min(bottom, ordered))


@numba.njit(nogil=True, cache=True, inline="always")
def _sign_bits(b):
    """Whether the float64 with bits b is > 0, and whether it is < 0 (NaN: neither)."""
    a = b & _MAGNITUDE
    finite = a <= _INF
    return np.uint64((b > 0) & finite), np.uint64((b < 0) & (a != 0) & finite)


@numba.njit(nogil=True, cache=True)
def _counts(tau, m, threshold_bits, ordered, nans, zeros, below, key_low, key_high, positive, negative):
    """Extremes, NaNs, zeros, threshold counts, the key range, and each entry's sign as one bit
    of `positive` or `negative` (64 entries a word; zero and NaN set neither): all from the
    entries' bits with integer operations, which vectorize (|t| < c is a comparison of bits for
    c > 0, NaN's bits being above every finite value's)."""
    rows = tau.shape[0]
    for r in range(rows):
        bits = tau[r].view(np.int64)
        zero, nan, high, low = 0, 0, np.int64(0), _NO_KEY
        top, bottom = ordered[r, 0], ordered[r, 1]
        for j in range(m):
            zero, nan, high, low, top, bottom = _reduce_bits(bits[j], zero, nan, high, low, top, bottom)
        for w in range((m + 63) // 64):
            plus, minus = np.uint64(0), np.uint64(0)
            for bit in range(min(64, m - w * 64)):
                up, down = _sign_bits(bits[w * 64 + bit])
                plus |= up << np.uint64(bit)
                minus |= down << np.uint64(bit)
            positive[r, w], negative[r, w] = plus, minus
        for k in range(threshold_bits.shape[0]):
            limit = threshold_bits[k]
            count = 0
            for j in range(m):
                count += (bits[j] & _MAGNITUDE) < limit
            below[r, k] += count
        ordered[r, 0], ordered[r, 1] = top, bottom
        nans[r] += nan
        zeros[r] += zero
        key_high[r] = max(key_high[r], high >> _SHIFT)
        key_low[r] = min(key_low[r], low >> _SHIFT)


@numba.njit(nogil=True, cache=True)
def _grid(tau, m, above, lower, upper, first, per_unit, log_bins, hist, grid, cut):
    """The grid: each entry counted in its cell's lower or upper half, the halves an edge of the
    absolute histogram splits, so that the histogram comes from the cells when the tensor closes.
    An entry is in the upper half where its |tau| bits exceed `above` at its key (CellBins); a
    negative `above` marks a cell two or more edges cut (only with many bins): its entries are
    also binned one by one. Keys below 256 are zero or subnormal: one cell, summed when the tensor
    closes. Integer comparisons: no float compare, no NaN rule in the loop."""
    for r in range(tau.shape[0]):
        bits = tau[r].view(np.int64)
        cells = grid[r]
        n = 0
        for j in range(m):
            a = bits[j] & _MAGNITUDE
            key = a >> _SHIFT
            limit = above[key]
            cells[2 * key + (a > limit)] += 1
            cut[n] = j
            n += limit < 0
        _bin_cut(tau[r], cut, n, lower, upper, first, per_unit, log_bins, hist[r])


@numba.njit(nogil=True, cache=True)
def _bin_cut(values, cut, n, lower, upper, first, per_unit, log_bins, hist):
    """Bin the n entries values[cut[:n]] one by one (their cells are cut by two edges)."""
    top = hist.shape[0] - 1
    for c in range(n):
        hist[_slot(abs(values[cut[c]]), lower, upper, first, per_unit, log_bins, top)] += 1


@numba.njit(nogil=True, cache=True)
def _slot(a, lower, upper, first, per_unit, log_bins, top):
    """numpy.histogram's slot of a >= 0 (0: below the edges, top: above them or NaN): from the
    position, then settled against the edges themselves."""
    if a != a:
        return top
    if log_bins:
        position = (math.log(a) - first) * per_unit + 1.0 if a > 0 else 0.0
    else:
        position = (a - first) * per_unit + 1.0
    slot = int(min(max(position, 0.0), float(top)))
    while slot > 0 and a < lower[slot]:
        slot -= 1
    while slot < top and a >= upper[slot]:
        slot += 1
    return slot


@intrinsic
def _popcount(typingctx, word):
    """The number of bits set in a uint64."""
    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])
    return types.uint64(types.uint64), codegen


@numba.njit(nogil=True, cache=True)
def _agreement(positive, negative, words, n_finetuned, agree, all_agree, block):
    """Pairwise same-nonzero-sign counts (upper triangle) and the all-fine-tunes agreement, 64
    entries a word."""
    rows = positive.shape[0]
    for r in range(rows):
        for w in range(r + 1):
            count = np.uint64(0)
            for k in range(words):
                count += _popcount((positive[r, k] & positive[w, k]) | (negative[r, k] & negative[w, k]))
            agree[w, r] += np.int64(count)
    if n_finetuned >= 2:
        count = np.uint64(0)
        for k in range(words):
            plus, minus = positive[0, k], negative[0, k]
            for i in range(1, n_finetuned):
                plus &= positive[i, k]
                minus &= negative[i, k]
            count += _popcount(plus) + _popcount(minus)
        all_agree[block] += np.int64(count)


@numba.njit(nogil=True, cache=True)
def _accumulate(addresses, wide, start, stop, block, n_finetuned, with_mean, power, threshold_bits, above, lower,
                upper, first, per_unit, log_bins, spread, pivot, sums, gram, ordered, nans, zeros, below, agree,
                all_agree, hist, grid, key_low, key_high):
    """Add elements start..stop of the rows at `addresses` (inputs; row 0: the base; float64
    where `wide`, else float32) to the accumulators of `block` (their leading axis), tile by
    tile; the base's spread about `pivot`."""
    rows = sums.shape[1]
    tau = np.empty((rows, TILE), dtype=np.float64)
    base = np.empty(TILE, dtype=np.float64)
    zero = np.zeros(TILE, dtype=np.float64)
    shifted = np.empty(TILE, dtype=np.float64)
    positive = np.empty((rows, TILE // 64), dtype=np.uint64)
    negative = np.empty((rows, TILE // 64), dtype=np.uint64)
    cut = np.empty(TILE, dtype=np.int64)
    for j0 in range(start, stop, TILE):
        m = min(TILE, stop - j0)
        _tile(addresses, wide, j0, m, n_finetuned, with_mean, tau, base, zero)
        _shifted(base, m, pivot, shifted)
        _spread(shifted, m, spread[block])
        _moments(tau, m, power, sums[block], gram[block])
        _counts(tau, m, threshold_bits, ordered[block], nans[block], zeros[block], below[block], key_low[block],
                key_high[block], positive, negative)
        _grid(tau, m, above, lower, upper, first, per_unit, log_bins, hist[block], grid[block], cut)
        _agreement(positive, negative, (m + 63) // 64, n_finetuned, agree[block], all_agree, block)


@numba.njit(nogil=True, cache=True)
def _close_cells(grid, start, stop, one_cell, first, multi, hist, counts):
    """Take the grid's keys start..stop (zeroing them for the next tensor): each row's entries per
    key, over blocks and halves, into `counts` (rows x keys; with `one_cell`, the keys are one
    cell, the first's: one column), and each half of a cell that no two edges cut (not `multi`)
    into `hist` (rows x slots) at the cell's first slot or the next."""
    for r in range(grid.shape[1]):
        lower, upper = 0, 0
        for key in range(start, stop):
            for b in range(grid.shape[0]):
                lower += grid[b, r, 2 * key]
                upper += grid[b, r, 2 * key + 1]
                grid[b, r, 2 * key] = 0
                grid[b, r, 2 * key + 1] = 0
            if not one_cell or key == stop - 1:
                cell = start if one_cell else key
                counts[r, cell - start] += lower + upper
                if not multi[cell]:
                    if lower:
                        hist[r, first[cell]] += lower
                    if upper:  # only where an edge cuts the cell: first[cell] + 1 is a slot
                        hist[r, first[cell] + 1] += upper
                lower, upper = 0, 0


class FusedState:
    """Per-block accumulators of the tensor being read, and of the absolute histogram."""

    def __init__(self, rows: int, n_finetuned: int, settings, abs_binning: Binning, blocks: int | None = None) -> None:
        self.rows, self.n_finetuned, self.settings = rows, n_finetuned, settings
        self.blocks = blocks or min(MAX_BLOCKS, len(os.sched_getaffinity(0)))
        self._pool = ThreadPoolExecutor(self.blocks, thread_name_prefix="taskvec-inspect")
        shape = (self.blocks, rows)
        self.power = settings.p if settings.p not in (1.0, 2.0) else 0.0
        self.threshold_bits = np.asarray(settings.thresholds, dtype=np.float64).view(np.int64)
        binning = abs_binning
        self.cells = CellBins(binning)
        self.binning = (binning.lower.cpu().numpy(), binning.upper.cpu().numpy(), binning.first, binning.per_unit,
                        binning.log)
        self.hist = np.zeros((*shape, binning.slots_count), dtype=np.int64)  # entries of cells edges cut twice
        self.hist_cells = np.zeros((rows, binning.slots_count), dtype=np.int64)  # the others, cell by cell
        # per key: its cell's lower, upper half; int32 (half the cache the increments touch), added
        # to `wide_grid` should a tensor bring GRID_LIMIT entries
        self.grid = np.zeros((*shape, 2 * KEYS), dtype=np.int32)
        self.wide_grid = None
        self.pending = 0
        self.sums = np.zeros((*shape, 3))
        self.gram = np.zeros((self.blocks, rows, rows))
        self.ordered = np.zeros((*shape, 2), dtype=np.int64)
        self.nans = np.zeros(shape, dtype=np.int64)
        self.zeros = np.zeros(shape, dtype=np.int64)
        self.below = np.zeros((*shape, len(self.threshold_bits)), dtype=np.int64)
        self.agree = np.zeros((self.blocks, rows, rows), dtype=np.int64)
        self.all_agree = np.zeros(self.blocks, dtype=np.int64)
        self.key_low = np.zeros(shape, dtype=np.int64)
        self.key_high = np.zeros(shape, dtype=np.int64)
        self.spread = np.zeros((self.blocks, 3))  # the base's count, mean, squared deviations
        self.base = BaseSpread()
        self._reset()

    def _reset(self) -> None:
        for array in (self.sums, self.gram, self.nans, self.zeros, self.below, self.agree, self.all_agree,
                      self.spread):
            array.fill(0)
        self.base = BaseSpread()
        self.ordered[..., 0], self.ordered[..., 1] = _NOTHING_ABOVE, _NOTHING_BELOW
        self.key_low.fill(KEYS)
        self.key_high.fill(-1)
        self.pending = 0

    def add(self, addresses: np.ndarray, wide: bool, numel: int) -> None:
        """A slice of one tensor: `numel` elements of each input's row at `addresses` (int64; row
        0: the base; float64 where `wide`, else float32), which must stay readable until this
        returns. One block per thread where there are enough of them, else all in block 0."""
        if self.pending + numel > GRID_LIMIT:  # a cell could overflow int32: move the counts to int64
            if self.wide_grid is None:
                self.wide_grid = np.zeros(self.grid.shape, dtype=np.int64)
            self.wide_grid += self.grid
            self.grid.fill(0)
            self.pending = 0
        self.pending += numel
        if self.base.pivot is None:  # the tensor's first slice: its first base value
            self.base.pivot = (ctypes.c_double if wide else ctypes.c_float).from_address(int(addresses[0])).value
        blocks = self.blocks if numel >= self.blocks * PARALLEL_MIN else 1
        spans = [(numel * k // blocks, numel * (k + 1) // blocks, k) for k in range(blocks)]
        if blocks == 1:
            self._block(addresses, wide, *spans[0])
        else:
            for future in [self._pool.submit(self._block, addresses, wide, *span) for span in spans]:
                future.result()
        for k in range(blocks):  # the base's spread over the slice, block by block in order
            count, mean, m2 = self.spread[k]
            self.base.add_moments(int(count), float(mean), float(m2))
        self.spread.fill(0)

    def _block(self, addresses: np.ndarray, wide: bool, start: int, stop: int, block: int) -> None:
        lower, upper, first, per_unit, log = self.binning
        _accumulate(addresses, wide, start, stop, block, self.n_finetuned, self.rows > len(addresses) - 1,
                    self.power, self.threshold_bits, self.cells.above, lower, upper, first, per_unit, log,
                    self.spread, self.base.pivot, self.sums, self.gram, self.ordered, self.nans, self.zeros,
                    self.below, self.agree, self.all_agree, self.hist, self.grid, self.key_low, self.key_high)

    def close(self) -> None:
        """Stop the block threads."""
        self._pool.shutdown()

    def finish(self, numel: int, norm_binning: Binning, norm_hist: torch.Tensor) -> tuple[Totals, float]:
        """Close the tensor: sum the blocks, apply the relative thresholds, reset for the next;
        its Totals and the base tensor's standard deviation."""
        base_std = self.base.std
        sums = self.sums.sum(0)
        gram = self.gram.sum(0)
        gram = np.triu(gram) + np.triu(gram, 1).T
        agree = self.agree.sum(0)
        agree = np.triu(agree) + np.triu(agree, 1).T
        mx = _from_ordered(self.ordered[..., 0].max(0), -np.inf)
        mn = _from_ordered(self.ordered[..., 1].min(0), np.inf)
        nan = self.nans.sum(0) > 0  # NaN wins, as in torch
        mx[nan], mn[nan] = np.nan, np.nan
        grid = FineGrid(self.rows, torch.device("cpu"))
        low, high = int(self.key_low.min()), int(self.key_high.max())
        source = self.grid
        if self.wide_grid is not None:
            self.wide_grid += self.grid
            self.grid.fill(0)
            source = self.wide_grid
        first, multi = self.cells.first, self.cells.multi
        _close_cells(source, 0, _FIRST_NORMAL, True, first, multi, self.hist_cells, grid.tiny.numpy()[:, None])
        if high >= _FIRST_NORMAL:
            grid.low, grid.counts = low, torch.zeros(self.rows, high + 1 - low, dtype=torch.int64)
            _close_cells(source, low, high + 1, False, first, multi, self.hist_cells, grid.counts.numpy())
        sp = sums[:, _POW] if self.power else {1.0: sums[:, _ABS], 2.0: np.diagonal(gram)}[self.settings.p]
        totals = close_tensor(numel, sums[:, _SUM], sums[:, _ABS], np.array(sp), gram, mx, mn, self.zeros.sum(0),
                              self.below.sum(0), agree, int(self.all_agree.sum()), grid, base_std, self.settings,
                              norm_binning, norm_hist)
        self._reset()
        return totals, base_std

    def histogram(self) -> torch.Tensor:
        """The absolute histogram, summed over blocks: (rows, slots)."""
        return torch.from_numpy(self.hist.sum(0) + self.hist_cells)


def _from_ordered(ordered: np.ndarray, nothing: float) -> np.ndarray:
    """Floats from their order-preserving integers (_reduce_bits); `nothing` where no entry was seen."""
    values = (ordered ^ ((ordered >> 63) & _MAGNITUDE)).view(np.float64).copy()
    values[(ordered == _NOTHING_ABOVE) | (ordered == _NOTHING_BELOW)] = nothing
    return values


def warm_up() -> None:
    """Load the compiled loops (numba's cache, ~1 s) on a few zeros: run on a thread while the
    process imports torch and plans the pass (the loading is partly outside the GIL)."""
    from taskvec.inspect.settings import Settings

    settings = Settings()
    binning = Binning(settings.edges(settings.range), False, torch.device("cpu"))
    state = FusedState(2, 1, settings, binning, blocks=1)
    try:
        zeros = np.zeros((2, TILE), dtype=np.float32)
        state.add(zeros.ctypes.data + np.arange(2, dtype=np.int64) * zeros.strides[0], False, TILE)
        state.finish(TILE, binning, torch.zeros(2, binning.slots_count, dtype=torch.int64))
    finally:
        state.close()


class CellBins:
    """Where the absolute histogram's edges fall in the grid's cells. For every key: `first`, the
    slot of its cell's smallest value; `multi`, where two or more edges cut the cell (many bins:
    its entries are binned one by one); `above`, as int64 bits of |tau|, the largest value still in
    `first` where one edge cuts the cell (the edge's bits less one: edges are > 0), the largest
    int64 where none does (no |tau| bits exceed it, a NaN's included: all go to `first`), -1 where
    `multi`. Keys below 256 form one cell, [0, the largest subnormal]; keys of inf and NaN go to
    the slot above the edges."""

    def __init__(self, binning: Binning) -> None:
        edges, upper = binning.edges.cpu().numpy(), binning.upper.cpu().numpy()
        keys = np.arange(KEYS, dtype=np.int64)
        lowest = (keys << _SHIFT).view(np.float64)
        highest = (((keys + 1) << _SHIFT) - 1).view(np.float64)
        lowest[:_FIRST_NORMAL], highest[:_FIRST_NORMAL] = 0.0, highest[_FIRST_NORMAL - 1]
        first, last = _exact_slots(lowest, edges), _exact_slots(highest, edges)
        self.first = first.astype(np.int64)
        self.multi = last > first + 1
        edge = upper[np.minimum(first, len(upper) - 1)]
        self.above = np.where(last == first + 1, edge.view(np.int64) - 1, np.iinfo(np.int64).max)
        self.above[self.multi] = -1
        self.slots_count = binning.slots_count


def _exact_slots(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """numpy.histogram's rule by search: [e_k, e_k+1), the last bin closed; 0 below, bins + 1
    above and NaN."""
    bins = len(edges) - 1
    slots = np.searchsorted(edges, values, side="right")
    slots[values == edges[-1]] = bins
    slots[np.isnan(values)] = bins + 1
    return slots
