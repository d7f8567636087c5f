"""Write-back started as shards are written: the call is right, and covers every byte written."""

import os
import sys

import pytest
import torch

from taskvec.io import shards as shards_module
from taskvec.io import writeback
from taskvec.io.safetensors_file import OutputSpec
from taskvec.io.shards import ShardWriter


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")
def test_sync_file_range_is_called_with_arguments_the_kernel_accepts(tmp_path):
    assert writeback._sync_file_range is not None
    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, b"x" * 10000, 0)
        assert writeback._sync_file_range(fd, 4096, 5904, writeback._WRITE) == 0  # EINVAL would give -1
        assert writeback._sync_file_range(-1, 0, 1, writeback._WRITE) == -1  # a bad fd is reported, not ignored
        writeback.start_writeback(fd, 0, 10000)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"x" * 10000


def test_shard_writer_starts_write_back_of_exactly_what_it_wrote(tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(shards_module, "start_writeback", lambda fd, offset, n: started.append((fd, offset, n)))
    specs = [OutputSpec("w", "F32", (40, 3)), OutputSpec("b", "F16", (7,))]
    writer = ShardWriter(tmp_path, specs, max_shard_bytes=100, metadata={})
    written = []
    for name, numel, size in (("w", 120, 4), ("b", 7, 2)):
        raw = torch.arange(numel * size, dtype=torch.uint8).numpy() % 251
        for start in range(0, len(raw), 37):  # pieces cut anywhere
            piece = raw[start:start + 37]
            fd, offset = writer._where[name]
            written.append((fd, offset + start, len(piece)))
            writer.write(name, start, memoryview(piece))
    writer.close()
    assert started == written
