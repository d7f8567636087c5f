"""Bad input: a one-line error naming the file and tensor, and nothing written anywhere."""

import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import save_file

from taskvec.errors import TaskvecError
from taskvec.merge import merge_checkpoints

from helpers import load_dir, merge_refused


def rewrite(path, change):
    """Rewrite a checkpoint's single file with `change(tensors)` applied."""
    from safetensors.torch import load_file

    file = path / "model.safetensors"
    tensors = load_file(file)
    change(tensors)
    file.unlink()
    save_file(tensors, file)
    return file


def test_shape_mismatch_names_file_and_tensor(workdir, tmp_path):
    base, fts = workdir
    file = rewrite(fts[1], lambda t: t.update({"transformer.h.0.ln_1.bias": torch.zeros(7)}))
    message = merge_refused(base, fts, tmp_path / "out", "shape")
    assert str(file) in message and "transformer.h.0.ln_1.bias" in message


def test_integer_buffers_of_different_dtypes_are_refused(workdir, tmp_path):
    base, fts = workdir
    rewrite(base, lambda t: t.update({"transformer.h.0.attn.lengths": torch.arange(4)}))
    for ft in fts:
        rewrite(ft, lambda t: t.update({"transformer.h.0.attn.lengths": torch.arange(4, dtype=torch.int32)}))
    message = merge_refused(base, fts, tmp_path / "out", "dtype I32, but .* has I64")
    assert "transformer.h.0.attn.lengths" in message


def test_missing_tensor(workdir, tmp_path):
    base, fts = workdir
    rewrite(fts[0], lambda t: t.pop("transformer.h.1.mlp.c_fc.bias"))
    message = merge_refused(base, fts, tmp_path / "out", "missing")
    assert "transformer.h.1.mlp.c_fc.bias" in message and str(fts[0]) in message


def test_extra_tensor_is_left_out_or_refused_with_strict(workdir, tmp_path):
    base, fts = workdir
    rewrite(fts[1], lambda t: t.update({"v_head.summary.weight": torch.zeros(3)}))
    message = merge_refused(base, fts, tmp_path / "out", "ft1: holds 1 tensors the base does not have", strict=True)
    assert "v_head.summary.weight" in message
    result = merge_checkpoints(fts, tmp_path / "out", base=base, progress=False)
    assert any("ft1: 1 tensors the base does not have left out (v_head.summary.weight)" in n for n in result.notes)
    assert "v_head.summary.weight" not in load_dir(tmp_path / "out")
    provenance = json.loads((tmp_path / "out" / "taskvec.json").read_text())
    assert provenance["left_out"] == {"ft1": ["v_head.summary.weight"]}


def test_truncated_file(workdir, tmp_path):
    base, fts = workdir
    file = fts[0] / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 1000])
    message = merge_refused(base, fts, tmp_path / "out", "truncated")
    assert str(file) in message


@pytest.mark.parametrize("damage, match", [
    (lambda raw: raw[:5], "truncated safetensors file"),
    (lambda raw: struct.pack("<Q", 10**12) + raw[8:], "corrupt or truncated safetensors header"),
    (lambda raw: raw[:8] + b"#" + raw[9:], "not valid JSON"),
])
def test_corrupt_header(workdir, tmp_path, damage, match):
    base, fts = workdir
    file = fts[1] / "model.safetensors"
    file.write_bytes(damage(file.read_bytes()))
    merge_refused(base, fts, tmp_path / "out", match)


def test_overlapping_offsets_are_corrupt(workdir, tmp_path):
    base, fts = workdir
    file = fts[1] / "model.safetensors"
    raw = file.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    first = next(k for k in header if k != "__metadata__")
    second = next(k for k in header if k not in ("__metadata__", first))
    header[second]["data_offsets"] = header[first]["data_offsets"]
    header[second]["shape"] = header[first]["shape"]
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    file.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + length :])
    merge_refused(base, fts, tmp_path / "out", "overlaps|gap")


