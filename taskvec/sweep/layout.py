"""Where a sweep keeps what it has done, so that a rerun can tell finished points from the rest.

    SWEEP_DIR/sweep.json                                   inputs, evaluation settings, methods, scales, seeds
    SWEEP_DIR/points/METHOD/scale-S/perplexity/summary.json    one perplexity per model
    SWEEP_DIR/points/METHOD/scale-S/seed-K/                    summary.json, generations.jsonl per sampling seed
    SWEEP_DIR/models/METHOD/scale-S/                           the model, while it is evaluated (or kept)
    SWEEP_DIR/sweep.csv, sweep.png, matched.json

The base model is the point `base` at scale 0, shared by every method's curve. Each evaluation
directory is renamed into place only when complete (taskvec.eval.evaluate), so one that exists
is finished.
"""

from __future__ import annotations

from pathlib import Path

from taskvec.errors import TaskvecError
from taskvec.eval.records import SUMMARY
from taskvec.jsonfile import read_json, write_json

RECORD = "sweep.json"
CSV = "sweep.csv"
PLOT = "sweep.png"
MATCHED = "matched.json"
FORMAT = "taskvec-sweep/1"
BASE = "base"
# sweep method -> (merge method, what it negates)
METHODS = {"merged": ("negated_mean", "the mean of the N fine-tunes"),
           "single": ("negate", "one fine-tune (--single, default the first)")}


def scale_name(scale: float) -> str:
    """The directory name of a scale, as taskvec.merge names multi-scale outputs."""
    return f"scale-{scale:g}"


def point_dir(root: Path, method: str, scale: float) -> Path:
    return root / "points" / method / scale_name(scale)


def perplexity_dir(root: Path, method: str, scale: float) -> Path:
    return point_dir(root, method, scale) / "perplexity"


def seed_dir(root: Path, method: str, scale: float, seed: int) -> Path:
    return point_dir(root, method, scale) / f"seed-{seed}"


def model_dir(root: Path, method: str, scale: float) -> Path:
    return root / "models" / method / scale_name(scale)


def finished(run_dir: Path) -> bool:
    return (run_dir / SUMMARY).is_file()


def points(record: dict) -> list[tuple[str, float]]:
    """(method, scale) of every point of a sweep, the base first."""
    return [(BASE, 0.0)] + [(method, scale) for method in record["methods"] for scale in record["scales"]]


def read_record(root: str | Path) -> dict:
    """The sweep.json of a sweep directory: a one-line error for anything else."""
    path = Path(root) / RECORD
    if not path.is_file():
        raise TaskvecError(f"{root} is not a sweep directory (no {RECORD}; `taskvec sweep` writes one)")
    record = read_json(path, expect=dict)
    if record.get("format") != FORMAT:
        raise TaskvecError(f"{path}: not a {FORMAT} record")
    from taskvec.sweep.run import check_grid  # the grid a run accepts: an edited record is held to it

    try:
        check_grid(*(record.get(key) or [] for key in ("methods", "scales", "seeds")))
    except TaskvecError as err:
        raise TaskvecError(f"{path}: {err}") from None
    except (TypeError, ValueError):
        raise TaskvecError(f"{path}: methods, scales and seeds must be lists of names and numbers") from None
    return record


def write_record(root: Path, record: dict) -> None:
    write_json(root / RECORD, record, fsync=False)
