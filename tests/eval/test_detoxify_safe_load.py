"""Detoxify checkpoints are read with weights_only=True: a hostile pickle is refused, not run."""

import pytest
import torch
from click.testing import CliRunner

from taskvec.cli import main
from taskvec.errors import TaskvecError
from taskvec.eval import get_scorer

HUB_NAME = "toxic_debiased-c7548aa0.ckpt"  # where Detoxify's `unbiased` checkpoint sits in the hub cache


class Hostile:
    """Unpickling this calls open(marker, "w"): code run by merely loading the file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def hostile_checkpoint(path, marker):
    torch.save({"config": Hostile(marker), "state_dict": {}}, path)
    return path


def tiny_checkpoint(directory):
    """A Detoxify-shaped checkpoint (config + state_dict, saved with torch.save as Detoxify's
    convert_weights.py does) of a 1-layer BERT whose config and tokenizer are in `directory`."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "you", "are", "nice", "an", "idiot"]
    (directory / "vocab.txt").write_text("\n".join(words) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(directory / "vocab.txt"))
    config = BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, num_labels=2)
    torch.manual_seed(1)
    model = BertForSequenceClassification(config).eval()
    config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    arch = {"model_type": str(directory), "model_name": "BertForSequenceClassification",
            "tokenizer_name": "BertTokenizerFast", "num_classes": 2}
    checkpoint = {"config": {"arch": {"args": arch}, "dataset": {"args": {"classes": ["obscene", "toxic"]}}},
                  "state_dict": model.state_dict()}
    return checkpoint, model, tokenizer


def offline(monkeypatch, torch_home):
    """An own torch hub cache and a proxy that refuses connections: nothing can be downloaded."""
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    for variable in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(variable, "http://127.0.0.1:9")


def test_hostile_checkpoint_is_refused_on_the_command_line(tmp_path):
    marker = tmp_path / "pwned"
    evil = hostile_checkpoint(tmp_path / "evil.ckpt", marker)
    (tmp_path / "t.csv").write_text("prompt,continuation\nHi,there\n")
    result = CliRunner().invoke(main, ["score", str(tmp_path / "t.csv"), "-o", str(tmp_path / "out"),
                                       "--scorer", "detoxify", "--detoxify-checkpoint", str(evil)])
    assert result.exit_code == 1 and not marker.exists() and not (tmp_path / "out").exists()
    assert result.output.splitlines() == [
        f"Error: {evil}: refused: loading it would unpickle io.open, which can run code; "
        "only checkpoints of tensors and plain containers are loaded"]


def test_hostile_checkpoint_in_the_hub_cache_is_refused(tmp_path, monkeypatch):
    offline(monkeypatch, tmp_path / "torch")
    (tmp_path / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    marker = tmp_path / "pwned"
    hostile_checkpoint(tmp_path / "torch" / "hub" / "checkpoints" / HUB_NAME, marker)
    with pytest.raises(TaskvecError, match=f"{HUB_NAME}: refused: loading it would unpickle io.open"):
        get_scorer("detoxify")
    assert not marker.exists()


def test_a_tiny_checkpoint_in_the_hub_cache_loads_and_scores(tmp_path, monkeypatch):
    offline(monkeypatch, tmp_path / "torch")
    checkpoint, model, tokenizer = tiny_checkpoint(tmp_path)
    (tmp_path / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(checkpoint, tmp_path / "torch" / "hub" / "checkpoints" / HUB_NAME)
    texts = ["you are nice", "you are an idiot", ""]
    with torch.no_grad():  # Detoxify.predict: sigmoid of the logits; "toxic" is renamed "toxicity"
        logits = model(**tokenizer(texts, return_tensors="pt", padding=True)).logits
    scorer = get_scorer("detoxify")
    assert scorer.score(texts) == pytest.approx(torch.sigmoid(logits[:, 1]).tolist(), abs=1e-6)
    assert scorer.settings == {"model_type": "unbiased", "checkpoint": None}


@pytest.mark.parametrize(("change", "message"), [
    (lambda c: c.pop("state_dict"), "not a Detoxify checkpoint .*needs config.arch.args"),
    (lambda c: c["config"]["dataset"]["args"].update(classes="toxic"), "has the wrong types"),
    (lambda c: c["config"]["arch"]["args"].update(model_name="AutoConfig"),
     "model_name 'AutoConfig' is not a transformers PreTrainedModel class"),
    (lambda c: c["config"]["arch"]["args"].update(tokenizer_name="is_torch_available"),
     "tokenizer_name 'is_torch_available' is not a transformers PreTrainedTokenizerBase class"),
])
def test_malformed_checkpoints_are_one_line_errors(tmp_path, change, message):
    checkpoint, _, _ = tiny_checkpoint(tmp_path)
    change(checkpoint)
    torch.save(checkpoint, tmp_path / "bad.ckpt")
    with pytest.raises(TaskvecError, match=message):
        get_scorer("detoxify", checkpoint=tmp_path / "bad.ckpt")


def test_a_file_that_is_no_checkpoint(tmp_path):
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(TaskvecError, match="junk.ckpt: not a readable Detoxify checkpoint"):
        get_scorer("detoxify", checkpoint=tmp_path / "junk.ckpt")
