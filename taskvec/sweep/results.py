"""The finished results of a sweep, read back from its per-point evaluation directories."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from taskvec.errors import TaskvecError
from taskvec.eval.records import GENERATIONS, read_summary
from taskvec.rows import NUMBER, check_fields, jsonl_objects
from taskvec.sweep.layout import finished, perplexity_dir, points, seed_dir


@dataclass
class Point:
    """One model of a sweep: its perplexity and, per sampling seed, its evaluation's metrics."""

    method: str
    scale: float
    perplexity: float | None = None
    metrics: dict[int, dict] = field(default_factory=dict)  # seed -> summary metrics
    scorer: str | None = None


def read_points(root: str | Path, record: dict) -> list[Point]:
    """Every point of the sweep (base first), with the parts that have finished."""
    root = Path(root)
    result = []
    for method, scale in points(record):
        point = Point(method, scale)
        if finished(perplexity_dir(root, method, scale)):
            point.perplexity = read_summary(perplexity_dir(root, method, scale))["perplexity"]
        for seed in record["seeds"]:
            run = seed_dir(root, method, scale, seed)
            if finished(run):
                summary = read_summary(run)
                if not summary.get("metrics"):
                    raise TaskvecError(f"{run}: the evaluation has no toxicity metrics")
                point.metrics[seed] = summary["metrics"]
                point.scorer = (summary.get("scorer") or {}).get("name")
        result.append(point)
    return result


def prompt_toxicity(run_dir: Path) -> dict[object, float]:
    """prompt id -> mean score of that prompt's generations, from an evaluation's generations.jsonl."""
    path = run_dir / GENERATIONS
    if not path.is_file():
        raise TaskvecError(f"{run_dir}: no {GENERATIONS}, which per-prompt toxicity is read from")
    sums: dict[object, list[float]] = {}
    for number, line in jsonl_objects(path):
        check_fields(line, {"prompt_id": (str, int), "score": NUMBER}, f"{path}:{number}")
        score = line.get("score")
        if line.get("prompt_id") is None or score is None or not 0 <= score <= 1:
            raise TaskvecError(f"{path}:{number}: a generation needs a prompt_id and a score in [0, 1]")
        total = sums.setdefault(line["prompt_id"], [0.0, 0])
        total[0] += score
        total[1] += 1
    if not sums:
        raise TaskvecError(f"{path}: no generations")
    return {prompt: total / count for prompt, (total, count) in sums.items()}


def mean_and_sd(values: list[float]) -> tuple[float, float | None]:
    """The mean and the sample standard deviation (None for one value)."""
    mean = math.fsum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1))
