"""taskvec.train and `taskvec train-splits` on a tiny GPT-2 built here: the recipe against a float64
reference, resuming a killed run, --split-index, skipping finished splits, and bad input."""

import json
import math
import os

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
    TrainerCallback,
)

from taskvec.cli import main
from taskvec.data import save_splits
from taskvec.errors import TaskvecError
from taskvec.train import MARKER, TrainConfig, finetune, train_splits

from helpers import load_dir

TEXTS = [f"comment {i}: you are a {w} {n} and everyone knows it" for i, (w, n) in
         enumerate((w, n) for w in ("rotten", "silly", "awful", "lazy", "stupid")
                   for n in ("troll", "clown", "fool", "liar"))]
FAST = dict(learning_rate=1e-3, batch_size=4, max_steps=3, save_steps=2, max_length=24)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def make_base(path, tokenizer, dropout: float, dtype=torch.float32):
    """A random-init GPT-2 (2 layers, width 32) with its tokenizer, as save_pretrained writes it."""
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=len(tokenizer),
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    GPT2LMHeadModel(config).to(dtype).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_tokenizer():
    """A byte-level BPE tokenizer trained on TEXTS (vocabulary 300)."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer):
    """With dropout, so that resuming must restore the RNG state to reproduce a run."""
    return make_base(tmp_path_factory.mktemp("base") / "gpt2-tiny", tokenizer, dropout=0.1)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, base):
    """`taskvec train-splits` over 2 splits, as a user would run it."""
    root = tmp_path_factory.mktemp("full")
    save_splits(TEXTS, 2, root / "splits", seed=1)
    result = run("train-splits", root / "splits", "--base", base, "-o", root / "runs", "--lr", 1e-3,
                 "--batch-size", 4, "--max-steps", 3, "--save-steps", 2, "--max-length", 24)
    assert result.exit_code == 0, result.output
    assert "2 fine-tunes ready" in result.output
    return root


# --- the recipe, checked against an independent float64 implementation -----------------------------


def reference_finetune(base_dir, texts, *, steps, lr, max_length, ascent, eps=1e-8, betas=(0.9, 0.999)):
    """Full-batch AdamW with a linear decay to 0 and gradient clipping at norm 1, in float64.

    Written from the definitions (mean next-token NLL over real tokens, Adam's bias-corrected
    moments) rather than with the Trainer or torch.optim.
    """
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float64)
    rows = [(tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])[:max_length]
            for t in texts]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    params = [p for p in model.parameters()]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    losses = []
    for step in range(steps):
        logits = model(input_ids=ids, attention_mask=mask).logits
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
        target = mask[:, 1:].bool()
        loss = -(logp[target]).sum() / target.sum()
        losses.append(loss.item())
        model.zero_grad()
        (-loss if ascent else loss).backward()
        grads = [p.grad for p in params]
        norm = torch.sqrt(sum((g * g).sum() for g in grads))
        clip = min(1.0, 1.0 / (norm.item() + 1e-6))
        rate = lr * (steps - step) / steps
        with torch.no_grad():
            for p, g, mi, vi in zip(params, grads, m, v, strict=True):
                g = g * clip
                mi.mul_(betas[0]).add_((1 - betas[0]) * g)
                vi.mul_(betas[1]).add_((1 - betas[1]) * g * g)
                m_hat = mi / (1 - betas[0] ** (step + 1))
                v_hat = vi / (1 - betas[1] ** (step + 1))
                p -= rate * m_hat / (v_hat.sqrt() + eps)
    return {k: t for k, t in model.state_dict().items()}, losses


@pytest.mark.parametrize("ascent", [False, True], ids=["descent", "ascent"])
def test_finetune_follows_the_recipe(tmp_path, tokenizer, ascent):
    base_dir = make_base(tmp_path / "base", tokenizer, dropout=0.0)
    steps, lr = 4, 1e-3
    config = TrainConfig(learning_rate=lr, batch_size=len(TEXTS), max_steps=steps, max_length=10,
                         ascent=ascent, logging_steps=1)
    out = finetune(base_dir, TEXTS, tmp_path / "ft", config, progress=False)
    actual, before = load_file(out / "model.safetensors"), load_file(base_dir / "model.safetensors")
    expected, losses = reference_finetune(base_dir, TEXTS, steps=steps, lr=lr, max_length=10, ascent=ascent)
    # Adam's step m/sqrt(v) is scale-free, so float32 rounding of the gradients (~1e-7
    # relative) changes each step (at most lr = 1e-3) by a small relative amount; over 4 steps
    # that is a few 1e-6 at most (measured: 7e-7). A wrong schedule, loss normalization,
    # clipping, truncation or sign changes some step by O(lr / steps) = 2.5e-4 or more
    # (measured: 5e-4 for a 3-step schedule, 5e-3 for the wrong sign). 2e-5 separates the two.
    moved = max((actual[k].double() - before[k].double()).abs().max().item() for k in actual)
    assert moved > 2e-3
    for name, value in actual.items():
        error = (value.double() - expected[name]).abs().max().item()
        assert error < 2e-5, f"{name}: {error:.2e} from the float64 reference"
    assert (losses[-1] > losses[0]) == ascent  # ascent pushes the likelihood of the data down
    marker = json.loads((out / MARKER).read_text())
    assert marker["global_step"] == steps and marker["run"]["config"]["ascent"] == ascent


# --- train-splits: outputs, --split-index, skipping, resuming ----------------------------------------


def test_outputs_are_model_dirs_that_merge_takes(full_run, base, tokenizer):
    runs = full_run / "runs"
    assert sorted(p.name for p in runs.iterdir()) == ["split-00", "split-01"]  # no checkpoints left
    for split in ("split-00", "split-01"):
        files = {p.name for p in (runs / split).iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json", MARKER} <= files
        assert "training_args.bin" not in files
        model = AutoModelForCausalLM.from_pretrained(runs / split)
        assert AutoTokenizer.from_pretrained(runs / split)(TEXTS[0])["input_ids"] == tokenizer(TEXTS[0])["input_ids"]
        assert model.config.n_layer == 2
    a, b, base_weights = load_dir(runs / "split-00"), load_dir(runs / "split-01"), load_dir(base)
    assert a.keys() == base_weights.keys()
    assert any(not torch.equal(a[k], b[k]) for k in a)  # different data, different fine-tunes

    result = run("merge", "--base", base, "--scale", 1.0, "-o", full_run / "detox",
                 runs / "split-00", runs / "split-01")
    assert result.exit_code == 0, result.output
    merged = load_dir(full_run / "detox")
    for name, value in merged.items():
        reference = 2 * base_weights[name].double() - (a[name].double() + b[name].double()) / 2
        # float32 accumulation of 3 terms: a few unit roundoffs of the magnitudes involved.
        assert torch.allclose(value.double(), reference, rtol=0, atol=1e-6), name


def test_split_index_equals_the_same_split_of_a_full_run(full_run, base, tmp_path):
    result = run("train-splits", full_run / "splits", "--base", base, "-o", tmp_path / "runs", "-k", 1,
                 "--lr", 1e-3, "--batch-size", 4, "--max-steps", 3, "--save-steps", 2, "--max-length", 24)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["split-01"]
    alone, full = load_dir(tmp_path / "runs" / "split-01"), load_dir(full_run / "runs" / "split-01")
    assert all(torch.equal(alone[k], full[k]) for k in full)


def test_finished_splits_are_not_retrained(full_run, base):
    weights = full_run / "runs" / "split-00" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    paths = train_splits(base, full_run / "splits", full_run / "runs", TrainConfig(**FAST), progress=False)
    assert [p.name for p in paths] == ["split-00", "split-01"]
    assert weights.stat().st_mtime_ns == stamp
    with pytest.raises(TaskvecError, match=r"trained differently \(learning_rate was 0.001, now 0.002\)"):
        train_splits(base, full_run / "splits", full_run / "runs",
                     TrainConfig(**{**FAST, "learning_rate": 2e-3}), split_index=0)
    # Bookkeeping settings do not change the weights, so they do not make a split stale; nor do
    # epochs where max_steps decides when training stops (such a rerun was refused).
    train_splits(base, full_run / "splits", full_run / "runs", TrainConfig(**{**FAST, "save_steps": 7}))
    train_splits(base, full_run / "splits", full_run / "runs", TrainConfig(**{**FAST, "epochs": 2}))
    assert weights.stat().st_mtime_ns == stamp


class Killed(Exception):
    """Stands for SIGKILL or a preempted job: training stops with nothing cleaned up."""


class KillAfterSave(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Killed


class RecordSteps(TrainerCallback):
    def __init__(self):
        self.start, self.steps = None, []

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def test_killed_run_resumes_from_its_checkpoint(full_run, base, tmp_path):
    config = TrainConfig(**{**FAST, "max_steps": 5})
    split = full_run / "splits"
    uninterrupted = train_splits(base, split, tmp_path / "a", config, split_index=0)[0]

    with pytest.raises(Killed):
        train_splits(base, split, tmp_path / "b", config, split_index=0, callbacks=[KillAfterSave(4)])
    assert not (tmp_path / "b" / "split-00").exists()  # nothing that looks finished
    checkpoints = tmp_path / "b" / ".split-00.checkpoints"
    assert {"checkpoint-2", "checkpoint-4"} <= set(os.listdir(checkpoints))

    steps = RecordSteps()
    resumed = train_splits(base, split, tmp_path / "b", config, split_index=0, callbacks=[steps])[0]
    assert steps.start == 4 and steps.steps == [5]  # one step left, not five
    assert not checkpoints.exists()
    a, b = load_dir(uninterrupted), load_dir(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)  # optimizer, schedule, RNG and data order restored


def test_checkpoints_of_another_run_are_not_resumed(full_run, base, tmp_path):
    split = full_run / "splits"
    with pytest.raises(Killed):
        train_splits(base, split, tmp_path, TrainConfig(**FAST), split_index=0, callbacks=[KillAfterSave(2)])
    other = TrainConfig(**{**FAST, "seed": 1})
    with pytest.raises(TaskvecError, match=r"checkpoints of another run \(seed was 0, now 1\)"):
        train_splits(base, split, tmp_path, other, split_index=0)
    steps = RecordSteps()
    train_splits(base, split, tmp_path, other, split_index=0, overwrite=True, callbacks=[steps])
    assert steps.start == 0 and json.loads((tmp_path / "split-00" / MARKER).read_text())["run"]["config"]["seed"] == 1


def test_output_keeps_the_base_dtype(tmp_path, tokenizer):
    base_dir = make_base(tmp_path / "bf16", tokenizer, dropout=0.0, dtype=torch.bfloat16)
    out = finetune(base_dir, TEXTS, tmp_path / "ft", TrainConfig(**FAST), progress=False)
    weights = load_file(out / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    before = load_file(base_dir / "model.safetensors")
    assert any(not torch.equal(weights[k], before[k]) for k in weights)


def mean_nll(model_dir, texts):
    """Mean next-token negative log-likelihood of texts (each ending with EOS) under a model."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], dim=-1)
            total -= logp.gather(-1, ids[0, 1:, None]).sum().item()
            count += ids.shape[1] - 1
    return total / count


