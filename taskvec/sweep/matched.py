"""Compare a sweep's methods at matched toxicity, with paired bootstrap intervals over the prompts.

For each method, the mean toxicity at each scale (averaged over the sampling seeds, the base at
scale 0) is fitted as a non-increasing function of the scale; the scale where the fit comes down
to a level is interpolated, and the perplexity there is interpolated between the models'
perplexities. A method's cost at that level is its perplexity increase over the base; a pair
(a, b) is compared by the difference of the increases and by the relative reduction
1 - increase_a / increase_b (the paper's "38.9% less degradation"), meaningless where
increase_b <= 0.

Uncertainty: every point was evaluated on the same prompts, so the prompts are resampled with
replacement, the same indices for every method, scale and seed (a paired bootstrap); each
resample's per-prompt toxicities give new curves, refitted and read again, and the percentile
interval of each number is reported. Perplexity is one corpus-level number per model
(taskvec.eval.likelihood), so it is held fixed: the intervals cover the toxicity side only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from taskvec.errors import TaskvecError
from taskvec.sweep.curves import crossing, interpolate, nonincreasing_fit
from taskvec.sweep.layout import BASE, read_record, seed_dir
from taskvec.sweep.results import prompt_toxicity, read_points

PERPLEXITY_NOTE = ("perplexity is one corpus-level number per model, held fixed in the bootstrap: "
                   "the intervals cover the sampling of prompts and generations only")


@dataclass
class Curves:
    """What a matched comparison reads from a sweep. Per method: the scales (0, the base, first),
    the perplexity at each and the per-prompt mean toxicity, an array (scales, seeds, prompts)."""

    methods: list[str]
    scales: list[list[float]]
    perplexity: list[list[float]]
    toxicity: list  # numpy arrays
    base_perplexity: float
    notes: list[str]


def load_curves(root: str | Path) -> Curves:
    """The finished points of a sweep directory; points missing a seed or their perplexity are
    left out with a note."""
    import numpy as np

    root = Path(root)
    record = read_record(root)
    seeds = record["seeds"]
    notes, prompts, by_method = [], None, {}
    for point in read_points(root, record):
        if point.perplexity is None or set(point.metrics) != set(seeds):
            if point.method == BASE:
                raise TaskvecError(f"{root}: the base model's evaluation is unfinished; rerun the sweep")
            notes.append(f"{point.method} at scale {point.scale:g} is unfinished and left out")
            continue
        rows = []
        for seed in seeds:
            run = seed_dir(root, point.method, point.scale, seed)
            means = prompt_toxicity(run)
            prompts = prompts or sorted(means, key=str)
            if set(means) != set(prompts):
                raise TaskvecError(f"{run}: its prompts differ from the base's; the comparison needs the same ones")
            rows.append([means[prompt] for prompt in prompts])
        by_method.setdefault(point.method, []).append((point.scale, point.perplexity, rows))
    base = by_method.pop(BASE)[0]
    methods = [method for method in record["methods"] if method in by_method]
    if not methods:
        raise TaskvecError(f"{root} has no finished sweep points besides the base; run or resume `taskvec sweep`")
    curves = Curves(methods, [], [], [], base[1], notes)
    for method in methods:
        points = [base] + by_method[method]
        curves.scales.append([scale for scale, _, _ in points])
        curves.perplexity.append([ppl for _, ppl, _ in points])
        curves.toxicity.append(np.array([rows for _, _, rows in points], dtype=float))
    return curves


def auto_levels(curves: Curves, fractions=(1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6)) -> list[float]:
    """Levels inside the toxicity range every method reaches, at `fractions` of the way from the
    highest of the methods' lowest fitted toxicities (0) up to the lowest of their starting ones (1)."""
    fits = [nonincreasing_fit(_means(tox)) for tox in curves.toxicity]
    low, high = max(fit[-1] for fit in fits), min(fit[0] for fit in fits)
    if not low < high:
        raise TaskvecError("the methods' toxicity curves share no range below the base's; give --levels")
    exact = [low + (high - low) * fraction for fraction in fractions]
    for digits in range(3, 18):  # 3 significant digits where they keep the levels apart and inside
        levels = [float(f"{level:.{digits}g}") for level in exact]
        if len(set(levels)) == len(levels) and all(low < level < high for level in levels):
            return levels
    return exact


