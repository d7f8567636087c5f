"""Toxicity as a non-increasing function of scale, and reading a curve at a level.

Sampled toxicity is noisy, so its measured means need not fall as the scale grows, although
the model's expected toxicity does (over the range a sweep covers). The least-squares
non-increasing fit (isotonic regression by pool-adjacent-violators) makes the curve monotone, so
that "the scale where toxicity reaches L" is one well-defined number.
"""

from __future__ import annotations

from collections.abc import Sequence


def nonincreasing_fit(values: Sequence[float], weights: Sequence[float] | None = None) -> list[float]:
    """The non-increasing sequence closest to `values` in weighted least squares (PAV).

    Adjacent blocks whose means increase are pooled into their weighted mean until no block is
    above the one before it; equal neighbours are no violation.
    """
    weights = [1.0] * len(values) if weights is None else list(weights)
    if len(weights) != len(values) or any(not w > 0 for w in weights):
        raise ValueError("one positive weight per value is needed")
    blocks: list[list[float]] = []  # [mean, weight, count]
    for value, weight in zip(values, weights, strict=True):
        blocks.append([float(value), float(weight), 1])
        while len(blocks) > 1 and blocks[-2][0] < blocks[-1][0]:
            mean, weight, count = blocks.pop()
            previous = blocks[-1]
            total = previous[1] + weight
            blocks[-1] = [(previous[0] * previous[1] + mean * weight) / total, total, previous[2] + count]
    return [mean for mean, _, count in blocks for _ in range(count)]


def crossing(xs: Sequence[float], ys: Sequence[float], level: float) -> float | None:
    """The smallest x where the non-increasing piecewise-linear curve through (xs, ys) comes down
    to `level` (ys at or below it), interpolated linearly; None if it never does.

    xs must increase. A curve already at or below the level at its first point reaches it there;
    on a flat stretch at exactly the level the first x of the stretch is returned (the least
    scale, hence the least perplexity cost, that reaches it).
    """
    if ys[0] <= level:
        return float(xs[0])
    for i in range(1, len(xs)):
        if ys[i] <= level:
            share = (ys[i - 1] - level) / (ys[i - 1] - ys[i])  # ys[i-1] > level >= ys[i]
            return xs[i - 1] + share * (xs[i] - xs[i - 1])
    return None


def interpolate(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """ys linearly interpolated at x within the range of xs (which must increase)."""
    if not xs[0] <= x <= xs[-1]:
        raise ValueError(f"{x} is outside [{xs[0]}, {xs[-1]}]")
    for i in range(1, len(xs)):
        if x <= xs[i]:
            share = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
            return ys[i - 1] + share * (ys[i] - ys[i - 1])
    return float(ys[0])  # a single point
