"""Inputs read in place from read-only mappings (taskvec.inspect.mapped) against the stacked reader.

The compiled pass reads float32 and float64 tensors stored at aligned offsets where their files
are mapped, everything else through the merge's reader into a stacked buffer. Both feed the same
loop the same values, so the statistics must be identical, not merely close; a file whose data
starts at an odd offset must take the reader's path and still match the float64 reference; and
the mapping's pages are released job by job, so resident memory does not grow with the model.
"""

import json
import struct
import sys

import pytest
import torch
from safetensors.torch import save_file
from test_inspect import DEFAULTS, check_all, reference_vectors, write_models

from taskvec.inspect import inspect_checkpoints, stream
from taskvec.inspect.mapped import MappedFiles
from taskvec.io.safetensors_file import TensorEntry, read_header


def _stacked_only(monkeypatch):
    monkeypatch.setattr(MappedFiles, "readable", staticmethod(lambda source, start, dtype: False))


def _recording_in_place(monkeypatch) -> list[bool]:
    """Whether each job was read in place, as the pass decides it."""
    decisions = []
    decide = stream._in_place
    monkeypatch.setattr(stream, "_in_place", lambda job: decisions.append(decide(job)) or decisions[-1])
    return decisions


@pytest.mark.parametrize("chunk_size", [140, "4MiB"])
def test_in_place_and_stacked_reads_give_identical_statistics(tmp_path, monkeypatch, chunk_size):
    base, finetuned, merged = write_models(tmp_path, "float32")
    decisions = _recording_in_place(monkeypatch)
    ours = inspect_checkpoints(base, finetuned, merged=[merged], chunk_size=chunk_size, progress=False)
    assert decisions and all(decisions)
    _stacked_only(monkeypatch)
    theirs = inspect_checkpoints(base, finetuned, merged=[merged], chunk_size=chunk_size, progress=False)
    assert not any(decisions[len(decisions) // 2:])
    assert json.dumps(ours, sort_keys=True) == json.dumps(theirs, sort_keys=True)  # the same bits, NaN included


def test_jobs_are_read_in_place_only_where_dtype_and_alignment_allow(tmp_path):
    base, finetuned, merged = write_models(tmp_path, "float32")
    entry = read_header(base / "model.safetensors").tensors["transformer.wte.weight"]
    assert MappedFiles.readable(entry, 0, torch.float32)
    assert MappedFiles.readable(entry, 3, torch.float32)
    assert not MappedFiles.readable(entry, 0, torch.float64)  # stored in another dtype
    shifted = TensorEntry(entry.name, entry.dtype, entry.shape, entry.path, entry.offset + 2, entry.nbytes)
    assert not MappedFiles.readable(shifted, 0, torch.float32)  # misaligned
    assert not MappedFiles.readable(object(), 0, torch.float32)  # a LoRA module, say


def _misaligned_copy(source_dir, target_dir):
    """The same tensors with the data starting at an offset that is 2 mod 4 (a legal file: the
    format does not require padding), so no float32 in it is aligned."""
    target_dir.mkdir()
    for path in source_dir.glob("*.safetensors"):
        raw = path.read_bytes()
        (length,) = struct.unpack("<Q", raw[:8])
        header = raw[8:8 + length].rstrip(b" ")
        while (8 + len(header)) % 4 != 2:
            header += b" "
        (target_dir / path.name).write_bytes(struct.pack("<Q", len(header)) + header + raw[8 + length:])
    for path in source_dir.iterdir():
        if path.suffix != ".safetensors":
            (target_dir / path.name).write_bytes(path.read_bytes())


def test_a_misaligned_file_is_read_through_the_reader_and_matches_the_reference(tmp_path, monkeypatch):
    base, finetuned, merged = write_models(tmp_path / "aligned", "float32")
    shifted = tmp_path / "shifted"
    _misaligned_copy(finetuned[1], shifted)
    entries = read_header(next(shifted.glob("*.safetensors"))).tensors.values()
    assert all(entry.offset % 4 == 2 for entry in entries)
    decisions = _recording_in_place(monkeypatch)
    inputs = [finetuned[0], shifted, *finetuned[2:]]
    stats = inspect_checkpoints(base, inputs, chunk_size=1000, progress=False)
    assert decisions and not any(decisions)
    check_all(stats, reference_vectors(base, inputs), DEFAULTS, len(inputs))


def _mapped_kib(paths) -> int:
    """Resident KiB of this process's mappings of the files `paths`."""
    names = {str(path) for path in paths}
    total, inside = 0, False
    with open("/proc/self/smaps") as handle:
        for line in handle:
            if line.startswith("Rss:"):
                total += int(line.split()[1]) if inside else 0
            elif "-" in line.split(maxsplit=1)[0]:
                inside = line.rstrip("\n").split(maxsplit=5)[-1] in names
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_resident_pages_of_the_mappings_stay_a_few_jobs(tmp_path, monkeypatch):
    """Three 16 MiB inputs read in place in 600 KiB jobs: after every job the mappings hold a
    small fraction of the files (the jobs in flight and the pages a fault maps around them),
    where keeping the pages would hold all 48 MiB by the end."""
    generator = torch.Generator().manual_seed(0)
    paths = []
    for k in range(3):
        folder = tmp_path / f"model-{k}"
        folder.mkdir()
        weight = torch.randn(1024, 4096, generator=generator) * 0.02
        save_file({"transformer.h.0.mlp.c_fc.weight": weight}, folder / "model.safetensors")
        paths.append(folder / "model.safetensors")
    peak = []
    done = MappedFiles.done

    def measured(self, ranges):
        done(self, ranges)
        peak.append(_mapped_kib(paths))

    monkeypatch.setattr(MappedFiles, "done", measured)
    inspect_checkpoints(paths[0].parent, [p.parent for p in paths[1:]], chunk_size="600KiB", progress=False)
    assert len(peak) > 50
    assert max(peak) < 48 * 1024 // 4