def test_wrong_n(workdir, tmp_path):
    base, fts = workdir
    merge_refused(base, [], tmp_path / "out", "at least one fine-tuned")
    merge_refused(base, fts, tmp_path / "out", "exactly one", method="negate")
    with pytest.raises(TaskvecError, match="at least two"):
        merge_checkpoints(fts[:1], tmp_path / "out", method="average", progress=False)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf"), 1e39, -3.5e38])
def test_scale_must_be_finite(workdir, tmp_path, scale):
    base, fts = workdir
    merge_refused(base, fts, tmp_path / "out", "scale must be a finite float32 number", scale=scale)


def test_same_checkpoint_twice(workdir, tmp_path):
    base, fts = workdir
    merge_refused(base, [fts[0], fts[0]], tmp_path / "out", "given twice")


def test_nonexistent_and_weightless_directories(workdir, tmp_path):
    base, fts = workdir
    merge_refused(base, [tmp_path / "nope"], tmp_path / "out", "no such file or directory")
    bin_only = tmp_path / "bin_only"
    bin_only.mkdir()
    torch.save({}, bin_only / "pytorch_model.bin")
    merge_refused(base, [bin_only], tmp_path / "out", "not a state dict of tensors")
    (bin_only / "pytorch_model.bin").unlink()
    merge_refused(base, [bin_only], tmp_path / "out", "no weights")


def test_index_naming_a_missing_shard(synthetic_sets, tmp_path):
    sset = synthetic_sets("float32", sharded=True)
    ft = shutil.copytree(sset.finetuned[0], tmp_path / "ft")
    next(ft.glob("model-00002-*.safetensors")).unlink()
    merge_refused(sset.base, [ft], tmp_path / "out", "which is missing")


def test_output_inside_an_input_or_input_inside_output(workdir, tmp_path):
    base, fts = workdir
    merge_refused(base, fts, fts[0] / "out", "inside input")
    with pytest.raises(TaskvecError, match="inside output"):
        merge_checkpoints(fts, tmp_path, base=base, overwrite=True, progress=False)


def test_existing_output_needs_overwrite(workdir, tmp_path):
    base, fts = workdir
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(TaskvecError, match="--overwrite"):
        merge_checkpoints(fts, out, base=base, progress=False)
    assert (out / "keep.txt").read_text() == "precious"


def test_failure_midway_leaves_nothing(workdir, tmp_path, monkeypatch):
    base, fts = workdir

    def explode(self, plan, forms, reader, writers, progress):
        writers[0].write_job(plan.jobs[0], torch.zeros(plan.jobs[0].nbytes_out, dtype=torch.uint8))
        raise TaskvecError("disk full")

    monkeypatch.setattr("taskvec.stream.cpu.CpuExecutor.run", explode)
    merge_refused(base, fts, tmp_path / "out", "disk full", device="cpu")


def test_integer_buffers_are_copied_from_the_base(workdir, tmp_path):
    base, fts = workdir
    rewrite(base, lambda t: t.update({"transformer.h.0.attn.lengths": torch.arange(6)}))
    for i, ft in enumerate(fts):
        rewrite(ft, lambda t, i=i: t.update({"transformer.h.0.attn.lengths": torch.arange(6) * (i + 5)}))
    merge_checkpoints(fts, tmp_path / "out", base=base, progress=False)

    assert torch.equal(load_dir(tmp_path / "out")["transformer.h.0.attn.lengths"], torch.arange(6))


def test_untied_lm_head_in_base_reads_the_tied_embedding_of_finetunes(workdir, tmp_path):
    from helpers import assert_close_to_reference, error_bound, load_dir, negated_mean_f64

    base, fts = workdir
    head = torch.randn(1000, 64) * 0.02
    rewrite(base, lambda t: t.update({"lm_head.weight": head.clone()}))
    merge_checkpoints(fts, tmp_path / "out", base=base, scale=1.0, progress=False)
    merged = load_dir(tmp_path / "out")
    embeddings = [load_dir(ft)["transformer.wte.weight"] for ft in fts]
    reference = negated_mean_f64(head, embeddings, 1.0)
    assert_close_to_reference(merged["lm_head.weight"], reference,
                              error_bound(head, embeddings, 2.0, 0.5, reference, torch.float32))


