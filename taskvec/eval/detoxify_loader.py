"""Detoxify checkpoints loaded without running pickled code.

Detoxify unpickles its checkpoints with `weights_only=False`, so a hostile .ckpt (a file copied
onto the machine, or whatever sits in the torch hub cache) would run code as it loads. Here the
file is read with `torch.load(weights_only=True)`, which rebuilds only tensors and plain
containers, and the model is built from the dict's config and state dict as Detoxify builds it.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from urllib.parse import urlparse

from taskvec.errors import TaskvecError, brief

CLASS_NAMES = {"toxic": "toxicity", "identity_hate": "identity_attack", "severe_toxic": "severe_toxicity"}
"""Detoxify's renaming of the Jigsaw class names, so every model has a `toxicity` class."""


def hub_checkpoint(model_type: str) -> Path:
    """The torch hub cache's copy of Detoxify's `model_type` checkpoint (where Detoxify keeps it),
    downloaded first if it is not there; downloading runs nothing, loading is read_checkpoint's."""
    import torch
    from detoxify.detoxify import MODEL_URLS

    url = MODEL_URLS[model_type]
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(path), progress=False)  # via a temporary file: never partial
    return path


def read_checkpoint(path: str | Path) -> tuple[dict, list[str], dict]:
    """(architecture arguments, class names, state dict) of a Detoxify checkpoint, read with
    weights_only=True; a file that needs any other object unpickled is refused, never run."""
    import torch

    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL (\S+)", str(err))  # torch names the global it would have imported
        if found:
            raise TaskvecError(f"{path}: refused: loading it would unpickle {found.group(1)}, which can run "
                               "code; only checkpoints of tensors and plain containers are loaded") from None
        reason = re.search(r"WeightsUnpickler error:\s*(\S.*)", str(err))
        raise TaskvecError(f"{path}: not a readable Detoxify checkpoint "
                           f"({reason.group(1) if reason else brief(err)})") from None
    except Exception as err:  # torch raises many types for a file that is not a checkpoint at all
        raise TaskvecError(f"{path}: not a readable Detoxify checkpoint ({type(err).__name__}: "
                           f"{brief(err)})") from None
    try:
        args = loaded["config"]["arch"]["args"]
        args = {key: args[key] for key in ("model_type", "model_name", "tokenizer_name", "num_classes")}
        classes, state_dict = loaded["config"]["dataset"]["args"]["classes"], loaded["state_dict"]
    except (KeyError, TypeError, IndexError):
        raise TaskvecError(f"{path}: not a Detoxify checkpoint (it needs config.arch.args with model_type, "
                           "model_name, tokenizer_name and num_classes, config.dataset.args.classes and "
                           "a state_dict)") from None
    if not (all(isinstance(args[key], str) for key in ("model_type", "model_name", "tokenizer_name"))
            and isinstance(args["num_classes"], int) and isinstance(classes, list)
            and all(isinstance(name, str) for name in classes) and isinstance(state_dict, dict)
            and all(isinstance(tensor, torch.Tensor) for tensor in state_dict.values())):
        raise TaskvecError(f"{path}: not a Detoxify checkpoint (its config or state_dict has the wrong types)")
    return args, [CLASS_NAMES.get(name, name) for name in classes], state_dict


def load_detoxify(path: str | Path, config_dir: str | Path | None = None):
    """(model, tokenizer, class names) of a Detoxify checkpoint file, built by Detoxify's own
    get_model_and_tokenizer from the safely read dict. The classes it names must be transformers
    model and tokenizer classes (the name is looked up in the transformers module)."""
    import transformers
    from detoxify.detoxify import get_model_and_tokenizer

    args, class_names, state_dict = read_checkpoint(path)
    for key, base in (("model_name", transformers.PreTrainedModel),
                      ("tokenizer_name", transformers.PreTrainedTokenizerBase)):
        found = getattr(transformers, args[key], None)
        if not (isinstance(found, type) and issubclass(found, base)):
            raise TaskvecError(f"{path}: {key} {args[key]!r} is not a transformers {base.__name__} class")
    model, tokenizer = get_model_and_tokenizer(
        **args, state_dict=state_dict, huggingface_config_path=None if config_dir is None else str(config_dir))
    return model, tokenizer, class_names
