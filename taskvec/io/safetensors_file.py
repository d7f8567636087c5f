"""Safetensors files handled by header and byte range, never by mapping the whole file.

`safetensors.safe_open` mmaps a file and every page it touches stays resident, so reading N+1
checkpoints that way costs N+1 models of memory. Here the header (8-byte little-endian length,
then JSON) is parsed and validated by hand, tensor bytes are read with `os.preadv` into buffers
the caller reuses, and outputs are written at offsets fixed by a header computed up front.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from taskvec.errors import TaskvecError
from taskvec.files import open_regular
from taskvec.jsonfile import parse_json

# safetensors dtype code -> torch dtype
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "BOOL": torch.bool,
}
CODES: dict[torch.dtype, str] = {dtype: code for code, dtype in DTYPES.items()}
MAX_HEADER_BYTES = 100_000_000  # the limit safetensors itself enforces
U64 = 2**64  # safetensors reads shapes and offsets as 64-bit unsigned integers
ENTRY_KEYS = {"dtype", "shape", "data_offsets"}


def itemsize(code: str) -> int:
    return DTYPES[code].itemsize


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes live: file, absolute byte offset, dtype and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    path: Path
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]


def read_header(path: Path) -> SafetensorsHeader:
    """Parse and validate a safetensors header; reads only the header bytes.

    At least as strict as the safetensors library: a file it refuses is refused here too, so no
    damaged header is read with its tensors shifted (a silently corrupt merge).
    """
    path = Path(path)
    try:
        with os.fdopen(open_regular(path), "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise TaskvecError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise TaskvecError(
                    f"{path}: corrupt or truncated safetensors header "
                    f"(header length {header_len}, file size {size})"
                )
            raw = handle.read(header_len)
    except OSError as err:
        raise TaskvecError(f"{path}: cannot read ({err.strerror or err})") from None
    header = parse_json(raw, path, expect=dict)
    _check_strict_json(path, raw)
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(
        isinstance(v, str) and _is_text(v) for v in metadata.values()
    ):
        raise TaskvecError(f"{path}: corrupt safetensors header (__metadata__ must map names to strings)")
    if not header:
        raise TaskvecError(f"{path}: holds no tensors")
    data_start = 8 + header_len
    tensors = {
        name: _parse_entry(path, name, info, data_start) for name, info in header.items()
    }
    _check_layout(path, tensors.values(), data_start, size)
    return SafetensorsHeader(path=path, tensors=tensors, metadata=metadata)


def _check_strict_json(path: Path, raw: bytes) -> None:
    """Refuse what Python's json reads and safetensors' parser does not: a key given twice
    (Python keeps the last), a name with a lone surrogate (`\\ud800`), `-0` (a float there).
    parse_json has already refused everything else a decoder can."""

    def unique(pairs):
        keys = [key for key, _ in pairs]
        if len(set(keys)) != len(keys):
            twice = next(key for key in keys if keys.count(key) > 1)
            raise TaskvecError(f"{path}: corrupt safetensors header (key {twice!r} appears twice)")
        if not all(_is_text(key) for key in keys):
            raise TaskvecError(f"{path}: corrupt safetensors header (a name is not valid Unicode)")

    def integer(text):
        if text == "-0":
            raise TaskvecError(f"{path}: corrupt safetensors header (-0 is not a size)")
        return int(text)

    json.loads(raw.decode("utf-8"), object_pairs_hook=unique, parse_int=integer)


def _is_text(text: str) -> bool:
    """False for strings with lone surrogates (JSON `\\ud800`), which are no valid UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_u64(value: object) -> bool:
    """A JSON integer safetensors reads as a size (bool is an int in Python; `true` is not)."""
    return type(value) is int and 0 <= value < U64


