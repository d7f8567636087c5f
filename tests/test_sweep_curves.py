"""The isotonic fit against a brute-force least-squares reference, and reading curves at a level."""

import itertools
import random

import pytest

from taskvec.sweep.curves import crossing, interpolate, nonincreasing_fit


def brute_force_fit(values, weights):
    """The best non-increasing fit whose values are block means, over every split into
    contiguous blocks (the isotonic optimum is always one of these)."""
    n, best = len(values), None
    for cuts in itertools.product([False, True], repeat=n - 1):
        blocks, start = [], 0
        for i, cut in enumerate([*cuts, True]):
            if cut:
                blocks.append((start, i + 1))
                start = i + 1
        fit = []
        for a, b in blocks:
            mean = sum(v * w for v, w in zip(values[a:b], weights[a:b], strict=True)) / sum(weights[a:b])
            fit += [mean] * (b - a)
        if all(x >= y - 1e-12 for x, y in zip(fit, fit[1:], strict=False)):
            loss = sum(w * (v - f) ** 2 for v, w, f in zip(values, weights, fit, strict=True))
            if best is None or loss < best[0] - 1e-12:
                best = (loss, fit)
    return best[1]


@pytest.mark.parametrize("trial", range(60))
def test_pav_equals_the_brute_force_optimum(trial):
    rng = random.Random(trial)
    n = rng.randint(1, 8)
    values = [rng.choice([0.0, 0.1, 0.2, 0.3]) if trial % 3 == 0 else rng.random() for _ in range(n)]  # ties too
    weights = [1.0] * n if trial % 2 else [rng.uniform(0.5, 3) for _ in range(n)]
    fit = nonincreasing_fit(values, weights)
    assert fit == pytest.approx(brute_force_fit(values, weights), abs=1e-12)
    assert all(x >= y for x, y in zip(fit, fit[1:], strict=False))


def test_pav_on_hand_made_sequences():
    assert nonincreasing_fit([0.3, 0.2, 0.1]) == [0.3, 0.2, 0.1]  # already monotone: unchanged
    assert nonincreasing_fit([0.1, 0.3]) == pytest.approx([0.2, 0.2])
    assert nonincreasing_fit([0.3, 0.1, 0.2, 0.0]) == pytest.approx([0.3, 0.15, 0.15, 0.0])
    assert nonincreasing_fit([0.2, 0.2, 0.2]) == [0.2, 0.2, 0.2]  # a tie is no violation
    assert nonincreasing_fit([0.1, 0.3], [3, 1]) == pytest.approx([0.15, 0.15])
    with pytest.raises(ValueError):
        nonincreasing_fit([0.1, 0.2], [1, 0])


def test_crossing_interpolates_between_points():
    xs, ys = [0, 1, 2], [0.2, 0.1, 0.0]
    assert crossing(xs, ys, 0.15) == pytest.approx(0.5)
    assert crossing(xs, ys, 0.1) == 1
    assert crossing(xs, ys, 0.025) == pytest.approx(1.75)
    assert crossing(xs, ys, 0.0) == 2


def test_crossing_at_the_start_never_and_on_flat_stretches():
    xs = [0, 0.5, 1, 1.5]
    assert crossing(xs, [0.2, 0.1, 0.05, 0.04], 0.25) == 0  # above the start: reached at once
    assert crossing(xs, [0.2, 0.1, 0.05, 0.04], 0.2) == 0
    assert crossing(xs, [0.2, 0.1, 0.05, 0.04], 0.03) is None  # below the floor: never
    assert crossing(xs, [0.1, 0.1, 0.1, 0.1], 0.1) == 0  # a flat curve reaches its own value at once
    assert crossing(xs, [0.1, 0.1, 0.1, 0.1], 0.09) is None
    assert crossing(xs, [0.2, 0.1, 0.1, 0.0], 0.1) == 0.5  # a tie: the first scale of the stretch
    assert crossing(xs, [0.2, 0.1, 0.1, 0.0], 0.05) == pytest.approx(1.25)


def test_interpolate():
    xs, ys = [0, 0.5, 1], [10, 11, 13]
    assert interpolate(xs, ys, 0.75) == pytest.approx(12)
    assert interpolate(xs, ys, 0) == 10 and interpolate(xs, ys, 1) == 13 and interpolate(xs, ys, 0.5) == 11
    assert interpolate([2.0], [7.0], 2.0) == 7.0
    with pytest.raises(ValueError, match="outside"):
        interpolate(xs, ys, 1.1)
