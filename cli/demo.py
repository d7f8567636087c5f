"""`taskvec demo`: a thin wrapper over taskvec.demo.pipeline.run_demo."""

import click

from taskvec.cli.options import SEED


@click.command()
@click.option("--output", "-o", default="taskvec-demo", show_default=True, type=click.Path(file_okay=False),
              help="Workspace for the corpus, models, evaluations, table and plot.")
@click.option("--splits", "-n", type=click.IntRange(min=2), default=5, show_default=True,
              help="Number of toxic splits, hence of fine-tunes averaged.")
@click.option("--quick", is_flag=True,
              help="A 2-layer model, a smaller corpus and a smaller sweep: a few minutes, a rougher result.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the corpus, training and sampling.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="CPU threads for torch, per process; a model this small gains little from more.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Processes for the fine-tunes and evaluations, which run side by side; 1 runs all in "
                   "one process  [default: one per CPU, at most 2].")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT even if it is not a previous demo's workspace.")
@click.option("--progress/--no-progress", default=None, help="Progress bars [default: only on a terminal].")
def demo(output, splits, quick, seed, threads, workers, overwrite, progress):
    """Run the whole detoxification method offline on CPU, on a small model, in a few minutes.

    It generates its own texts (everyday English with a little toxicity, a mostly insulting
    corpus, held-out clean text and prompts), trains a small GPT-2 and a tokenizer on them,
    fine-tunes it on each of N toxic splits, and sweeps the scale for the negated averaged task
    vector (merged) and the task vector of split 0 alone (single): perplexity on held-out clean
    text, toxicity of sampled continuations at 4 sampling seeds (offline scorer:
    alt-profanity-check). It compares the two where their toxicity is the same, with bootstrap
    intervals, prints the tables and a verdict computed from the numbers, and writes
    OUTPUT/report.txt and OUTPUT/sweep/sweep.png.

    Every stage runs the same functions as the `taskvec data`, `train-splits`, `inspect`,
    `sweep` (`merge`, `eval`) and `compare --matched` commands; the intermediate models stay in
    OUTPUT/models for inspection.
    """
    from taskvec.demo.pipeline import run_demo

    result = run_demo(output, splits=splits, quick=quick, seed=seed, overwrite=overwrite,
                      threads=threads, workers=workers, echo=click.echo, progress=progress)
    click.echo("")
    click.echo(result.report)
    click.echo(f"\nPlot: {result.plot}   Report: {result.output / 'report.txt'}")
