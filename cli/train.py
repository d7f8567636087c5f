"""`taskvec train-splits`: a thin wrapper over taskvec.train.train_splits."""

from dataclasses import fields

import click

from taskvec.cli.options import SEED
from taskvec.train_config import ATTN_IMPLEMENTATIONS, MODEL_DTYPES, OPTIMIZERS, PRECISIONS, TrainConfig

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
@click.option("--seed", type=SEED, default=DEFAULTS["seed"], show_default=True,
              help="Seed of dropout and data order (the same for every split).")
@click.option("--save-steps", type=click.IntRange(min=1), default=DEFAULTS["save_steps"], show_default=True,
              help="Checkpoint every this many steps; a killed run resumes from the last one.")
@click.option("--lora-rank", type=click.IntRange(min=1), default=DEFAULTS["lora_rank"],
              help="Train a LoRA adapter of this rank per split (PEFT) instead of every weight "
                   "[default: full fine-tune].")
@click.option("--lora-alpha", type=click.FloatRange(min=0, min_open=True), default=DEFAULTS["lora_alpha"],
              help="LoRA alpha; the update is B A * alpha / rank [default: the rank].")
@click.option("--lora-target-modules", default=None, metavar="NAMES",
              help="Comma-separated module names to adapt, or all-linear [default: PEFT's for the "
                   "architecture, e.g. c_attn for GPT-2, q_proj,v_proj for Llama].")
@click.option("--lora-dropout", type=click.FloatRange(min=0, max=1, max_open=True),
              default=DEFAULTS["lora_dropout"], show_default=True, help="Dropout on the LoRA branch.")
@click.option("--gradient-checkpointing", is_flag=True,
              help="Recompute activations in the backward pass: less memory, about 20-30% slower.")
@click.option("--optim", type=click.Choice(OPTIMIZERS), default=DEFAULTS["optim"], show_default=True,
              help="The Trainer's optimizer; paged_* and *_8bit need bitsandbytes.")
@click.option("--model-dtype", type=click.Choice(MODEL_DTYPES), default=DEFAULTS["model_dtype"],
              show_default=True,
              help="Load and train the base in this dtype; below float32 only with --lora-rank or --deepspeed.")
@click.option("--attn-implementation", type=click.Choice(ATTN_IMPLEMENTATIONS),
              default=DEFAULTS["attn_implementation"],
              help="Attention kernel; flash_attention_2 needs flash-attn and a GPU [default: transformers' choice].")
@click.option("--deepspeed", type=click.Path(dir_okay=False), default=DEFAULTS["deepspeed"], metavar="CONFIG",
              help="DeepSpeed JSON config for the Trainer, e.g. examples/deepspeed/zero3-bf16.json "
                   "(launch with deepspeed, torchrun or accelerate).")
@click.option("--overwrite", is_flag=True,
              help="Retrain splits that are already finished, and discard checkpoints of other settings.")
@click.option("--progress/--no-progress", default=None, help="Progress bars [default: only on a terminal].")
def train_splits(splits_dir, base, output, split_index, learning_rate, batch_size, epochs, max_steps,
                 max_length, warmup_steps, weight_decay, gradient_accumulation_steps, precision, ascent,
                 seed, save_steps, lora_rank, lora_alpha, lora_target_modules, lora_dropout,
                 gradient_checkpointing, optim, model_dtype, attn_implementation, deepspeed, overwrite, progress):
    """Fine-tune BASE once per split of SPLITS (a directory from `taskvec data split`).

    Each fine-tune is saved as a safetensors model directory OUTPUT/split-KK (config, tokenizer,
    model.safetensors, taskvec-train.json) that `taskvec merge` takes as is; with --lora-rank it
    is a PEFT adapter directory (adapter_config.json, adapter_model.safetensors). The defaults are
    the original recipe: AdamW, lr 1e-5, linear schedule, batch 16, 5 epochs, descent on the LM loss.

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
                         precision=precision, ascent=ascent, seed=seed, save_steps=save_steps,
                         lora_rank=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                         lora_target_modules=lora_target_modules and tuple(
                             name.strip() for name in lora_target_modules.split(",")),
                         gradient_checkpointing=gradient_checkpointing, optim=optim, model_dtype=model_dtype,
                         attn_implementation=attn_implementation, deepspeed=deepspeed)
    paths = run(base, splits_dir, output, config, split_index, overwrite=overwrite, progress=progress)
    if is_main_process():
        click.echo(f"{len(paths)} fine-tune{'s' * (len(paths) != 1)} ready in {output}: "
                   + " ".join(path.name for path in paths))
