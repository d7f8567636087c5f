"""Single output files (a filtered JSONL, a plot): the file counterpart of taskvec.outputs."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from taskvec.errors import TaskvecError


def check_output_file(output: str | Path, inputs: Sequence[str | Path], overwrite: bool) -> Path:
    """Refuse an output file that is one of the inputs (by any name: a symlink, a hard link), is
    a directory, or exists (unless `overwrite`), before anything is read. Returns it as a Path."""
    output = Path(output)
    if output.exists():
        for path in inputs:
            if Path(path).exists() and os.path.samefile(output, path):
                raise TaskvecError(f"output {output} is the input {path}; choose another file")
        if output.is_dir():
            raise TaskvecError(f"output {output} is a directory, not a file")
        if not overwrite:
            raise TaskvecError(f"output {output} already exists; pass --overwrite to replace it")
    return output
