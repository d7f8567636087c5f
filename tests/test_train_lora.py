"""`train-splits --lora-rank` and the memory options for big models, on the tiny GPT-2 of
test_train: LoRA adapters end to end, resuming and --split-index for them, gradient checkpointing
against the loss curve without it, each option checked on the objects the Trainer gets, and
missing optional packages as one-line CLI errors."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, TrainerCallback

from taskvec.data import save_splits
from taskvec.errors import TaskvecError
from taskvec.train import MARKER, TrainConfig, cast_saved_weights, finetune, train_splits

from helpers import load_dir
from test_train import FAST, TEXTS, KillAfterSave, Killed, RecordSteps, make_base, make_tokenizer, run

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ZERO3 = EXAMPLES / "deepspeed" / "zero3-bf16.json"
LORA = dict(FAST, lora_rank=4, lora_alpha=8.0)
LORA_ARGS = ("--lr", 1e-3, "--batch-size", 4, "--max-steps", 3, "--save-steps", 2, "--max-length", 24,
             "--lora-rank", 4, "--lora-alpha", 8)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer):
    return make_base(tmp_path_factory.mktemp("base") / "gpt2-tiny", tokenizer, dropout=0.1)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, base):
    root = tmp_path_factory.mktemp("lora")
    save_splits(TEXTS, 2, root / "splits", seed=1)
    result = run("train-splits", root / "splits", "--base", base, "-o", root / "runs", *LORA_ARGS)
    assert result.exit_code == 0, result.output
    assert "2 fine-tunes ready" in result.output
    return root


class Seen(TrainerCallback):
    """What the Trainer trains with: its arguments, the model, the optimizer, and the loss log."""

    def __init__(self):
        self.losses = []

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.args, self.model, self.optimizer = args, model, optimizer

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "loss" in logs:
            self.losses.append(logs["loss"])


# --- LoRA adapters ------------------------------------------------------------------------------------


def test_lora_splits_are_peft_adapters(lora_run, base):
    from peft import PeftModel

    runs = lora_run / "runs"
    assert sorted(p.name for p in runs.iterdir()) == ["split-00", "split-01"]  # no checkpoints left
    adapters = []
    for split in ("split-00", "split-01"):
        files = {p.name for p in (runs / split).iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", MARKER} <= files
        assert "model.safetensors" not in files and "training_args.bin" not in files
        config = json.loads((runs / split / "adapter_config.json").read_text())
        assert (config["r"], config["lora_alpha"], config["target_modules"]) == (4, 8.0, ["c_attn"])
        assert config["base_model_name_or_path"] == str(base.resolve()) and config["fan_in_fan_out"]
        marker = json.loads((runs / split / MARKER).read_text())
        assert marker["run"]["config"]["lora_rank"] == 4 and marker["lora_target_modules"] == ["c_attn"]
        assert marker["global_step"] == 3 and marker["peft_version"]
        saved = load_file(runs / split / "adapter_model.safetensors")
        assert len(saved) == 2 * 2 and all("lora_" in name for name in saved)  # A and B of 2 layers, nothing else
        assert {t.dtype for t in saved.values()} == {torch.float32}
        assert all(saved[k].abs().max() > 0 for k in saved if "lora_B" in k)  # B starts at 0: it trained

        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), runs / split)
        loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
        assert {k.replace(".default", "") for k in loaded} == set(saved)
        assert all(torch.equal(loaded[k], saved[k.replace(".default", "")]) for k in loaded)
        adapters.append(saved)
    assert any(not torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])  # different data


def test_lora_split_index_equals_the_same_split_of_a_full_run(lora_run, base, tmp_path):
    result = run("train-splits", lora_run / "splits", "--base", base, "-o", tmp_path / "runs", "-k", 1, *LORA_ARGS)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["split-01"]
    alone = load_file(tmp_path / "runs" / "split-01" / "adapter_model.safetensors")
    full = load_file(lora_run / "runs" / "split-01" / "adapter_model.safetensors")
    assert all(torch.equal(alone[k], full[k]) for k in full)


def test_killed_lora_run_resumes_from_its_checkpoint(lora_run, base, tmp_path):
    config = TrainConfig(**{**LORA, "max_steps": 5, "lora_dropout": 0.1})  # dropout: the RNG state matters
    splits = lora_run / "splits"
    uninterrupted = train_splits(base, splits, tmp_path / "a", config, split_index=0)[0]
    with pytest.raises(Killed):
        train_splits(base, splits, tmp_path / "b", config, split_index=0, callbacks=[KillAfterSave(4)])
    assert not (tmp_path / "b" / "split-00").exists()
    steps = RecordSteps()
    resumed = train_splits(base, splits, tmp_path / "b", config, split_index=0, callbacks=[steps])[0]
    assert steps.start == 4 and steps.steps == [5]
    a, b = (load_file(p / "adapter_model.safetensors") for p in (uninterrupted, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_changed_setting_is_refused(lora_run, base, tmp_path):
    splits, runs = lora_run / "splits", lora_run / "runs"
    stamp = (runs / "split-00" / "adapter_model.safetensors").stat().st_mtime_ns
    train_splits(base, splits, runs, TrainConfig(**LORA))  # the same settings: skipped
    assert (runs / "split-00" / "adapter_model.safetensors").stat().st_mtime_ns == stamp
    for change, message in [({"lora_rank": 8}, "lora_rank was 4, now 8"),
                            ({"lora_target_modules": ("c_attn", "c_proj")}, "lora_target_modules was None"),
                            ({"gradient_checkpointing": True}, "gradient_checkpointing was False, now True"),
                            ({"optim": "adamw_torch"}, "optim was 'adamw_torch_fused', now 'adamw_torch'"),
                            ({"attn_implementation": "eager"}, "attn_implementation was None, now 'eager'"),
                            ({"model_dtype": "bfloat16"}, "model_dtype was 'float32', now 'bfloat16'"),
                            ({"lora_rank": None, "lora_alpha": None}, "lora_rank was 4, now None")]:
        with pytest.raises(TaskvecError, match=rf"trained differently \({message}"):
            train_splits(base, splits, runs, TrainConfig(**{**LORA, **change}), split_index=0)
    # Checkpoints of a killed LoRA run are not resumed with another alpha.
    with pytest.raises(Killed):
        train_splits(base, splits, tmp_path, TrainConfig(**LORA), split_index=0, callbacks=[KillAfterSave(2)])
    with pytest.raises(TaskvecError, match=r"checkpoints of another run \(lora_alpha was 8.0, now 16.0\)"):
        train_splits(base, splits, tmp_path, TrainConfig(**{**LORA, "lora_alpha": 16.0}), split_index=0)


def test_a_changed_deepspeed_config_is_refused(lora_run, base, tmp_path, monkeypatch):
    """The config's contents are recorded, so it counts even though deepspeed is not installed here."""
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: object())
    edited = tmp_path / "ds.json"
    edited.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    with pytest.raises(TaskvecError, match=r"trained differently \(deepspeed was None, now \{'zero_optimization'"):
        train_splits(base, lora_run / "splits", lora_run / "runs",
                     TrainConfig(**{**LORA, "deepspeed": str(edited)}), split_index=0)
    edited.write_text('{"zero_optimization": ')
    with pytest.raises(TaskvecError, match=r"ds.json: not valid JSON"):
        train_splits(base, lora_run / "splits", lora_run / "runs",
                     TrainConfig(**{**LORA, "deepspeed": str(edited)}), split_index=0)


