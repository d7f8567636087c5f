"""From accumulated sums and counts to the statistics users read, per tensor, group and overall.

Shares are fractions of the entries considered; "below" counts an entry whose |tau| is under
the threshold, and a zero entry at every threshold. Sign agreement of two vectors is the share
of entries where both are nonzero with the same sign (a zero agrees with nothing), so two
random vectors agree on about half, and all N fine-tunes on 2^(1-N) by chance.
"""

from __future__ import annotations

import math

import numpy as np

from taskvec.inspect.accumulators import Totals
from taskvec.inspect.groups import GROUPS, group_of
from taskvec.inspect.settings import Settings


def vector_stats(totals: Totals, row: int, settings: Settings) -> dict:
    """The norms, extremes, moments and near-zero shares of one vector over `totals`' entries."""
    n = totals.n
    squares = float(totals.gram[row, row])
    return {
        "l1": float(totals.sa[row]),
        "l2": math.sqrt(squares),
        "linf": max(float(totals.mx[row]), -float(totals.mn[row])),
        "lp": float(totals.sp[row]) ** (1 / settings.p),
        "min": float(totals.mn[row]),
        "max": float(totals.mx[row]),
        "mean": float(totals.s1[row]) / n,
        "rms": math.sqrt(squares / n),
        "zero_share": int(totals.zeros[row]) / n,
        "below_abs": _shares(settings.thresholds, totals.below_abs[row], n),
        "below_rms": _shares(settings.rms_fractions, totals.below_rms[row], n),
        "below_std": _shares(settings.std_fractions, totals.below_std[row], n),
    }


def cross_stats(totals: Totals, vectors: list[str], n_finetuned: int) -> dict:
    """Cosines and sign agreement between every two vectors (in `vectors`' order), and for two
    or more fine-tunes their averages, the all-agree share and each one's cosine to the mean."""
    norms = np.sqrt(np.diagonal(totals.gram))
    with np.errstate(invalid="ignore", divide="ignore"):
        cosine = totals.gram / np.outer(norms, norms)
    result = {"cosine": _matrix(cosine), "sign_agreement": _matrix(totals.agree / totals.n)}
    if n_finetuned >= 2:
        pairs = [(i, j) for i in range(n_finetuned) for j in range(i + 1, n_finetuned)]
        result |= {
            "mean_pairwise_cosine": _number(np.mean([cosine[i, j] for i, j in pairs])),
            "mean_pairwise_sign_agreement": float(np.mean([totals.agree[i, j] for i, j in pairs])) / totals.n,
            "all_agree": totals.all_agree / totals.n,
            "all_agree_by_chance": 2.0 ** (1 - n_finetuned),
            "cosine_to_mean": {vectors[i]: _number(cosine[i, n_finetuned]) for i in range(n_finetuned)},
        }
    return result


def summarize(tensors: dict[str, Totals], shapes: dict[str, tuple[int, ...]], base_std: dict[str, float],
              vectors: list[str], n_finetuned: int, settings: Settings) -> dict:
    """The "global", "groups" and "tensors" sections of stats.json."""

    def section(totals: Totals) -> dict:
        return {"numel": totals.n,
                "vectors": {name: vector_stats(totals, row, settings) for row, name in enumerate(vectors)},
                "cross": cross_stats(totals, vectors, n_finetuned)}

    by_group: dict[str, list[Totals]] = {}
    records = []
    for name, totals in tensors.items():
        group = group_of(name)
        by_group.setdefault(group, []).append(totals)
        records.append({"name": name, "group": group, "shape": list(shapes[name]), "base_std": base_std[name],
                        **section(totals)})
    groups = {group: section(_total(by_group[group])) for group in GROUPS if group in by_group}
    return {"global": section(_total(list(tensors.values()))), "groups": groups, "tensors": records}


def _total(items: list[Totals]) -> Totals:
    total = items[0]
    for item in items[1:]:
        total = total + item
    return total


def _shares(levels, counts, n: int) -> dict[str, float]:
    return {f"{level:g}": int(count) / n for level, count in zip(levels, counts, strict=True)}


def _number(value) -> float | None:
    """A float for JSON; None where it is undefined (the cosine of a zero vector)."""
    value = float(value)
    return value if math.isfinite(value) else None


def _matrix(values: np.ndarray) -> list[list[float | None]]:
    return [[_number(v) for v in row] for row in values]
