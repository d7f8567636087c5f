"""Loading from Hugging Face libraries (models, tokenizers, hub datasets) with one-line errors.

Training, evaluation and data preparation all load through here, so a directory that is not a
causal LM, an unreachable hub or an unknown dataset reads the same wherever it is met.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from taskvec.errors import TaskvecError, brief

if TYPE_CHECKING:  # torch is imported where a model is loaded: data preparation and --help need none of it
    import torch


@contextmanager
def quiet_transformers(*, progress_bars: bool = False, warnings: bool = False):
    """Silence transformers' bars and reports (our own errors say what matters), then restore."""
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    if not warnings:
        logging.set_verbosity_error()
    if not progress_bars:
        logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


class CausalLM(NamedTuple):
    model: torch.nn.Module
    tokenizer: object
    stored_dtype: torch.dtype  # what the checkpoint holds, whatever dtype it was loaded in


def load_causal_lm(model_dir: str | Path, dtype: torch.dtype | str = "auto") -> CausalLM:
    """A causal LM directory (or hub id) with its tokenizer, or a TaskvecError saying why not.

    Refused rather than loaded with freshly initialised layers: configs of other model kinds
    (BERT, T5 encoders) and weights that lack some of the causal-LM head's tensors.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from taskvec.io.checkpoint import resolve_model_path
    from taskvec.jsonfile import read_json

    where = str(model_dir)
    path = resolve_model_path(model_dir)  # a hub id is fetched once, failing fast when offline
    if path.exists() and not (path / "config.json").is_file():
        raise TaskvecError(f"{where} is not a model directory (no config.json)")
    if path.exists():
        read_json(path / "config.json", expect=dict)  # hostile JSON: one line, not a RecursionError
    with quiet_transformers():
        try:
            config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError) as err:
            if path.exists():
                raise TaskvecError(f"{where} is not a model directory ({brief(err)})") from None
            raise TaskvecError(f"{where}: no such directory, and not loadable from the Hugging Face hub "
                               f"({brief(err)}); pass a local model directory") from None
        architectures = config.architectures or []
        causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
        if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or (
            architectures and not any(name in causal for name in architectures)
        ):
            kind = ", ".join(architectures) or config.model_type
            raise TaskvecError(f"{where}: {kind} is not a causal language model (AutoModelForCausalLM)")
        stored_dtype = config.dtype if isinstance(config.dtype, torch.dtype) else torch.float32
        try:
            model, info = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype,
                                                               output_loading_info=True)
        except (OSError, ValueError) as err:
            raise TaskvecError(f"{where}: cannot load its weights ({brief(err)})") from None
        if info["missing_keys"]:
            names = ", ".join(sorted(info["missing_keys"])[:3])
            raise TaskvecError(f"{where} is not a causal language model: its weights lack {names}")
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError, TypeError) as err:
            raise TaskvecError(f"{where}: cannot load its tokenizer ({brief(err)})") from None
        if not tokenizer("Hello world", verbose=False)["input_ids"]:  # transformers makes an empty one
            raise TaskvecError(f"{where}: no usable tokenizer (it encodes text to nothing); "
                               "copy the base model's tokenizer files into it")
    model.loss_type = "ForCausalLM"  # what transformers falls back to anyway, minus its warning
    return CausalLM(model, tokenizer, stored_dtype)


def load_hub_dataset(name: str, config: str | None, split: str, *, local_hint: str):
    """datasets.load_dataset (cached locally), with one clear error naming the local alternative."""
    import datasets

    try:
        return datasets.load_dataset(name, config, split=split)
    except ConnectionError as err:
        raise TaskvecError(f"{name}: the Hugging Face hub cannot be reached and the dataset is not cached "
                           f"({brief(err)}); download it where the hub is reachable, {local_hint}") from None
    except Exception as err:  # unknown name, missing split or config: datasets raises many types
        raise TaskvecError(f"{name}: not a local file and not loadable from the Hugging Face hub "
                           f"({type(err).__name__}: {brief(err)}); check the name, {local_hint}") from None
