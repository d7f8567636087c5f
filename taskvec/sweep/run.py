"""Run a sweep in one process: build each method's models over the scales, evaluate each once
for perplexity and once per sampling seed for toxicity, and keep every result on disk as it
finishes, so that a rerun does only what is missing.

Start-up dominates small evaluations (a CLI merge or eval pays seconds of imports each), which is
why the whole grid runs here; each method's models come from one read of its inputs
(taskvec.merge's multi-scale merge), and each model is loaded once for all its evaluations.
Given a process pool (taskvec.workers), the points are evaluated there, side by side, while this
process builds the next method's models; every number is the same as evaluated one by one.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass, replace
from pathlib import Path

from taskvec import __version__
from taskvec.errors import TaskvecError
from taskvec.eval.records import read_summary
from taskvec.eval.run import evaluate
from taskvec.eval.scorers import Scorer, get_scorer
from taskvec.outputs import check_output
from taskvec.sweep.layout import (
    BASE,
    CSV,
    FORMAT,
    METHODS,
    PLOT,
    RECORD,
    finished,
    model_dir,
    perplexity_dir,
    read_record,
    scale_name,
    seed_dir,
    write_record,
)
from taskvec.sweep.plot import plot_sweep
from taskvec.sweep.results import read_points
from taskvec.sweep.table import sweep_rows, write_csv


@dataclass(frozen=True)
class SweepResult:
    output: Path
    rows: list[dict]  # sweep.csv's rows
    csv: Path
    plot: Path


def run_sweep(output: str | Path, *, base: str | Path, finetuned: Sequence[str | Path], scales: Sequence[float],
              seeds: Sequence[int], methods: Sequence[str] = ("merged", "single"), single: str | Path | None = None,
              ppl_texts: Sequence[str], prompts: Sequence[str], scorer: Scorer | str,
              evaluation: dict | None = None, settings: dict | None = None, keep_models: bool = False,
              device: str = "auto", progress: bool | None = None,
              echo: Callable[[str], None] = print, pool: Executor | None = None) -> SweepResult:
    """Evaluate the base and every method x scale x seed into `output`; write sweep.csv and sweep.png.

    methods: 'merged' (negate the mean of all `finetuned`) and/or 'single' (negate `single`, by
    default finetuned[0]; any model directory, e.g. a fine-tune on all the data). seeds: the
    sampling seeds; the prompts are the same for all. evaluation: the keywords of
    taskvec.eval.evaluate (samples, top_p, stride, ...), as `taskvec eval` takes them. settings:
    what else describes the evaluation (where the prompts came from), recorded in each summary.
    An existing sweep directory is resumed if its inputs and evaluation are the same.
    pool: evaluate each point (a model's perplexity and seeds) as a task there, e.g. a
    taskvec.workers pool of single-threaded processes; the scorer goes with every task, so it
    should be a light one (profanity), and the tasks show no progress bars. The points' lines are
    echoed in the same order as without a pool; a method's "building" line may come earlier.
    """
    methods, scales, seeds = check_grid(methods, scales, seeds)
    finetuned = [str(path) for path in finetuned]
    if not finetuned:
        raise TaskvecError("no fine-tuned models given")
    single = str(single or finetuned[0])
    scorer = get_scorer(scorer) if isinstance(scorer, str) else scorer
    evaluation = dict(evaluation or {})
    root = check_output(output, [base, *finetuned, single], overwrite=True)
    described = {**evaluation, **(settings or {}), "scorer": {"name": scorer.name, **scorer.settings},
                 "prompts_sha256": _digest(prompts), "n_prompts": len(prompts), "ppl_texts_sha256": _digest(ppl_texts)}
    inputs = {"base": _where(base), "finetuned": [_where(p) for p in finetuned],
              "fingerprints": {"base": _fingerprint(base), "finetuned": [_fingerprint(p) for p in finetuned]}}
    if "single" in methods:  # only what this run evaluates: a later run may add the method, or leave it out
        inputs |= {"single": _where(single), "single_fingerprint": _fingerprint(single)}
    identity = {"inputs": inputs, "evaluation": _plain(described)}
    record = _open_sweep(root, identity, methods, scales, seeds)
    context = _Context(root, seeds, ppl_texts, prompts, scorer, evaluation, settings or {}, device, progress)
    points = _Points(root, context, pool, keep_models, echo)
    if not _point_finished(root, BASE, 0.0, seeds):
        points.evaluate(BASE, 0.0, base)
    for method in methods:
        todo = [scale for scale in scales if not _point_finished(root, method, scale, seeds)]
        missing = [scale for scale in todo if not model_dir(root, method, scale).is_dir()]
        if missing:
            inputs = finetuned if method == "merged" else [single]
            echo(f"sweep: building {method} at scales {', '.join(f'{s:g}' for s in missing)} ({METHODS[method][1]})")
            _build(root, method, inputs, base, missing, progress)
        for scale in todo:
            points.evaluate(method, scale, model_dir(root, method, scale))
    points.finish()
    rows = sweep_rows(read_points(root, record))
    write_csv(root / CSV, rows)
    plot = plot_sweep(rows, root / PLOT)
    return SweepResult(root, rows, root / CSV, plot)


def check_grid(methods, scales, seeds) -> tuple[list[str], list[float], list[int]]:
    """The methods, the scales (sorted) and the seeds, refused with one line if any is empty, unknown or repeated."""
    methods, scales, seeds = list(methods), [float(s) for s in scales], [int(s) for s in seeds]
    if not methods:
        raise TaskvecError("no methods to sweep: choose from " + ", ".join(METHODS))
    for method in methods:
        if method not in METHODS:
            raise TaskvecError(f"unknown method {method!r}: choose from {', '.join(METHODS)}")
    if not scales:
        raise TaskvecError("no scales to sweep")
    for scale in scales:
        if not math.isfinite(scale) or scale <= 0:
            raise TaskvecError(f"scale {scale:g} must be a positive number (scale 0, the base, is always included)")
    names = [scale_name(s) for s in scales]
    if not seeds:
        raise TaskvecError("no sampling seeds")
    for kind, values in (("method", methods), ("scale", names), ("seed", seeds)):
        if len(set(values)) != len(values):
            raise TaskvecError(f"a {kind} is given twice ({', '.join(map(str, values))})")
    return methods, sorted(scales), seeds


def _where(path) -> str:
    """A model by resolved path (the same on a rerun from another directory), or as given (a hub id)."""
    return str(Path(path).resolve()) if Path(path).exists() else str(path)


def _fingerprint(path) -> str | None:
    """A local model's fingerprint (its tensor table and the ends of its weight files): a rerun
    after its weights were replaced in place must not resume points made from the old ones."""
    from taskvec.io.checkpoint import open_checkpoint

    return open_checkpoint(path).fingerprint() if Path(path).exists() else None


def _digest(texts: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(texts)).encode()).hexdigest()


def _plain(value):
    return json.loads(json.dumps(value))


def _open_sweep(root: Path, identity: dict, methods, scales, seeds) -> dict:
    """The sweep's record: a new one, or the existing one (same inputs and evaluation) with this
    run's methods, scales and seeds added."""
    if (root / RECORD).is_file():
        record = read_record(root)
        for part in ("inputs", "evaluation"):
            old, new = record.get(part) or {}, identity[part]
            # an input this run does not name (single, without its method) or one the record lacks
            # (a sweep that has not run single yet) is not a difference; the record then gains it
            keys = new if part == "inputs" else {*old, *new}
            differ = sorted(key for key in keys if old.get(key) != new.get(key)
                            and not (part == "inputs" and old.get(key) is None))
            if differ:
                key = differ[0]
                raise TaskvecError(f"{root} holds a sweep with other {part} ({key}: {old.get(key)!r} there, "
                                   f"{new.get(key)!r} now); resume it with the same ones or use another --output")
            record[part] = {**old, **new}
        named = {scale_name(scale): scale for scale in record["scales"]}
        for scale in scales:
            if named.get(scale_name(scale), scale) != scale:
                raise TaskvecError(f"scale {scale!r} would share {scale_name(scale)} with the sweep's scale "
                                   f"{named[scale_name(scale)]!r}; give that one, or a scale of its own")
        record["methods"] = [*record["methods"], *(m for m in methods if m not in record["methods"])]
        record["scales"] = sorted({*record["scales"], *scales})
        record["seeds"] = [*record["seeds"], *(s for s in seeds if s not in record["seeds"])]
    elif root.exists() and any(root.iterdir()):
        raise TaskvecError(f"output {root} exists and is not a sweep directory (no {RECORD}); choose another")
    else:
        record = {"format": FORMAT, "taskvec_version": __version__, **identity,
                  "methods": methods, "scales": scales, "seeds": seeds}
    root.mkdir(parents=True, exist_ok=True)
    write_record(root, record)
    return record


def _point_finished(root: Path, method: str, scale: float, seeds) -> bool:
    return finished(perplexity_dir(root, method, scale)) and all(
        finished(seed_dir(root, method, scale, seed)) for seed in seeds)


def _build(root: Path, method: str, inputs: list[str], base, scales: list[float], progress) -> None:
    """Write the method's models at `scales` (one read of the inputs) into models/METHOD/scale-S."""
    from taskvec.merge import merge_checkpoints

    building = root / "models" / f".{method}-building"
    if building.exists():
        shutil.rmtree(building)  # what a killed run left
    merged = merge_checkpoints(inputs, building, base=base, method=METHODS[method][0], scale=list(scales),
                               progress=progress)
    for scale, path in zip(scales, merged.outputs, strict=True):  # both in increasing scale
        target = model_dir(root, method, scale)
        target.parent.mkdir(parents=True, exist_ok=True)
        Path(path).rename(target)
    shutil.rmtree(building)


class _Points:
    """Evaluates points now, or as pool tasks whose results are taken in order; echoes each
    point's line and removes its model afterwards unless the models are kept."""

    def __init__(self, root: Path, context: _Context, pool: Executor | None, keep_models: bool,
                 echo: Callable[[str], None]) -> None:
        self.root, self.pool, self.keep_models, self.echo = root, pool, keep_models, echo
        self.context = context if pool is None else replace(context, progress=False)
        self.pending: list[tuple[str, float, Future]] = []

    def evaluate(self, method: str, scale: float, model: str | Path) -> None:
        if self.pool is None:
            self._done(method, scale, self.context.evaluate_point(method, scale, model))
        else:
            self.pending.append((method, scale, self.pool.submit(self.context.evaluate_point, method, scale, model)))

    def finish(self) -> None:
        pending, self.pending = self.pending, []
        try:
            for method, scale, future in pending:
                self._done(method, scale, future.result())
        except BaseException:
            for _, _, future in pending:
                future.cancel()
            raise

    def _done(self, method: str, scale: float, line: str | None) -> None:
        if line:
            self.echo(line)
        if method != BASE and not self.keep_models:
            shutil.rmtree(model_dir(self.root, method, scale))


@dataclass(frozen=True)
class _Context:
    """What every point's evaluations share."""

    root: Path
    seeds: list[int]
    ppl_texts: Sequence[str]
    prompts: Sequence[str]
    scorer: Scorer
    evaluation: dict
    settings: dict
    device: str
    progress: bool | None

    def evaluate_point(self, method: str, scale: float, model: str | Path) -> str | None:
        """Perplexity once and toxicity per seed, whichever is not finished, loading the model
        once; the line that reports the new toxicity numbers (None if there were none)."""
        from taskvec.eval.model import load_model
        from taskvec.sweep.results import mean_and_sd

        loaded = load_model(model, self.device)
        common = dict(self.evaluation, loaded=loaded, device=self.device, progress=self.progress,
                      settings={**self.settings, "sweep": {"method": method, "scale": scale}})
        target = perplexity_dir(self.root, method, scale)
        if finished(target):
            perplexity = read_summary(target)["perplexity"]
        else:
            perplexity = evaluate(model, target, ppl_texts=self.ppl_texts, prompts=None, **common)["perplexity"]
        toxicity = []
        for seed in self.seeds:
            target = seed_dir(self.root, method, scale, seed)
            if not finished(target):
                toxicity.append(evaluate(model, target, ppl_texts=None, prompts=self.prompts, scorer=self.scorer,
                                         seed=seed, **common)["metrics"]["mean_toxicity"])
        if not toxicity:
            return None
        mean, sd = mean_and_sd(toxicity)
        spread = "" if sd is None else f" (SD {sd:.3f})"
        return (f"sweep: {method} at scale {scale:g}: perplexity {perplexity:.3f}, mean toxicity "
                f"{mean:.3f}{spread} over {len(toxicity)} new seed(s)")
