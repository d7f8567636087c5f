"""The merges being compared, as commands, and the checkpoint sets they run on.

Every tool computes base - scale * (mean(ft) - base) from the same inputs into a fresh
output directory; `taskvec` is the command a user runs (on CPU), `taskvec-cuda` the same with
`--device cuda` (fused Triton kernel, pinned double-buffered copies; GPU machines only),
`original` the research code's way, `mergekit` mergekit's task_arithmetic.

A case's inputs come in one of three formats (`Case.format`): `safetensors` (what
save_pretrained writes), `bin` (the same weights as `torch.save(state_dict)` pytorch_model.bin
files) or `lora` (the safetensors base plus N PEFT LoRA adapter directories as the fine-tunes).
Only taskvec runs on the last two; their rows are read next to the safetensors case's.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from benchmarks.mergekit_runner import mergekit_command, mergekit_yaml, write_config

MERGERS = ("taskvec", "taskvec-cuda", "original", "mergekit")
BASELINES = ("import torch", "import taskvec", "read+write")
FORMATS = ("safetensors", "bin", "lora")
FORMAT_TOOLS = ("read+write", "taskvec", "taskvec-cuda")  # .bin and LoRA cases: taskvec only
# The LoRA adapters: PEFT's layout for GPT-2 (Conv1D weights are (in, out): fan_in_fan_out).
LORA_RANK, LORA_ALPHA = 16, 32
LORA_TARGETS = ("c_attn", "c_proj", "c_fc")


@dataclass(frozen=True)
class Case:
    """One merge problem: a synthetic GPT-2 shape, its dtype, the number of fine-tunes and their format."""

    size: str
    n: int
    dtype: str = "float32"
    scale: float = 1.0
    format: str = "safetensors"

    @property
    def id(self) -> str:
        suffix = "" if self.format == "safetensors" else f"-{self.format}"
        return f"{self.size}-{self.dtype}-N{self.n}{suffix}"

    @property
    def tools(self) -> tuple[str, ...]:
        return BASELINES + MERGERS if self.format == "safetensors" else FORMAT_TOOLS


@dataclass(frozen=True)
class Inputs:
    base: Path
    finetuned: list[Path]

    @property
    def directories(self) -> list[Path]:
        return [self.base, *self.finetuned]


def taskvec_executable() -> str | None:
    beside = Path(sys.executable).parent / "taskvec"
    return str(beside) if beside.exists() else shutil.which("taskvec")


def unavailable(tool: str) -> str | None:
    """Why `tool` cannot run here, or None."""
    if tool == "mergekit" and mergekit_yaml() is None:
        return "mergekit is not installed (pip install 'taskvec[bench]'); skipping the mergekit comparison"
    if tool.startswith("taskvec") and taskvec_executable() is None:
        return "the taskvec command is not installed (pip install -e .)"
    if tool == "taskvec-cuda":
        import torch

        if not torch.cuda.is_available() or importlib.util.find_spec("triton") is None:
            return "needs a CUDA GPU and triton (taskvec merge --device cuda)"
    return None


def command(tool: str, inputs: Inputs, scale: float, output: Path, workdir: Path) -> list[str]:
    """The command line that makes `tool` write the negated mean of `inputs` to `output`."""
    fts = [str(p) for p in inputs.finetuned]
    if tool in ("taskvec", "taskvec-cuda"):
        device = "cuda" if tool == "taskvec-cuda" else "cpu"
        return [taskvec_executable(), "merge", "--base", str(inputs.base), "--scale", str(scale),
                "--output", str(output), "--device", device, "--no-progress", *fts]
    if tool == "original":
        script = Path(__file__).with_name("original_approach.py")
        return [sys.executable, str(script), "--base", str(inputs.base), "--scale", str(scale),
                "--output", str(output), *fts]
    if tool == "mergekit":
        config = write_config(workdir / "mergekit.yml", inputs.base, inputs.finetuned, scale,
                              _stored_dtype(inputs.base))
        return mergekit_command(config, output)
    raise ValueError(f"unknown tool {tool!r}")


def _stored_dtype(model: Path) -> str:
    config = json.loads((model / "config.json").read_text())
    return config.get("dtype") or config.get("torch_dtype") or "float32"


def ensure_checkpoints(root: Path, size: str, dtype: str, n: int, format: str = "safetensors") -> Inputs:
    """A synthetic base and n fine-tunes under root/SIZE-DTYPE[-FORMAT], writing only what is missing.

    Each model is marked complete only once fully written, so an interrupted run is repaired;
    a set made for N=16 also serves N=1 and N=5. `bin` sets are made from the safetensors set
    (same values); `lora` sets are adapters onto the safetensors base.
    """
    if format == "bin":
        return _ensure_bin(root, size, dtype, n)
    if format == "lora":
        return _ensure_lora(root, size, dtype, n)
    if format != "safetensors":
        raise ValueError(f"unknown format {format!r}: {', '.join(FORMATS)}")
    from taskvec.synthetic import write_model

    directory = Path(root) / f"{size}-{dtype}"
    names = ["base"] + [f"ft-{i:02d}" for i in range(n)]
    for model, name in enumerate(names):  # model 0 is the base, i + 1 the i-th fine-tune
        done = directory / f"{name}.complete"
        if not done.exists():
            shutil.rmtree(directory / name, ignore_errors=True)
            write_model(directory / name, size, model, dtype=dtype)
            done.touch()
    return Inputs(directory / "base", [directory / name for name in names[1:]])


def _ensure_bin(root: Path, size: str, dtype: str, n: int) -> Inputs:
    """The safetensors set's models as `torch.save(state_dict)` pytorch_model.bin (zip) + config.json."""
    import torch
    from safetensors.torch import load_file

    source = ensure_checkpoints(root, size, dtype, n)
    directory = Path(root) / f"{size}-{dtype}-bin"
    outputs = []
    for model in source.directories:
        target = directory / model.name
        done = directory / f"{model.name}.complete"
        if not done.exists():
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
            state_dict = {}
            for path in sorted(model.glob("*.safetensors")):
                state_dict.update(load_file(path))  # one model at a time: 0.5 GB at gpt2 fp32
            torch.save(state_dict, target / "pytorch_model.bin")
            del state_dict
            shutil.copy2(model / "config.json", target / "config.json")
            done.touch()
        outputs.append(target)
    return Inputs(outputs[0], outputs[1:])


