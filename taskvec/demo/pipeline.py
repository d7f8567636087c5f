"""Run the whole method on the demo's small model, through the library's real code paths.

Every stage calls the function a real run calls (`taskvec.data.save_splits`,
`taskvec.train.finetune` / `train_splits`, `taskvec.sweep.run.run_sweep` (which merges with
`taskvec.merge.merge_checkpoints` and evaluates with `taskvec.eval.evaluate`),
`taskvec.sweep.matched`, `taskvec.inspect.inspect_checkpoints`); only the texts and the model's
size are the demo's own. The output directory is a workspace that keeps every intermediate
product, each written atomically by the stage that makes it, so a user can inspect or reuse them
with the other `taskvec` commands. A marker file says the directory is the demo's, so that rerunning the demo
may replace it while any other directory is refused unless overwriting was asked for.

The independent work, the N fine-tunes and the sweep's evaluations, runs in single-threaded
worker processes (taskvec.workers), one per core by default: the numbers are the same as with
`workers=1`, which runs everything in this process.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from taskvec import __version__
from taskvec.demo.corpus import DemoCorpus, make_corpus
from taskvec.demo.model import write_untrained_model
from taskvec.demo.settings import DEFAULT, QUICK, DemoSettings
from taskvec.demo.verdict import Check, judge, summarize
from taskvec.errors import TaskvecError

MARKER = "taskvec-demo.json"
LEGEND = """\
base:   the small LM, trained on mostly clean text (scale 0 of both curves)
single: base - scale * (fine-tune of split 0 - base), one task vector (the baseline)
merged: base - scale * (mean of the N fine-tunes - base)
SD:     standard deviation of mean toxicity over the sampling seeds"""
STAGES = 7
# What the workers' fork server imports once: training, evaluation, the model class, the scorer.
PRELOAD = ("taskvec.train", "taskvec.sweep.run", "taskvec.eval.sampling", "taskvec.eval.likelihood",
           "transformers.models.gpt2.modeling_gpt2", "profanity_check")


@dataclass(frozen=True)
class DemoResult:
    """What a demo produced: the numbers and checks for a caller to act on, the report to print."""

    output: Path
    rows: list[dict]  # sweep.csv's rows (taskvec.sweep.table)
    matched: dict  # matched.json's content (taskvec.sweep.matched)
    checks: list[Check]
    report: str
    plot: Path


def prepare_output(output: Path, overwrite: bool) -> None:
    """Start from an empty directory: a previous demo's is replaced, anything else only if asked."""
    if output.exists():
        if not output.is_dir():
            raise TaskvecError(f"output {output} exists and is not a directory")
        if output.resolve() in (Path.cwd(), *Path.cwd().parents):
            raise TaskvecError(f"output {output} holds the current directory; choose another directory")
        ours = (output / MARKER).is_file()
        if any(output.iterdir()) and not ours and not overwrite:
            raise TaskvecError(f"output {output} exists and is not a taskvec demo directory; "
                               "pass --overwrite to replace it")
        shutil.rmtree(output)
    output.mkdir(parents=True)


def run_demo(output: str | Path = "taskvec-demo", *, splits: int = 5,
             quick: bool = False, seed: int = 0, overwrite: bool = False,
             threads: int | None = 1, workers: int | None = None, settings: DemoSettings | None = None,
             echo: Callable[[str], None] = print, progress: bool | None = None) -> DemoResult:
    """Train, fine-tune, sweep the scale for merged and single, compare them at matched
    toxicity; return the tables and the verdict.

    threads: torch CPU threads while the demo runs, in this process and in each worker (None:
    leave torch's setting). One is the default because a model this small gains little from
    more, and loses a lot when the cores are busy with other work (threads then wait for each
    other at every operation). workers: processes for the fine-tunes and the evaluations
    (None: one per CPU, at most 2; 1: all in this process).
    settings: sizes and hyper-parameters (default: `DEFAULT`, or `QUICK` with quick=True).
    echo: where stage messages go. progress: tqdm bars (None: only on a terminal).
    """
    stage = _Stages(echo)  # the times it prints count the imports too
    import torch

    from taskvec.workers import default_workers

    settings = settings or (QUICK if quick else DEFAULT)
    if threads is not None and threads < 1:
        raise TaskvecError(f"--threads must be at least 1, got {threads}")
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise TaskvecError(f"--workers must be at least 1, got {workers}")
    if splits < 2:
        raise TaskvecError(f"--splits must be at least 2 (averaging needs several fine-tunes), got {splits}")
    if splits > settings.toxic_docs:
        raise TaskvecError(f"--splits {splits} exceeds the {settings.toxic_docs} toxic documents")
    output = Path(output)
    prepare_output(output, overwrite)
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with _workers(workers, threads) as pool:
            return _run(output, splits, settings, seed, workers, pool, stage, echo, progress)
    finally:
        torch.set_num_threads(previous)