def test_runs_recorded_before_the_new_settings_still_count_as_finished(lora_run, base, tmp_path):
    """A marker written before these options existed ran with their defaults: not stale."""
    out = finetune(base, TEXTS, tmp_path / "ft", TrainConfig(**FAST), progress=False)
    marker = json.loads((out / MARKER).read_text())
    new = ("lora_rank", "lora_alpha", "lora_target_modules", "lora_dropout", "gradient_checkpointing",
           "optim", "model_dtype", "attn_implementation", "deepspeed")
    marker["run"]["config"] = {k: v for k, v in marker["run"]["config"].items() if k not in new}
    (out / MARKER).write_text(json.dumps(marker))
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    finetune(base, TEXTS, out, TrainConfig(**FAST), progress=False)
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(TaskvecError, match="optim was 'adamw_torch_fused', now 'adamw_torch'"):
        finetune(base, TEXTS, out, TrainConfig(**FAST, optim="adamw_torch"))


# --- memory options -----------------------------------------------------------------------------------


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_gradient_checkpointing_gives_the_same_loss_curve(tmp_path, base, lora):
    settings = dict(LORA if lora else FAST, max_steps=6, logging_steps=1)
    curves = {}
    for checkpointing in (False, True):
        seen = Seen()
        config = TrainConfig(**settings, gradient_checkpointing=checkpointing)
        finetune(base, TEXTS, tmp_path / str(checkpointing), config, progress=False, callbacks=[seen])
        inner = seen.model.base_model.model if lora else seen.model
        assert inner.is_activation_checkpointing == checkpointing
        curves[checkpointing] = seen.losses
    # Recomputing a layer's forward pass in the backward pass repeats the same float32 operations
    # with the same dropout masks (the RNG state is restored), so the curves agree to float32
    # rounding (measured on CPU: identical). Other dropout masks (seed 1) change the curve by
    # 4e-3 relative, a gradient lost through a checkpoint (frozen LoRA inputs) stops the descent;
    # 1e-5 separates them.
    assert len(curves[True]) == 6 and curves[True][-1] < curves[True][0]
    assert curves[True] == pytest.approx(curves[False], rel=1e-5, abs=0)


