"""Check a merged checkpoint against a float64 reference, one tensor at a time.

Reads every input with the `safetensors` library (independent of taskvec's reader), so the
check shares no code with what it checks, and holds one tensor of each input at a time, so it
runs on checkpoints larger than memory.

Bound per element, for base - scale * (mean(ft) - base) computed in float32 by any of the
tools: each of their few float32 steps (differences, N-term sum, scaling, final add) rounds by
at most one unit roundoff u32 of a magnitude no larger than
    M = (1 + scale) * |base| + (scale / N) * sum_i |ft_i|,
so 2 * (N + 3) * u32 * M covers them with room for summation order; storing the result in a
16-bit dtype adds one unit roundoff of that dtype times |result|, plus half its smallest
subnormal step.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
HALF_SUBNORMAL = {torch.float32: 2.0**-150, torch.bfloat16: 2.0**-134, torch.float16: 2.0**-25}
INDEX = "model.safetensors.index.json"
TIED = "lm_head.weight"


@dataclass(frozen=True)
class CheckResult:
    tensors: int
    max_abs_error: float
    worst_error_over_bound: float  # <= 1 when every element is within its bound


def tensor_files(directory: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it, following a shard index if present."""
    directory = Path(directory)
    index = directory / INDEX
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: directory / file for name, file in weight_map.items()}
    files = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(path, "pt") as handle:
            files.update(dict.fromkeys(handle.keys(), path))
    return files


def _get(files: dict[str, Path], name: str) -> torch.Tensor:
    with safe_open(files[name], "pt") as handle:
        return handle.get_tensor(name)


def check_negated_mean(output: Path, base: Path, finetuned: list[Path], scale: float) -> CheckResult:
    """Raise AssertionError naming the first tensor outside its bound, or tensors that differ."""
    base_files = tensor_files(base)
    out_files = tensor_files(output)
    ft_files = [tensor_files(p) for p in finetuned]
    expected = set(base_files) - {TIED}
    got = set(out_files) - {TIED}
    assert got == expected, f"{output}: tensor names differ from the base: {sorted(got ^ expected)[:5]}"
    n = len(finetuned)
    worst_abs, worst_ratio = 0.0, 0.0
    for name in sorted(expected):
        base_t = _get(base_files, name)
        out_t = _get(out_files, name)
        assert out_t.shape == base_t.shape, f"{output}: '{name}' has shape {list(out_t.shape)}"
        assert out_t.dtype == base_t.dtype, f"{output}: '{name}' has dtype {out_t.dtype}"
        if not base_t.is_floating_point():
            assert torch.equal(out_t, base_t), f"{output}: non-float '{name}' differs from the base"
            continue
        b = base_t.double()
        ft_sum = torch.zeros_like(b)
        ft_abs = torch.zeros_like(b)
        for files in ft_files:
            ft = _get(files, name).double()
            ft_sum += ft
            ft_abs += ft.abs()
        error, ratio = compare(out_t, b, ft_sum, ft_abs, n, scale)
        assert ratio <= 1.0, (
            f"{output}: '{name}' is off the float64 reference by {error:.3e} ({ratio:.2f}x its bound)"
        )
        worst_abs = max(worst_abs, error)
        worst_ratio = max(worst_ratio, ratio)
    return CheckResult(len(expected), worst_abs, worst_ratio)


def compare(actual: torch.Tensor, base: torch.Tensor, ft_sum: torch.Tensor, ft_abs: torch.Tensor,
            n: int, scale: float) -> tuple[float, float]:
    """(max |actual - reference|, max error / bound) for one tensor; float64 base and sums."""
    reference = base - scale * (ft_sum / n - base)
    magnitude = (1 + abs(scale)) * base.abs() + abs(scale) / n * ft_abs
    bound = 2 * (n + 3) * UNIT_ROUNDOFF[torch.float32] * magnitude
    if actual.dtype != torch.float32:
        bound += UNIT_ROUNDOFF[actual.dtype] * reference.abs() + HALF_SUBNORMAL[actual.dtype]
    error = (actual.double() - reference).abs()
    ratio = error / bound.clamp_min(HALF_SUBNORMAL[torch.float32])
    return error.max().item(), ratio.max().item()
