"""The original research code's merge, for comparison: whole models in memory, then save.

Mimics `scripts/average_model.py` (load every fine-tuned model with transformers, average
their state dicts) followed by `scripts/generate_negated_model.py` (task vector = averaged -
pretrained, negated, applied to the pretrained model with a scaling coefficient, then
`save_pretrained`). It is the favourable variant: one process and one import instead of two
scripts, and no intermediate averaged model written to disk. Arithmetic is float32, as the
research code's transformers-4 default; the output is saved in the base's stored dtype.

    python benchmarks/original_approach.py --base BASE --scale 1.0 --output OUT FT1 FT2 ...
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoConfig, AutoModelForCausalLM


def load(path: str):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def average_state_dicts(paths: list[str]) -> dict[str, torch.Tensor]:
    """average_model.py: every model loaded, state dicts summed and divided by N."""
    state_dicts = [load(path).state_dict() for path in paths]
    return {key: sum(sd[key] for sd in state_dicts) / len(state_dicts) for key in state_dicts[0]}


def negate_into(pretrained, averaged: dict[str, torch.Tensor], scale: float):
    """generate_negated_model.py: TaskVector(pretrained, averaged), negated, apply_to(scale)."""
    base = pretrained.state_dict()
    vector = {k: averaged[k] - v for k, v in base.items() if v.dtype not in (torch.int64, torch.uint8)}
    negated = {k: -v for k, v in vector.items()}
    pretrained.load_state_dict({k: base[k] + scale * negated[k] for k in vector}, strict=False)
    return pretrained


def stored_dtype(path: str) -> torch.dtype:
    config = AutoConfig.from_pretrained(path)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("finetuned", nargs="+")
    parser.add_argument("--base", required=True)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    with torch.no_grad():
        averaged = average_state_dicts(args.finetuned)
        model = negate_into(load(args.base), averaged, args.scale)
    model.to(stored_dtype(args.base)).save_pretrained(args.output)


if __name__ == "__main__":
    main()
