"""Perplexity of a causal LM on a clean corpus, with the strided sliding window of the original.

This is the Hugging Face "perplexity of fixed-length models" recipe: the texts are joined with
"\n\n" and tokenised once; windows of `max_length` tokens start every `stride` tokens, and each
window scores only the tokens no earlier window scored, so every token after the first is
predicted exactly once, from up to max_length - stride tokens of context; with stride equal to
max_length (windows that do not overlap) the first token of each window has no context and, as in
the recipe, is not predicted. The result is the exponential of the mean negative log-likelihood
over all predicted tokens (accumulated in float64); a NaN or overflowing one is an error.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from pathlib import Path

from taskvec.errors import TaskvecError
from taskvec.hf import load_hub_dataset
from taskvec.rows import read_text

WIKITEXT = ("wikitext", "wikitext-103-raw-v1", "test")
# Tokens per forward pass when windows are batched: 64 windows of 64 tokens, 4 of 1024, one of 4096 or more.
BATCH_TOKENS = 4096
_LARGEST_EXPONENT = math.log(float.fromhex("0x1.fffffffffffffp+1023"))  # exp of more overflows a float


def load_ppl_texts(files: Sequence[str | Path] = ()) -> list[str]:
    """The contents of local text files, or WikiText-103's test split when `files` is empty."""
    if files:
        texts = [read_text(file) for file in files]  # regular files only: a FIFO would block
        if not any(text.strip() for text in texts):
            raise TaskvecError(f"perplexity text files {', '.join(map(str, files))} are empty")
        return texts
    name, config, split = WIKITEXT
    return list(load_hub_dataset(name, config, split, local_hint="or pass local text with --ppl-file FILE.txt")["text"])


def perplexity(model, tokenizer, texts: Sequence[str], *, stride: int = 512, max_length: int | None = None,
               device=None, max_tokens: int | None = None, batch_tokens: int = BATCH_TOKENS,
               progress: bool | None = None) -> float:
    """exp(mean NLL) of the joined `texts` under `model` (see the module docstring).

    max_length: window size (default: the model's context); a stride longer than the window is
    cut to it (windows then do not overlap). max_tokens: score only the first tokens of the
    corpus (a quick estimate on slow hardware). batch_tokens: windows of the same shape go
    through the model together, as many as fit in this many tokens (at least one): short windows
    then cost one forward pass per batch instead of one each, while a window of the budget's size
    or more still goes alone. Each window's log-likelihood is summed on its own, in window order.
    """
    import torch

    from taskvec.eval.model import context_length
    from taskvec.progress import progress_bar

    if max_length is None:
        max_length = context_length(model)
    elif max_length > _known_context(model):
        raise TaskvecError(f"perplexity window {max_length} exceeds the model's context of "
                           f"{_known_context(model)} positions (--max-length)")
    if stride < 1:
        raise TaskvecError(f"stride {stride} must be at least 1")
    if batch_tokens < 1:
        raise TaskvecError(f"batch_tokens {batch_tokens} must be at least 1")
    stride = min(stride, max_length)
    ids = tokenizer("\n\n".join(texts), verbose=False)["input_ids"][:max_tokens]
    if len(ids) < 2:
        raise TaskvecError("the perplexity text has fewer than 2 tokens")
    ids = torch.tensor(ids, device=device or model.device)
    keep_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
    batches = _window_batches(_windows(len(ids), stride, max_length), max(1, batch_tokens // max_length))
    nll_sum, scored = 0.0, 0
    with torch.inference_mode(), progress_bar(progress, total=sum(map(len, batches)), desc="perplexity",
                                              unit="window") as bar:
        for batch in batches:
            begin, end, first = batch[0]
            length, kept = end - begin, end - begin - first + 1  # logits of positions first-1 .. length-1
            windows = torch.stack([ids[b:e] for b, e, _ in batch])
            extra = {"logits_to_keep": kept} if keep_logits else {}
            logits = model(windows, **extra).logits[:, -kept:-1]
            for row, window in zip(logits, windows, strict=True):  # one float copy of the logits at a time
                log_probs = torch.log_softmax(row.float(), dim=-1)
                nll_sum -= log_probs.gather(1, window[first:, None]).double().sum().item()
            scored += len(batch) * (length - first)
            bar.update(len(batch))
    mean_nll = nll_sum / scored
    if not mean_nll < _LARGEST_EXPONENT:  # NaN too: its comparisons are false
        what = "is NaN" if math.isnan(mean_nll) else "overflows"
        raise TaskvecError(f"perplexity {what}: the mean negative log-likelihood is {mean_nll:g} nats per token "
                           "(NaN or infinite logits, or weights far from any trained model)")
    return math.exp(mean_nll)


def _windows(n_ids: int, stride: int, max_length: int) -> list[tuple[int, int, int]]:
    """(begin, end, first) of each window: it covers ids[begin:end] and scores its positions from
    `first` on, the first one no earlier window scored; the last window reaches the end."""
    windows, previous_end = [], 0
    for begin in range(0, max(n_ids - max_length, 0) + stride, stride):
        end = min(begin + max_length, n_ids)
        windows.append((begin, end, max(previous_end - begin, 1)))
        previous_end = end
        if end == n_ids:
            break
    return windows


def _window_batches(windows: list[tuple[int, int, int]], size: int) -> list[list[tuple[int, int, int]]]:
    """Consecutive windows of the same length and first scored position, at most `size` a batch."""
    batches = []
    for window in windows:
        last = batches[-1] if batches else None
        if last and len(last) < size and (last[0][1] - last[0][0], last[0][2]) == (window[1] - window[0], window[2]):
            last.append(window)
        else:
            batches.append([window])
    return batches


def _known_context(model) -> float:
    """The model's context length, or infinity where its config does not say."""
    from taskvec.eval.model import context_length

    try:
        return context_length(model)
    except TaskvecError:
        return math.inf
