"""PyTorch `.bin` checkpoints read like safetensors files: by byte range, and without running them.

A `torch.save` file is a pickle that names tensor storages plus the storages' raw bytes. The
pickle is read here by an unpickler that knows only the few globals a state dict needs (tensors,
parameters, storages, OrderedDict) and refuses every other one, so no code in the file runs
(what `torch.load(weights_only=True)` promises). Instead of loading the storages it records
where each tensor's bytes are in the file, so the merge reads `.bin` inputs chunk by chunk with
the same `TensorEntry` and the same reader as safetensors: memory stays a few chunks.

Both formats torch has written are read: the zip archive (torch >= 1.6, uncompressed entries)
and the older sequence of pickles followed by each storage as an 8-byte count and its bytes.
"""

from __future__ import annotations

import math
import pickle
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch

from taskvec.errors import TaskvecError
from taskvec.files import check_regular_file
from taskvec.io.safetensors_file import CODES, TensorEntry

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
_STORAGE_TYPES = {  # torch.<Name>Storage -> dtype, as torch.save pickles typed storages
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class _Storage:
    """A storage named by the pickle: its key and dtype; `offset` (bytes in the file) comes later."""

    def __init__(self, dtype: torch.dtype, key: str, numel: int) -> None:
        self.dtype, self.key, self.numel = dtype, key, numel
        self.offset: int | None = None


class _TensorRef:
    def __init__(self, storage: _Storage, storage_offset: int, size, stride) -> None:
        self.storage, self.storage_offset = storage, storage_offset
        self.shape, self.stride = tuple(size), tuple(stride)


class _StorageType:
    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


def _rebuild_tensor(storage, storage_offset, size, stride, *_):
    if not isinstance(storage, _Storage):  # a hostile pickle: anything may be passed here
        raise pickle.UnpicklingError(f"a tensor rebuilt from a {type(storage).__name__}, not from a storage")
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, *_):
    return data


_GLOBALS = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
}


class _Unpickler(pickle.Unpickler):
    """Knows tensors and nothing else: any other global in the file is refused, never imported."""

    def __init__(self, handle, path: Path) -> None:
        super().__init__(handle)
        self.path = path
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str):
        if module == "torch" and name in _STORAGE_TYPES:
            return _StorageType(_STORAGE_TYPES[name])
        found = _GLOBALS.get((module, name))
        if found is None:
            raise TaskvecError(f"{self.path}: the pickle needs {module}.{name}, which is not part of a "
                               "state dict of tensors; refused (taskvec never runs code from a model file)")
        return found

    def persistent_load(self, pid):
        # zip: ('storage', type, key, location, numel); legacy adds view metadata
        if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage" \
                or not isinstance(pid[1], _StorageType) or not isinstance(pid[4], int):
            raise TaskvecError(f"{self.path}: unknown object reference in the pickle (corrupt file)")
        key = str(pid[2])
        if len(pid) > 5 and pid[5] is not None:
            raise TaskvecError(f"{self.path}: storage views of the pre-1.0 torch format are not supported; "
                               "load and re-save the file with torch.save")
        if key not in self.storages:
            self.storages[key] = _Storage(pid[1].dtype, key, pid[4])
        return self.storages[key]


def read_torch_file(path: Path) -> dict[str, TensorEntry]:
    """Every tensor of a torch.save'd state dict, with where its bytes are; reads no tensor data."""
    path = Path(path)
    check_regular_file(path)
    try:
        if zipfile.is_zipfile(path):
            state, storages = _read_zip(path)
        else:
            state, storages = _read_legacy(path)
    except TaskvecError:
        raise
    except OSError as err:
        raise TaskvecError(f"{path}: cannot read ({err.strerror or err})") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, struct.error, zipfile.BadZipFile, RecursionError, UnicodeDecodeError) as err:
        raise TaskvecError(f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: {err})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict) and not _tensors_only(state):
        state = state["state_dict"]  # {"state_dict": ..., "epoch": ...}, as training scripts save
    if not isinstance(state, dict) or not state or not _tensors_only(state):
        raise TaskvecError(f"{path}: not a state dict of tensors (torch.save(model.state_dict()) writes one)")
    size = path.stat().st_size
    entries = {}
    for name, ref in state.items():
        entries[str(name)] = _entry(path, str(name), ref, size)
    return entries


def _tensors_only(state: dict) -> bool:
    return all(isinstance(value, _TensorRef) for value in state.values())


