"""mergekit's `task_arithmetic` configured to compute exactly taskvec's negated mean.

task_arithmetic gives base + sum_i w_i * (ft_i - base); with w_i = -scale / N and
`normalize: false` that is base - scale * (mean(ft) - base). Arithmetic in float32 and the
output in the inputs' dtype, as taskvec does. The config is written as JSON, which is YAML.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path


def mergekit_yaml() -> str | None:
    """The mergekit-yaml entry point beside this interpreter, else on PATH (None: not installed)."""
    beside = Path(sys.executable).parent / "mergekit-yaml"
    return str(beside) if beside.exists() else shutil.which("mergekit-yaml")


def write_config(path: Path, base: Path, finetuned: list[Path], scale: float, out_dtype: str) -> Path:
    weight = -scale / len(finetuned)
    config = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [{"model": str(p), "parameters": {"weight": weight}} for p in finetuned],
        "parameters": {"normalize": False},
        "dtype": "float32",
        "out_dtype": out_dtype,
    }
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


def mergekit_command(config: Path, output: Path) -> list[str]:
    executable = mergekit_yaml()
    if executable is None:
        raise RuntimeError("mergekit is not installed: pip install 'taskvec[bench]'")
    return [executable, str(config), str(output), "--quiet"]
