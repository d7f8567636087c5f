"""`taskvec train-splits`: a thin wrapper over taskvec.train.train_splits."""

from dataclasses import fields

import click

from taskvec.train_config import PRECISIONS, TrainConfig

DEFAULTS = {field.name: field.default for field in fields(TrainConfig)}


@click.command()
@click.argument("splits_dir", metavar="SPLITS", type=click.Path(file_okay=False))
@click.option("--base", default="gpt2", show_default=True,
              help="Base causal LM: a model directory or a hub name (any AutoModelForCausalLM).")
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False),
              help="Directory for the fine-tunes: OUTPUT/split-00, OUTPUT/split-01, ...")
@click.option("--split-index", "-k", type=click.IntRange(min=0), default=None,
              help="Train split K only (e.g. $SLURM_ARRAY_TASK_ID) [default: all, one after another].")
@click.option("--learning-rate", "--lr", type=float, default=DEFAULTS["learning_rate"], show_default=True,
              help="Peak AdamW learning rate, decayed linearly to 0.")
@click.option("--batch-size", type=click.IntRange(min=1), default=DEFAULTS["batch_size"], show_default=True,
              help="Examples per step per device.")
@click.option("--epochs", type=float, default=DEFAULTS["epochs"], show_default=True,
              help="Passes over each split.")
@click.option("--max-steps", type=click.IntRange(min=1), default=DEFAULTS["max_steps"],
              help="Stop after this many optimizer steps (overrides --epochs).")
@click.option("--max-length", type=click.IntRange(min=2), default=DEFAULTS["max_length"], show_default=True,
              help="Tokens per example; longer texts are truncated.")
@click.option("--warmup-steps", type=click.IntRange(min=0), default=DEFAULTS["warmup_steps"], show_default=True,
              help="Linear warm-up steps before the decay.")
@click.option("--weight-decay", type=float, default=DEFAULTS["weight_decay"], show_default=True,
              help="AdamW weight decay.")
@click.option("--gradient-accumulation-steps", type=click.IntRange(min=1),
              default=DEFAULTS["gradient_accumulation_steps"], show_default=True,
              help="Batches accumulated per optimizer step.")
@click.option("--precision", type=click.Choice(PRECISIONS), default=DEFAULTS["precision"], show_default=True,
              help="Mixed precision on a GPU (weights stay float32 while training).")
@click.option("--ascent", is_flag=True,
              help="Gradient ascent on the LM loss (the classic unlearning baseline) instead of descent.")
@click.option("--seed", type=int, default=DEFAULTS["seed"], show_default=True,
              help="Seed of dropout and data order (the same for every split).")
@click.option("--save-steps", type=click.IntRange(min=1), default=DEFAULTS["save_steps"], show_default=True,
              help="Checkpoint every this many steps; a killed run resumes from the last one.")
@click.option("--overwrite", is_flag=True,
              help="Retrain splits that are already finished, and discard checkpoints of other settings.")
@click.option("--progress/--no-progress", default=None, help="Progress bars [default: only on a terminal].")
def train_splits(splits_dir, base, output, split_index, learning_rate, batch_size, epochs, max_steps,
                 max_length, warmup_steps, weight_decay, gradient_accumulation_steps, precision, ascent,
                 seed, save_steps, overwrite, progress):
    """Fine-tune BASE once per split of SPLITS (a directory from `taskvec data split`).

    Each fine-tune is saved as a safetensors model directory OUTPUT/split-KK (config, tokenizer,
    model.safetensors, taskvec-train.json) that `taskvec merge` takes as is. The defaults are the
    original recipe: AdamW, lr 1e-5, linear schedule, batch 16, 5 epochs, descent on the LM loss.

    A finished split is skipped, so rerunning the command after a crash only does what is left;
    a killed split resumes from its last checkpoint (kept in OUTPUT/.split-KK.checkpoints).
    For several GPUs per split launch the same command with torchrun or accelerate:

    \b
        torchrun --nproc_per_node 4 -m taskvec train-splits toxic-splits --base gpt2 -o runs
        taskvec merge --base gpt2 --scale 1.0 -o gpt2-detox runs/split-*
    """
    from taskvec.train import is_main_process
    from taskvec.train import train_splits as run

    config = TrainConfig(learning_rate=learning_rate, batch_size=batch_size, epochs=epochs,
                         max_steps=max_steps, max_length=max_length, warmup_steps=warmup_steps,
                         weight_decay=weight_decay, gradient_accumulation_steps=gradient_accumulation_steps,
                         precision=precision, ascent=ascent, seed=seed, save_steps=save_steps)
    paths = run(base, splits_dir, output, config, split_index, overwrite=overwrite, progress=progress)
    if is_main_process():
        click.echo(f"{len(paths)} fine-tune{'s' * (len(paths) != 1)} ready in {output}: "
                   + " ".join(path.name for path in paths))
