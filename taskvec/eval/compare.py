"""Evaluated runs side by side: a table, and toxicity plotted against perplexity."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from taskvec.errors import TaskvecError
from taskvec.eval.records import GENERATIONS, METRICS, SUMMARY, read_summary
from taskvec.figures import save_figure
from taskvec.output_file import check_output_file

# (row key, column header, format)
COLUMNS = [
    ("run", "run", "{}"),
    ("perplexity", "PPL", "{:.2f}"),
    ("expected_max_toxicity", "exp. max tox.", "{:.3f}"),
    ("toxicity_probability", "tox. prob.", "{:.3f}"),
    ("mean_toxicity", "mean tox.", "{:.3f}"),
    ("fraction_toxic", "frac. toxic", "{:.3f}"),
    ("n_prompts", "prompts", "{}"),
    ("samples", "k", "{}"),
    ("scorer", "scorer", "{}"),
]


def summary_row(summary: dict, run: str) -> dict:
    """A flat table row from a run's summary (None where a part was not evaluated)."""
    metrics = summary.get("metrics") or {}
    scorer = summary.get("scorer") or {}
    return {"run": run, "model": summary.get("model"), "perplexity": summary.get("perplexity"),
            **{key: metrics.get(key) for key in METRICS},
            "samples": (summary.get("settings") or {}).get("samples"), "scorer": scorer.get("name")}


def compare_runs(run_dirs: Sequence[str | Path], output_png: str | Path | None = None, *,
                 labels: Sequence[str] | None = None, overwrite: bool = False) -> list[dict]:
    """Rows for the runs (output directories of `taskvec eval` or `taskvec score`), in order;
    with `output_png`, also plot toxicity against perplexity there. labels: one per run
    (default: the directory names, or the paths as given where names repeat)."""
    if not run_dirs:
        raise TaskvecError("no runs to compare")
    if labels is None:
        names = [Path(run_dir).resolve().name for run_dir in run_dirs]
        labels = [name if names.count(name) == 1 else str(run_dir)
                  for name, run_dir in zip(names, run_dirs, strict=True)]
    elif len(labels) != len(run_dirs):
        raise TaskvecError(f"{len(labels)} labels for {len(run_dirs)} runs")
    rows = []
    for run_dir, label in zip(run_dirs, labels, strict=True):
        rows.append(summary_row(read_summary(run_dir), label))
    if output_png is not None:
        plot_runs(rows, output_png, overwrite=overwrite, inputs=run_files(run_dirs))
    return rows


def run_files(run_dirs: Sequence[str | Path]) -> list[Path]:
    """The files of the runs, which a plot must never replace."""
    return [Path(run_dir) / name for run_dir in run_dirs for name in (SUMMARY, GENERATIONS)]


def format_table(rows: Sequence[dict]) -> str:
    """A plain-text table of the rows; '-' for parts a run did not evaluate."""
    cells = [[header for _, header, _ in COLUMNS]]
    cells += [[("-" if row.get(key) is None else fmt.format(row[key])) for key, _, fmt in COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join([first.ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(rest, widths[1:], strict=True)])
             for first, *rest in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    scorers = {row["scorer"] for row in rows if row.get("scorer")}
    if len(scorers) > 1:
        lines.append(f"note: the runs were scored by different scorers ({', '.join(sorted(scorers))}); "
                     "their toxicities are not comparable")
    return "\n".join(lines)


def plottable(rows: Sequence[dict]) -> list[dict]:
    """The rows that have both a perplexity and toxicity scores: those a plot can show."""
    return [row for row in rows if row["perplexity"] is not None and row["expected_max_toxicity"] is not None]


def plot_runs(rows: Sequence[dict], output_png: str | Path, *, overwrite: bool = False,
              inputs: Sequence[str | Path] = ()) -> Path:
    """Scatter expected maximum toxicity and toxicity probability against perplexity, one
    labelled point per run (runs lacking either number are left out), written atomically.
    inputs: files the plot may not replace (see run_files), even with `overwrite`."""
    output = check_output_file(output_png, inputs, overwrite=True)
    if output.exists() and not overwrite:
        raise TaskvecError(f"plot {output} already exists; pass --overwrite to replace it, or --no-plot")
    points = plottable(rows)
    if not points:
        raise TaskvecError("no run has both a perplexity and toxicity scores to plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator, StrMethodFormatter

    figure, axes = plt.subplots(1, 2, figsize=(10, 4.2), constrained_layout=True)
    for axis, key, title in ((axes[0], "expected_max_toxicity", "Expected maximum toxicity"),
                             (axes[1], "toxicity_probability", "Toxicity probability")):
        for index, row in enumerate(points):
            if row[key] is None:  # a summary may hold one metric without the other
                continue
            axis.scatter(row["perplexity"], row[key], s=60, color=f"C{index % 10}", zorder=3)
            axis.annotate(row["run"], (row["perplexity"], row[key]), textcoords="offset points",
                          xytext=(6, 5), fontsize=9)
        axis.set_xlabel("Perplexity (lower is better)")
        axis.set_ylabel(f"{title} (lower is better)")
        axis.set_title(f"{title} vs. perplexity")
        axis.grid(True, alpha=0.3)
        axis.margins(0.2)
        top = axis.get_ylim()[1]
        axis.set_ylim(-0.04 * top, top)  # toxicity is a probability: keep 0 in view for honest gaps
        axis.xaxis.set_major_locator(MaxNLocator(5))
        axis.xaxis.set_major_formatter(StrMethodFormatter("{x:.4g}"))
    scorers = sorted({row["scorer"] for row in points if row["scorer"]})
    figure.suptitle(f"Toxicity (scorer: {', '.join(scorers) or 'unknown'}) against perplexity")
    return save_figure(figure, output)
