"""A tiny random GPT-2 with a byte-level BPE tokenizer trained here, saved as a model directory."""

import pytest
import torch
from tiny_lm import EOS, build_tokenizer


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (2 threads on a shared, busy machine are 20x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory):
    """Path of a 2-layer GPT-2 (n_embd 32, 64 positions) with its tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = build_tokenizer()
    eos = tokenizer.convert_tokens_to_ids(EOS)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=len(tokenizer),
                        bos_token_id=eos, eos_token_id=eos)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    path = tmp_path_factory.mktemp("tiny-lm") / "tiny-gpt2"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_loaded(tiny_lm):
    from taskvec.eval import load_model

    return load_model(tiny_lm, device="cpu")