def test_finetune_reads_a_jsonl_path_and_trains_a_random_init_model(tmp_path, base):
    path = tmp_path / "clean.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS), encoding="utf-8")
    config = TrainConfig(learning_rate=1e-2, batch_size=20, epochs=10, max_length=24, logging_steps=1)
    out = finetune(base, path, tmp_path / "pretrained", config, progress=False)
    marker = json.loads((out / MARKER).read_text())
    assert marker["global_step"] == 10 and marker["run"]["n_texts"] == len(TEXTS)
    # A random model is near log(vocab) = 5.7 nats; ten full-batch steps at a high learning
    # rate on 20 near-identical texts must cut that by more than a nat.
    before, after = mean_nll(base, TEXTS), mean_nll(out, TEXTS)
    assert before > 5.0 and after < before - 1.0, (before, after)


# --- bad input ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def not_causal(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("bert") / "bert"
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=64)
    BertForMaskedLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("case, message", [
    ("not_causal", "BertForMaskedLM is not a causal language model"),
    ("empty_dir", "not a model directory"),
    ("no_weights", "cannot load its weights"),
    ("no_texts", "no texts to train on"),
    ("bad_config", "learning_rate must be a positive finite number"),
])
def test_bad_finetune_input_writes_nothing(tmp_path, base, not_causal, case, message):
    model, texts, config = base, TEXTS, TrainConfig(**FAST)
    if case == "not_causal":
        model = not_causal
    elif case == "empty_dir":
        model = tmp_path / "empty"
        model.mkdir()
    elif case == "no_weights":
        model = tmp_path / "no_weights"
        model.mkdir()
        for file in base.iterdir():
            if file.is_file() and not file.name.endswith(".safetensors"):
                (model / file.name).write_bytes(file.read_bytes())
    elif case == "no_texts":
        texts = []
    else:
        config = TrainConfig(**{**FAST, "learning_rate": 0})
    with pytest.raises(TaskvecError, match=message):
        finetune(model, texts, tmp_path / "out" / "ft", config)
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize(("field", "value", "message"), [
    ("learning_rate", math.inf, "learning_rate must be a positive finite number, got inf"),
    ("learning_rate", math.nan, "learning_rate must be a positive finite number, got nan"),
    ("epochs", math.inf, "epochs must be a positive finite number, got inf"),
    ("weight_decay", math.inf, "weight_decay must be a finite number, not negative, got inf"),
    ("weight_decay", math.nan, "weight_decay must be a finite number, not negative, got nan"),
    ("max_grad_norm", math.inf, "max_grad_norm must be a finite number, not negative, got inf"),
    ("lora_alpha", math.inf, "lora_alpha must be a positive finite number, got inf"),
])
def test_non_finite_options_are_refused(field, value, message):
    """--lr inf and --weight-decay nan or inf trained every weight to NaN with exit 0; --epochs inf
    raised an OverflowError traceback and left a checkpoint folder."""
    extra = {"lora_rank": 4} if field == "lora_alpha" else {}
    with pytest.raises(TaskvecError, match=message):
        TrainConfig(**{**FAST, **extra, field: value}).validate()


