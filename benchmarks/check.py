"""Check a merged checkpoint against a float64 reference, one tensor at a time.

Reads every input with the `safetensors` library, or `torch.load(mmap=True, weights_only=True)`
for pytorch_model.bin inputs (independent of taskvec's readers), so the check shares no code with
what it checks, and holds one tensor of each input at a time, so it runs on checkpoints larger
than memory. A PEFT LoRA adapter directory as a fine-tune is base + delta per target module,
delta = B @ A * lora_alpha / r (transposed with fan_in_fan_out, GPT-2's Conv1D), in float64.

Bound per element, for base - scale * (mean(ft) - base) computed in float32 by any of the
tools: each of their few float32 steps (differences, N-term sum, scaling, final add) rounds by
at most one unit roundoff u32 of a magnitude no larger than
    M = (1 + scale) * |base| + (scale / N) * sum_i |ft_i|,
so 2 * (N + 3) * u32 * M covers them with room for summation order; storing the result in a
16-bit dtype adds one unit roundoff of that dtype times |result|, plus half its smallest
subnormal step. A LoRA delta computed in float32 as r products summed and scaled adds at most
2 * (r + 1) * u32 * scaling * (|B| @ |A|) per fine-tune, times scale / N in the result.
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
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class CheckResult:
    tensors: int
    max_abs_error: float
    worst_error_over_bound: float  # <= 1 when every element is within its bound


class BinTensors:
    """The tensors of a directory's torch `.bin` files, memory-mapped (pages read on use)."""

    def __init__(self, directory: Path) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        for path in sorted(Path(directory).glob("*.bin")):
            self.tensors.update(torch.load(path, map_location="cpu", mmap=True, weights_only=True))

    def names(self) -> set[str]:
        return set(self.tensors)

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name]


class SafetensorsTensors:
    def __init__(self, directory: Path) -> None:
        self.files = tensor_files(directory)

    def names(self) -> set[str]:
        return set(self.files)

    def get(self, name: str) -> torch.Tensor:
        return _get(self.files, name)


def model_tensors(directory: Path):
    """A model directory's tensors by name: safetensors files, else torch .bin files."""
    if any(Path(directory).glob("*.safetensors")):
        return SafetensorsTensors(directory)
    return BinTensors(directory)


class LoraFinetune:
    """A PEFT LoRA adapter as a fine-tune: (value, extra error bound) of each base tensor."""

    def __init__(self, directory: Path) -> None:
        from safetensors.torch import load_file

        config = json.loads((Path(directory) / ADAPTER_CONFIG).read_text())
        assert config["peft_type"] == "LORA" and not config.get("use_rslora")
        self.transpose = bool(config.get("fan_in_fan_out"))
        factors = load_file(Path(directory) / ADAPTER_WEIGHTS)
        self.modules = {}
        for key in factors:
            if key.endswith(".lora_A.weight"):
                module = key.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight")
                a = factors[key].double()
                b = factors[key.replace(".lora_A.", ".lora_B.")].double()
                self.modules[f"{module}.weight"] = (a, b, config["lora_alpha"] / a.shape[0])
        assert len(self.modules) * 2 == len(factors), f"{directory}: tensors other than LoRA factors"

    def value(self, name: str, base64: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if name not in self.modules:
            return base64, None
        a, b, scaling = self.modules[name]
        delta, magnitude = (b @ a) * scaling, (b.abs() @ a.abs()) * scaling
        if self.transpose:
            delta, magnitude = delta.T, magnitude.T
        assert delta.shape == base64.shape, f"LoRA delta for '{name}' is {list(delta.shape)}"
        return base64 + delta, 2 * (a.shape[0] + 1) * UNIT_ROUNDOFF[torch.float32] * magnitude


class ModelFinetune:
    def __init__(self, directory: Path) -> None:
        self.tensors = model_tensors(directory)

    def value(self, name: str, base64: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.tensors.get(name).double(), None


def finetune(directory: Path):
    if (Path(directory) / ADAPTER_CONFIG).exists():
        return LoraFinetune(directory)
    return ModelFinetune(directory)


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
    base_tensors = model_tensors(base)
    out_files = tensor_files(output)
    fts = [finetune(p) for p in finetuned]
    expected = base_tensors.names() - {TIED}
    got = set(out_files) - {TIED}
    assert got == expected, f"{output}: tensor names differ from the base: {sorted(got ^ expected)[:5]}"
    n = len(finetuned)
    worst_abs, worst_ratio = 0.0, 0.0
    for name in sorted(expected):
        base_t = base_tensors.get(name)
        out_t = _get(out_files, name)
        assert out_t.shape == base_t.shape, f"{output}: '{name}' has shape {list(out_t.shape)}"
        assert out_t.dtype == base_t.dtype, f"{output}: '{name}' has dtype {out_t.dtype}"
        if not base_t.is_floating_point():
            assert torch.equal(out_t, base_t), f"{output}: non-float '{name}' differs from the base"
            continue
        b = base_t.double()
        ft_sum = torch.zeros_like(b)
        ft_abs = torch.zeros_like(b)
        extra = None  # error bound of LoRA deltas, summed over fine-tunes
        for ft in fts:
            value, ft_extra = ft.value(name, b)
            ft_sum += value
            ft_abs += value.abs()
            if ft_extra is not None:
                extra = ft_extra if extra is None else extra + ft_extra
        error, ratio = compare(out_t, b, ft_sum, ft_abs, n, scale, extra)
        assert ratio <= 1.0, (
            f"{output}: '{name}' is off the float64 reference by {error:.3e} ({ratio:.2f}x its bound)"
        )
        worst_abs = max(worst_abs, error)
        worst_ratio = max(worst_ratio, ratio)
    return CheckResult(len(expected), worst_abs, worst_ratio)


def compare(actual: torch.Tensor, base: torch.Tensor, ft_sum: torch.Tensor, ft_abs: torch.Tensor,
            n: int, scale: float, delta_bound: torch.Tensor | None = None) -> tuple[float, float]:
    """(max |actual - reference|, max error / bound) for one tensor; float64 base and sums.

    `delta_bound`: the fine-tunes' own rounding (LoRA deltas computed in float32), summed."""
    reference = base - scale * (ft_sum / n - base)
    magnitude = (1 + abs(scale)) * base.abs() + abs(scale) / n * ft_abs
    bound = 2 * (n + 3) * UNIT_ROUNDOFF[torch.float32] * magnitude
    if delta_bound is not None:
        bound += abs(scale) / n * delta_bound
    if actual.dtype != torch.float32:
        bound += UNIT_ROUNDOFF[actual.dtype] * reference.abs() + HALF_SUBNORMAL[actual.dtype]
    error = (actual.double() - reference).abs()
    ratio = error / bound.clamp_min(HALF_SUBNORMAL[torch.float32])
    return error.max().item(), ratio.max().item()
