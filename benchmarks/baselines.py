"""What the machine itself allows: reading every input once, writing one output, importing.

A streaming merge cannot beat reading each input byte once plus writing each output byte
once, and a command-line tool also pays its interpreter's import time. These are measured in
the same run as the tools, so the ratio `taskvec / (import + read + write)` is meaningful on a
noisy machine where absolute times are not.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from taskvec.io.writeback import start_writeback

BUFFER_BYTES = 16 * 2**20


def model_files(directory: Path) -> list[Path]:
    """Every file of a model directory (weights, index, config): what a merge tool opens."""
    return sorted(p for p in Path(directory).iterdir() if p.is_file())


def read_once(directories: list[Path]) -> tuple[float, int]:
    """Seconds and bytes to read every file of every directory once, into one reused buffer."""
    buffer = bytearray(BUFFER_BYTES)
    view = memoryview(buffer)
    total = 0
    started = time.perf_counter()
    for directory in directories:
        for path in model_files(directory):
            with open(path, "rb", buffering=0) as handle:
                while count := handle.readinto(view):
                    total += count
    return time.perf_counter() - started, total


def write_once(path: Path, nbytes: int) -> float:
    """Seconds to write `nbytes` to a new file and fsync it (taskvec fsyncs its output), each
    chunk's write-back started as it is written, as taskvec's shard writer does: without it the
    disk idles while the page cache fills, a floor taskvec's own writes beat."""
    chunk = memoryview(bytearray(min(BUFFER_BYTES, max(nbytes, 1))))
    started = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        written = 0
        while written < nbytes:
            count = os.write(fd, chunk[:min(len(chunk), nbytes - written)])
            start_writeback(fd, written, count)
            written += count
        os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - started
    path.unlink()
    return seconds


def physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


WEIGHT_SUFFIXES = (".safetensors", ".bin")


def weights_bytes(directory: Path) -> int:
    """Bytes of a model directory's weight files (safetensors or torch .bin)."""
    return sum(p.stat().st_size for p in Path(directory).iterdir() if p.suffix in WEIGHT_SUFFIXES)


IMPORT_STATEMENTS = {"import torch": "import torch", "import taskvec": "import taskvec.cli.merge, taskvec.merge"}


def import_command(statement: str) -> list[str]:
    """A fresh interpreter that only imports, e.g. `import torch`."""
    return [sys.executable, "-c", statement]
