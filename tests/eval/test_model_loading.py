"""taskvec.hf: the one loader training and evaluation share, and the one-line error text helper."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from taskvec.errors import TaskvecError, brief
from taskvec.hf import load_causal_lm


def test_brief_keeps_one_short_line():
    assert brief(ValueError("first  line\n\nsecond\nlast line")) == "first line"
    assert brief(ValueError("first\nlast   line\n"), last=True) == "last line"
    assert brief(KeyError()) == "KeyError"
    long = brief(OSError("x" * 500), limit=50)
    assert len(long) == 50 and long.endswith("...")
    words = brief(OSError("connection refused by the remote host " * 20), limit=50)
    assert words == "connection refused by the remote host..."  # not cut mid-word


@pytest.fixture(scope="module")
def bf16_lm(tiny_lm, tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("bf16") / "tiny-bf16"
    AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.bfloat16).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_lm).save_pretrained(path)
    return path


def test_loads_in_the_stored_dtype_unless_told(bf16_lm):
    model, tokenizer, stored = load_causal_lm(bf16_lm)
    assert stored == torch.bfloat16 and next(model.parameters()).dtype == torch.bfloat16
    assert tokenizer("a b").input_ids
    model, _, stored = load_causal_lm(bf16_lm, dtype=torch.float32)
    assert stored == torch.bfloat16 and next(model.parameters()).dtype == torch.float32


def test_weights_missing_from_the_head_are_refused(tiny_lm, tmp_path):
    """An untied checkpoint without lm_head would load with a random head: refused instead."""
    from transformers import AutoConfig, AutoTokenizer

    path = tmp_path / "headless"
    config = AutoConfig.from_pretrained(tiny_lm)
    config.tie_word_embeddings = False
    config.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_lm).save_pretrained(path)
    weights = {k: v for k, v in load_file(tiny_lm / "model.safetensors").items() if not k.startswith("lm_head")}
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(TaskvecError, match=r"is not a causal language model: its weights lack lm_head.weight"):
        load_causal_lm(path)


def test_a_directory_without_tokenizer_files_is_refused(tiny_lm, tmp_path):
    """transformers builds an empty tokenizer there, which later reads as 'no tokens in the text'."""
    path = tmp_path / "weights-only"
    path.mkdir()
    for name in ("config.json", "model.safetensors"):
        (path / name).write_bytes((tiny_lm / name).read_bytes())
    with pytest.raises(TaskvecError, match="no usable tokenizer"):
        load_causal_lm(path)
