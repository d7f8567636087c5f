"""Many scales from one read: `scale=[...]` writes OUTPUT/scale-X per scale, each the bytes of
its own single-scale merge, reading every input once."""

import json

import pytest
import torch

from taskvec.errors import TaskvecError
from taskvec.io.safetensors_file import FileReader
from taskvec.merge import merge_checkpoints, scale_dir

from helpers import load_dir

SCALES = [0.1, 0.5, 1.0, -0.25, 2.5]


def files(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("dtype, out_dtype, sharded", [("float32", None, False), ("bfloat16", None, True),
                                                       ("float32", "bfloat16", False), ("float16", "float32", True)])
def test_each_scale_equals_its_single_scale_merge(synthetic_sets, tmp_path, dtype, out_dtype, sharded):
    sset = synthetic_sets(dtype, sharded=sharded)
    result = merge_checkpoints(sset.finetuned[:3], tmp_path / "sweep", base=sset.base, scale=SCALES,
                               dtype=out_dtype, chunk_size=4096, max_shard_size="100KB", progress=False)
    assert result.outputs == [tmp_path / "sweep" / scale_dir(s) for s in SCALES]
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == sorted(scale_dir(s) for s in SCALES)
    for scale, directory in zip(SCALES, result.outputs, strict=True):
        merge_checkpoints(sset.finetuned[:3], tmp_path / f"single{scale}", base=sset.base, scale=scale,
                          dtype=out_dtype, chunk_size=4096, max_shard_size="100KB", progress=False)
        single = files(tmp_path / f"single{scale}")
        assert files(directory) == single, scale  # weights, index, config, provenance: every byte
        assert json.loads(single["taskvec.json"])["scale"] == scale


def test_every_input_byte_is_read_once(synthetic_sets, tmp_path, monkeypatch):
    sset = synthetic_sets("float32")
    read = []
    original = FileReader.read_into

    def counting(self, path, offset, buffer):
        read.append(len(buffer))
        original(self, path, offset, buffer)

    monkeypatch.setattr(FileReader, "read_into", counting)
    merge_checkpoints(sset.finetuned[:2], tmp_path / "one", base=sset.base, scale=1.0, progress=False)
    once = sum(read)
    read.clear()
    merge_checkpoints(sset.finetuned[:2], tmp_path / "many", base=sset.base, scale=SCALES, progress=False)
    assert sum(read) == once


def test_negate_takes_a_list_too_and_values_are_right(synthetic_sets, tmp_path):
    sset = synthetic_sets("float32")
    result = merge_checkpoints(sset.finetuned[:1], tmp_path / "out", base=sset.base, method="negate",
                               scale=[0.0, 1.0], progress=False)
    base, ft = load_dir(sset.base), load_dir(sset.finetuned[0])
    zero, one = (load_dir(d) for d in result.outputs)
    assert all(torch.equal(zero[n], base[n]) for n in base)  # scale 0 is the base, bit for bit
    name = "transformer.h.0.mlp.c_fc.weight"
    torch.testing.assert_close(one[name].double(), 2 * base[name].double() - ft[name].double(),
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("scale, message", [
    ([], "no scale given"),
    ([0.5, 0.5], "scales repeat"),
    ([0.1, 0.1000000001], "scales repeat"),
    ([0.5, float("nan")], "finite float32"),
])
def test_bad_scale_lists_are_refused(synthetic_sets, tmp_path, scale, message):
    sset = synthetic_sets("float32")
    with pytest.raises(TaskvecError, match=message):
        merge_checkpoints(sset.finetuned[:2], tmp_path / "out", base=sset.base, scale=scale, progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(TaskvecError, match="average takes no scale"):
        merge_checkpoints(sset.finetuned[:2], tmp_path / "avg", method="average", scale=[1.0, 2.0])


def test_the_cli_takes_lists_and_ranges(synthetic_sets, tmp_path):
    from click.testing import CliRunner

    from taskvec.cli import main

    sset = synthetic_sets("float32")
    args = ["merge", "--base", str(sset.base), *map(str, sset.finetuned[:2])]
    result = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "list"), "--scale", "0.5,1"])
    assert result.exit_code == 0, result.output
    assert "2 models" in result.output and (tmp_path / "list" / "scale-0.5" / "model.safetensors").is_file()
    result = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "range"), "--scale", "0.1:0.5:0.1"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "range").iterdir()) == [f"scale-0.{i}" for i in range(1, 6)]
    for bad in ("0.5,x", "1:0:0.1", "0:1:0", "0:1000:0.1"):
        result = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "bad"), "--scale", bad])
        assert result.exit_code == 2 and "Traceback" not in result.output and "--scale" in result.output, bad
