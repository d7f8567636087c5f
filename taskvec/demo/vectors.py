"""The demo's view of the task vectors: the merged (mean) vector against the single ones it averages.

The paper reads "more parameters almost unchanged after merging" as decoupling noise from the
toxic direction. Both views are printed, because they answer different questions: the share of
near-zero entries in absolute terms (averaging shrinks the update, so it rises), and relative to
each tensor's own RMS (whether the update became sparser in shape); then how much the N split
vectors share (cosines, sign agreement against chance). Every number comes from stats.json.
"""

from __future__ import annotations

SAME_SHAPE = 0.005  # shares within half a percentage point of the singles' range count as the same


def compare_vectors(stats: dict) -> tuple[str, dict]:
    """Printable lines and their numbers, from `taskvec inspect`'s statistics of N >= 2 fine-tunes."""
    settings = stats["settings"]
    threshold, fraction = f"{max(settings['thresholds']):g}", f"{max(settings['rms_fractions']):g}"
    vectors = stats["global"]["vectors"]
    singles = [vectors[name] for name in stats["finetuned"]]
    mean, cross, n = vectors["mean"], stats["global"]["cross"], len(singles)
    absolute = [v["below_abs"][threshold] for v in singles]
    relative = [v["below_rms"][fraction] for v in singles]
    numbers = {
        "l2_ratio": mean["l2"] / (sum(v["l2"] for v in singles) / n),
        "below_abs": {"threshold": float(threshold), "mean": mean["below_abs"][threshold], "singles": absolute},
        "below_rms": {"fraction": float(fraction), "mean": mean["below_rms"][fraction], "singles": relative},
        "mean_pairwise_cosine": cross["mean_pairwise_cosine"],
        "all_agree": cross["all_agree"], "all_agree_by_chance": cross["all_agree_by_chance"],
    }
    shape = _compared(numbers["below_rms"]["mean"], relative)
    lines = [
        f"task vectors (taskvec inspect, {n} fine-tunes and their mean; stats.json in inspect/):",
        f"  L2 norm of the mean: {numbers['l2_ratio']:.2f}x a single vector's (on average)",
        f"  |tau| < {threshold}: {_share(numbers['below_abs']['mean'])} of the mean's entries, "
        f"{_span(absolute)} of a single vector's",
        f"  |tau| < {fraction} x its tensor's RMS: {_share(numbers['below_rms']['mean'])} of the mean's, "
        f"{_span(relative)} of a single vector's: relative to its own scale the mean is {shape}",
        f"  the {n} split vectors: mean pairwise cosine {_number(numbers['mean_pairwise_cosine'])}; all {n} agree "
        f"in sign on {_share(numbers['all_agree'])} of entries ({_share(numbers['all_agree_by_chance'])} "
        "by chance)",
    ]
    return "\n".join(lines), numbers


def _compared(value: float, singles: list[float]) -> str:
    if value > max(singles) + SAME_SHAPE:
        return "sparser in shape than a single vector"
    if value < min(singles) - SAME_SHAPE:
        return "denser in shape than a single vector"
    return "no sparser in shape: averaging shrinks the update rather than zeroing parts of it"


def _share(value: float) -> str:
    return f"{100 * value:.1f}%"


def _span(shares: list[float]) -> str:
    low, high = min(shares), max(shares)
    return _share(low) if _share(low) == _share(high) else f"{_share(low)}-{_share(high)}"


def _number(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.2f}"
