"""Checks that a command refused bad input the promised way: one `Error:` line, nothing changed."""

import hashlib
from pathlib import Path

from click.testing import CliRunner

from taskvec.cli import main


def snapshot(root: Path) -> dict:
    """Every path under root (hidden ones too, symlinks not followed) with its file's sha256."""
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else p.is_dir())
            for p in sorted(root.rglob("*"))}


def refused(root: Path, *args, where: str, status: int = 1) -> str:
    """Run `taskvec ARGS`; assert it exits with `status`, its output ends in exactly one
    `Error: WHERE...` line and has no traceback, and nothing under `root` changed. The error line."""
    before = snapshot(root)
    result = CliRunner().invoke(main, [str(arg) for arg in args])
    assert isinstance(result.exception, SystemExit), result.exception  # not an uncaught exception
    assert result.exit_code == status, result.output
    lines = result.output.strip().splitlines()
    assert "Traceback" not in result.output
    assert [line for line in lines if line.startswith("Error:")] == lines[-1:], result.output
    assert lines[-1].startswith(f"Error: {where}"), result.output
    assert snapshot(root) == before
    return lines[-1]
