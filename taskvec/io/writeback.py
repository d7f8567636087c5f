"""Start the disk writing of bytes just written, without waiting for it (Linux's sync_file_range).

The kernel starts writing dirty pages back only once they are 30 s old or a tenth of memory is
dirty: a merge writing K outputs would leave the disk idle for its first gigabytes and then wait
for all of them in the final fsync. Starting each range's write-back as soon as it is written
keeps the disk busy alongside the reads and the arithmetic; the fsync before each shard's header
is still what makes the data durable. Elsewhere (no sync_file_range) this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_WRITE = 2  # SYNC_FILE_RANGE_WRITE: start writing the range's dirty pages, do not wait


def _load():
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_sync_file_range = _load()


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing bytes offset..offset+nbytes of fd to disk (a hint: a
    failure, such as a file system without it, changes nothing that fsync does not settle)."""
    if _sync_file_range is not None and nbytes > 0:
        _sync_file_range(fd, offset, nbytes, _WRITE)
