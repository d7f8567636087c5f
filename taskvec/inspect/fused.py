"""The CPU pass: the compiled loops (taskvec.inspect.loops) run over a tensor's slices, block by
block on Python threads, and their accumulators closed into the torch accumulators' Totals.

A slice is split into one block per core, each with its own accumulators, run on Python threads
(the loops release the GIL) and summed when the tensor closes. The torch accumulators stay the
reference (and the CUDA pass); tests hold the two to the same counts and to float64 rounding on
sums.
"""

from __future__ import annotations

import ctypes
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from taskvec.inspect.accumulators import BaseSpread, Binning, FineGrid, Totals, close_tensor
from taskvec.inspect.keys import FIRST_NORMAL, KEYS, SHIFT
from taskvec.inspect.loops import ABS, MAGNITUDE, NOTHING_ABOVE, NOTHING_BELOW, POW, SUM, accumulate, close_cells

GRID_LIMIT = 2**31 - 1  # entries a tensor adds to the int32 grid before it is added to the int64 one
PARALLEL_MIN = 1 << 14  # elements per block below which threads cost more than they save
MAX_BLOCKS = 8


class FusedState:
    """Per-block accumulators of the tensor being read, and of the absolute histogram."""

    def __init__(self, rows: int, n_finetuned: int, settings, abs_binning: Binning, blocks: int | None = None) -> None:
        self.rows, self.n_finetuned, self.settings = rows, n_finetuned, settings
        self.blocks = blocks or min(MAX_BLOCKS, len(os.sched_getaffinity(0)))
        self._pool = ThreadPoolExecutor(self.blocks, thread_name_prefix="taskvec-inspect")
        shape = (self.blocks, rows)
        self.power = float(settings.p) if settings.p not in (1.0, 2.0) else 0.0  # p=3 would compile an int loop
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
        self.ordered[..., 0], self.ordered[..., 1] = NOTHING_ABOVE, NOTHING_BELOW
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
        accumulate(addresses, wide, start, stop, block, self.n_finetuned, self.rows > len(addresses) - 1,
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
        close_cells(source, 0, FIRST_NORMAL, True, first, multi, self.hist_cells, grid.tiny.numpy()[:, None])
        if high >= FIRST_NORMAL:
            grid.low, grid.counts = low, torch.zeros(self.rows, high + 1 - low, dtype=torch.int64)
            close_cells(source, low, high + 1, False, first, multi, self.hist_cells, grid.counts.numpy())
        sp = sums[:, POW] if self.power else {1.0: sums[:, ABS], 2.0: np.diagonal(gram)}[self.settings.p]
        totals = close_tensor(numel, sums[:, SUM], sums[:, ABS], np.array(sp), gram, mx, mn, self.zeros.sum(0),
                              self.below.sum(0), agree, int(self.all_agree.sum()), grid, base_std, self.settings,
                              norm_binning, norm_hist)
        self._reset()
        return totals, base_std

    def histogram(self) -> torch.Tensor:
        """The absolute histogram, summed over blocks: (rows, slots)."""
        return torch.from_numpy(self.hist.sum(0) + self.hist_cells)


def _from_ordered(ordered: np.ndarray, nothing: float) -> np.ndarray:
    """Floats from their order-preserving integers (_reduce_bits); `nothing` where no entry was seen."""
    values = (ordered ^ ((ordered >> 63) & MAGNITUDE)).view(np.float64).copy()
    values[(ordered == NOTHING_ABOVE) | (ordered == NOTHING_BELOW)] = nothing
    return values


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
        lowest = (keys << SHIFT).view(np.float64)
        highest = (((keys + 1) << SHIFT) - 1).view(np.float64)
        lowest[:FIRST_NORMAL], highest[:FIRST_NORMAL] = 0.0, highest[FIRST_NORMAL - 1]
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
