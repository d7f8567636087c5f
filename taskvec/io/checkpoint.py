"""Model directories as a merge sees them: tensors by name, config, side files, whatever the format.

`open_checkpoint` reads headers only and dispatches on what a path holds, one reader per format,
each giving the same `TensorEntry` (file, byte offset, dtype, shape), so planning and the
executors never depend on the format:

    model.safetensors / model.safetensors.index.json         taskvec.io.safetensors_file
    pytorch_model.bin / pytorch_model.bin.index.json / .pt    taskvec.io.torch_file (no pickled code runs)
    adapter_config.json + adapter_model.safetensors           taskvec.io.peft_adapter (LoRA deltas)

Tensor bytes are read later, chunk by chunk.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from taskvec.errors import TaskvecError, brief
from taskvec.io import layout
from taskvec.io.peft_adapter import Adapter, read_adapter
from taskvec.io.safetensors_file import TensorEntry, read_header
from taskvec.jsonfile import dumps, read_json


@dataclass
class Checkpoint:
    """A model directory's tensors (name -> location, in file order), its config and its format."""

    path: Path
    tensors: dict[str, TensorEntry]
    config: dict = field(default_factory=dict)
    format: str = "safetensors"  # "safetensors", "torch" or "peft"
    adapter: Adapter | None = None
    label: str = ""  # how outputs name it: the hub id or the directory's name, never a full path

    @property
    def ties_embeddings(self) -> bool | None:
        """Whether the output embedding is the input embedding; None when no config says."""
        if not self.config or self.adapter is not None:
            return None
        return bool(self.config.get("tie_word_embeddings", True))

    def find(self, name: str, tied: bool) -> TensorEntry | None:
        """The tensor called `name`, or, where `tied`, the input embedding a tied head is."""
        entry = self.tensors.get(name)
        if entry is None and name == layout.TIED_OUTPUT and tied:
            embedding = self.input_embedding()
            entry = self.tensors.get(embedding) if embedding else None
        return entry

    def input_embedding(self) -> str | None:
        return next((n for n in layout.INPUT_EMBEDDINGS if n in self.tensors), None)

    def files(self) -> list[Path]:
        """Every file a merge reads from this checkpoint: weight files and side files."""
        weights = {entry.path for entry in self.tensors.values()}
        if self.adapter is not None:
            weights |= {d.a.path for d in self.adapter.deltas.values()}
        return sorted(weights | set(self.side_files()))

    def side_files(self) -> list[Path]:
        """Config, tokenizer, licence and custom-code files a merged model keeps from this one."""
        if not self.path.is_dir():
            return []
        found = {p for pattern in layout.SIDE_FILE_PATTERNS for p in self.path.glob(pattern) if p.is_file()}
        found |= {p for name in self._custom_code() if (p := self.path / name).is_file()}
        return sorted(found)

    def _custom_code(self) -> set[str]:
        """The .py files auto_map names (module.Class -> module.py; another repository's
        `repo--module.Class` is fetched by transformers itself)."""
        names = set()
        for config in (self.config, _json_or_empty(self.path / layout.TOKENIZER_CONFIG)):
            auto_map = config.get("auto_map") if isinstance(config, dict) else None
            values = auto_map.values() if isinstance(auto_map, dict) else []
            for value in values:
                for reference in value if isinstance(value, list) else [value]:
                    if isinstance(reference, str) and "--" not in reference and "." in reference:
                        module = reference.rsplit(".", 1)[0]
                        if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", module):
                            names.add(f"{module}.py")
        return names

    def fingerprint(self) -> str:
        """sha256 of the tensor table (names, dtypes, shapes, offsets) and of the first and last
        4 KiB of each weight file's tensor data: tells apart fine-tunes of one architecture (their
        headers are identical) without exposing where they are stored or reading whole files."""
        digest = hashlib.sha256()
        table = [(n, e.dtype, e.shape, e.path.name, e.offset, e.nbytes) for n, e in self.tensors.items()]
        if self.adapter is not None:
            table += [(n, d.a.path.name, d.a.offset, d.b.offset, d.scaling, d.transpose)
                      for n, d in self.adapter.deltas.items()]
        digest.update(json.dumps(table).encode())
        factors = [f for d in self.adapter.deltas.values() for f in (d.a, d.b)] if self.adapter else []
        starts: dict[Path, int] = {}
        for entry in [*self.tensors.values(), *factors]:
            starts[entry.path] = min(starts.get(entry.path, entry.offset), entry.offset)
        for path, start in sorted(starts.items()):
            with open(path, "rb") as handle:
                handle.seek(start)
                digest.update(handle.read(_SAMPLE))
                handle.seek(max(start, os.fstat(handle.fileno()).st_size - _SAMPLE))
                digest.update(handle.read(_SAMPLE))
        return digest.hexdigest()


_SAMPLE = 4096
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_WEIGHT_PATTERNS = (  # what a hub download fetches, in order of preference: the first that has weights
    ("*.safetensors", layout.SAFETENSORS_INDEX, layout.ADAPTER_CONFIG),
    ("*.bin", layout.TORCH_INDEX, layout.ADAPTER_CONFIG),
)


