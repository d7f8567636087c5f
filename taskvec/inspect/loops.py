"""The CPU pass's compiled loops: every statistic of a slice from one read of its inputs.

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
the grid in int32 (half the cache its scattered increments touch). The histogram is counted per
half grid cell (the grid is counted anyway; an edge of the histogram splits a cell in two) and
each half binned once when its tensor closes; only entries of the cells two edges cut (with many
bins) are binned one by one.

Semantics are the torch accumulators': a NaN tau is no zero and agrees with nothing, goes to the
histograms' last slot and to the grid at NaN's key; the mean is the fine-tunes' rows added in
order, divided by N; histogram slots are numpy.histogram's, found by position and settled
against the edges themselves (so the rounding of the position never decides a slot).

This module imports numpy and numba only: loading its compiled loops from numba's cache (about
a second) then runs beside torch's import (`warm_up`), not after it.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import types
from numba.extending import intrinsic

from taskvec.inspect.keys import FIRST_NORMAL, KEYS, SHIFT

MAGNITUDE = np.int64(0x7FFFFFFFFFFFFFFF)
_NORMAL = np.int64(FIRST_NORMAL << SHIFT)  # the bits of the smallest normal float64
_NO_KEY = MAGNITUDE  # no smaller |tau| seen: its key, KEYS - 1, is at least every key seen
_INF = np.int64(0x7FF0000000000000)  # the bits of inf: larger |t| bits are NaN's
NOTHING_ABOVE, NOTHING_BELOW = np.iinfo(np.int64).min, np.iinfo(np.int64).max  # extremes of no entry

# sums[..., k]: tau, |tau|, |tau|^p; ordered[..., k]: max, min as order-preserving integers
SUM, ABS, POW = range(3)


TILE = 2048  # elements per step: the (vectors x TILE) float64 task vectors stay in a core's L2


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
        sums[r, SUM] += total
        sums[r, ABS] += absolute
        sums[r, POW] += powered
        for w in range(r + 1):
            dot = 0.0
            for j in range(m):
                dot += tau[w, j] * tau[r, j]
            gram[w, r] += dot


@numba.njit(nogil=True, cache=True, inline="always")
def _reduce_bits(b, zero, nan, high, low, top, bottom):
    """One entry's float64 bits added to the row's integer reductions: zeros, NaNs, the largest
    |t| bits, the smallest normal |t| bits, and the extremes as order-preserving integers."""
    a = b & MAGNITUDE
    ordered = b ^ ((b >> 63) & MAGNITUDE)  # as signed integers, ordered as the floats are
    return (zero + (a == 0), nan + (a > _INF), max(high, a), min(low, a if a >= _NORMAL else _NO_KEY),
            max(top, ordered), min(bottom, ordered))


@numba.njit(nogil=True, cache=True, inline="always")
def _sign_bits(b):
    """Whether the float64 with bits b is > 0, and whether it is < 0 (NaN: neither)."""
    a = b & MAGNITUDE
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
                count += (bits[j] & MAGNITUDE) < limit
            below[r, k] += count
        ordered[r, 0], ordered[r, 1] = top, bottom
        nans[r] += nan
        zeros[r] += zero
        key_high[r] = max(key_high[r], high >> SHIFT)
        key_low[r] = min(key_low[r], low >> SHIFT)


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
            a = bits[j] & MAGNITUDE
            key = a >> SHIFT
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
def accumulate(addresses, wide, start, stop, block, n_finetuned, with_mean, power, threshold_bits, above, lower,
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
def close_cells(grid, start, stop, one_cell, first, multi, hist, counts):
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


def warm_up() -> None:
    """Load the compiled loops (numba's cache) by running them on a tile of zeros, with the very
    argument types FusedState passes (another type would load a second signature)."""
    rows, slots = 2, 3
    zeros = np.zeros((rows, TILE), dtype=np.float32)
    addresses = zeros.ctypes.data + np.arange(rows, dtype=np.int64) * zeros.strides[0]
    counts = np.zeros((1, rows), dtype=np.int64)
    grid = np.zeros((1, rows, 2 * KEYS), dtype=np.int32)
    hist = np.zeros((1, rows, slots), dtype=np.int64)
    edges = np.zeros(slots, dtype=np.float64)
    no_cut = np.full(KEYS, np.iinfo(np.int64).max, dtype=np.int64)
    accumulate(addresses, False, 0, TILE, 0, 1, False, 0.0, np.ones(1, dtype=np.int64), no_cut, edges, edges, 0.0,
               1.0, False, np.zeros((1, 3)), 0.0, np.zeros((1, rows, 3)), np.zeros((1, rows, rows)),
               np.zeros((1, rows, 2), dtype=np.int64), counts, counts.copy(), np.zeros((1, rows, 1), dtype=np.int64),
               np.zeros((1, rows, rows), dtype=np.int64), np.zeros(1, dtype=np.int64), hist, grid, counts.copy(),
               counts.copy())
    close_cells(grid, 0, FIRST_NORMAL, True, np.zeros(KEYS, dtype=np.int64), np.zeros(KEYS, dtype=np.bool_),
                hist[0], np.zeros((rows, 1), dtype=np.int64))
