"""Hugging Face model directories: weights (single file or sharded with an index) and side files.

Opening a checkpoint reads headers only; tensor bytes are read later, chunk by chunk.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path

from taskvec.errors import TaskvecError, brief
from taskvec.io.safetensors_file import TensorEntry, read_header
from taskvec.io.shards import INDEX_FILE, SINGLE_FILE

# Files copied from the base into a merged model: what from_pretrained and the tokenizer need.
SIDE_FILE_PATTERNS = (
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "*.model",
    "*.tiktoken",
    "chat_template.*",
    "preprocessor_config.json",
)
# Names a tied output embedding may be stored under, and where its input embedding lives.
TIED_OUTPUT = "lm_head.weight"
INPUT_EMBEDDINGS = (
    "transformer.wte.weight",
    "model.embed_tokens.weight",
    "model.decoder.embed_tokens.weight",
    "gpt_neox.embed_in.weight",
    "wte.weight",
    "embed_tokens.weight",
)


@dataclass
class Checkpoint:
    """A model directory's tensors (name -> location, in file order) and its config."""

    path: Path
    tensors: dict[str, TensorEntry]
    config: dict = field(default_factory=dict)

    @property
    def ties_embeddings(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", True))

    def find(self, name: str) -> TensorEntry | None:
        """The tensor called `name`, or for a tied model the input embedding it is tied to."""
        entry = self.tensors.get(name)
        if entry is None and name == TIED_OUTPUT and self.ties_embeddings:
            embedding = self.input_embedding()
            entry = self.tensors.get(embedding) if embedding else None
        return entry

    def input_embedding(self) -> str | None:
        return next((n for n in INPUT_EMBEDDINGS if n in self.tensors), None)

    def files(self) -> list[Path]:
        """Every file a merge reads from this checkpoint: weight files and side files."""
        return sorted({entry.path for entry in self.tensors.values()} | set(self.side_files()))

    def side_files(self) -> list[Path]:
        return sorted(
            p for p in self.path.iterdir()
            if p.is_file() and any(fnmatch(p.name, pattern) for pattern in SIDE_FILE_PATTERNS)
        )


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def resolve_model_path(name: str | Path) -> Path:
    """A local path as it is; otherwise a Hugging Face hub id (`gpt2`, `org/model`), whose
    safetensors weights, config and tokenizer are fetched into the hub cache, as from_pretrained would."""
    path = Path(name)
    if path.exists() or not HUB_ID.fullmatch(str(name)):
        return path
    from huggingface_hub import snapshot_download

    patterns = ["*.safetensors", INDEX_FILE, *SIDE_FILE_PATTERNS]
    try:
        return Path(snapshot_download(str(name), allow_patterns=patterns))
    except Exception as err:  # the hub client raises many types; each means "not fetched"
        raise TaskvecError(
            f"{name}: no such directory, and it could not be fetched from the Hugging Face hub "
            f"({brief(err, last=True)}); pass a local model directory"
        ) from None


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Read the headers of a model directory (or of one .safetensors file)."""
    path = Path(path)
    if not path.exists():
        raise TaskvecError(f"{path}: no such file or directory")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise TaskvecError(f"{path}: not a safetensors file or a model directory")
        return Checkpoint(path.parent, dict(read_header(path).tensors), _read_config(path.parent))
    index = path / INDEX_FILE
    if index.is_file():
        tensors = _read_sharded(index)
    elif (path / SINGLE_FILE).is_file():
        tensors = dict(read_header(path / SINGLE_FILE).tensors)
    else:
        tensors = _read_unnamed(path)
    return Checkpoint(path, tensors, _read_config(path))


def _read_sharded(index: Path) -> dict[str, TensorEntry]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        raise TaskvecError(f"{index}: not a valid safetensors index (no weight_map)") from None
    headers = {}
    for shard in dict.fromkeys(weight_map.values()):
        if not isinstance(shard, str) or Path(shard).name != shard:
            raise TaskvecError(f"{index}: names shard {shard!r}, not a file name in its directory (corrupt index)")
        shard_path = index.parent / shard
        if not shard_path.is_file():
            raise TaskvecError(f"{index}: names shard '{shard}', which is missing")
        headers[shard] = read_header(shard_path).tensors
    tensors = {}
    for name, shard in weight_map.items():
        if name not in headers[shard]:
            raise TaskvecError(f"{index.parent / shard}: tensor '{name}' listed in the index is missing")
        tensors[name] = headers[shard][name]
    return tensors


def _read_unnamed(path: Path) -> dict[str, TensorEntry]:
    files = sorted(path.glob("*.safetensors"))
    if len(files) == 1:
        return dict(read_header(files[0]).tensors)
    if len(files) > 1:
        raise TaskvecError(f"{path}: {len(files)} safetensors files but no {INDEX_FILE}")
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise TaskvecError(
            f"{path}: only PyTorch .bin/.pt weights; convert them to safetensors "
            "(model.save_pretrained(dir, safe_serialization=True))"
        )
    raise TaskvecError(f"{path}: no safetensors weights (model.safetensors or {INDEX_FILE})")


def _read_config(path: Path) -> dict:
    config = path / "config.json"
    if not config.is_file():
        return {}
    try:
        return json.loads(config.read_text())
    except ValueError as err:
        raise TaskvecError(f"{config}: not valid JSON ({err})") from None


def copy_side_files(source: Checkpoint, directory: Path, config_updates: dict | None = None) -> None:
    """Copy config, generation config and tokenizer files; apply updates to config.json."""
    for file in source.side_files():
        if file.name == "config.json" and config_updates:
            config = {**source.config, **config_updates}
            (directory / file.name).write_text(json.dumps(config, indent=2) + "\n")
        else:
            shutil.copyfile(file, directory / file.name)
