"""perplexity() against a token-by-token float64 computation on a tiny GPT-2.

The reference re-derives which context each token gets in the strided recipe (token t is scored
by the first window that reaches past it, from that window's start; a token that starts its
window has no context and is not scored, as in the Hugging Face recipe) and runs the float64
model on exactly that prefix, one token at a time: no windows, no -100 masks, no slicing shared with
the implementation. float32 forward passes on a 2-layer model keep each log-probability within
about 1e-6 of float64, so the mean NLL (and hence log perplexity) agrees to well under 1e-5.
"""

import copy
import math

import pytest
import torch
from tiny_lm import SENTENCES

from taskvec.errors import TaskvecError
from taskvec.eval import perplexity

RTOL = 1e-5


def reference_ppl(model, ids, stride, max_length):
    model64 = copy.deepcopy(model).double()
    n = len(ids)
    ends = [min(begin + max_length, n) for begin in range(0, n, stride)]
    nll, scored = 0.0, 0
    with torch.no_grad():
        for t in range(1, n):
            window = next(k for k, end in enumerate(ends) if end > t)
            context = ids[window * stride:t]
            if context:
                logits = model64(torch.tensor([context])).logits[0, -1]
                nll -= torch.log_softmax(logits, -1)[ids[t]].item()
                scored += 1
    return math.exp(nll / scored)


def corpus_ids(tokenizer, texts):
    return tokenizer("\n\n".join(texts))["input_ids"]


BATCHINGS = [1, 64, 200, 4096]  # tokens per forward pass: one window at a time, a few, many, all


@pytest.mark.parametrize("batch_tokens", BATCHINGS)
@pytest.mark.parametrize("texts, stride, max_length", [
    (SENTENCES[:2], 512, None),   # shorter than the 64-position context: one window
    (SENTENCES * 2, 12, 32),      # strided, overlapping windows; stride does not divide the length
    (SENTENCES * 2, 32, 32),      # windows side by side, no overlap
    (SENTENCES * 2, 512, 40),     # stride beyond the window is cut to it
])
def test_matches_token_by_token_reference(tiny_loaded, texts, stride, max_length, batch_tokens):
    model, tokenizer = tiny_loaded
    ids = corpus_ids(tokenizer, texts)
    window = max_length or model.config.n_positions
    if max_length:
        assert len(ids) > 2 * window  # the strided cases really span several windows
    expected = reference_ppl(model, ids, min(stride, window), window)
    got = perplexity(model, tokenizer, texts, stride=stride, max_length=max_length, batch_tokens=batch_tokens,
                     progress=False)
    assert got == pytest.approx(expected, rel=RTOL)


def forward_batches(model):
    """The batch size of every forward pass the model makes, recorded by a hook."""
    sizes = []
    handle = model.register_forward_hook(lambda _module, args, kwargs, _out: sizes.append(
        (kwargs.get("input_ids") if args == () else args[0]).shape[0]), with_kwargs=True)
    return sizes, handle


@pytest.mark.parametrize("batch_tokens, expected", [
    (1, [1] * 20),                   # at most one 16-token window per pass: the unbatched recipe
    (16, [1] * 20),
    (48, [1, 3, 3, 3, 3, 3, 3, 1]),  # the first window scores from position 1, the others from 8; the last is short
    (4096, [1, 18, 1]),
])
def test_windows_of_one_shape_share_a_forward_pass(tiny_loaded, batch_tokens, expected):
    """Batching only regroups the same windows: same number, each scored as alone."""
    model, tokenizer = tiny_loaded
    ids = corpus_ids(tokenizer, SENTENCES)
    assert len(ids) == 163  # windows at 0, 8, ..., 152; the last one (152..163) is 11 tokens long
    sizes, handle = forward_batches(model)
    try:
        got = perplexity(model, tokenizer, SENTENCES, stride=8, max_length=16, batch_tokens=batch_tokens,
                         progress=False)
    finally:
        handle.remove()
    assert sizes == expected
    alone = perplexity(model, tokenizer, SENTENCES, stride=8, max_length=16, batch_tokens=1, progress=False)
    assert got == pytest.approx(alone, rel=1e-6)


def test_max_tokens_scores_a_prefix(tiny_loaded):
    model, tokenizer = tiny_loaded
    ids = corpus_ids(tokenizer, SENTENCES)
    expected = reference_ppl(model, ids[:30], 8, 16)
    got = perplexity(model, tokenizer, SENTENCES, stride=8, max_length=16, max_tokens=30, progress=False)
    assert got == pytest.approx(expected, rel=RTOL)


def test_errors(tiny_loaded):
    model, tokenizer = tiny_loaded
    with pytest.raises(TaskvecError, match="fewer than 2 tokens"):
        perplexity(model, tokenizer, [""], progress=False)
    with pytest.raises(TaskvecError, match="batch_tokens 0 must be at least 1"):
        perplexity(model, tokenizer, SENTENCES, batch_tokens=0, progress=False)
    with pytest.raises(TaskvecError, match="stride 0"):
        perplexity(model, tokenizer, SENTENCES, stride=0, progress=False)
    with pytest.raises(TaskvecError, match=r"perplexity window 65 exceeds the model's context of 64 positions"):
        perplexity(model, tokenizer, SENTENCES, max_length=65, progress=False)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda weight: weight.mul_(3000.0), r"perplexity overflows: the mean negative log-likelihood is \d+\.?\d* nats"),
    (lambda weight: weight.__setitem__(0, math.nan), "perplexity is NaN: the mean negative log-likelihood is nan"),
])
def test_a_broken_model_is_refused_instead_of_an_overflow_or_a_nan(tiny_loaded, edit, message):
    """A final LayerNorm scaled 3000x gives a mean NLL above 709 nats, whose exp overflowed with a
    traceback (OverflowError); a NaN weight gave a NaN perplexity, written silently."""
    model, tokenizer = tiny_loaded
    broken = copy.deepcopy(model)
    with torch.no_grad():
        edit(broken.transformer.ln_f.weight)
    with pytest.raises(TaskvecError, match=message):
        perplexity(broken, tokenizer, SENTENCES, progress=False)
