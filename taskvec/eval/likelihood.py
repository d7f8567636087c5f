"""Perplexity of a causal LM on a clean corpus, with the strided sliding window of the original.

This is the Hugging Face "perplexity of fixed-length models" recipe: the texts are joined with
"\n\n" and tokenised once; windows of `max_length` tokens start every `stride` tokens, and each
window scores only the tokens no earlier window scored, so every token after the first is
predicted exactly once, from up to max_length - stride tokens of context. The result is the
exponential of the mean negative log-likelihood over all predicted tokens (accumulated in float64).
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
               device=None, max_tokens: int | None = None, progress: bool | None = None) -> float:
    """exp(mean NLL) of the joined `texts` under `model` (see the module docstring).

    max_length: window size (default: the model's context); a stride longer than the window is
    cut to it (windows then do not overlap). max_tokens: score only the first tokens of the
    corpus (a quick estimate on slow hardware).
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
    stride = min(stride, max_length)
    ids = tokenizer("\n\n".join(texts), verbose=False)["input_ids"][:max_tokens]
    if len(ids) < 2:
        raise TaskvecError("the perplexity text has fewer than 2 tokens")
    ids = torch.tensor(ids, device=device or model.device)
    keep_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
    nll_sum, scored, previous_end = 0.0, 0, 0
    starts = range(0, max(len(ids) - max_length, 0) + stride, stride)
    with torch.inference_mode():
        for begin in progress_bar(progress, starts, desc="perplexity", unit="window"):
            end = min(begin + max_length, len(ids))
            window = ids[begin:end]
            first = max(previous_end - begin, 1)  # first position not scored by an earlier window
            extra = {"logits_to_keep": len(window) - first + 1} if keep_logits else {}
            logits = model(window[None], **extra).logits[0, -(len(window) - first + 1):-1]
            log_probs = torch.log_softmax(logits.float(), dim=-1)
            nll_sum -= log_probs.gather(1, window[first:, None]).double().sum().item()
            scored += len(window) - first
            previous_end = end
            if end == len(ids):
                break
    return math.exp(nll_sum / scored)


def _known_context(model) -> float:
    """The model's context length, or infinity where its config does not say."""
    from taskvec.eval.model import context_length

    try:
        return context_length(model)
    except TaskvecError:
        return math.inf
