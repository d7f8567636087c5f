"""sweep.png: perplexity against mean toxicity, one curve per method through the base (scale 0),
points labelled by scale, horizontal bars one SD over the sampling seeds; matched toxicity
levels, when given, as vertical lines with each method's perplexity there marked."""

from __future__ import annotations

from pathlib import Path

from taskvec.errors import TaskvecError
from taskvec.figures import save_figure
from taskvec.sweep.layout import BASE


def plot_sweep(rows: list[dict], output: Path, matched: list[dict] | None = None) -> Path:
    """Draw the mean rows of sweep.csv; matched: matched.json's `levels` (level, per-method perplexity)."""
    means = [row for row in rows if row["seed"] == "mean" and row["perplexity"] is not None]
    sds = {(row["method"], row["scale"]): row["mean_toxicity"] for row in rows if row["seed"] == "sd"}
    base = [row for row in means if row["method"] == BASE]
    methods = list(dict.fromkeys(row["method"] for row in means if row["method"] != BASE))
    if not methods:
        raise TaskvecError("no finished sweep points to plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.8), constrained_layout=True)
    for index, method in enumerate(methods):
        curve = base + sorted((row for row in means if row["method"] == method), key=lambda row: row["scale"])
        color = f"C{index % 10}"
        axis.errorbar([row["mean_toxicity"] for row in curve], [row["perplexity"] for row in curve],
                      xerr=[sds.get((row["method"], row["scale"])) or 0 for row in curve], color=color,
                      marker="o", capsize=3, label=method)
        for row in curve[len(base):]:
            axis.annotate(f"{row['scale']:g}", (row["mean_toxicity"], row["perplexity"]), textcoords="offset points",
                          xytext=(5, 4), fontsize=8, color=color)
        for level in matched or []:
            value = level["methods"].get(method, {}).get("perplexity")
            if value is not None:
                axis.plot(level["level"], value, marker="x", markersize=9, color=color, zorder=4)
    for row in base:
        axis.annotate("base", (row["mean_toxicity"], row["perplexity"]), textcoords="offset points", xytext=(5, -10),
                      fontsize=8)
    for level in matched or []:
        axis.axvline(level["level"], color="0.5", linestyle=":", linewidth=1)
    axis.set_xlabel("Mean toxicity (mean over sampling seeds, bars: 1 SD)")
    axis.set_ylabel("Perplexity")
    axis.set_title("Perplexity against toxicity over the scale" + (" (dotted: matched levels)" if matched else ""))
    axis.grid(True, alpha=0.3)
    axis.legend()
    return save_figure(figure, output)