def resolve_model_path(name: str | Path) -> Path:
    """A local path as it is; otherwise a Hugging Face hub id (`gpt2`, `org/model`), fetched into
    the hub cache as from_pretrained would: safetensors weights where the repository has them,
    else its PyTorch `.bin` weights, plus config, generation config and tokenizer."""
    path = Path(name)
    if path.exists() or not HUB_ID.fullmatch(str(name)):
        return path
    from huggingface_hub import snapshot_download

    try:
        for weights in _WEIGHT_PATTERNS:
            snapshot = Path(snapshot_download(str(name), allow_patterns=[*weights, *layout.SIDE_FILE_PATTERNS,
                                                                     layout.CUSTOM_CODE]))
            if _has_weights(snapshot):
                return snapshot
        return snapshot
    except Exception as err:  # the hub client raises many types; each means "not fetched"
        raise TaskvecError(
            f"{name}: no such directory, and it could not be fetched from the Hugging Face hub "
            f"({brief(err, last=True)}); pass a local model directory"
        ) from None


def _has_weights(directory: Path) -> bool:
    return any(directory.glob("*.safetensors")) or any(directory.glob("*.bin")) \
        or (directory / layout.ADAPTER_CONFIG).is_file()


def open_checkpoint(path: str | Path, label: str | None = None) -> Checkpoint:
    """Read the headers of a model directory, an adapter directory, or one weight file."""
    path = Path(path)
    label = label or (path.name if path.is_dir() else f"{path.parent.name}/{path.name}")
    if not path.exists():
        raise TaskvecError(f"{path}: no such file or directory")
    if not path.is_dir() and not path.is_file():
        raise TaskvecError(f"{path}: not a regular file or a directory")
    if path.is_file():
        return _checked(Checkpoint(path.parent, _read_weight_file(path), _read_config(path.parent),
                                   _format(path), label=label))
    if (path / layout.ADAPTER_CONFIG).is_file():
        adapter = read_adapter(path)
        return Checkpoint(path, dict(adapter.replaced), adapter.config, "peft", adapter, label)
    for index, single, reader in (  # from_pretrained's order: a single file before an index beside it
        (layout.SAFETENSORS_INDEX, layout.SAFETENSORS_SINGLE, _read_safetensors),
        (layout.TORCH_INDEX, layout.TORCH_SINGLE, _read_torch),
    ):
        if (path / single).is_file():
            return _checked(Checkpoint(path, reader(path / single), _read_config(path), _format(path / single),
                                       label=label))
        if (path / index).is_file():
            return _checked(Checkpoint(path, _read_sharded(path / index, reader), _read_config(path),
                                       _format(path / single), label=label))
    weights = _only_weight_file(path)
    return _checked(Checkpoint(path, _read_weight_file(weights), _read_config(path), _format(weights), label=label))


def _format(path: Path) -> str:
    return "safetensors" if path.suffix == ".safetensors" else "torch"


def _read_safetensors(path: Path) -> dict[str, TensorEntry]:
    return dict(read_header(path).tensors)


def _read_torch(path: Path) -> dict[str, TensorEntry]:
    from taskvec.io.torch_file import read_torch_file

    return read_torch_file(path)


def _read_weight_file(path: Path) -> dict[str, TensorEntry]:
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    if path.suffix in layout.TORCH_SUFFIXES:
        return _read_torch(path)
    raise TaskvecError(f"{path}: not a weight file (.safetensors, .bin, .pt) or a model directory")


def _only_weight_file(path: Path) -> Path:
    for pattern in ("*.safetensors", *(f"*{suffix}" for suffix in layout.TORCH_SUFFIXES)):
        files = sorted(f for f in path.glob(pattern) if not f.name.startswith("training_args"))
        if len(files) == 1:
            return files[0]
        if len(files) > 1:
            raise TaskvecError(f"{path}: {len(files)} {pattern[1:]} files but no index naming them")
    checkpoints = [(int(m[1]), p) for p in path.iterdir()
                   if p.is_dir() and (m := layout.TRAINER_CHECKPOINT.fullmatch(p.name))]
    if checkpoints:
        newest = max(checkpoints)[1]
        raise TaskvecError(f"{path}: no weights, only Trainer checkpoints; the newest is {newest} "
                           "(pass it, or the directory the final model was saved to)")
    raise TaskvecError(f"{path}: no weights ({layout.SAFETENSORS_SINGLE}, {layout.TORCH_SINGLE}, "
                       f"a sharded index or a PEFT adapter)")


