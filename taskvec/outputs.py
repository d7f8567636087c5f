"""Output directories that never clobber: checked up front, built aside, moved into place last.

Every command that writes a directory (merge, data split, train-splits, eval, score) goes
through here, so a crash leaves either the complete result or nothing, and no input is lost.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from taskvec.errors import TaskvecError


def check_output(output: str | Path, inputs: Sequence[str | Path], overwrite: bool) -> Path:
    """Refuse an output that is an input, contains one (replacing it would delete the input),
    lies inside an input directory, holds the current directory, or exists (unless
    `overwrite`). Returns it as a Path."""
    output = Path(output)
    target = output.resolve()
    if target == Path.cwd().resolve() or target in Path.cwd().resolve().parents:
        raise TaskvecError(f"output {output} holds the current directory; choose another directory")
    for path in inputs:
        source = Path(path).resolve()
        if target == source or target in source.parents:
            raise TaskvecError(f"input {path} is inside output {output}; choose another directory")
        if source.is_dir() and source in target.parents:
            raise TaskvecError(f"output {output} is inside input {path}; choose another directory")
    if output.exists():
        if not output.is_dir():
            raise TaskvecError(f"output {output} exists and is not a directory")
        if not overwrite:
            raise TaskvecError(f"output {output} already exists; pass --overwrite to replace it")
    return output


@contextmanager
def staged_directory(output: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary directory beside `output`; move it into place only on success."""
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        yield staging
        staging.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the result should not be
        if output.exists():
            if not overwrite:
                raise TaskvecError(f"output {output} already exists; pass --overwrite to replace it")
            retired = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
            output.rename(retired / output.name)
            staging.rename(output)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            staging.rename(output)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
