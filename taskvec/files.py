"""Opening input files that may be hostile: only regular files, never a FIFO or a device.

open() or read() of a FIFO (or a character device) named like an input blocks forever, so
every reader of user-given files (weights, JSON, text) opens through here.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from taskvec.errors import TaskvecError


def check_regular_file(path: str | Path) -> None:
    """Refuse anything but a regular file, before it is opened."""
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        raise TaskvecError(f"{path}: cannot read ({err.strerror or err})") from None
    if not stat.S_ISREG(mode):
        raise TaskvecError(f"{path}: not a regular file")


def open_regular(path: str | Path) -> int:
    """A read-only fd of the regular file `path`."""
    check_regular_file(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO swapped in since does not block
    except OSError as err:
        raise TaskvecError(f"{path}: cannot read ({err.strerror or err})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise TaskvecError(f"{path}: not a regular file")
    return fd


def read_regular(path: str | Path) -> bytes:
    """The bytes of the regular file `path`; anything else is a one-line error naming it."""
    fd = open_regular(path)
    try:
        with os.fdopen(fd, "rb") as handle:
            return handle.read()
    except OSError as err:
        raise TaskvecError(f"{path}: cannot read ({err.strerror or err})") from None
