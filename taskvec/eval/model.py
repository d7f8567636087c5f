"""Loading a causal LM and its tokenizer for evaluation, with errors that say what is wrong."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from taskvec.errors import TaskvecError


def resolve_device(device: str | None = "auto") -> str:
    """'auto' (or None) means CUDA when available, else CPU."""
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TaskvecError(f"device {device!r} requested but no CUDA GPU is available")
    return device


@contextmanager
def quiet_transformers():
    """Silence transformers' loading bars and reports; our own errors say what matters."""
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def load_model(model_dir: str | Path, device: str = "auto"):
    """(model, tokenizer) of a causal LM directory (or hub id), in eval mode on `device`.

    The tokenizer is made ready for batched generation (see prepare_tokenizer).
    A directory whose weights do not fit a causal-LM head (e.g. a BERT encoder) is refused rather
    than evaluated with freshly initialised layers.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    where = str(model_dir)
    path = Path(model_dir)
    if path.exists() and not (path / "config.json").is_file():
        raise TaskvecError(f"{where} is not a model directory (no config.json)")
    device = resolve_device(device)
    with quiet_transformers():
        try:
            config = AutoConfig.from_pretrained(where)
        except (OSError, ValueError) as err:
            raise TaskvecError(f"cannot load a model config from {where}: no such directory, "
                               f"and not a model on the Hugging Face hub ({type(err).__name__})") from err
        try:
            model, info = AutoModelForCausalLM.from_pretrained(where, output_loading_info=True)
        except ValueError as err:
            raise TaskvecError(f"{where} is not a causal language model "
                               f"(model_type {config.model_type!r})") from err
        except OSError as err:
            raise TaskvecError(f"cannot load the weights in {where}: {' '.join(str(err).split())[:200]}") from err
        if info["missing_keys"]:
            names = ", ".join(sorted(info["missing_keys"])[:3])
            raise TaskvecError(f"{where} is not a causal language model: its weights lack {names} "
                               f"(architectures {config.architectures})")
        try:
            tokenizer = AutoTokenizer.from_pretrained(where)
        except (OSError, ValueError, TypeError) as err:
            raise TaskvecError(f"cannot load a tokenizer from {where} ({type(err).__name__})") from err
    return model.to(device).eval(), prepare_tokenizer(tokenizer, where)


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