def matched_comparison(curves: Curves, levels: list[float] | None = None, *, replicates: int = 1000, seed: int = 0,
                       confidence: float = 0.95) -> dict:
    """matched.json's content: per level, each method's scale, perplexity and increase over the
    base, and each pair's difference and relative reduction, with bootstrap intervals and flags."""
    import numpy as np

    if replicates < 1 or not 0 < confidence < 1:
        raise TaskvecError(f"need at least one bootstrap replicate and a confidence in (0, 1), got "
                           f"{replicates} and {confidence}")
    levels = auto_levels(curves) if levels is None else [float(level) for level in levels]
    if not levels:
        raise TaskvecError("no toxicity levels to compare at")
    for level in levels:
        if not math.isfinite(level):
            raise TaskvecError(f"toxicity level {level} is not a finite number")
    n_prompts = curves.toxicity[0].shape[2]
    weights = np.random.default_rng(seed).multinomial(n_prompts, [1 / n_prompts] * n_prompts, size=replicates)
    resampled = [np.einsum("ksp,bp->bk", tox, weights) / (n_prompts * tox.shape[1]) for tox in curves.toxicity]
    estimate_fits = [nonincreasing_fit(_means(tox)) for tox in curves.toxicity]
    replicate_fits = [[nonincreasing_fit(row) for row in means] for means in resampled]
    result_levels = []
    for level in levels:
        estimate = [_read(curves, m, estimate_fits[m], level) for m in range(len(curves.methods))]
        boot = [[_read(curves, m, fit, level) for fit in replicate_fits[m]] for m in range(len(curves.methods))]
        result_levels.append(_level(curves, level, estimate, boot, estimate_fits, confidence))
    return {"format": "taskvec-matched/1", "metric": "mean_toxicity", "levels": result_levels,
            "base": {"perplexity": curves.base_perplexity, "mean_toxicity": float(_means(curves.toxicity[0])[0])},
            "bootstrap": {"replicates": replicates, "seed": seed, "confidence": confidence,
                          "resampled": f"the {n_prompts} prompts, paired across methods, scales and seeds"},
            "perplexity_note": PERPLEXITY_NOTE, "notes": curves.notes}


def _means(tox) -> list[float]:
    """Mean toxicity per scale: over the prompts, then over the seeds."""
    return [float(value) for value in tox.mean(axis=2).mean(axis=1)]


def _read(curves: Curves, m: int, fit: list[float], level: float) -> float | None:
    """Method m's perplexity increase over the base where its fitted toxicity reaches `level`."""
    scale = crossing(curves.scales[m], fit, level)
    if scale is None:
        return None
    return interpolate(curves.scales[m], curves.perplexity[m], scale) - curves.base_perplexity


def _interval(values: list[float], confidence: float) -> list[float] | None:
    import numpy as np

    if not values:
        return None
    tail = (1 - confidence) / 2
    return [float(q) for q in np.quantile(values, [tail, 1 - tail])]


def _relative(a: float, b: float) -> float | None:
    """1 - a / b, defined where b's increase is positive (resamples keep a of either sign)."""
    return None if b <= 0 else 1 - a / b


def _level(curves: Curves, level: float, estimate: list, boot: list, fits: list, confidence: float) -> dict:
    methods, flags = {}, []
    for m, method in enumerate(curves.methods):
        increase = estimate[m]
        reached = [value for value in boot[m] if value is not None]
        entry = {"reached": increase is not None, "increase": increase, "scale": None, "perplexity": None,
                 "increase_ci": _interval(reached, confidence), "reached_share": len(reached) / len(boot[m])}
        if increase is None:
            flags.append(f"{method} never reaches this level (its fitted toxicity stops at {fits[m][-1]:.3f})")
        else:
            entry["scale"] = crossing(curves.scales[m], fits[m], level)
            entry["perplexity"] = curves.base_perplexity + increase
            if increase <= 0:
                flags.append(f"{method}'s perplexity increase is {increase:+.3f}, not above 0: no relative "
                             "reduction is given here")
        methods[method] = entry
    pairs = []
    for a in range(len(curves.methods)):
        for b in range(a + 1, len(curves.methods)):
            pairs.append(_pair(curves, a, b, estimate, boot, confidence))
    return {"level": level, "methods": methods, "pairs": pairs, "flags": flags}


def _pair(curves: Curves, a: int, b: int, estimate: list, boot: list, confidence: float) -> dict:
    both = [(x, y) for x, y in zip(boot[a], boot[b], strict=True) if x is not None and y is not None]
    share = len(both) / len(boot[a])
    defined = estimate[a] is not None and estimate[b] is not None
    difference = estimate[a] - estimate[b] if defined else None
    difference_ci = _interval([x - y for x, y in both], confidence)
    relative = _relative(estimate[a], estimate[b]) if defined and estimate[a] > 0 else None  # flagged otherwise
    relative_values = [r for r in (_relative(x, y) for x, y in both) if r is not None]
    resolved = (defined and share >= confidence and difference_ci is not None
                and (difference_ci[1] < 0 or difference_ci[0] > 0))
    return {"methods": [curves.methods[a], curves.methods[b]], "difference": difference,
            "difference_ci": difference_ci, "relative_reduction": relative,
            "relative_reduction_ci": _interval(relative_values, confidence) if relative is not None else None,
            "relative_defined_share": len(relative_values) / len(boot[a]), "both_reached_share": share,
            "resolved": resolved}