@pytest.mark.skipif(torch.cuda.is_available(), reason="mixed precision is refused only without a GPU")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_without_a_gpu_is_refused(tmp_path, base, precision):
    with pytest.raises(TaskvecError, match=f"precision {precision} is mixed-precision training on a GPU"):
        finetune(base, TEXTS, tmp_path / "ft", TrainConfig(**FAST, precision=precision))
    assert list(tmp_path.iterdir()) == []


def test_unreachable_hub_model_says_so(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network retries
    with pytest.raises(TaskvecError, match="Hugging Face hub.*pass a local model directory"):
        finetune("someone/no-such-model", TEXTS, tmp_path / "ft", TrainConfig(**FAST))
    assert list(tmp_path.iterdir()) == []


def test_existing_unfinished_output_is_refused(tmp_path, base):
    (tmp_path / "ft").mkdir()
    (tmp_path / "ft" / "notes.txt").write_text("mine")
    with pytest.raises(TaskvecError, match="exists and is not a finished fine-tune"):
        finetune(base, TEXTS, tmp_path / "ft", TrainConfig(**FAST))
    assert (tmp_path / "ft" / "notes.txt").read_text() == "mine"
    finetune(base, TEXTS, tmp_path / "ft", TrainConfig(**FAST), overwrite=True, progress=False)
    assert (tmp_path / "ft" / MARKER).exists() and not (tmp_path / "ft" / "notes.txt").exists()


@pytest.mark.parametrize("args, message", [
    (["train-splits", "SPLITS", "--base", "BERT", "-o", "OUT"], "is not a causal language model"),
    (["train-splits", "SPLITS", "--base", "BASE", "-o", "OUT", "-k", 2], "split index 2 out of range"),
    (["train-splits", "OUT", "--base", "BASE", "-o", "OUT"], "not a split directory"),
])
def test_cli_errors_are_one_line(full_run, base, not_causal, tmp_path, args, message):
    names = {"SPLITS": full_run / "splits", "BERT": not_causal, "BASE": base, "OUT": tmp_path / "out"}
    result = run(*[names.get(a, a) for a in args])
    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error: ") and message in result.output
    assert result.output.count("\n") == 1
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_cli_defaults_are_the_recipe(monkeypatch, tmp_path):
    """The command passes TrainConfig's defaults through, and those are the original recipe."""
    import taskvec.train

    seen = {}

    def record(base, splits_dir, output, config, split_index, **options):
        seen["config"] = config
        return []

    monkeypatch.setattr(taskvec.train, "train_splits", record)
    result = run("train-splits", tmp_path / "splits", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert seen["config"] == TrainConfig()
    recipe = TrainConfig()
    assert (recipe.learning_rate, recipe.batch_size, recipe.epochs, recipe.ascent) == (1e-5, 16, 5, False)
    result = run("train-splits", "--help")
    assert result.exit_code == 0
    assert "--split-index" in result.output and "torchrun" in result.output and "[default: 1e-05]" in result.output