def test_options_reach_the_trainer_and_the_model(tmp_path, base):
    seen = Seen()
    config = TrainConfig(**LORA, optim="adamw_torch", gradient_checkpointing=True, model_dtype="bfloat16",
                         attn_implementation="eager", lora_dropout=0.05, lora_target_modules=("c_attn", "c_proj"))
    out = finetune(base, TEXTS, tmp_path / "ft", config, progress=False, callbacks=[seen])
    assert seen.args.optim == "adamw_torch" and seen.args.activation_checkpointing
    assert seen.args.deepspeed is None
    optimizer = seen.optimizer.optimizer  # inside accelerate's wrapper
    assert isinstance(optimizer, torch.optim.AdamW) and not optimizer.defaults["fused"]
    inner = seen.model.base_model.model
    assert inner.config._attn_implementation == "eager"
    dtypes = {name: p.dtype for name, p in seen.model.named_parameters()}
    assert {d for n, d in dtypes.items() if "lora_" not in n} == {torch.bfloat16}  # the frozen base
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}  # the trained adapter
    lora = seen.model.peft_config["default"]
    assert (lora.r, lora.lora_alpha, lora.lora_dropout, sorted(lora.target_modules)) == (
        4, 8.0, 0.05, ["c_attn", "c_proj"])
    recorded = json.loads((out / MARKER).read_text())["run"]["config"]
    assert {k: recorded[k] for k in ("optim", "gradient_checkpointing", "model_dtype", "attn_implementation",
                                     "lora_dropout", "lora_target_modules")} == {
        "optim": "adamw_torch", "gradient_checkpointing": True, "model_dtype": "bfloat16",
        "attn_implementation": "eager", "lora_dropout": 0.05, "lora_target_modules": ["c_attn", "c_proj"]}

    seen = Seen()
    finetune(base, TEXTS, tmp_path / "default", TrainConfig(**FAST), progress=False, callbacks=[seen])
    assert seen.args.optim == "adamw_torch_fused" and not seen.args.activation_checkpointing
    assert seen.optimizer.optimizer.defaults["fused"]
    assert seen.model.config._attn_implementation == "sdpa"  # transformers' choice
    assert {p.dtype for p in seen.model.parameters()} == {torch.float32}


def test_deepspeed_config_reaches_the_training_arguments(tmp_path, base, monkeypatch):
    """deepspeed is not installed here, so the TrainingArguments call itself is captured."""
    import taskvec.train

    captured = {}

    def capture(**kwargs):
        captured.update(kwargs)
        raise Killed

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: object())
    monkeypatch.setattr(taskvec.train, "TrainingArguments", capture)
    with pytest.raises(Killed):
        finetune(base, TEXTS, tmp_path / "ft", TrainConfig(**LORA, deepspeed=str(ZERO3)))
    paper = json.loads(ZERO3.read_text())
    assert captured["deepspeed"] == paper
    # The paper's Llama-2-7B settings (merge_to_detoxify config/ds_config.json).
    zero = paper["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_gather_16bit_weights_on_model_save"] and paper["bf16"]["enabled"]
    assert paper["train_micro_batch_size_per_gpu"] == paper["gradient_accumulation_steps"] == "auto"


def test_fsdp_example_is_an_accelerate_config():
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(EXAMPLES / "accelerate" / "fsdp-bf16.yaml"))
    assert config.distributed_type == "FSDP" and config.mixed_precision == "bf16"
    assert config.fsdp_config["fsdp_sharding_strategy"] == "FULL_SHARD"
    assert config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # a whole model on save


def test_sharded_saves_are_cast_to_the_stored_dtype(tmp_path, tokenizer):
    """DeepSpeed saves its bf16 copy; the split must be in the base's dtype for merge."""
    model_dir = make_base(tmp_path / "saved", tokenizer, dropout=0.0, dtype=torch.bfloat16)
    original = load_file(model_dir / "model.safetensors")
    save_file(original, model_dir / "model.safetensors", metadata={"format": "pt"})
    cast_saved_weights(model_dir, torch.float16)
    cast = load_file(model_dir / "model.safetensors")
    assert cast.keys() == original.keys() and {t.dtype for t in cast.values()} == {torch.float16}
    assert all(torch.equal(cast[k], original[k].to(torch.float16)) for k in cast)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    assert model.dtype == torch.float16


