"""`--scorer hf:MODEL`: any text-classification model, checked against the model run directly."""

import json

import pytest
import torch
from click.testing import CliRunner

from taskvec.cli import main
from taskvec.errors import TaskvecError
from taskvec.eval import get_scorer
from taskvec.eval.hf_classifier import toxic_label

TEXTS = ["you are nice", "you are an idiot", "hello", ""]
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "you", "are", "nice", "an", "idiot", "hello"]


def tiny_classifier(path, id2label=None, tokenizer_dir=None):
    """A 1-layer BERT text classifier saved with save_pretrained (safetensors), its tokenizer beside
    it or, with tokenizer_dir, only there (as toxigen_hatebert borrows bert-base-uncased's)."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    id2label = id2label or {0: "LABEL_0", 1: "LABEL_1"}
    home = tokenizer_dir or path
    home.mkdir(parents=True, exist_ok=True)
    (home / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(home / "vocab.txt"))
    tokenizer.save_pretrained(home)
    config = BertConfig(vocab_size=len(WORDS), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, id2label=id2label, label2id={v: k for k, v in id2label.items()})
    torch.manual_seed(0)
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(path)
    return model, tokenizer


def direct(model, tokenizer, texts, index):
    with torch.no_grad():
        logits = model(**tokenizer(texts, return_tensors="pt", padding=True)).logits
    return torch.softmax(logits, dim=-1)[:, index].tolist()


def test_scores_are_the_toxic_labels_probability(tmp_path):
    model, tokenizer = tiny_classifier(tmp_path / "clf", {0: "non-toxic", 1: "neutral", 2: "toxic"})
    scorer = get_scorer(f"hf:{tmp_path / 'clf'}", batch_size=3)
    assert scorer.settings["label"] == "toxic" and scorer.batch_size == 3
    assert scorer.score(TEXTS) == pytest.approx(direct(model, tokenizer, TEXTS, 2), abs=1e-6)
    assert get_scorer(f"hf:{tmp_path / 'clf'}", label="neutral").score(TEXTS) == pytest.approx(
        direct(model, tokenizer, TEXTS, 1), abs=1e-6)


def test_score_command_with_a_separate_tokenizer(tmp_path):
    model, tokenizer = tiny_classifier(tmp_path / "clf", tokenizer_dir=tmp_path / "tok")
    (tmp_path / "gen.csv").write_text("prompt,continuation\n" + "".join(f"p{i},{t}\n" for i, t in enumerate(TEXTS)))
    result = CliRunner().invoke(main, ["score", str(tmp_path / "gen.csv"), "--scorer", f"hf:{tmp_path / 'clf'}",
                                       "--hf-tokenizer", str(tmp_path / "tok"), "--hf-batch-size", "2"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    output = tmp_path / "gen-hf-clf"  # the default output name is one path component
    records = [json.loads(line) for line in (output / "generations.jsonl").read_text().splitlines()]
    assert [r["score"] for r in records] == pytest.approx(direct(model, tokenizer, TEXTS, 1), abs=1e-6)
    scorer = json.loads((output / "summary.json").read_text())["scorer"]
    assert scorer == {"name": f"hf:{tmp_path / 'clf'}", "model": str(tmp_path / "clf"),
                      "tokenizer": str(tmp_path / "tok"), "label": "LABEL_1", "batch_size": 2}


@pytest.mark.parametrize(("id2label", "label", "expected"), [
    ({0: "LABEL_0", 1: "LABEL_1"}, None, 1),
    ({0: "not_hate", 1: "hate"}, None, 1),
    ({0: "Toxic", 1: "Non-Toxic"}, None, 0),
    ({0: "NOT", 1: "OFFENSIVE"}, None, 1),
    ({0: "toxicity"}, None, 0),
    ({0: "a", 1: "B"}, "b", 1),
    ({0: "a", 1: "b"}, "0", 0),
])
def test_toxic_label(id2label, label, expected):
    assert toxic_label(id2label, label, "m") == expected


def test_label_errors(tmp_path):
    with pytest.raises(TaskvecError, match=r"^m: cannot tell which label is toxic among toxic, severe_toxic, "
                                           r"insult; pass --hf-label NAME$"):
        toxic_label({0: "toxic", 1: "severe_toxic", 2: "insult"}, None, "m")
    tiny_classifier(tmp_path / "clf")
    with pytest.raises(TaskvecError, match=r"clf has no label 'nope' \(its labels: LABEL_0, LABEL_1\)$"):
        get_scorer(f"hf:{tmp_path / 'clf'}", label="nope")


class Hostile:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_bad_models_are_one_line_errors(tmp_path, tiny_lm, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def error(*args):
        result = CliRunner().invoke(main, ["score", str(tmp_path / "g.csv"), "-o", str(tmp_path / "out"), *args])
        assert result.exit_code == 1 and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1 and result.output.startswith("Error: ")
        return result.output

    (tmp_path / "g.csv").write_text("prompt,continuation\nHi,there\n")
    (tmp_path / "empty").mkdir()
    assert "empty: not a loadable text-classification model" in error("--scorer", f"hf:{tmp_path / 'empty'}")
    assert "is not a text-classification model: its weights lack score.weight" in error("--scorer", f"hf:{tiny_lm}")
    assert "applies to --scorer hf:MODEL, not profanity" in error("--scorer", "profanity", "--hf-label", "x")
    # pytorch_model.bin is unpickled with weights_only=True: a hostile one is refused, never run
    tiny_classifier(tmp_path / "evil")
    (tmp_path / "evil" / "model.safetensors").unlink()
    torch.save({"classifier.weight": Hostile(tmp_path / "pwned")}, tmp_path / "evil" / "pytorch_model.bin")
    assert "evil: not a loadable text-classification model (UnpicklingError" in error(
        "--scorer", f"hf:{tmp_path / 'evil'}")
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out").exists()
