"""Fine-tune a causal LM on one text set, or on every split of a split directory.

The transformers Trainer does the work, so the same code runs on a CPU, one GPU, or several
through `torchrun`/`accelerate launch`, and a killed run resumes from its last checkpoint.
Checkpoints live in `.<output>.checkpoints` beside the output; the finished model is moved into
place only when complete, with `taskvec-train.json` (what was trained, on what, how) as its
marker, so a finished fine-tune is never retrained and a half-written one never looks finished.
With a LoRA rank the output is a PEFT adapter directory instead: the low-rank task vector itself.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path

import torch
import transformers
from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback
from transformers.trainer_utils import get_last_checkpoint

from taskvec import __version__
from taskvec.data import read_jsonl, read_manifest, read_split, texts_hash
from taskvec.errors import TaskvecError, brief
from taskvec.hf import load_causal_lm, quiet_transformers
from taskvec.jsonfile import read_json
from taskvec.outputs import check_output, staged_directory
from taskvec.train_config import BNB_OPTIMIZERS, TrainConfig

MARKER = "taskvec-train.json"
RUN_FILE = "taskvec-run.json"
FINAL = "final"  # in the checkpoint directory: the finished model before it moves into place
# Settings that change how often a run saves or logs, not the weights it produces.
BOOKKEEPING = frozenset({"save_steps", "save_total_limit", "logging_steps"})


class AscentTrainer(Trainer):
    """Gradient ascent: the negated LM loss, so the optimizer pushes the likelihood down."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                             num_items_in_batch=num_items_in_batch)
        return (-loss, outputs) if return_outputs else -loss


class PadCollator:
    """Pad a batch to its longest example; padding is masked out of attention and loss."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        input_ids = torch.full((len(features), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(features), width), dtype=torch.long)
        labels = torch.full((len(features), width), -100, dtype=torch.long)
        for row, feature in enumerate(features):
            ids = torch.tensor(feature["input_ids"], dtype=torch.long)
            input_ids[row, : len(ids)] = ids
            attention_mask[row, : len(ids)] = 1
            labels[row, : len(ids)] = ids
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def tokenize(texts: Sequence[str], tokenizer, max_length: int) -> list[dict]:
    """Token ids of each text, ending with EOS (where the tokenizer has one), at most max_length.

    Examples shorter than two tokens are dropped: they give no next-token target.
    """
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    examples = [{"input_ids": (ids + eos)[:max_length]} for ids in encoded]
    return [example for example in examples if len(example["input_ids"]) >= 2]


def _settings(config: TrainConfig) -> dict:
    return {k: v for k, v in asdict(config).items() if k not in BOOKKEEPING}


def run_record(model_dir: str | Path, texts: Sequence[str], config: TrainConfig) -> dict:
    """What determines a fine-tune's weights: base model, data and settings (not bookkeeping).

    A DeepSpeed config is recorded by its contents, so an edited file counts as a change and a
    moved one does not. The record is as JSON gives it back, so a reread one compares equal.
    """
    base = Path(model_dir)
    settings = _settings(config)
    if config.deepspeed is not None:
        settings["deepspeed"] = read_json(config.deepspeed, expect=dict)
    return json.loads(json.dumps({
        "base_model": str(base.resolve()) if base.exists() else str(model_dir),
        "data_sha256": texts_hash(texts),
        "n_texts": len(texts),
        "config": settings,
    }))


def _with_defaults(record: object) -> object:
    """A record written before a setting existed: that run used the setting's default."""
    if isinstance(record, dict) and isinstance(record.get("config"), dict):
        defaults = json.loads(json.dumps(_settings(TrainConfig())))
        return {**record, "config": {**defaults, **record["config"]}}
    return record


def _comparable(record: object) -> object:
    """A run record as far as it decides the weights: with max_steps set, epochs does not (the
    Trainer stops at max_steps), so a rerun with other epochs is the same run."""
    if isinstance(record, dict) and isinstance(record.get("config"), dict) \
            and record["config"].get("max_steps") is not None:
        return {**record, "config": {**record["config"], "epochs": None}}
    return record