# --- bad settings and missing packages ----------------------------------------------------------------


@pytest.mark.parametrize("args, module, install", [
    (["--optim", "paged_adamw_32bit"], "bitsandbytes", "pip install bitsandbytes"),
    (["--optim", "adamw_bnb_8bit"], "bitsandbytes", "pip install bitsandbytes"),
    (["--attn-implementation", "flash_attention_2"], "flash_attn", "pip install flash-attn"),
    (["--deepspeed", ZERO3], "deepspeed", "pip install deepspeed"),
    (["--lora-rank", 4], "peft", "pip install 'taskvec[lora]'"),
])
def test_a_missing_optional_package_is_one_line(lora_run, base, tmp_path, monkeypatch, args, module, install):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: None if name == module else real(name, *rest))
    result = run("train-splits", lora_run / "splits", "--base", base, "-o", tmp_path / "out", *args)
    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1, result.output
    assert install in result.output and module in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    (["--model-dtype", "bfloat16"], "model_dtype bfloat16 would train every weight in bfloat16"),
    (["--lora-alpha", 8], "lora_alpha is a LoRA setting; set lora_rank"),
    (["--lora-rank", 4, "--lora-target-modules", "no_such_module"], "cannot add LoRA adapters"),
    (["--lora-rank", 4, "--lora-target-modules", ","], "lora_target_modules must be module names"),
    (["--deepspeed", "missing.json"], "missing.json: cannot read"),
])
def test_bad_settings_are_one_line(lora_run, base, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *rest: object() if name == "deepspeed" else real(name, *rest))
    result = run("train-splits", lora_run / "splits", "--base", base, "-o", tmp_path / "out", *args)
    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1, result.output
    assert message in result.output
    assert not (tmp_path / "out").exists()


# --- LoRA splits -> taskvec merge ---------------------------------------------------------------------


def test_merge_negates_the_mean_of_the_lora_task_vectors(lora_run, base):
    from peft import PeftModel

    runs, out, scale = lora_run / "runs", lora_run / "merged", 0.7
    splits = [runs / "split-00", runs / "split-01"]
    result = run("merge", "--base", base, "--scale", scale, "-o", out, *splits)
    assert result.exit_code == 0, result.output
    merged, base_weights = load_dir(out), load_dir(base)
    assert merged.keys() == base_weights.keys()

    # From the saved factors, in float64: delta = B A * alpha / r, transposed for GPT-2's Conv1D,
    # whose weights are stored (in, out).
    deltas = {name: torch.zeros_like(w, dtype=torch.float64) for name, w in base_weights.items()}
    for split in splits:
        config = json.loads((split / "adapter_config.json").read_text())
        factors = load_file(split / "adapter_model.safetensors")
        for key in (k for k in factors if ".lora_A." in k):
            a, b = factors[key].double(), factors[key.replace(".lora_A.", ".lora_B.")].double()
            delta = b @ a * config["lora_alpha"] / config["r"]
            target = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
            deltas[target] += (delta.T if config["fan_in_fan_out"] else delta) / len(splits)
    # PEFT's own route: merge_and_unload each adapter into the base, average the merged deltas.
    peft_deltas = {name: torch.zeros_like(w, dtype=torch.float64) for name, w in base_weights.items()}
    for split in splits:
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), split).merge_and_unload()
        state = model.state_dict()
        for name in peft_deltas:
            peft_deltas[name] += (state[name].double() - base_weights[name].double()) / len(splits)

    assert max(d.abs().max().item() for d in deltas.values()) > 1e-4  # trained: a wrong delta would show
    assert {n for n, d in deltas.items() if d.abs().max() > 0} == {f"transformer.h.{i}.attn.c_attn.weight"
                                                                   for i in range(2)}
    for name, value in merged.items():
        expected = base_weights[name].double() - scale * deltas[name]
        # float32 rounding of weights of magnitude <= 1 (the base, LayerNorm scales) is < 1e-7;
        # a transposition, a missing alpha / r or a sum instead of a mean is off by > 1e-4.
        assert torch.allclose(value.double(), expected, rtol=0, atol=1e-6), name
        assert torch.allclose(deltas[name], peft_deltas[name], rtol=0, atol=1e-6), name
