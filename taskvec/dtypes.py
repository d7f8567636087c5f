"""Dtype names in one place: the output dtypes a merge writes, and which stored dtypes it combines.

torch-free, so the CLI takes its choices from here without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from taskvec.errors import TaskvecError

if TYPE_CHECKING:
    import torch

OUTPUT_DTYPES = ("float32", "float16", "bfloat16")  # --dtype choices
_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
ARITHMETIC_CODES = frozenset({"F16", "BF16", "F32", "F64"})  # safetensors codes merged as floats
COPIED_CODES = frozenset({"I64", "I32", "I16", "I8", "U8", "U16", "U32", "U64", "BOOL"})  # taken from the base


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """An output dtype by name (`float32`, `bf16`, ...), a torch dtype as it is, or None."""
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = _ALIASES.get(dtype, dtype)
    if name not in OUTPUT_DTYPES:
        raise TaskvecError(f"unknown dtype {dtype!r}: use {', '.join(OUTPUT_DTYPES)}")
    return getattr(torch, name)


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bfloat16', as config.json and provenance write it."""
    return str(dtype).removeprefix("torch.")
