"""The offline scorers, Detoxify's offline failure and its loading path with a tiny checkpoint."""

import pytest
import torch

from taskvec.errors import TaskvecError
from taskvec.eval import get_scorer, score_texts

PROFANE, CLEAN = "you are a fucking idiot", "thank you for the lovely afternoon"


def test_unknown_scorer_lists_choices():
    with pytest.raises(TaskvecError, match="unknown scorer 'toxic-o-meter': choose from detoxify, perspective"):
        get_scorer("toxic-o-meter")


def test_unknown_option_is_a_clear_error():
    with pytest.raises(TaskvecError, match="scorer 'profanity' does not take that option"):
        get_scorer("profanity", checkpoint="x.ckpt")


def test_profanity_scorer():
    scorer = get_scorer("profanity")
    profane, clean, empty = scorer.score([PROFANE, CLEAN, ""])
    assert 0.0 <= clean < 0.5 < profane <= 1.0 and 0.0 <= empty <= 1.0
    assert scorer.score([]) == []


def test_better_profanity_scorer():
    assert get_scorer("better-profanity").score([PROFANE, CLEAN, ""]) == [1.0, 0.0, 0.0]


def test_score_texts_batches_and_checks_range():
    class Echo:
        name, settings, batch_size = "echo", {}, 2
        calls = []

        def score(self, texts):
            self.calls.append(len(texts))
            return [float(t) for t in texts]

    assert score_texts(Echo(), ["0.1", "0.2", "0.3"], progress=False) == [0.1, 0.2, 0.3]
    assert Echo.calls == [2, 1]
    with pytest.raises(TaskvecError, match="returned 1.5, outside"):
        score_texts(Echo(), ["0.1", "1.5"], progress=False)


def test_detoxify_offline_error(tmp_path, monkeypatch):
    # an empty torch hub cache and a proxy that refuses connections: the download fails at once
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    for variable in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(variable, "http://127.0.0.1:9")
    with pytest.raises(TaskvecError, match=r"cannot load the Detoxify model 'unbiased' .*--detoxify-checkpoint "
                                           r"FILE .*--scorer profanity"):
        get_scorer("detoxify")


def test_detoxify_missing_checkpoint(tmp_path):
    with pytest.raises(TaskvecError, match="checkpoint .*missing.ckpt does not exist"):
        get_scorer("detoxify", checkpoint=tmp_path / "missing.ckpt")


def tiny_detoxify_checkpoint(directory, classes):
    """A Detoxify checkpoint as its training code saves one (config + state_dict), for a 1-layer
    BERT whose config and tokenizer live in `directory` (Detoxify's `model_type`)."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "you", "are", "nice", "an", "idiot", "hello"]
    (directory / "vocab.txt").write_text("\n".join(words) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(directory / "vocab.txt"))
    config = BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, num_labels=len(classes))
    torch.manual_seed(0)
    model = BertForSequenceClassification(config).eval()
    config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    checkpoint = {"config": {"arch": {"args": {"model_type": str(directory),
                                                "model_name": "BertForSequenceClassification",
                                                "tokenizer_name": "BertTokenizerFast",
                                                "num_classes": len(classes)}},
                             "dataset": {"args": {"classes": classes}}},
                  "state_dict": model.state_dict()}
    torch.save(checkpoint, directory / "tiny.ckpt")
    return directory / "tiny.ckpt", model, tokenizer


def test_detoxify_with_a_local_checkpoint(tmp_path):
    # Detoxify renames the Jigsaw class "toxic" to "toxicity"; the scorer reads that column
    path, model, tokenizer = tiny_detoxify_checkpoint(tmp_path, ["insult", "toxic"])
    scorer = get_scorer("detoxify", checkpoint=path)
    texts = ["you are nice", "you are an idiot", "hello"]
    with torch.no_grad():
        expected = torch.sigmoid(model(**tokenizer(texts, return_tensors="pt", padding=True)).logits)[:, 1]
    assert scorer.score(texts) == pytest.approx(expected.tolist(), abs=1e-6)
    assert scorer.score(["hello"]) == pytest.approx([expected[2].item()], abs=1e-6)  # one text: a list too
    assert scorer.settings == {"model_type": None, "checkpoint": str(path)}


def test_detoxify_checkpoint_without_toxicity(tmp_path):
    path, _, _ = tiny_detoxify_checkpoint(tmp_path, ["insult", "obscene"])
    with pytest.raises(TaskvecError, match="has no 'toxicity' class"):
        get_scorer("detoxify", checkpoint=path)
