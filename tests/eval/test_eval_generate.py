"""Batched, left-padded sampling: record layout, seeding, and agreement with unpadded decoding."""

import pytest
import torch

from taskvec.errors import TaskvecError
from taskvec.eval import generate

PROMPTS = ["The cat", "Researchers measure how toxic the generations", "A"]


def test_records_layout(tiny_loaded):
    model, tokenizer = tiny_loaded
    records = generate(model, tokenizer, PROMPTS, samples=3, max_new_tokens=6, batch_size=4, progress=False)
    assert [(r["prompt_id"], r["sample"]) for r in records] == [(i, j) for i in range(3) for j in range(3)]
    assert all(r["prompt"] == PROMPTS[r["prompt_id"]] for r in records)
    assert all(isinstance(r["continuation"], str) for r in records)


def test_seeded_and_leaves_global_rng_alone(tiny_loaded):
    model, tokenizer = tiny_loaded
    state = torch.random.get_rng_state()
    first = generate(model, tokenizer, PROMPTS, samples=4, max_new_tokens=8, seed=1, progress=False)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert generate(model, tokenizer, PROMPTS, samples=4, max_new_tokens=8, seed=1, progress=False) == first
    other = generate(model, tokenizer, PROMPTS, samples=4, max_new_tokens=8, seed=2, progress=False)
    assert [r["continuation"] for r in other] != [r["continuation"] for r in first]


def greedy_unpadded(model, tokenizer, prompt, steps):
    """Argmax decoding of one prompt, one full forward pass per token: no padding, no cache."""
    ids = tokenizer(prompt)["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(steps):
            token = model(torch.tensor([ids + new])).logits[0, -1].argmax().item()
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
    return tokenizer.decode(new, skip_special_tokens=True)


def test_left_padded_batches_match_unpadded_decoding(tiny_loaded):
    # a nucleus this small keeps only the most likely token: sampling becomes argmax decoding, so
    # prompts of different lengths in one left-padded batch must decode as they do alone
    model, tokenizer = tiny_loaded
    records = generate(model, tokenizer, PROMPTS, samples=2, max_new_tokens=10, top_p=1e-9,
                       batch_size=6, progress=False)
    for r in records:
        assert r["continuation"] == greedy_unpadded(model, tokenizer, r["prompt"], 10)


def test_long_prompt_keeps_its_end(tiny_loaded):
    model, tokenizer = tiny_loaded
    long_prompt = " ".join(["the cat sat on the mat"] * 30)  # far beyond the 64 positions
    records = generate(model, tokenizer, [long_prompt], samples=1, max_new_tokens=8, top_p=1e-9, progress=False)
    tail = tokenizer.decode(tokenizer(long_prompt)["input_ids"][-(64 - 8):])
    assert records[0]["continuation"] == greedy_unpadded(model, tokenizer, tail, 8)


@pytest.mark.parametrize("kwargs, message", [
    ({"samples": 0}, "at least 1"),
    ({"top_p": 0.0}, "top_p"),
    ({"temperature": 0.0}, "temperature"),
    ({"max_new_tokens": 64}, "no room for a prompt"),
])
def test_bad_settings(tiny_loaded, kwargs, message):
    model, tokenizer = tiny_loaded
    with pytest.raises(TaskvecError, match=message):
        generate(model, tokenizer, PROMPTS, progress=False, **kwargs)


def test_empty_prompts(tiny_loaded):
    model, tokenizer = tiny_loaded
    with pytest.raises(TaskvecError, match="no prompts"):
        generate(model, tokenizer, [], progress=False)
    with pytest.raises(TaskvecError, match="empty strings"):
        generate(model, tokenizer, ["ok", ""], progress=False)
