"""`taskvec merge`, `average` and `negate`: thin wrappers over taskvec.merge.merge_checkpoints."""

import functools

import click

from taskvec.cli.options import SCALES
from taskvec.dtypes import OUTPUT_DTYPES


def _output_options(dtype_from: str = "the base's", scales: bool = True):
    """Options every merge command shares: `dtype_from` names the input whose dtype the output
    keeps; `scales`, whether the command takes a list of scales (one model per scale)."""
    per_scale = "; with several scales, one model per scale in OUTPUT/scale-X" if scales else ""
    options = [
        click.option("--output", "-o", required=True, type=click.Path(file_okay=False),
                     help=f"Directory to write the merged model to (created; an existing one is refused unless "
                          f"--overwrite{per_scale})."),
        click.option("--dtype", type=click.Choice(OUTPUT_DTYPES),
                     default=None, help=f"Dtype of floating tensors in the output [default: {dtype_from}]."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
                     show_default=True,
                     help="Where the arithmetic runs; auto uses the Triton kernels on a GPU if present."),
        click.option("--max-shard-size", default="50GB", show_default=True,
                     help="Largest output shard, as in save_pretrained (e.g. 2GB, 500MiB)."),
        click.option("--chunk-size", default="16MiB", show_default=True,
                     help="Elements merged per step, as float32 bytes; memory is a few chunks."),
        click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists."),
        click.option("--strict", is_flag=True,
                     help="Refuse fine-tune tensors the base does not have (a value head, a classifier) "
                          "and NaN/inf values in the output, instead of a note for each."),
        click.option("--progress/--no-progress", default=None,
                     help="Progress bar [default: only on a terminal]."),
    ]
    return lambda command: functools.reduce(lambda cmd, option: option(cmd), reversed(options), command)


def _run(**kwargs):
    from taskvec.merge import merge_checkpoints

    result = merge_checkpoints(**kwargs)
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    gigabytes = result.bytes_written / 1e9
    models = f"{len(result.outputs)} models, " if len(result.outputs) > 1 else ""
    click.echo(
        f"wrote {result.output} ({models}{len(result.files)} shard{'s' * (len(result.files) > 1)}"
        f"{' each' if models else ''}, {gigabytes:.3f} GB) in {result.seconds:.2f} s"
    )
    if not (result.outputs[0] / "config.json").exists():
        click.echo(f"note: no config.json beside the {'first input' if kwargs.get('base') is None else 'base'}, "
                   f"so {result.output} holds weights only; add a config to load it with from_pretrained",
                   err=True)


class WeightList(click.ParamType):
    """`1,2,0.5`: one weight per fine-tune, in the order given."""

    name = "w1,...,wN"

    def convert(self, value, param, ctx):
        if isinstance(value, (list, tuple)):
            return list(value)
        try:
            return [float(part) for part in str(value).split(",")]
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of numbers", param, ctx)


def _method_options(command):
    """--method, --weights, and an option per parameter the methods declare (taskvec.methods)."""
    from taskvec.methods import MERGE_METHODS, method_params

    types = {float: click.FLOAT, int: click.INT}
    options = [
        click.option("--method", type=click.Choice(MERGE_METHODS), default="negated_mean", show_default=True,
                     help="negated_mean: the mean task vector (the paper's); ties: trim, elect sign, disjoint "
                          "mean (--density); dare, dare-ties: random drop and rescale (--density, --seed), then "
                          "the mean or TIES's disjoint mean. All write base - scale * tau (docs/methods.md)."),
        click.option("--weights", type=WeightList(), default=None,
                     help="One weight per FINETUNED (w1,...,wN, >= 0): tau is the weighted mean of the task "
                          "vectors (weighted disjoint mean for ties, dare-ties) [default: equal]."),
    ]
    for name, (param, _methods) in method_params().items():
        options.append(click.option(f"--{name.replace('_', '-')}", type=types.get(param.type, click.STRING),
                                    default=None, help=param.help))
    return functools.reduce(lambda cmd, option: option(cmd), reversed(options), command)


@click.command()
@click.argument("finetuned", nargs=-1, required=True, type=click.Path(exists=False))
@click.option("--base", required=True, type=click.Path(), help="The pretrained (base) model: a directory or a hub id.")
@click.option("--scale", "-l", type=SCALES, default=1.0, show_default=True,
              help="lambda: how far to move away from the averaged task vector. A list (0.1,0.5,1) or a "
                   "range (0.1:1.0:0.1) writes OUTPUT/scale-X for each, from one read of the inputs.")
@_method_options
@_output_options()
def merge(finetuned, base, scale, method, weights, **options):
    """Negate the averaged task vector of FINETUNED models from BASE.

    \b
        out = base - scale * (mean_i(finetuned_i) - base)        --method negated_mean
        out = base - scale * tau                                  --method ties | dare | dare-ties

    TIES keeps each task vector's largest --density fraction per tensor, elects each entry's
    sign and averages the agreeing entries; DARE keeps each entry with probability --density
    (seeded by --seed), rescales by 1/density and averages; dare-ties combines DARE's drop with
    TIES's sign election. --weights makes any of them a weighted mean.

    Each FINETUNED is a model fine-tuned from BASE: a model directory (safetensors or PyTorch
    .bin, single or sharded), one weight file, a PEFT LoRA adapter directory (its task vector is
    B @ A * alpha / r per module), or a hub id. Names are matched as transformers loads them
    (the hub's GPT-2 layout and save_pretrained's agree), mixed float dtypes are cast into the
    float32 sum; a note says what was renamed, dropped, cast or left out. The merge streams every
    tensor in chunks, so memory stays at a few chunks whatever N and the model size. The output
    is a loadable Hugging Face model directory in BASE's dtype (config and tokenizer copied from
    BASE, provenance in taskvec.json).

    Example: taskvec merge --base gpt2 --scale 1.0 -o gpt2-detox runs/split-*
    """
    _run(finetuned=finetuned, base=base, scale=scale, method=method, weights=weights, **options)
    if len(finetuned) == 1 and method == "negated_mean":  # often a glob that matched less than meant
        click.echo("note: one fine-tune: this negated a single task vector (as `taskvec negate` does), "
                   "with no averaging", err=True)


@click.command()
@click.argument("finetuned", nargs=-1, required=True, type=click.Path())
@_output_options(dtype_from="the first model's", scales=False)
def average(finetuned, **options):
    """Average the weights of FINETUNED models (two or more): out = mean_i(finetuned_i).

    Config and tokenizer are copied from the first one.
    """
    _run(finetuned=finetuned, method="average", **options)


@click.command()
@click.option("--base", required=True, type=click.Path(), help="The pretrained (base) model: a directory or a hub id.")
@click.option("--finetuned", required=True, type=click.Path(),
              help="One fine-tuned model: a directory, a weight file, a LoRA adapter or a hub id, as merge's "
                   "FINETUNED.")
@click.option("--scale", "-l", type=SCALES, default=1.0, show_default=True,
              help="lambda: how far to move away from the task vector; a list or range as for merge.")
@_output_options()
def negate(base, finetuned, scale, **options):
    """Negate a single task vector: out = base - scale * (finetuned - base).

    The classic task-vector negation, the baseline `taskvec merge` improves on.
    """
    _run(finetuned=[finetuned], base=base, scale=scale, method="negate", **options)
