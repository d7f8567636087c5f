"""PEFT LoRA adapter directories as fine-tunes: each target module's task vector, one at a time.

A LoRA adapter stores, per target module, `lora_A` (r x in) and `lora_B` (out x r); its task
vector for that module's weight is

    delta = B @ A * scaling,      scaling = lora_alpha / r   (lora_alpha / sqrt(r) with rslora)

transposed for modules that store (in, out) weights (GPT-2's Conv1D: `fan_in_fan_out`, and
embeddings), exactly as PEFT's `get_delta_weight` computes it. Tensors an adapter trains whole
(`modules_to_save`, biases with `bias="all"/"lora_only"`) replace the base's. Every other tensor
of the fine-tune is the base's own.

`read_adapter` reads headers only. A `LoraSource` stands for one module's fine-tuned weight
(base + delta) in a merge and computes the delta block by block, so memory is bounded by a block
and the factors, whatever the size of the module or the adapter.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from taskvec.errors import TaskvecError
from taskvec.io.layout import ADAPTER_CONFIG, ADAPTER_SAFETENSORS, ADAPTER_TORCH
from taskvec.io.safetensors_file import DTYPES, FileReader, TensorEntry, read_header
from taskvec.jsonfile import read_json

PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"(?P<module>.+)\.(?P<kind>lora_A|lora_B)\.weight|(?P<emb>.+)\.(?P<ekind>lora_embedding_[AB])")
_DEFAULT_NAME = re.compile(r"\.(?P<kind>lora_[AB]|lora_embedding_[AB])\.default(?=\.weight$|$)")
# variants whose merged weight is not base + B @ A * scaling, or not on the base's layers as they are
_UNSUPPORTED = ("use_dora", "lora_bias", "use_qalora", "use_bdlora", "alora_invocation_tokens", "layer_replication",
                "trainable_token_indices", "kasa_config", "monteclora_config", "arrow_config", "velora_config")
# initialisations besides True/False that leave the base's weights as they are (the others, PiSSA,
# OLoRA, CorDA, LoftQ, LoRA-GA and MiCA among them, train factors of a changed base weight or merge
# as a variant; PEFT's conversion to a plain LoRA of the original base sets True)
_PLAIN_INITS = ("gaussian", "eva", "orthogonal")


@dataclass(frozen=True)
class LoraDelta:
    """One target module: its A and B factors, the scaling, and whether B @ A is transposed."""

    target: str  # the base tensor it changes, e.g. transformer.h.0.attn.c_attn.weight
    a: TensorEntry
    b: TensorEntry
    scaling: float
    transpose: bool  # from the config's fan_in_fan_out, until the base's module types decide
    embedding: bool = False  # lora_embedding_A/B: always transposed, as PEFT does
    base: TensorEntry | None = None  # the module's weight the adapter saved (PEFT loads it over the base's)

    @property
    def shape(self) -> tuple[int, ...]:
        rows, cols = self.b.shape[0], self.a.shape[1]
        return (cols, rows) if self.transpose else (rows, cols)


@dataclass
class Adapter:
    """What an adapter directory holds, by base tensor name."""

    config: dict
    deltas: dict[str, LoraDelta] = field(default_factory=dict)
    replaced: dict[str, TensorEntry] = field(default_factory=dict)

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")


def read_adapter(directory: Path) -> Adapter:
    """Headers and config of a PEFT LoRA adapter directory; refuses kinds taskvec does not compute."""
    config_path = directory / ADAPTER_CONFIG
    config = read_json(config_path, expect=dict)
    kind = config.get("peft_type")
    if kind is None:
        raise TaskvecError(f"{config_path}: no peft_type, so not a PEFT adapter (mlx-lm and other tools save "
                           "their own formats); taskvec merges PEFT LoRA adapters only")
    if kind != "LORA":
        raise TaskvecError(f"{config_path}: peft_type {kind!r}; taskvec merges PEFT LoRA adapters only "
                           "(peft_type 'LORA')")
    for option in _UNSUPPORTED:
        if config.get(option):
            raise TaskvecError(f"{config_path}: {option} is set; taskvec computes plain LoRA deltas only "
                               "(merge it with PEFT's merge_and_unload and pass the merged model)")
    init = config.get("init_lora_weights", True)
    if not (isinstance(init, bool) or init in _PLAIN_INITS):
        raise TaskvecError(f"{config_path}: init_lora_weights is {init!r}: its factors belong to a base weight "
                           "PEFT changed when it initialised them (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA) or merge as a "
                           "variant, not to the base taskvec reads; save the adapter with PEFT's "
                           "path_initial_model_for_weight_conversion (a plain LoRA of the original base), or merge "
                           "it with merge_and_unload and pass the merged model")
    weights = directory / ADAPTER_SAFETENSORS
    if weights.is_file():
        tensors = read_header(weights).tensors
    elif (directory / ADAPTER_TORCH).is_file():
        from taskvec.io.torch_file import read_torch_file

        tensors = read_torch_file(directory / ADAPTER_TORCH)
    else:
        raise TaskvecError(f"{directory}: {ADAPTER_CONFIG} but no {ADAPTER_SAFETENSORS}")
    adapter = Adapter(config)
    factors: dict[str, dict[str, TensorEntry]] = {}
    for key, entry in tensors.items():
        name = _module_name(key)
        match = _LORA_KEY.fullmatch(name)
        if match is None:
            adapter.replaced[name] = entry
            continue
        module = match["module"] or match["emb"]
        factor = (match["kind"] or match["ekind"])[-1]  # "A" or "B"
        if entry.dtype not in ("F32", "F16", "BF16", "F64") or len(entry.shape) != 2:
            raise TaskvecError(f"{entry.path}: tensor '{key}' is not a LoRA factor (dtype {entry.dtype}, "
                               f"shape {list(entry.shape)})")
        factors.setdefault(module, {})[factor] = entry
        factors[module]["embedding"] = match["emb"] is not None
    for module, parts in factors.items():
        if "A" not in parts or "B" not in parts:
            raise TaskvecError(f"{weights}: module '{module}' has lora_{'B' if 'A' in parts else 'A'} missing")
        delta = _delta(config, config_path, module, parts)
        saved = adapter.replaced.pop(delta.target, None)  # `base_layer.weight` (save_embedding_layers)
        adapter.deltas[delta.target] = replace(delta, base=saved) if saved is not None else delta
    return adapter


def _module_name(key: str) -> str:
    """PEFT's key -> the base model's name: no `base_model.model.` prefix, no `.base_layer`, no
    adapter name `default` (in keys of a whole PEFT model's state dict, which PEFT loads alike)."""
    key = key.removeprefix(PEFT_PREFIX)
    key = _DEFAULT_NAME.sub(r".\g<kind>", key)
    return key.replace(".base_layer.", ".")



def _delta(config: dict, where: Path, module: str, parts: dict) -> LoraDelta:
    a, b = parts["A"], parts["B"]
    rank = a.shape[0]
    if b.shape[1] != rank:
        raise TaskvecError(f"{b.path}: module '{module}': lora_B is {list(b.shape)}, lora_A {list(a.shape)}; "
                           "their ranks differ (corrupt adapter)")
    alpha = config.get("lora_alpha", 8)
    pattern = _pattern_value(config.get("alpha_pattern") or {}, module, where)
    alpha = pattern if pattern is not None else alpha
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or rank == 0:
        raise TaskvecError(f"{where}: lora_alpha {alpha!r} for module '{module}' is not a number")
    scaling = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
    transpose = bool(parts["embedding"]) or bool(config.get("fan_in_fan_out"))
    return LoraDelta(f"{module}.weight", a, b, float(scaling), transpose, bool(parts["embedding"]))


def _pattern_value(patterns, module: str, where: Path):
    """PEFT's rank/alpha pattern rule (peft.utils.other.get_pattern_key): a key matches a
    module name that ends with it, as whole dotted components."""
    if not isinstance(patterns, dict):
        raise TaskvecError(f"{where}: alpha_pattern is {type(patterns).__name__}, not an object of "
                           "module patterns and alphas")
    for key, value in patterns.items():
        try:
            found = re.match(rf"(.*\.)?({key})$", module)
        except re.error as err:
            raise TaskvecError(f"{where}: alpha_pattern key {key!r} is not a regular expression ({err})") from None
        if found:
            return value
    return None


BLOCK_ELEMENTS = 1 << 20  # the delta is computed in blocks of whole rows of about this size


class LoraSource:
    """One module's fine-tuned weight, base + delta, read chunk by chunk as float32.

    The delta is computed by matmul in blocks of whole rows whose boundaries depend on the
    tensor's shape alone, never on where a chunk starts, so every chunk size gives the same bytes
    (BLAS may sum in another order for another block shape); the current block is kept until a
    chunk reaches its end, so consecutive chunks reuse it. Memory: one block plus the two factors
    per module being read, released when its last element has been read.
    """

    dtype = "F32"

    def __init__(self, base: TensorEntry, delta: LoraDelta) -> None:
        if delta.shape != base.shape:
            raise TaskvecError(
                f"{delta.a.path}: LoRA module for '{base.name}' makes a {list(delta.shape)} update, but "
                f"{base.path} has {list(base.shape)} (an adapter of another model?)"
            )
        self.base, self.delta = base, delta
        self.name, self.shape, self.path = base.name, base.shape, delta.a.path
        self._factors: tuple[torch.Tensor, torch.Tensor] | None = None
        self._block: tuple[int, torch.Tensor] | None = None  # (index, flattened values)

    @property
    def numel(self) -> int:
        return self.base.numel

    def add_delta(self, files: FileReader, start: int, out: torch.Tensor) -> None:
        """Add elements [start, start + len(out)) of the flattened delta to float32 `out`."""
        left, right = self._left_right(files)
        block_elements = max(1, BLOCK_ELEMENTS // right.shape[1]) * right.shape[1]
        done, end = 0, start + out.numel()
        while start + done < end:
            index, offset = divmod(start + done, block_elements)
            values = self._values(index, block_elements, left, right)
            take = min(end - start - done, values.numel() - offset)
            out[done:done + take].add_(values[offset:offset + take])
            done += take
            if offset + take == values.numel():  # chunks come in order: this block is done with
                self._block = None
        if end == self.numel:
            self._factors = None

    def _values(self, index: int, block_elements: int, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        if self._block is None or self._block[0] != index:
            rows = block_elements // right.shape[1]
            product = left[index * rows:(index + 1) * rows] @ right
            self._block = (index, product.mul_(self.delta.scaling).view(-1))
        return self._block[1]

    def _left_right(self, files: FileReader) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A), or (A^T, B^T) where the weight is stored transposed, in float32."""
        if self._factors is None:
            a, b = (_read_whole(files, entry).float() for entry in (self.delta.a, self.delta.b))
            self._factors = (a.T.contiguous(), b.T.contiguous()) if self.delta.transpose else (b, a)
        return self._factors


def _read_whole(files: FileReader, entry: TensorEntry) -> torch.Tensor:
    raw = torch.empty(entry.nbytes, dtype=torch.uint8)
    files.read_into(entry.path, entry.offset, memoryview(raw.numpy()))
    return raw.view(DTYPES[entry.dtype]).view(entry.shape)
