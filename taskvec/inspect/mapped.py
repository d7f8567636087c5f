"""Inputs mapped read-only into memory, so that the compiled pass reads the page cache in place.

Reading a chunk copies it from the page cache into a buffer. Inspect does little arithmetic per
byte, and on two cores that copy, and the memory traffic it adds, cost as much as a third of the
statistics. A tensor stored in the pass's dtype (float32 or float64) at an aligned offset is
instead read where the mapping puts it; the pages of each job are released once it is done, so
resident memory stays a few chunks whatever the model's size. The rest (bf16 and fp16 inputs,
LoRA modules, mixed dtypes) goes through the merge's reader (stream.StackedReader).

Files are mapped whole, at most `max_open` at a time (a mapping holds a file descriptor), and
nothing is ever written through a mapping (PROT_READ).
"""

from __future__ import annotations

import mmap
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from taskvec.errors import TaskvecError
from taskvec.files import open_regular
from taskvec.io.safetensors_file import DTYPES, TensorEntry

_PAGE = mmap.PAGESIZE


class MappedFiles:
    """Addresses of tensors' elements in read-only mappings of their files.

    An address stays valid until `done()` or `close()`: call `done()` between jobs, never while
    the compiled pass may read a job's addresses.
    """

    def __init__(self, max_open: int = 64) -> None:
        self._maps: OrderedDict[Path, tuple[mmap.mmap, int]] = OrderedDict()  # the mapping, its address
        self.max_open = max_open
        self._previous: list[tuple[TensorEntry, int, int, torch.dtype]] = []

    @staticmethod
    def readable(source, start: int, dtype: torch.dtype) -> bool:
        """Whether element `start` on of `source` can be read in place as `dtype`: stored so (not
        a LoRA module, not another dtype), at an offset aligned for it."""
        return (isinstance(source, TensorEntry) and DTYPES[source.dtype] == dtype
                and (source.offset + start * dtype.itemsize) % dtype.itemsize == 0)

    def address(self, source: TensorEntry, start: int, dtype: torch.dtype) -> int:
        """The address of element `start` of a `readable` source."""
        return self._base(source.path) + source.offset + start * dtype.itemsize

    def done(self, ranges: list[tuple[TensorEntry, int, int, torch.dtype]]) -> None:
        """A job read (source, start, numel, dtype) in place: drop the mappings' pages of its
        ranges and of the previous job's (the page cache keeps them), so that resident memory stays
        the job in flight; then unmap the least recently used files beyond `max_open`. The
        previous job's pages again, because a fault maps the pages around it too (fault-around):
        reading the start of a range maps the end of the one before."""
        for source, start, numel, dtype in self._previous + ranges:
            mapping = self._maps[source.path][0]
            begin = source.offset + start * dtype.itemsize
            end = begin + numel * dtype.itemsize
            first, last = begin - begin % _PAGE, min(len(mapping), -(-end // _PAGE) * _PAGE)
            if last > first and hasattr(mmap, "MADV_DONTNEED"):
                mapping.madvise(mmap.MADV_DONTNEED, first, last - first)
        while len(self._maps) > self.max_open:
            self._maps.popitem(last=False)[1][0].close()
        self._previous = [r for r in ranges if r[0].path in self._maps]

    def _base(self, path: Path) -> int:
        entry = self._maps.get(path)
        if entry is not None:
            self._maps.move_to_end(path)
            return entry[1]
        fd = open_regular(path)
        try:
            mapping = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
        except (OSError, ValueError) as err:
            raise TaskvecError(f"{path}: cannot map the file for reading ({err})") from None
        finally:
            os.close(fd)
        view = np.frombuffer(mapping, dtype=np.uint8)
        base = view.ctypes.data
        del view  # no buffer export may outlive this: close() would refuse
        self._maps[path] = (mapping, base)
        return base

    def close(self) -> None:
        self._previous = []
        while self._maps:
            self._maps.popitem()[1][0].close()
