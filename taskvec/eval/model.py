"""Loading a causal LM and its tokenizer for evaluation, with errors that say what is wrong."""

from __future__ import annotations

from pathlib import Path

from taskvec.errors import TaskvecError
from taskvec.hf import load_causal_lm


def resolve_device(device: str | None = "auto") -> str:
    """'auto' (or None) means CUDA when available, else CPU."""
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TaskvecError(f"device {device!r} requested but no CUDA GPU is available")
    return device


def load_model(model_dir: str | Path, device: str = "auto"):
    """(model, tokenizer) of a causal LM directory (or hub id), in its stored dtype, in eval mode
    on `device`; the tokenizer made ready for batched generation (see prepare_tokenizer)."""
    model, tokenizer, _ = load_causal_lm(model_dir)
    return model.to(resolve_device(device)).eval(), prepare_tokenizer(tokenizer, str(model_dir))


def prepare_tokenizer(tokenizer, where: str = "the model"):
    """Left padding and truncation (prompts end where generation starts), EOS as the pad token
    if there is none: what batched generation needs."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise TaskvecError(f"the tokenizer of {where} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = tokenizer.truncation_side = "left"
    return tokenizer


def context_length(model) -> int:
    """How many positions the model attends over (n_positions for GPT-2)."""
    config = model.config
    for attribute in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(config, attribute, None)
        if isinstance(value, int) and value > 0:
            return value
    raise TaskvecError(f"cannot tell the context length of {type(model).__name__}; pass max_length")