def _parse_entry(path: Path, name: str, info: object, data_start: int) -> TensorEntry:
    where = f"{path}: tensor {name!r}"
    if not name.isprintable():  # a newline in a name would break every one-line error naming it
        raise TaskvecError(f"{where}: name has unprintable characters (corrupt header)")
    if not isinstance(info, dict) or info.keys() != ENTRY_KEYS:
        raise TaskvecError(f"{where}: corrupt header entry (needs exactly dtype, shape, data_offsets)")
    code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(code, str) or code not in DTYPES:
        raise TaskvecError(f"{where}: unknown dtype {code!r}")
    if not isinstance(shape, list) or not all(_is_u64(d) for d in shape):
        raise TaskvecError(f"{where}: corrupt shape {shape!r}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_u64(o) for o in offsets) \
            or offsets[0] > offsets[1]:
        raise TaskvecError(f"{where}: corrupt data_offsets {offsets!r}")
    extent = 1  # the product with zeros as ones: torch's strides must fit an int64, and it
    for dim in shape:  # bounds safetensors' own check (the product may not overflow on the way)
        extent *= max(dim, 1)
        if extent >= 2**63:
            raise TaskvecError(f"{where}: shape {shape} is too large (corrupt header)")
    nbytes = offsets[1] - offsets[0]
    expected = math.prod(shape) * itemsize(code)
    if nbytes != expected:
        raise TaskvecError(
            f"{where}: holds {nbytes} bytes but {code}{shape} needs {expected} (corrupt header)"
        )
    return TensorEntry(name, code, tuple(shape), path, data_start + offsets[0], nbytes)


def _check_layout(path: Path, entries, data_start: int, size: int) -> None:
    """Byte ranges must tile the data section to the end of the file, without holes or overlaps:
    a header length a few bytes off still parses (inside the padding) and shifts every tensor."""
    end = data_start
    for entry in sorted(entries, key=lambda e: (e.offset, e.nbytes)):
        if entry.offset != end:
            kind = "overlaps the previous tensor" if entry.offset < end else "leaves a gap"
            raise TaskvecError(f"{path}: tensor {entry.name!r} {kind} (corrupt header)")
        end = entry.offset + entry.nbytes
        if end > size:
            raise TaskvecError(
                f"{path}: truncated: tensor {entry.name!r} ends at byte {end}, file has {size}"
            )
    if end != size:
        raise TaskvecError(
            f"{path}: corrupt header: the tensors end at byte {end}, but the file has {size} bytes "
            "(file not fully covered)"
        )


class FileReader:
    """Reads byte ranges with os.preadv into caller-owned buffers.

    Keeps the `max_open` most recently used files open: a merge of many sharded checkpoints
    (6 x 191 shards for a 405B model and 5 fine-tunes) must not run into the fd limit.
    """

    def __init__(self, max_open: int = 64) -> None:
        self._fds: OrderedDict[Path, int] = OrderedDict()
        self.max_open = max_open

    def read_into(self, path: Path, offset: int, buffer: memoryview) -> None:
        fd = self._fds.get(path)
        if fd is None:
            if len(self._fds) >= self.max_open:
                os.close(self._fds.popitem(last=False)[1])
            fd = self._fds[path] = open_regular(path)
        else:
            self._fds.move_to_end(path)
        done, total = 0, len(buffer)
        while done < total:
            got = os.preadv(fd, [buffer[done:]], offset + done)
            if got == 0:
                raise TaskvecError(f"{path}: unexpected end of file at byte {offset + done}")
            done += got

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


@dataclass(frozen=True)
class OutputSpec:
    """One tensor of an output file: its name, dtype code, shape and size."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)


def encode_header(specs: list[OutputSpec], metadata: dict[str, str]) -> tuple[bytes, dict[str, int]]:
    """Header bytes (length prefix included) and each tensor's offset from the file start."""
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    position = 0
    relative: dict[str, int] = {}
    for spec in specs:
        header[spec.name] = {
            "dtype": spec.dtype,
            "shape": list(spec.shape),
            "data_offsets": [position, position + spec.nbytes],
        }
        relative[spec.name] = position
        position += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data section starts 8-byte aligned, as safetensors writes
    prefix = struct.pack("<Q", len(raw)) + raw
    return prefix, {name: len(prefix) + off for name, off in relative.items()}
