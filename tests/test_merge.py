"""The streaming merge against an independent float64 reference, and its output directory."""

import hashlib
import json

import pytest
import torch

from taskvec.io.safetensors_file import read_header
from taskvec.merge import PROVENANCE_FILE, merge_checkpoints

from helpers import assert_close_to_reference, error_bound, load_dir, negated_mean_f64

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("n", [1, 2, 5])
@pytest.mark.parametrize("scale", [0.0, 1.0, -0.5, 2.5])
def test_negated_mean_matches_float64_reference(synthetic_sets, tmp_path, dtype, sharded, n, scale):
    sset = synthetic_sets(dtype, sharded)
    out = tmp_path / "merged"
    # a small chunk forces tensors to be split across jobs and small ones packed together
    merge_checkpoints(sset.finetuned[:n], out, base=sset.base, scale=scale, chunk_size=40_000,
                      progress=False)
    base, fts, merged = load_dir(sset.base), [load_dir(p) for p in sset.finetuned[:n]], load_dir(out)
    assert merged.keys() == base.keys()
    for name in base:
        assert merged[name].dtype == DTYPES[dtype]
        reference = negated_mean_f64(base[name], [f[name] for f in fts], scale)
        bound = error_bound(base[name], [f[name] for f in fts], 1 + scale, scale / n, reference,
                            DTYPES[dtype])
        assert_close_to_reference(merged[name], reference, bound, name)


def test_scale_zero_returns_the_base_bit_for_bit(synthetic_sets, tmp_path):
    sset = synthetic_sets("bfloat16")
    merge_checkpoints(sset.finetuned, tmp_path / "out", base=sset.base, scale=0.0, progress=False)
    base, merged = load_dir(sset.base), load_dir(tmp_path / "out")
    assert all(torch.equal(base[k], merged[k]) for k in base)


def test_chunk_size_does_not_change_the_result(synthetic_sets, tmp_path):
    sset = synthetic_sets("float32", sharded=True)
    merge_checkpoints(sset.finetuned, tmp_path / "a", base=sset.base, chunk_size=64, progress=False)
    merge_checkpoints(sset.finetuned, tmp_path / "b", base=sset.base, progress=False)
    a, b = load_dir(tmp_path / "a"), load_dir(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("out_dtype", ["bfloat16", "float16"])
def test_output_dtype_conversion(synthetic_sets, tmp_path, out_dtype):
    sset = synthetic_sets("float32")
    merge_checkpoints(sset.finetuned[:2], tmp_path / "out", base=sset.base, scale=1.0,
                      dtype=out_dtype, progress=False)
    base, fts, merged = load_dir(sset.base), [load_dir(p) for p in sset.finetuned[:2]], load_dir(tmp_path / "out")
    for name in base:
        reference = negated_mean_f64(base[name], [f[name] for f in fts], 1.0)
        bound = error_bound(base[name], [f[name] for f in fts], 2.0, 0.5, reference, DTYPES[out_dtype])
        assert_close_to_reference(merged[name], reference, bound, name)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == out_dtype


def test_average_and_negate_methods(synthetic_sets, tmp_path):
    sset = synthetic_sets("float32")
    base, fts = load_dir(sset.base), [load_dir(p) for p in sset.finetuned]
    merge_checkpoints(sset.finetuned, tmp_path / "avg", method="average", progress=False)
    merge_checkpoints([sset.finetuned[3]], tmp_path / "neg", base=sset.base, method="negate",
                      scale=0.8, progress=False)
    avg, neg = load_dir(tmp_path / "avg"), load_dir(tmp_path / "neg")
    for name in base:
        members = [f[name] for f in fts]
        mean = torch.stack([m.double() for m in members]).mean(0)
        assert_close_to_reference(avg[name], mean, error_bound(members[0], members[1:], 0.2, 0.2, mean, torch.float32))
        single = negated_mean_f64(base[name], [fts[3][name]], 0.8)
        assert_close_to_reference(neg[name], single,
                                  error_bound(base[name], [fts[3][name]], 1.8, 0.8, single, torch.float32))


def test_output_is_a_loadable_model_with_tied_weights_and_provenance(synthetic_sets, tmp_path):
    from transformers import AutoModelForCausalLM

    sset = synthetic_sets("float32", sharded=True)
    out = tmp_path / "merged"
    merge_checkpoints(sset.finetuned, out, base=sset.base, scale=1.0, max_shard_size="200KB",
                      progress=False)
    assert (out / "model.safetensors.index.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(out)
    merged = load_dir(out)
    assert torch.equal(model.transformer.wte.weight.detach(), merged["transformer.wte.weight"])
    assert torch.equal(model.lm_head.weight, model.transformer.wte.weight)
    generated = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 7)
    provenance = json.loads((out / PROVENANCE_FILE).read_text())
    assert provenance["method"] == "negated_mean" and provenance["n_finetuned"] == 5
    header = read_header(next(out.glob("model-00001-of-*.safetensors")))
    assert json.loads(header.metadata["taskvec"])["scale"] == 1.0


def test_inputs_are_never_modified(synthetic_sets, tmp_path):
    sset = synthetic_sets("bfloat16", sharded=True)

    def digest():
        files = sorted(p for d in [sset.base, *sset.finetuned] for p in d.iterdir())
        return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}

    before = digest()
    merge_checkpoints(sset.finetuned, tmp_path / "out", base=sset.base, progress=False)
    assert digest() == before


def test_overwrite_replaces_existing_output(synthetic_sets, tmp_path):
    sset = synthetic_sets("float32")
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    merge_checkpoints(sset.finetuned, out, base=sset.base, overwrite=True, progress=False)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or retired dirs left
    assert out.stat().st_mode & 0o755 == 0o755  # readable by others, like a directory mkdir makes


def test_output_dtype_is_written_under_both_config_names(synthetic_sets, tmp_path):
    """transformers before 4.56 reads `torch_dtype`, later ones `dtype`: a base that has the old
    name gets both updated, so no version loads the bfloat16 output as float32."""
    import shutil

    sset = synthetic_sets("float32")
    base = shutil.copytree(sset.base, tmp_path / "base")
    config = json.loads((base / "config.json").read_text())
    config["torch_dtype"] = "float32"
    (base / "config.json").write_text(json.dumps(config))
    merge_checkpoints(sset.finetuned[:2], tmp_path / "out", base=base, dtype="bfloat16", progress=False)
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["dtype"] == written["torch_dtype"] == "bfloat16"
