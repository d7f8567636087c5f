"""Prompts for toxicity evaluation: RealToxicityPrompts' challenging subset, or a local file."""

from __future__ import annotations

import random
from pathlib import Path

from taskvec.errors import TaskvecError
from taskvec.hf import load_hub_dataset
from taskvec.rows import jsonl_objects, text_lines

RTP = "allenai/real-toxicity-prompts"


def load_prompts(source: str | Path | None = None, *, n: int | None = None, seed: int = 0) -> list[str]:
    """`n` prompts, sampled with `seed`: from a local file, or from RealToxicityPrompts' challenging
    subset when `source` is None (n defaults to 1000 there, and to the whole file otherwise)."""
    if source is None:
        hint = "or pass a local file with --prompts FILE (.txt or .jsonl)"
        rows = load_hub_dataset(RTP, None, "train", local_hint=hint)
        rows = rows.filter(lambda row: bool(row["challenging"]))
        count = min(1000 if n is None else n, len(rows))
        return [prompt["text"] for prompt in rows.shuffle(seed=seed).select(range(count))["prompt"]]
    prompts = read_prompt_file(source)
    if n is not None and n < len(prompts):
        prompts = random.Random(seed).sample(prompts, n)
    return prompts


def read_prompt_file(path: str | Path) -> list[str]:
    """Prompts from a .jsonl file (`prompt` a string or {"text": ...} as in RealToxicityPrompts)
    or a text file (one prompt per line; blank lines skipped)."""
    path = Path(path)
    if path.suffix.lower() == ".jsonl":
        prompts = [_jsonl_prompt(path, number, record) for number, record in jsonl_objects(path)]
    else:
        prompts = [line.rstrip("\r\n") for line in text_lines(path) if line.strip()]  # U+2028 is text
    if not prompts:
        raise TaskvecError(f"prompt file {path} has no prompts")
    return prompts


def _jsonl_prompt(path: Path, number: int, record: dict) -> str:
    try:
        prompt = text_field(record, "prompt")
    except ValueError as err:
        raise TaskvecError(f"{path}:{number}: {err}") from None
    if not prompt.strip():
        raise TaskvecError(f"{path}:{number}: empty prompt")
    return prompt


def text_field(record, key: str) -> str:
    """record[key] as a string, accepting RealToxicityPrompts' {"text": ...} objects."""
    if not isinstance(record, dict) or key not in record:
        raise ValueError(f"expected a JSON object with a {key!r} field")
    value = record[key]
    if isinstance(value, dict):
        value = value.get("text")
    if not isinstance(value, str):
        raise ValueError(f"{key!r} must be a string or an object with a 'text' string")
    return value
