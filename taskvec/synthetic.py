"""Synthetic GPT-2-shaped checkpoints: a base and N fine-tunes, for tests and benchmarks.

Each fine-tune is base + delta * (shared + own): a direction all fine-tunes share (the "task")
plus noise of their own, like real fine-tunes of one recipe on disjoint splits. Tensors are
generated chunk by chunk from seeds, so a gpt2-xl-sized set is written without holding a model
in memory, and every value can be regenerated for checking.
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from taskvec.io.safetensors_file import CODES, OutputSpec
from taskvec.io.shards import ShardWriter, parse_size

SIZES = {  # (n_layer, n_embd, n_head, vocab_size, n_positions)
    "tiny": (2, 64, 2, 1000, 128),
    "gpt2": (12, 768, 12, 50257, 1024),
    "gpt2-medium": (24, 1024, 16, 50257, 1024),
    "gpt2-large": (36, 1280, 20, 50257, 1024),
    "gpt2-xl": (48, 1600, 25, 50257, 1024),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CHUNK = 1 << 22  # elements generated at a time


def gpt2_config(size: str) -> dict:
    n_layer, n_embd, n_head, vocab, positions = SIZES[size]
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "n_layer": n_layer,
        "n_embd": n_embd,
        "n_head": n_head,
        "vocab_size": vocab,
        "n_positions": positions,
        "n_ctx": positions,
        "tie_word_embeddings": True,
        "bos_token_id": vocab - 1,
        "eos_token_id": vocab - 1,
    }


def gpt2_shapes(size: str) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes as GPT2LMHeadModel.save_pretrained writes them (lm_head tied)."""
    n_layer, d, _, vocab, positions = SIZES[size]
    shapes = [("transformer.wte.weight", (vocab, d)), ("transformer.wpe.weight", (positions, d))]
    for i in range(n_layer):
        p = f"transformer.h.{i}."
        shapes += [
            (p + "ln_1.weight", (d,)), (p + "ln_1.bias", (d,)),
            (p + "attn.c_attn.weight", (d, 3 * d)), (p + "attn.c_attn.bias", (3 * d,)),
            (p + "attn.c_proj.weight", (d, d)), (p + "attn.c_proj.bias", (d,)),
            (p + "ln_2.weight", (d,)), (p + "ln_2.bias", (d,)),
            (p + "mlp.c_fc.weight", (d, 4 * d)), (p + "mlp.c_fc.bias", (4 * d,)),
            (p + "mlp.c_proj.weight", (4 * d, d)), (p + "mlp.c_proj.bias", (d,)),
        ]
    return shapes + [("transformer.ln_f.weight", (d,)), ("transformer.ln_f.bias", (d,))]


def _noise(seed: int, name: str, chunk: int, numel: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{name}/{chunk}".encode()))
    return torch.randn(numel, generator=generator)


def synthetic_chunk(name: str, chunk: int, numel: int, model: int, *, seed: int = 0,
                    delta: float = 1e-3) -> torch.Tensor:
    """Float32 values of elements [chunk*CHUNK, chunk*CHUNK+numel) of tensor `name`.

    model 0 is the base, model i >= 1 the i-th fine-tune.
    """
    values = _noise(seed, name, chunk, numel) * 0.02
    if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
        values += 1.0
    if model:
        shared = _noise(seed + 1_000_003, name, chunk, numel)
        own = _noise(seed + 1_000_003 + model, name, chunk, numel)
        values += delta * (shared + own)
    return values


@dataclass
class SyntheticSet:
    base: Path
    finetuned: list[Path]


def write_synthetic(
    directory: str | Path,
    *,
    size: str = "tiny",
    n_finetuned: int = 5,
    dtype: str = "float32",
    max_shard_size: str | int | None = None,
    seed: int = 0,
) -> SyntheticSet:
    """Write `directory/base` and `directory/ft-00`... as Hugging Face GPT-2 model directories."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}: {', '.join(SIZES)}")
    directory = Path(directory)
    paths = [directory / "base"] + [directory / f"ft-{i:02d}" for i in range(n_finetuned)]
    for model, path in enumerate(paths):
        write_model(path, size, model, dtype=dtype, max_shard_size=max_shard_size, seed=seed)
    return SyntheticSet(paths[0], paths[1:])


def write_model(path: Path, size: str, model: int, *, dtype: str = "float32",
                max_shard_size: str | int | None = None, seed: int = 0) -> None:
    torch_dtype = DTYPES[dtype]
    path.mkdir(parents=True, exist_ok=True)
    shapes = gpt2_shapes(size)
    specs = [OutputSpec(name, CODES[torch_dtype], shape) for name, shape in shapes]
    limit = parse_size(max_shard_size) if max_shard_size else sum(s.nbytes for s in specs)
    with ShardWriter(path, specs, limit, {"format": "pt"}) as writer:  # an error leaves no loadable shard
        for name, shape in shapes:
            numel = math.prod(shape)
            for chunk, start in enumerate(range(0, numel, CHUNK)):
                count = min(CHUNK, numel - start)
                values = synthetic_chunk(name, chunk, count, model, seed=seed).to(torch_dtype)
                writer.write(name, start * torch_dtype.itemsize, memoryview(values.view(torch.uint8).numpy()))
    config = {**gpt2_config(size), "dtype": dtype}
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