def _entry(path: Path, name: str, ref: _TensorRef, size: int) -> TensorEntry:
    where = f"{path}: tensor '{name}'"
    storage, shape = ref.storage, ref.shape
    if storage.offset is None:
        raise TaskvecError(f"{where}: its storage's bytes are missing (corrupt or truncated file)")
    if not all(isinstance(d, int) and d >= 0 for d in shape) or not isinstance(ref.storage_offset, int):
        raise TaskvecError(f"{where}: corrupt shape {list(shape)}")
    numel = math.prod(shape)
    if len(ref.stride) != len(shape):
        raise TaskvecError(f"{where}: {len(ref.stride)} strides for {len(shape)} dimensions (corrupt file)")
    strides = _contiguous_strides(shape)  # a size-1 dimension's stride does not matter
    if numel > 1 and any(d > 1 and s != c for d, s, c in zip(shape, ref.stride, strides, strict=True)):
        raise TaskvecError(f"{where}: stored as a non-contiguous view (strides {list(ref.stride)}); "
                           "re-save it with tensors made .contiguous(), or as safetensors")
    if ref.storage_offset < 0 or ref.storage_offset + numel > storage.numel:
        raise TaskvecError(f"{where}: lies outside its storage (corrupt file)")
    itemsize = storage.dtype.itemsize
    offset = storage.offset + ref.storage_offset * itemsize
    if offset + numel * itemsize > size:
        raise TaskvecError(f"{where}: truncated file (tensor ends past byte {size})")
    return TensorEntry(name, CODES[storage.dtype], shape, path, offset, numel * itemsize)


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for dim in reversed(shape):
        strides.append(step)
        step *= max(dim, 1)
    return tuple(reversed(strides))


def _read_zip(path: Path):
    with zipfile.ZipFile(path) as archive, open(path, "rb") as raw:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pickles) != 1:
            raise TaskvecError(f"{path}: a zip file, but not a torch.save archive (no data.pkl)")
        prefix = pickles[0][: -len("data.pkl")]
        order = archive.read(f"{prefix}byteorder").decode() if f"{prefix}byteorder" in names else "little"
        if order != "little":
            raise TaskvecError(f"{path}: written on a {order}-endian machine; not supported")
        with archive.open(pickles[0]) as handle:
            unpickler = _Unpickler(handle, path)
            state = unpickler.load()
        for storage in unpickler.storages.values():
            info = archive.getinfo(f"{prefix}data/{storage.key}")
            if info.compress_type != zipfile.ZIP_STORED:
                raise TaskvecError(f"{path}: storage {storage.key} is compressed; torch never writes that")
            if info.file_size < storage.numel * storage.dtype.itemsize:
                raise TaskvecError(f"{path}: storage {storage.key} is shorter than its tensors (corrupt file)")
            storage.offset = _zip_data_offset(raw, info)
    return state, unpickler.storages


def _zip_data_offset(raw, info: zipfile.ZipInfo) -> int:
    """Where an uncompressed member's bytes start: after its local header, name and extra field."""
    raw.seek(info.header_offset)
    local = raw.read(30)
    if len(local) != 30 or local[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"bad local header for {info.filename}")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return info.header_offset + 30 + name_len + extra_len


def _read_legacy(path: Path):
    with open(path, "rb") as handle:
        def load_plain():
            return _Unpickler(handle, path).load()

        if load_plain() != LEGACY_MAGIC or load_plain() != LEGACY_PROTOCOL:
            raise TaskvecError(f"{path}: not a PyTorch checkpoint (no torch.save archive or magic number)")
        info = load_plain()
        if isinstance(info, dict) and info.get("little_endian") is False:
            raise TaskvecError(f"{path}: written on a big-endian machine; not supported")
        unpickler = _Unpickler(handle, path)
        state = unpickler.load()
        keys = load_plain()
        if not isinstance(keys, list):
            raise TaskvecError(f"{path}: corrupt legacy torch file (no storage list)")
        for key in keys:
            storage = unpickler.storages.get(str(key))
            count = handle.read(8)
            if storage is None or len(count) != 8:
                raise TaskvecError(f"{path}: corrupt legacy torch file (storage {key})")
            (numel,) = struct.unpack("<q", count)
            if numel != storage.numel:
                raise TaskvecError(f"{path}: storage {key} holds {numel} elements, the pickle says {storage.numel}")
            storage.offset = handle.tell()
            handle.seek(numel * storage.dtype.itemsize, 1)
    return state, unpickler.storages
