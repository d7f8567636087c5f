"""Sharded safetensors output whose layout is fixed before any byte is written.

Every output tensor's size is known from the plan, so shard membership, headers and offsets are
computed up front; chunks are then written with `os.pwrite` at their offsets, in any order.
Shards are named and indexed as `save_pretrained` does, so `from_pretrained` loads them.
"""

from __future__ import annotations

import json
import math
import os
import re
from decimal import Decimal
from pathlib import Path

from taskvec.errors import TaskvecError
from taskvec.io.safetensors_file import OutputSpec, encode_header
from taskvec.io.writeback import start_writeback

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_SIZE = 2**50  # 1024 TiB: larger sizes are typos, and would overflow float or int64 arithmetic
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """'50GB' -> 50 * 10**9, '512MiB' -> 512 * 2**20, as transformers reads max_shard_size."""
    if isinstance(text, int):
        value = Decimal(text)
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
        if not match or match.group(2).upper() not in _UNITS:
            raise TaskvecError(f"cannot read size {_clip(text)}: use a number with B, KB, MB, GB, TB, KiB, MiB, "
                               "GiB or TiB")
        value = Decimal(match.group(1)) * _UNITS[match.group(2).upper()]  # exact: no float overflow
    if value > MAX_SIZE:
        raise TaskvecError(f"size {_clip(text)} is too large (at most {MAX_SIZE} bytes, 1024TiB)")
    if int(value) <= 0:
        raise TaskvecError(f"size {_clip(text)} must be positive")
    return int(value)


def _clip(text: str | int, limit: int = 40) -> str:
    """The size as typed, shortened: a line of 300 digits helps nobody."""
    text = repr(str(text))
    return text if len(text) <= limit else text[:limit - 4] + "...'"


def plan_shards(specs: list[OutputSpec], max_shard_bytes: int) -> list[list[OutputSpec]]:
    """Shards as `save_pretrained` cuts them (huggingface_hub's `split_state_dict_into_shards`):
    filled in order, a new one begun where the next tensor would pass the limit, and a tensor
    larger than the limit given a shard of its own while the one being filled stays open."""
    shards: list[list[OutputSpec]] = []
    current: list[OutputSpec] = []
    used = 0
    for spec in specs:
        if spec.nbytes > max_shard_bytes:
            shards.append([spec])
            continue
        if current and used + spec.nbytes > max_shard_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(spec)
        used += spec.nbytes
    return shards + [current] if current or not shards else shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


class ShardWriter:
    """Creates the shard files at their final size, then takes tensor bytes at any offset.

    A shard's header is written last, in `close()`, once its data is on disk: until then its
    first 8 bytes (the header length) are zero, which every reader refuses, so a shard left by
    a crash (SIGKILL, power loss) can never be loaded as a model full of zeros.
    Used as a context manager, an error on the way leaves the shards headerless.
    """

    def __init__(
        self, directory: Path, specs: list[OutputSpec], max_shard_bytes: int, metadata: dict[str, str]
    ) -> None:
        self.directory = Path(directory)
        shards = plan_shards(specs, max_shard_bytes)
        self.files = shard_names(len(shards))
        self._fds: list[int] = []
        self._headers: list[bytes] = []
        self._where: dict[str, tuple[int, int]] = {}
        self.weight_map: dict[str, str] = {}
        self.total_size = sum(spec.nbytes for spec in specs)
        self.total_parameters = sum(math.prod(spec.shape) for spec in specs)
        for file_name, shard in zip(self.files, shards, strict=True):
            header, offsets = encode_header(shard, metadata)
            fd = os.open(self.directory / file_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            self._fds.append(fd)
            self._headers.append(header)
            os.ftruncate(fd, len(header) + sum(spec.nbytes for spec in shard))
            for spec in shard:
                self._where[spec.name] = (fd, offsets[spec.name])
                self.weight_map[spec.name] = file_name

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.close(complete=kind is None)

    def write(self, name: str, start: int, data: memoryview) -> None:
        """Write `data` at byte `start` of tensor `name`."""
        fd, offset = self._where[name]
        _pwrite_all(fd, data, offset + start)
        start_writeback(fd, offset + start, len(data))

    def close(self, complete: bool = True) -> None:
        """Flush the data, then write and flush the headers, and the index when there is more
        than one shard. complete=False (a failed write) closes the shards headerless, unloadable."""
        if not self._fds:
            return
        if complete:
            for fd, header in zip(self._fds, self._headers, strict=True):
                os.fsync(fd)  # the data is on disk before a header says the shard is complete
                _pwrite_all(fd, memoryview(header), 0)
                os.fsync(fd)
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
        if complete and len(self.files) > 1:
            metadata = {"total_parameters": self.total_parameters, "total_size": self.total_size}
            index = {"metadata": metadata, "weight_map": self.weight_map}
            (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)