def _ensure_lora(root: Path, size: str, dtype: str, n: int) -> Inputs:
    """n PEFT LoRA adapter dirs (rank 16, alpha 32, c_attn/c_proj/c_fc, fan_in_fan_out) for the
    safetensors base: A and B random from seeds, whole (they are small)."""
    import torch
    from safetensors.torch import save_file

    from taskvec.synthetic import DTYPES, gpt2_shapes

    base = ensure_checkpoints(root, size, dtype, 0).base
    directory = Path(root) / f"{size}-{dtype}-lora"
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base),
        "r": LORA_RANK, "lora_alpha": LORA_ALPHA, "target_modules": list(LORA_TARGETS),
        "fan_in_fan_out": True, "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
        "modules_to_save": None, "inference_mode": True,
    }
    torch_dtype = DTYPES[dtype]
    adapters = []
    for i in range(n):
        target = directory / f"adapter-{i:02d}"
        done = directory / f"{target.name}.complete"
        if not done.exists():
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
            generator = torch.Generator().manual_seed(1_000 + i)
            tensors = {}
            for name, shape in gpt2_shapes(size):
                module = name.removesuffix(".weight")
                if not name.endswith(".weight") or module.rsplit(".", 1)[-1] not in LORA_TARGETS:
                    continue
                fan_in, fan_out = shape  # Conv1D stores (in, out)
                key = f"base_model.model.{module}"
                # delta elements ~1e-3, like the full fine-tunes' (taskvec.synthetic)
                a = torch.randn(LORA_RANK, fan_in, generator=generator) * 0.02
                b = torch.randn(fan_out, LORA_RANK, generator=generator) * 6e-3
                tensors[f"{key}.lora_A.weight"] = a.to(torch_dtype).contiguous()
                tensors[f"{key}.lora_B.weight"] = b.to(torch_dtype).contiguous()
            save_file(tensors, target / "adapter_model.safetensors", metadata={"format": "pt"})
            (target / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
            done.touch()
        adapters.append(target)
    return Inputs(base, adapters)