def _read_sharded(index: Path, read_shard) -> dict[str, TensorEntry]:
    """An index's tensors, each from the shard it names; a tensor a shard holds but the index
    leaves out, or one the index names twice, would silently lose data: both are refused."""
    weight_map = read_json(index, expect=dict, unique_keys=True).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise TaskvecError(f"{index}: not a valid index (no weight_map)")
    shards = {}
    for shard in dict.fromkeys(weight_map.values()):
        if not isinstance(shard, str) or Path(shard).name != shard:
            raise TaskvecError(f"{index}: names shard {shard!r}, not a file name in its directory (corrupt index)")
        shard_path = index.parent / shard
        if not shard_path.is_file():
            raise TaskvecError(f"{index}: names shard '{shard}', which is missing")
        shards[shard] = read_shard(shard_path)
    for sibling in _series(shards):
        if sibling not in shards and (index.parent / sibling).is_file():
            raise TaskvecError(f"{index.parent / sibling}: a shard that {index.name} does not name "
                               "(its tensors would be dropped; corrupt index)")
    tensors = {}
    for name, shard in weight_map.items():
        if name not in shards[shard]:
            raise TaskvecError(f"{index.parent / shard}: tensor '{name}' listed in the index is missing")
        tensors[name] = shards[shard][name]
    for shard, entries in shards.items():
        for name in entries:
            listed = weight_map.get(name)
            if listed != shard:
                where = f"assigns to {listed}" if listed else "does not list"
                raise TaskvecError(f"{index.parent / shard}: holds tensor '{name}', which {index.name} {where} "
                                   "(corrupt index)")
    return tensors


_SHARD_NAME = re.compile(r"(?P<stem>.+)-\d{5}-of-(?P<count>\d{5})(?P<suffix>\.\w+)")


def _series(shards) -> set[str]:
    """Every file name of the numbered shard series (`model-00001-of-00003.safetensors`, ...) that
    the index's shard names belong to."""
    names = set()
    for shard in shards:
        match = _SHARD_NAME.fullmatch(shard)
        if match:
            count = int(match["count"])
            names |= {f"{match['stem']}-{i:05d}-of-{count:05d}{match['suffix']}" for i in range(1, count + 1)}
    return names


def _read_config(path: Path) -> dict:
    config = path / layout.CONFIG
    return read_json(config, expect=dict) if config.is_file() else {}


def _checked(checkpoint: Checkpoint) -> Checkpoint:
    """Refuse quantized weights: packed integers and scales are not values to take a task vector of."""
    quantization = checkpoint.config.get("quantization_config")
    if quantization:
        method = quantization.get("quant_method", "quantized") if isinstance(quantization, dict) else "quantized"
        raise TaskvecError(f"{checkpoint.path / layout.CONFIG}: a {method} checkpoint (quantization_config); "
                           "merge the unquantized weights instead")
    packed = next((n for n in checkpoint.tensors if layout.QUANTIZED_TENSORS.search(n)), None)
    if packed is not None:
        raise TaskvecError(f"{checkpoint.tensors[packed].path}: tensor '{packed}' is part of a quantized "
                           "checkpoint; merge the unquantized weights instead")
    return _alias_of_embedding_dropped(checkpoint)


def _alias_of_embedding_dropped(checkpoint: Checkpoint) -> Checkpoint:
    """A tied head that torch.save stored as a view of the input embedding's storage (the same
    bytes, as old .bin checkpoints hold it) is not a tensor of its own: dropped, as save_pretrained
    leaves it out, unless the config unties the two."""
    head, embedding = checkpoint.tensors.get(layout.TIED_OUTPUT), checkpoint.input_embedding()
    if head is None or embedding is None or checkpoint.ties_embeddings is False:
        return checkpoint
    other = checkpoint.tensors[embedding]
    if (head.path, head.offset, head.nbytes, head.dtype, head.shape) != \
            (other.path, other.offset, other.nbytes, other.dtype, other.shape):
        return checkpoint
    tensors = {name: entry for name, entry in checkpoint.tensors.items() if name != layout.TIED_OUTPUT}
    return Checkpoint(checkpoint.path, tensors, checkpoint.config, checkpoint.format, checkpoint.adapter,
                      checkpoint.label)


def copy_side_files(source: Checkpoint, directory: Path, config_updates: dict | None = None) -> list[str]:
    """Copy config, generation config and tokenizer files; apply updates to config.json.

    Only regular files that are inside the model directory (or, for a hub snapshot, in its
    repository's blob store) are copied, never with wider permissions than they have: a link to
    a private file elsewhere is not published with the model. Returns what was skipped.
    """
    skipped = []
    for file in source.side_files():
        if not _inside_model(file, source.path):
            skipped.append(f"{file.name} (a link to {file.resolve()}, outside {source.path})")
            continue
        target = directory / file.relative_to(source.path)
        target.parent.mkdir(exist_ok=True)
        if file.name == layout.CONFIG and config_updates:
            target.write_text(dumps({**source.config, **config_updates}), encoding="utf-8")
        else:
            shutil.copyfile(file, target)
        os.chmod(target, os.stat(target).st_mode & file.stat().st_mode & 0o777)
    return skipped


def _json_or_empty(path: Path) -> dict:
    """A side file's JSON object, or {} where there is none or it does not parse (the tokenizer's
    loader reports that, not the merge)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _inside_model(file: Path, directory: Path) -> bool:
    real = file.resolve()
    roots = [directory.resolve()]
    if directory.parent.name == "snapshots":  # huggingface_hub cache: snapshots/<rev>/f -> ../../blobs/<sha>
        roots.append((directory.parent.parent / "blobs").resolve())
    return real.is_file() and any(root in real.parents for root in roots)
