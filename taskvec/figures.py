"""Saving matplotlib figures in one place: written aside, renamed into place, always closed."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def save_figure(figure, output: Path) -> Path:
    """Write `figure` as a PNG to `output` through a temporary file beside it (a failed save
    leaves no half-written picture), and close it."""
    from matplotlib import pyplot as plt

    output.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".png", dir=output.parent)
    os.close(handle)
    try:
        figure.savefig(staging, dpi=120)
        os.replace(staging, output)
    finally:
        plt.close(figure)
        if os.path.exists(staging):
            os.remove(staging)
    return output
