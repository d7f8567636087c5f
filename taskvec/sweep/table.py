"""sweep.csv: per method x scale, one row per seed, then a mean and an SD row.

The seed column holds the sampling seed, or `mean` / `sd` (the sample standard deviation over
the seeds, empty with one seed). Perplexity does not depend on the seed: every row of a model
has the same one, and the SD row leaves it empty.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from taskvec.sweep.results import Point, mean_and_sd

METRICS = ("mean_toxicity", "expected_max_toxicity", "toxicity_probability", "fraction_toxic")
COLUMNS = ("method", "scale", "seed", "perplexity", *METRICS, "n_prompts", "n_seeds")


def sweep_rows(points: list[Point]) -> list[dict]:
    """The csv's rows (values, None for empty cells) for the points that have finished seeds."""
    rows = []
    for point in points:
        if not point.metrics:
            continue
        head = {"method": point.method, "scale": point.scale, "perplexity": point.perplexity}
        for seed, metrics in sorted(point.metrics.items()):
            rows.append({**head, "seed": seed, **{key: metrics.get(key) for key in METRICS},
                         "n_prompts": metrics.get("n_prompts"), "n_seeds": 1})
        stats = {key: mean_and_sd([m[key] for m in point.metrics.values()]) for key in METRICS}
        count = {"n_prompts": next(iter(point.metrics.values())).get("n_prompts"), "n_seeds": len(point.metrics)}
        rows.append({**head, "seed": "mean", **{key: mean for key, (mean, _) in stats.items()}, **count})
        rows.append({**head, "seed": "sd", "perplexity": None, **{key: sd for key, (_, sd) in stats.items()}, **count})
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    """Write the rows through a temporary file renamed into place."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "w", encoding="utf-8", newline="") as handle:
            writer = csv.DictWriter(handle, COLUMNS)
            writer.writeheader()
            writer.writerows({key: "" if row[key] is None else row[key] for key in COLUMNS} for row in rows)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def format_means(rows: list[dict]) -> str:
    """A plain-text table of the mean rows: perplexity and mean toxicity (SD over the seeds)."""
    sds = {(row["method"], row["scale"]): row["mean_toxicity"] for row in rows if row["seed"] == "sd"}
    lines = [f"{'method':<8} {'scale':>6} {'PPL':>8} {'mean tox.':>9} {'SD':>6} {'seeds':>5}"]
    for row in rows:
        if row["seed"] == "mean":
            sd = sds.get((row["method"], row["scale"]))
            ppl = "-" if row["perplexity"] is None else f"{row['perplexity']:.3f}"
            lines.append(f"{row['method']:<8} {row['scale']:>6g} {ppl:>8} {row['mean_toxicity']:>9.3f} "
                         f"{'-' if sd is None else f'{sd:.3f}':>6} {row['n_seeds']:>5}")
    return "\n".join(lines)
