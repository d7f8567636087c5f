"""Header parsing, size parsing, shard planning and chunked reads of the streaming I/O layer."""

import random

import pytest
import torch
from safetensors.torch import load_file, save_file

from taskvec.errors import TaskvecError
from taskvec.io.checkpoint import open_checkpoint
from taskvec.io.safetensors_file import FileReader, OutputSpec, read_header
from taskvec.io.shards import ShardWriter, parse_size, plan_shards, shard_names


def test_header_matches_what_safetensors_wrote(tmp_path):
    tensors = {"a": torch.arange(10, dtype=torch.float32), "b": torch.ones(3, 4, dtype=torch.bfloat16),
               "mask": torch.tensor([True, False])}
    save_file(tensors, tmp_path / "x.safetensors", metadata={"format": "pt"})
    header = read_header(tmp_path / "x.safetensors")
    assert header.metadata == {"format": "pt"}
    assert {n: (e.dtype, e.shape) for n, e in header.tensors.items()} == {
        "a": ("F32", (10,)), "b": ("BF16", (3, 4)), "mask": ("BOOL", (2,))}
    entry = header.tensors["a"]
    buffer = bytearray(entry.nbytes)
    reader = FileReader()
    reader.read_into(entry.path, entry.offset, memoryview(buffer))
    reader.close()
    assert torch.equal(torch.frombuffer(buffer, dtype=torch.float32), tensors["a"])


def test_writer_output_loads_with_safetensors(tmp_path):
    specs = [OutputSpec("w", "F32", (4, 3)), OutputSpec("i", "I64", (2,)), OutputSpec("h", "F16", (5,))]
    values = {"w": torch.randn(4, 3), "i": torch.tensor([3, -1]), "h": torch.randn(5).half()}
    writer = ShardWriter(tmp_path, specs, max_shard_bytes=60, metadata={"format": "pt"})
    for name, value in reversed(values.items()):  # any order, in two pieces each
        raw = value.flatten().view(torch.uint8).numpy()
        half = len(raw) // 2
        writer.write(name, half, memoryview(raw[half:]))
        writer.write(name, 0, memoryview(raw[:half]))
    writer.close()
    assert writer.files == shard_names(2) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    loaded = {}
    for file in writer.files:
        loaded.update(load_file(tmp_path / file))
    assert all(torch.equal(loaded[k], v) for k, v in values.items())
    assert open_checkpoint(tmp_path).tensors.keys() == values.keys()


@pytest.mark.parametrize("text, size", [("50GB", 50 * 10**9), ("512MiB", 512 * 2**20), ("1.5KB", 1500),
                                        ("100", 100), (4096, 4096)])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["ten GB", "5XB", "0", ""])
def test_parse_size_rejects(text):
    with pytest.raises(TaskvecError):
        parse_size(text)


def test_parse_size_messages_name_only_units_it_reads():
    """The refusal listed neither TB nor TiB, which it reads, and the limit was given in PiB,
    which it does not."""
    with pytest.raises(TaskvecError) as unknown:
        parse_size("1PiB")
    units = str(unknown.value).split("use a number with ")[1].replace(" or ", ", ").split(", ")
    assert all(parse_size(f"1{unit}") for unit in units) and {"TB", "TiB"} <= set(units)
    with pytest.raises(TaskvecError, match="at most 1125899906842624 bytes, 1024TiB"):
        parse_size("1025TiB")
    assert parse_size("1024TiB") == 2**50


@pytest.mark.parametrize("seed", range(20))
def test_plan_shards_cuts_as_save_pretrained_does(seed):
    """A tensor over the limit got its own shard and closed the one being filled, so a small
    --max-shard-size gave more shards than save_pretrained. huggingface_hub's split is the reference."""
    from huggingface_hub import split_torch_state_dict_into_shards

    rng = random.Random(seed)
    sizes = [rng.choice([1, 3, 10, 25, 40, 100]) for _ in range(rng.randrange(1, 12))]
    limit = rng.choice([40, 80, 100, 160])
    specs = [OutputSpec(f"t{i}", "F32", (n,)) for i, n in enumerate(sizes)]
    split = split_torch_state_dict_into_shards({s.name: torch.empty(s.shape) for s in specs}, max_shard_size=limit)
    ours = [[s.name for s in shard] for shard in plan_shards(specs, max_shard_bytes=limit)]
    assert ours == list(split.filename_to_tensors.values())
    assert shard_names(len(ours)) == list(split.filename_to_tensors)


def test_single_safetensors_file_as_checkpoint(tmp_path):
    save_file({"w": torch.zeros(2)}, tmp_path / "weights.safetensors")
    assert list(open_checkpoint(tmp_path / "weights.safetensors").tensors) == ["w"]
    assert list(open_checkpoint(tmp_path).tensors) == ["w"]  # the only safetensors file in a directory
    with pytest.raises(TaskvecError, match="not a weight file"):
        (tmp_path / "notes.txt").write_text("x")
        open_checkpoint(tmp_path / "notes.txt")


def test_unknown_dtype_in_header(tmp_path):
    import json
    import struct

    header = json.dumps({"w": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 4]}}).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(4))
    with pytest.raises(TaskvecError, match="tensor 'w': unknown dtype 'Q7'"):
        open_checkpoint(tmp_path)


def test_reader_keeps_a_bounded_number_of_files_open(tmp_path):
    """Merges of many shards must not exhaust file descriptors: least recently used fds close."""
    files = []
    for i in range(5):
        save_file({"x": torch.full((64,), float(i))}, tmp_path / f"{i}.safetensors")
        files.append(read_header(tmp_path / f"{i}.safetensors").tensors["x"])
    reader = FileReader(max_open=2)
    buffer = bytearray(256)
    for round_ in range(3):
        for i, entry in enumerate(files):
            reader.read_into(entry.path, entry.offset, memoryview(buffer))
            assert torch.equal(torch.frombuffer(buffer, dtype=torch.float32), torch.full((64,), float(i))), (round_, i)
            assert len(reader._fds) <= 2
    reader.close()