@contextmanager
def _workers(workers: int, threads: int | None) -> Iterator[Executor | None]:
    """The worker pool, started now so that its imports overlap the first stages; None for one worker."""
    if workers == 1:
        yield None
        return
    from taskvec.workers import worker_pool

    with worker_pool(workers, threads=threads, preload=PRELOAD) as pool:
        yield pool


def _run(output: Path, splits: int, settings: DemoSettings, seed: int, workers: int, pool: Executor | None,
         stage: _Stages, echo: Callable[[str], None], progress: bool | None) -> DemoResult:
    from taskvec.demo.vectors import compare_vectors
    from taskvec.eval import evaluate, get_scorer
    from taskvec.inspect import inspect_checkpoints
    from taskvec.sweep.matched import auto_levels, load_curves, matched_comparison
    from taskvec.sweep.plot import plot_sweep
    from taskvec.sweep.report import format_matched
    from taskvec.sweep.run import run_sweep
    from taskvec.sweep.table import format_means
    from taskvec.train import finetune
    from taskvec.workers import results

    seeds = [seed + k for k in range(settings.sampling_seeds)]
    record = {"format": "taskvec-demo/2", "taskvec_version": __version__, "status": "running",
              "splits": splits, "seed": seed, "sampling_seeds": seeds, "workers": workers,
              "settings": asdict(settings)}
    _write_json(output / MARKER, record)

    stage("Writing the corpus: clean text with a little toxicity, a toxic corpus, prompts")
    corpus = make_corpus(pretrain_docs=settings.pretrain_docs, heldout_docs=settings.heldout_docs,
                         toxic_docs=settings.toxic_docs, prompts=settings.prompts,
                         pretrain_toxic_rate=settings.pretrain_toxic_rate, toxic_rate=settings.toxic_rate,
                         seed=seed)
    data = output / "data"
    heldout = _write_corpus(data, corpus, splits, seed)

    stage(f"Training a byte-level BPE tokenizer and initialising a {settings.size.n_layer}-layer GPT-2")
    untrained = write_untrained_model(output / "models" / "untrained",
                                      corpus.pretrain + corpus.toxic, settings.size, seed)

    stage(f"Pretraining the base on {len(corpus.pretrain)} documents")
    base = finetune(untrained, data / "pretrain.jsonl", output / "models" / "base",
                    _train_config(settings, settings.pretrain_lr, settings.pretrain_epochs, seed,
                                  len(corpus.pretrain)), progress=progress)

    side_by_side = f", {workers} at a time" if pool is not None else ""
    stage(f"Fine-tuning the base on each of the {splits} toxic splits{side_by_side}")
    finetuned = _finetune_splits(base, data / "toxic-splits", output / "models" / "finetuned", splits,
                                 _train_config(settings, settings.finetune_lr, settings.finetune_epochs, seed,
                                               len(corpus.toxic) // splits), pool, progress)

    stage(f"Measuring the {splits} task vectors and their mean (taskvec inspect)")
    inspected = inspect_checkpoints(base, finetuned, output=output / "inspect", progress=progress)
    vectors, vector_numbers = compare_vectors(inspected)
    echo(vectors)

    scorer = get_scorer("profanity")
    evaluation = dict(samples=settings.samples, max_new_tokens=settings.max_new_tokens,
                      batch_size=settings.generation_batch, max_length=settings.ppl_window,
                      stride=settings.ppl_window // 2)
    stage(f"Sweeping the scale ({', '.join(f'{s:g}' for s in settings.scales)}) for merged (the mean of "
          f"{splits}) and single (split 0), toxicity at {len(seeds)} sampling seeds{side_by_side}")
    finetuned_eval = dict(ppl_texts=None, prompts=corpus.prompts, scorer=scorer, seed=seed, device="cpu", **evaluation)
    if pool is not None:  # a worker evaluates split 0's fine-tune while this process builds the sweep's models
        finetuned_summary = pool.submit(evaluate, finetuned[0], output / "eval" / "finetuned", progress=False,
                                        **finetuned_eval)
    sweep = run_sweep(output / "sweep", base=base, finetuned=finetuned, scales=settings.scales, seeds=seeds,
                      ppl_texts=[heldout], prompts=corpus.prompts, scorer=scorer, evaluation=evaluation,
                      keep_models=True, device="cpu", progress=progress, echo=echo, pool=pool)
    if pool is None:
        summary = evaluate(finetuned[0], output / "eval" / "finetuned", progress=progress, **finetuned_eval)
    else:
        summary, = results([finetuned_summary])
    finetuned_toxicity = summary["metrics"]["mean_toxicity"]
    echo(f"      finetuned (split 0): mean toxicity {finetuned_toxicity:.3f}")

    stage("Comparing merged and single at matched toxicity")
    curves = load_curves(sweep.output)
    matched = matched_comparison(curves, auto_levels(curves, settings.level_fractions),
                                 replicates=settings.bootstrap, seed=seed)
    _write_json(sweep.output / "matched.json", matched)
    plot = plot_sweep(sweep.rows, sweep.output / "sweep.png", matched["levels"])
    lowest = {method: min(row["mean_toxicity"] for row in sweep.rows
                          if row["method"] == method and row["seed"] == "mean") for method in ("merged", "single")}
    checks = judge(finetuned_toxicity, lowest, matched)
    report = "\n".join([format_means(sweep.rows), "", LEGEND, "", format_matched(matched), "", vectors, "",
                        summarize(checks, matched)])
    (output / "report.txt").write_text(report + "\n", encoding="utf-8")
    record.update(status="complete", seconds=round(stage.elapsed(), 1), rows=sweep.rows, matched=matched,
                  finetuned_toxicity=finetuned_toxicity, task_vectors=vector_numbers,
                  checks=[asdict(c) for c in checks], passed=all(c.passed for c in checks))
    _write_json(output / MARKER, record)
    return DemoResult(output, sweep.rows, matched, checks, report, plot)


def _finetune_splits(base: Path, splits_dir: Path, output: Path, splits: int, config, pool: Executor | None,
                     progress: bool | None) -> list[Path]:
    """`train_splits` in this process, or one split per worker task (`split_index`: the same weights)."""
    from taskvec.progress import progress_bar
    from taskvec.train import train_splits
    from taskvec.workers import in_order

    if pool is None:
        return train_splits(base, splits_dir, output, config, progress=progress)
    futures = [pool.submit(train_splits, base, splits_dir, output, config, k, progress=False) for k in range(splits)]
    paths = []
    with progress_bar(progress, total=splits, desc="splits", unit="split") as bar:
        for (path,) in in_order(futures):
            paths.append(path)
            bar.update()
    return paths


class _Stages:
    """Numbered stage messages, each with the time spent before it (from the start of run_demo)."""

    def __init__(self, echo: Callable[[str], None]) -> None:
        self.echo, self.number, self.started = echo, 0, time.perf_counter()

    def __call__(self, message: str) -> None:
        self.number += 1
        self.echo(f"[{self.number}/{STAGES}, {self.elapsed():.0f}s elapsed] {message}")

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


def _write_corpus(folder: Path, corpus: DemoCorpus, splits: int, seed: int) -> str:
    """Write the texts as the files a real run starts from; return the held-out text as
    `taskvec eval --ppl-file data/heldout.txt` reads it, so that command repeats the demo's number.

    The held-out documents become one text: perplexity joins texts with blank lines, which the
    model never saw in training.
    """
    from taskvec.data import save_splits, write_jsonl

    folder.mkdir(parents=True)
    heldout = " ".join(corpus.heldout) + "\n"
    (folder / "heldout.txt").write_text(heldout, encoding="utf-8")
    (folder / "prompts.txt").write_text("\n".join(corpus.prompts) + "\n", encoding="utf-8")
    write_jsonl(corpus.pretrain, folder / "pretrain.jsonl")
    toxic = write_jsonl(corpus.toxic, folder / "toxic.jsonl")
    save_splits(corpus.toxic, splits, folder / "toxic-splits", seed=seed, source=str(toxic))
    return heldout


def _train_config(settings: DemoSettings, lr: float, epochs: float, seed: int, n_texts: int):
    """TrainConfig for the demo: the high learning rates need a warm-up, a tenth of the steps."""
    from taskvec.train import TrainConfig

    steps = int(epochs * -(-n_texts // settings.batch_size))
    return TrainConfig(learning_rate=lr, epochs=epochs, batch_size=settings.batch_size,
                       max_length=settings.max_length, warmup_steps=steps // 10, seed=seed)


def _write_json(path: Path, content: dict) -> None:
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
    staging.replace(path)
