"""`taskvec inspect`: a thin wrapper over taskvec.inspect.inspect_checkpoints."""

import time

import click


def _numbers(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of numbers") from None


@click.command()
@click.argument("finetuned", nargs=-1, type=click.Path())
@click.option("--base", required=True, type=click.Path(), help="The pretrained (base) model directory or hub id.")
@click.option("--merged", "-m", multiple=True, type=click.Path(),
              help="A merged or negated model, measured as M - base (repeatable).")
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False),
              help="Directory to write the report to (created; an existing one is refused unless --overwrite).")
@click.option("--p", "p", type=float, default=1.0, show_default=True,
              help="p of the p-norm reported beside L1, L2 and Linf (the original cal_task_vector_norm's p).")
@click.option("--thresholds", default="1e-5,1e-4,1e-3", show_default=True,
              help="Absolute near-zero thresholds: share of entries with |tau| below each.")
@click.option("--rms-fractions", default="0.01,0.1", show_default=True,
              help="Relative near-zero thresholds, as fractions of each tensor's own RMS of tau.")
@click.option("--std-fractions", default="0.01,0.1", show_default=True,
              help="Relative near-zero thresholds, as fractions of the base tensor's standard deviation.")
@click.option("--bins", type=int, default=500, show_default=True,
              help="Histogram bins, on both scales (the original's num_bin).")
@click.option("--range", "range_", type=float, default=0.01, show_default=True,
              help="Top edge of the absolute |tau| histogram (the original's bin_max).")
@click.option("--norm-range", type=float, default=5.0, show_default=True,
              help="Top edge of the normalised histogram, in units of each tensor's RMS of tau.")
@click.option("--log-bins", is_flag=True,
              help="Log-spaced bins over --log-decades decades below the top edge, instead of linear from 0.")
@click.option("--log-decades", type=float, default=4.0, show_default=True,
              help="Decades the log-spaced bins cover.")
@click.option("--chunk-size", default="4MiB", show_default=True,
              help="Elements per step as float32 bytes, shared by all vectors; memory is about ten times this.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Where the statistics are computed.")
@click.option("--strict", is_flag=True, help="Refuse fine-tune tensors the base does not have.")
@click.option("--plot/--no-plot", default=True, show_default=True, help="Write the PNGs (needs matplotlib).")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--progress/--no-progress", default=None, help="Progress bar [default: only on a terminal].")
def inspect(finetuned, base, merged, output, thresholds, rms_fractions, std_fractions, range_, **options):
    """Measure the task vectors of FINETUNED models (and --merged ones) against BASE.

    \b
        tau_i = finetuned_i - base,   their mean,   M - base for each --merged M

    In one streaming pass (a few chunks of memory, whatever N and the model size), in float64:
    L1, L2, Linf and p-norms, min, max, mean and RMS, and the share of near-zero entries on an
    absolute scale and relative to each tensor's own RMS, per vector, tensor group and tensor;
    |tau| histograms on both scales; cosines and sign agreement between the vectors. Inputs
    are read as `taskvec merge` reads them. Writes stats.json (every number), tensors.csv,
    task_vector_histogram/*/counts.npy and bin_edges.npy, and PNGs. See docs/inspect.md.

    Example: taskvec inspect --base gpt2 --merged gpt2-detox -o inspect/ runs/split-*
    """
    from taskvec.inspect import inspect_checkpoints
    from taskvec.inspect.report import table

    started = time.perf_counter()
    stats = inspect_checkpoints(base, finetuned, merged=merged, output=output, thresholds=_numbers(thresholds),
                                rms_fractions=_numbers(rms_fractions), std_fractions=_numbers(std_fractions),
                                range=range_, **options)
    for note in stats["notes"]:
        click.echo(f"note: {note}", err=True)
    click.echo(table(stats))
    click.echo(f"wrote {output} in {time.perf_counter() - started:.2f} s")