def _difference(old: dict, new: dict) -> str:
    flat_old = {**old, **old.get("config", {})}
    flat_new = {**new, **new.get("config", {})}
    names = [k for k in {**flat_old, **flat_new} if k != "config" and flat_old.get(k) != flat_new.get(k)]
    if not names:
        return "settings differ"
    return f"{names[0]} was {flat_old.get(names[0])!r}, now {flat_new.get(names[0])!r}"


def finished_record(output_dir: Path) -> dict | None:
    """The run record of a finished fine-tune in output_dir, or None if it is not one."""
    try:
        return _with_defaults(read_json(output_dir / MARKER, expect=dict)["run"])
    except (TaskvecError, KeyError):
        return None


def _require(module: str, feature: str, install: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise TaskvecError(f"{feature} needs the {module} package, which is not installed: pip install {install}")


def check_dependencies(config: TrainConfig) -> None:
    """Refuse, before anything loads, a setting whose optional package is missing."""
    if config.lora_rank is not None:
        _require("peft", "--lora-rank", "'taskvec[lora]'")
    if config.optim in BNB_OPTIMIZERS:
        _require("bitsandbytes", f"--optim {config.optim}", "bitsandbytes")
    if config.attn_implementation == "flash_attention_2":
        _require("flash_attn", "--attn-implementation flash_attention_2", "flash-attn --no-build-isolation")
    if config.deepspeed is not None:
        _require("deepspeed", "--deepspeed", "deepspeed")


def finetune(model_dir: str | Path, texts: Iterable[str] | str | Path, output_dir: str | Path,
             config: TrainConfig | None = None, *, overwrite: bool = False,
             progress: bool | None = None, callbacks: Sequence[TrainerCallback] = ()) -> Path:
    """Fine-tune the causal LM in `model_dir` on `texts` (or a JSONL file of them); return output_dir.

    The output is a safetensors model directory (config, tokenizer, weights in the base's dtype)
    that `taskvec merge` takes as is. A finished output with the same base, data and settings is
    returned untouched; a different one is an error unless `overwrite`. Checkpoints of the same
    run left by a killed process are resumed; those of another run are an error unless
    `overwrite` (which deletes them).
    """
    config = config or TrainConfig()
    config.validate()
    check_dependencies(config)
    if config.precision != "fp32" and not torch.cuda.is_available():
        raise TaskvecError(f"precision {config.precision} is mixed-precision training on a GPU, and no CUDA GPU "
                           "is available; use fp32 on CPU")
    output_dir = Path(output_dir)
    texts = read_jsonl(texts) if isinstance(texts, (str, Path)) else list(texts)
    if not texts:
        raise TaskvecError(f"{output_dir}: no texts to train on")
    record = run_record(model_dir, texts, config)
    if output_dir.exists() and not overwrite:
        finished = finished_record(output_dir)
        if finished is None:
            raise TaskvecError(f"output {output_dir} exists and is not a finished fine-tune; "
                               "pass --overwrite to replace it")
        if _comparable(finished) != _comparable(record):
            raise TaskvecError(f"output {output_dir} was trained differently ({_difference(finished, record)}); "
                               "pass --overwrite to retrain")
        return output_dir
    if Path(model_dir).exists():
        check_output(output_dir, [Path(model_dir)], overwrite=True)

    progress = sys.stderr.isatty() if progress is None else progress
    with quiet_transformers(progress_bars=progress, warnings=True):
        workdir = output_dir.parent / f".{output_dir.name}.checkpoints"
        # Before the model loads: this sets up torch.distributed if launched so, and DeepSpeed
        # ZeRO-3 then partitions the weights as they load instead of after.
        args = _training_arguments(workdir, config, progress, record["config"]["deepspeed"])
        # Train in float32 whatever the checkpoint stores (AdamW on half-precision weights
        # stalls) unless model_dtype says otherwise; a full fine-tune is saved back in the
        # stored dtype so that `taskvec merge` pairs them.
        model, tokenizer, saved_dtype = load_causal_lm(model_dir, dtype=getattr(torch, config.model_dtype))
        if config.attn_implementation is not None:
            _set_attention(model, config.attn_implementation, model_dir)
        if config.lora_rank is not None:
            model = _lora_model(model, config, record["base_model"], model_dir)
        dataset = tokenize(texts, tokenizer, config.max_length)
        if not dataset:
            raise TaskvecError(f"{output_dir}: every text is shorter than two tokens; nothing to train on")
        if args.process_index == 0:
            _prepare_workdir(workdir, record, overwrite)
        args.distributed_state.wait_for_everyone()

        started = time.time()
        trainer = _make_trainer(model, tokenizer, dataset, args, config, progress, callbacks)
        result = trainer.train(resume_from_checkpoint=get_last_checkpoint(str(workdir)))
        # A LoRA adapter stays in float32 (small, and merged in float32 anyway). DeepSpeed and
        # FSDP own the weights they sharded and gather their own copy: that is cast after saving.
        full = config.lora_rank is None
        sharded = trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled
        if full and not sharded and saved_dtype != model.dtype:
            trainer.model.to(saved_dtype)
        trainer.save_model(str(workdir / FINAL))
    if trainer.is_world_process_zero():
        if full and sharded:
            cast_saved_weights(workdir / FINAL, saved_dtype)
        marker = {"format": "taskvec-train/1", "run": record, "global_step": result.global_step,
                  "train_loss": result.training_loss, "seconds": round(time.time() - started, 3),
                  "taskvec_version": __version__, "transformers_version": transformers.__version__}
        if not full:
            import peft

            marker["peft_version"] = peft.__version__
            marker["lora_target_modules"] = sorted(trainer.model.peft_config["default"].target_modules)
        with staged_directory(output_dir, overwrite=True) as staging:
            for file in (workdir / FINAL).iterdir():
                if file.name != "training_args.bin":  # a pickle of the Trainer's arguments
                    file.rename(staging / file.name)
            (staging / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        shutil.rmtree(workdir)
    trainer.accelerator.wait_for_everyone()
    return output_dir


def _prepare_workdir(workdir: Path, record: dict, overwrite: bool) -> None:
    """Create the checkpoint directory, or keep its checkpoints for resuming if it holds this run.

    Its `final` subdirectory, where the finished model is saved before being moved into place,
    is made empty here, before other processes could try to save into it.
    """
    run_file = workdir / RUN_FILE
    if workdir.exists():
        try:
            previous = read_json(run_file, expect=dict)
        except TaskvecError:
            previous = None
        if _comparable(_with_defaults(previous)) != _comparable(record):
            if not overwrite:
                why = _difference(previous, record) if isinstance(previous, dict) else "no run record"
                raise TaskvecError(f"{workdir} holds checkpoints of another run ({why}); "
                                   "pass --overwrite to discard them")
            shutil.rmtree(workdir)
    if not workdir.exists():
        workdir.mkdir(parents=True)
        run_file.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    shutil.rmtree(workdir / FINAL, ignore_errors=True)
    (workdir / FINAL).mkdir()


def _set_attention(model, name: str, where) -> None:
    try:
        model.set_attn_implementation(name)
    except (ImportError, ValueError) as err:
        raise TaskvecError(f"{where}: cannot use attention {name} ({brief(err)})") from None
    if model.config._attn_implementation != name:
        raise TaskvecError(f"{where}: {type(model).__name__} cannot switch its attention to {name}")


def _lora_model(model, config: TrainConfig, base_name: str, where):
    """Wrap the base in a trainable LoRA adapter (PEFT), every other weight frozen.

    Seeded first: the adapter's random initialisation is part of the run, so split K's adapter
    is the same whether it is trained alone (--split-index) or after other splits.
    """
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    modules = list(config.lora_target_modules or [])  # none: PEFT's default for the architecture
    lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha or config.lora_rank,
                      lora_dropout=config.lora_dropout, task_type="CAUSAL_LM",
                      target_modules="all-linear" if modules == ["all-linear"] else modules or None,
                      fan_in_fan_out=any(isinstance(m, Conv1D) for m in model.modules()))  # GPT-2's (in, out) weights
    model.name_or_path = base_name  # what adapter_config.json names as its base
    transformers.set_seed(config.seed)
    try:
        return get_peft_model(model, lora)
    except ValueError as err:
        hint = "" if modules else "; name them with --lora-target-modules"
        raise TaskvecError(f"{where}: cannot add LoRA adapters ({brief(err)}){hint}") from None


def cast_saved_weights(model_dir: Path, dtype: torch.dtype) -> None:
    """Rewrite a saved model's floating tensors (and config dtype) in `dtype`, so merge pairs it with its base."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(file, "pt") as handle:
            metadata = handle.metadata()
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (not a dict)
        if any(t.is_floating_point() and t.dtype != dtype for t in tensors.values()):
            save_file({k: t.to(dtype) if t.is_floating_point() else t for k, t in tensors.items()}, file, metadata)
    config_file = model_dir / "config.json"
    if config_file.exists():
        config = read_json(config_file, expect=dict)
        config["dtype"] = str(dtype).removeprefix("torch.")
        config_file.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def _training_arguments(workdir: Path, config: TrainConfig, progress: bool,
                        deepspeed: dict | None = None) -> TrainingArguments:
    """The Trainer's arguments; `deepspeed` is the config's contents as recorded (read once)."""
    return TrainingArguments(
        output_dir=str(workdir),
        per_device_train_batch_size=config.batch_size,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps or -1,
        learning_rate=config.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        bf16=config.precision == "bf16",
        fp16=config.precision == "fp16",
        seed=config.seed,
        data_seed=config.seed,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        logging_steps=config.logging_steps,
        report_to="none",
        disable_tqdm=not progress,
        remove_unused_columns=False,
        dataloader_pin_memory=torch.cuda.is_available(),
        optim=config.optim,
        activation_checkpointing=config.gradient_checkpointing,
        deepspeed=deepspeed,
    )


def _make_trainer(model, tokenizer, dataset, args: TrainingArguments, config: TrainConfig, progress: bool,
                  callbacks: Sequence[TrainerCallback]) -> Trainer:
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    trainer_class = AscentTrainer if config.ascent else Trainer
    trainer = trainer_class(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                            data_collator=PadCollator(pad_id or 0), callbacks=list(callbacks))
    if not progress:
        trainer.remove_callback(PrinterCallback)  # it prints every log line when tqdm is off
    return trainer


def is_main_process() -> bool:
    """False in the extra processes torchrun or accelerate launch start, which should stay quiet."""
    return int(os.environ.get("RANK", "0")) == 0


def split_dir(output_dir: Path, k: int) -> Path:
    return Path(output_dir) / f"split-{k:02d}"


def train_splits(base_model: str | Path, splits_dir: str | Path, output_dir: str | Path,
                 config: TrainConfig | None = None, split_index: int | None = None, *,
                 overwrite: bool = False, progress: bool | None = None,
                 callbacks: Sequence[TrainerCallback] = ()) -> list[Path]:
    """Fine-tune `base_model` once per split into `output_dir/split-00`, ...; return those paths.

    With `split_index` only that split is trained, so N scheduler jobs can share the work; its
    weights equal those of the same split in a full run. Finished splits are skipped, killed
    ones resume. Every split file is checked against the manifest before training starts.
    """
    manifest = read_manifest(splits_dir)
    n_splits = manifest["n_splits"]
    if split_index is not None and not 0 <= split_index < n_splits:
        raise TaskvecError(f"split index {split_index} out of range: {splits_dir} has splits 0..{n_splits - 1}")
    indices = range(n_splits) if split_index is None else [split_index]
    # No fine-tune may replace or land inside what it is trained from. Existing outputs are
    # finetune's to judge (a finished split is skipped), so only the inputs are checked here.
    inputs = [*([base_model] if Path(base_model).exists() else []), splits_dir,
              *([config.deepspeed] if config is not None and config.deepspeed else [])]
    for k in indices:
        check_output(split_dir(output_dir, k), inputs, overwrite=True)
    texts = {k: read_split(splits_dir, k, manifest) for k in indices}
    progress = sys.stderr.isatty() if progress is None else progress
    show_bar = progress and len(indices) > 1 and is_main_process()
    paths = []
    for k in tqdm(indices, desc="splits", unit="split", disable=not show_bar):
        paths.append(finetune(base_model, texts[k], split_dir(output_dir, k), config,
                              overwrite=overwrite, progress=progress, callbacks=callbacks))
    return paths
