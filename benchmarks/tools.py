"""The merges being compared, as commands, and the checkpoint sets they run on.

Every tool computes base - scale * (mean(ft) - base) from the same inputs into a fresh
output directory; `taskvec` is the command a user runs (on CPU), `taskvec-cuda` the same with
`--device cuda` (fused Triton kernel, pinned double-buffered copies; GPU machines only),
`original` the research code's way, `mergekit` mergekit's task_arithmetic.
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


@dataclass(frozen=True)
class Case:
    """One merge problem: a synthetic GPT-2 shape, its dtype and the number of fine-tunes."""

    size: str
    n: int
    dtype: str = "float32"
    scale: float = 1.0

    @property
    def id(self) -> str:
        return f"{self.size}-{self.dtype}-N{self.n}"


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


def ensure_checkpoints(root: Path, size: str, dtype: str, n: int) -> Inputs:
    """A synthetic base and n fine-tunes under root/SIZE-DTYPE, writing only what is missing.

    Each model is marked complete only once fully written, so an interrupted run is repaired;
    a set made for N=16 also serves N=1 and N=5.
    """
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
