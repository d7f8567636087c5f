"""The PNGs of `taskvec inspect`: both histograms, the cosine matrix and per-group bars.
matplotlib is imported here only, when plots are asked for."""

from __future__ import annotations

from pathlib import Path

import numpy as np

PLOTS = ("histogram_absolute.png", "histogram_normalised.png", "cosine.png", "groups.png")


def write_plots(directory: Path, stats: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    vectors = stats["vectors"]
    scales = (("absolute", "|tau|"), ("normalised", "|tau| / RMS of its tensor's tau"))
    for (kind, label), file in zip(scales, PLOTS[:2], strict=True):
        histogram = stats["histograms"][kind]
        figure, axes = plt.subplots(figsize=(7, 4))
        for vector in vectors:
            axes.stairs(np.asarray(histogram["counts"][vector]), np.asarray(histogram["edges"]), label=vector)
        axes.set(xlabel=label, ylabel="entries", yscale="log", title=f"Task-vector entries, {kind} scale")
        if stats["settings"]["log_bins"]:
            axes.set_xscale("log")
        axes.legend(fontsize="small")
        _save(figure, directory / file)

    cosine = np.array([[np.nan if v is None else v for v in row] for row in stats["global"]["cross"]["cosine"]])
    figure, axes = plt.subplots(figsize=(1.2 + 0.7 * len(vectors), 1 + 0.6 * len(vectors)))
    image = axes.imshow(cosine, vmin=-1, vmax=1, cmap="RdBu_r")
    axes.set_xticks(range(len(vectors)), vectors, rotation=45, ha="right")
    axes.set_yticks(range(len(vectors)), vectors)
    for (i, j), value in np.ndenumerate(cosine):
        axes.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize="small")
    figure.colorbar(image, ax=axes, label="cosine")
    axes.set_title("Cosine similarity of task vectors")
    _save(figure, directory / PLOTS[2])

    groups = list(stats["groups"])
    threshold = f"{max(stats['settings']['thresholds']):g}"
    figure, panels = plt.subplots(1, 3, figsize=(13, 4))
    width = 0.8 / len(vectors)
    positions = np.arange(len(groups))
    for k, vector in enumerate(vectors):
        values = [stats["groups"][g]["vectors"][vector] for g in groups]
        panels[0].bar(positions + k * width, [v["rms"] for v in values], width, label=vector)
        panels[1].bar(positions + k * width, [v["below_abs"][threshold] for v in values], width, label=vector)
    pairwise = [stats["groups"][g]["cross"].get("mean_pairwise_cosine") for g in groups]
    panels[2].bar(positions, [np.nan if v is None else v for v in pairwise], 0.6)
    titles = ("RMS of tau", f"share with |tau| < {threshold}", "mean pairwise cosine of fine-tunes")
    for panel, title in zip(panels, titles, strict=True):
        panel.set_xticks(positions + (0.4 - width / 2 if panel is not panels[2] else 0), groups, rotation=30)
        panel.set_title(title)
    panels[0].legend(fontsize="small")
    _save(figure, directory / PLOTS[3])
    return list(PLOTS)


def _save(figure, path: Path) -> None:
    from matplotlib import pyplot as plt

    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