def test_unreachable_hub_id_is_a_clear_error(workdir, tmp_path):
    base, fts = workdir
    message = merge_refused("taskvec-tests/no-such-model", fts, tmp_path / "out", "Hugging Face hub")
    assert message.startswith("taskvec-tests/no-such-model: no such directory")


def test_hub_ids_resolve_to_their_snapshot(workdir, tmp_path, monkeypatch):
    """A name that is no local path is fetched as from_pretrained would (here: a stand-in)."""
    import huggingface_hub

    base, fts = workdir
    fetched = []

    def snapshot_download(repo_id, allow_patterns):
        fetched.append((repo_id, allow_patterns))
        return str(base)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    merge_checkpoints(fts, tmp_path / "out", base="openai-community/gpt2", progress=False)
    assert fetched[0][0] == "openai-community/gpt2" and "*.safetensors" in fetched[0][1]
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_a_failing_write_stops_cleanly_and_restores_torch_threads(workdir, tmp_path, monkeypatch):
    """A full disk in the writer thread is an error naming the output, nothing is left behind,
    and the torch thread count the merge lowered for its I/O threads is restored."""
    import errno

    from taskvec.io.shards import ShardWriter

    base, fts = workdir
    write, calls = ShardWriter.write, []

    def fail_third(self, name, start, data):
        calls.append(name)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.directory))
        write(self, name, start, data)

    monkeypatch.setattr(ShardWriter, "write", fail_third)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(TaskvecError, match=f"output {tmp_path / 'out'}: No space left on device"):
            merge_checkpoints(fts, tmp_path / "out", base=base, chunk_size=4096, progress=False)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "ft0", "ft1"]  # the inputs, nothing else


def test_not_enough_free_space_is_refused_before_reading(workdir, tmp_path, monkeypatch):
    import shutil

    base, fts = workdir
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    merge_refused(base, fts, tmp_path / "out", r"merge writes 0\.\d+ GB, but only 0\.00 GB is free on the file system")


def test_input_files_linked_from_inside_the_output_are_protected(workdir, tmp_path):
    """The HF cache layout: snapshot files are symlinks into blobs/. Writing the output over
    blobs/ must be refused, even with --overwrite."""
    base, fts = workdir
    cache = tmp_path / "cache"
    (cache / "blobs").mkdir(parents=True)
    (cache / "snapshot").mkdir()
    for file in base.iterdir():
        blob = cache / "blobs" / file.name
        blob.write_bytes(file.read_bytes())
        (cache / "snapshot" / file.name).symlink_to(blob)
    with pytest.raises(TaskvecError, match="is stored inside output"):
        merge_checkpoints(fts, cache / "blobs", base=cache / "snapshot", overwrite=True, progress=False)
    assert all(p.resolve().exists() for p in (cache / "snapshot").iterdir())


def test_a_huge_chunk_size_allocates_only_what_the_model_needs(workdir, tmp_path):
    base, fts = workdir
    merge_checkpoints(fts, tmp_path / "out", base=base, chunk_size="200GB", progress=False)
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.parametrize("shard", [None, "../elsewhere.safetensors", 3])
def test_index_naming_a_shard_that_is_not_a_file_name(synthetic_sets, tmp_path, shard):
    sset = synthetic_sets("float32", sharded=True)
    base = shutil.copytree(sset.base, tmp_path / "base")
    index = base / "model.safetensors.index.json"
    content = json.loads(index.read_text())
    first = next(iter(content["weight_map"]))
    content["weight_map"][first] = shard
    index.write_text(json.dumps(content))
    merge_refused(base, sset.finetuned[:2], tmp_path / "out", "not a file name in its directory")
