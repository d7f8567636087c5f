"""Issue 12's merge items: side files that would publish a private file, index files that drop
data, free space counted in full, a full disk named as the output's."""

import errno
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from taskvec.merge import merge_checkpoints

from helpers import merge_refused


def test_a_side_file_linking_outside_the_model_is_not_published(workdir, tmp_path):
    base, fts = workdir
    secret = tmp_path / "secret.json"
    secret.write_text('{"token": "hf_private"}')
    secret.chmod(0o600)
    (base / "tokenizer_config.json").symlink_to(secret)
    (base / "special_tokens_map.json").write_text("{}")
    (base / "special_tokens_map.json").chmod(0o600)
    result = merge_checkpoints(fts, tmp_path / "out", base=base, progress=False)
    assert not (tmp_path / "out" / "tokenizer_config.json").exists()
    assert any("tokenizer_config.json" in note and "outside" in note for note in result.notes), result.notes
    copied = tmp_path / "out" / "special_tokens_map.json"
    assert copied.is_file() and oct(copied.stat().st_mode & 0o777) == oct(0o600)  # never wider


def test_a_link_inside_the_model_directory_is_copied_as_a_file(workdir, tmp_path):
    base, fts = workdir
    (base / "real-vocab.json").write_text('{"a": 1}')
    (base / "vocab.json").symlink_to("real-vocab.json")
    merge_checkpoints(fts, tmp_path / "out", base=base, progress=False)
    copied = tmp_path / "out" / "vocab.json"
    assert copied.is_file() and not copied.is_symlink() and json.loads(copied.read_text()) == {"a": 1}


def test_custom_code_named_chat_templates_and_licences_travel_with_the_model(workdir, tmp_path):
    """What a merged model needs to load and to be used as the base was: the custom code its
    auto_map names (copied, never run: the output kept auto_map without it and did not load with
    trust_remote_code), save_pretrained's named chat templates (the tool_use template was lost),
    Mistral's tekken.json, the licence. Other .py files, and the base's model card, stay behind."""
    base, fts = workdir
    config = json.loads((base / "config.json").read_text())
    auto_map = {"AutoConfig": "configuration_mine.MineConfig", "AutoModelForCausalLM": "other/repo--modeling_far.M"}
    (base / "config.json").write_text(json.dumps({**config, "auto_map": auto_map}))
    tokenizer_map = {"auto_map": {"AutoTokenizer": ["tokenization_mine.T", None]}}
    (base / "tokenizer_config.json").write_text(json.dumps(tokenizer_map))
    for name in ("configuration_mine.py", "tokenization_mine.py", "modeling_far.py", "train.py"):
        (base / name).write_text("raise SystemExit('never run')\n")
    (base / "additional_chat_templates").mkdir()
    (base / "additional_chat_templates" / "tool_use.jinja").write_text("TOOLS:{{ messages[0]['content'] }}")
    for name in ("tekken.json", "LICENSE", "USE_POLICY.md", "README.md"):
        (base / name).write_text(name)
    merge_checkpoints(fts, tmp_path / "out", base=base, progress=False)
    out = tmp_path / "out"
    for name in ("configuration_mine.py", "tokenization_mine.py", "additional_chat_templates/tool_use.jinja",
                 "tekken.json", "LICENSE", "USE_POLICY.md"):
        assert (out / name).read_text() == (base / name).read_text(), name
    assert json.loads((out / "config.json").read_text())["auto_map"] == auto_map
    assert not any((out / name).exists() for name in ("modeling_far.py", "train.py", "README.md"))


@pytest.fixture
def sharded(synthetic_sets, tmp_path):
    sset = synthetic_sets("float32", sharded=True)
    ft = shutil.copytree(sset.finetuned[0], tmp_path / "ft")
    return sset.base, ft, ft / "model.safetensors.index.json"


def test_a_tensor_a_shard_holds_but_the_index_omits_is_refused(sharded, tmp_path):
    base, ft, index = sharded
    content = json.loads(index.read_text())
    shards = list(content["weight_map"].values())
    dropped = next(n for n, s in content["weight_map"].items() if shards.count(s) > 1)
    del content["weight_map"][dropped]
    index.write_text(json.dumps(content))
    message = merge_refused(base, [ft], tmp_path / "out", "does not list")
    assert dropped in message


def test_a_shard_the_index_does_not_name_is_refused(sharded, tmp_path):
    base, ft, index = sharded
    content = json.loads(index.read_text())
    alone = next(s for s in content["weight_map"].values() if list(content["weight_map"].values()).count(s) == 1)
    content["weight_map"] = {n: s for n, s in content["weight_map"].items() if s != alone}
    index.write_text(json.dumps(content))
    merge_refused(base, [ft], tmp_path / "out", f"{alone}: a shard that model.safetensors.index.json does not name")


def test_a_tensor_listed_twice_in_the_index_is_refused(sharded, tmp_path):
    base, ft, index = sharded
    content = json.loads(index.read_text())
    name, shard = next(iter(content["weight_map"].items()))
    other = next(s for s in content["weight_map"].values() if s != shard)
    text = json.dumps(content)
    index.write_text(text[:-2] + f', "{name}": "{other}"' + text[-2:])
    merge_refused(base, [ft], tmp_path / "out", f"key '{name}' appears twice")


def test_a_tensor_the_index_assigns_to_another_shard_is_refused(sharded, tmp_path):
    base, ft, index = sharded
    content = json.loads(index.read_text())
    shards = sorted(set(content["weight_map"].values()))
    first = next(n for n, s in content["weight_map"].items() if s == shards[0])
    tensors = load_file(ft / shards[1])
    tensors[first] = load_file(ft / shards[0])[first]  # a stray copy in the second shard
    save_file(tensors, ft / shards[1])
    merge_refused(base, [ft], tmp_path / "out", f"holds tensor '{first}', which .* assigns to {shards[0]}")


def test_free_space_counts_headers_and_side_files(workdir, tmp_path, monkeypatch):
    """Before, only tensor bytes were counted: a disk with room for the tensors alone passed."""
    base, fts = workdir
    (base / "tokenizer.json").write_bytes(b"x" * 200_000)
    tensor_bytes = os.path.getsize(base / "model.safetensors")
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=tensor_bytes + 1000))
    merge_refused(base, fts, tmp_path / "out", f"only 0.00 GB is free on the file system of {tmp_path}")


def test_a_full_disk_while_copying_side_files_names_the_output(workdir, tmp_path, monkeypatch):
    base, fts = workdir

    def full(source, target):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "copyfile", full)
    (base / "tokenizer.json").write_text("{}")
    message = merge_refused(base, fts, tmp_path / "out", f"output {tmp_path / 'out'}: No space left on device")
    assert str(base) not in message


def test_inputs_are_unchanged_by_every_refusal(workdir, tmp_path):
    base, fts = workdir
    before = {p: p.read_bytes() for d in (base, *fts) for p in d.iterdir()}
    tensors = load_file(fts[0] / "model.safetensors")
    tensors["transformer.wte.weight"] = torch.zeros(3, 3)
    save_file(tensors, fts[0] / "model.safetensors")
    before[fts[0] / "model.safetensors"] = (fts[0] / "model.safetensors").read_bytes()
    merge_refused(base, fts, tmp_path / "out", "has shape")
    assert {p: p.read_bytes() for d in (base, *fts) for p in d.iterdir()} == before


def test_nan_in_an_input_is_reported_and_refused_with_strict(workdir, tmp_path):
    base, fts = workdir
    tensors = load_file(fts[1] / "model.safetensors")
    tensors["transformer.h.0.ln_1.bias"][3] = float("nan")
    tensors["transformer.h.0.ln_1.bias"][5] = float("inf")
    save_file(tensors, fts[1] / "model.safetensors")
    result = merge_checkpoints(fts, tmp_path / "out", base=base, chunk_size=64, progress=False)
    assert "tensor 'transformer.h.0.ln_1.bias': 2 NaN/inf values in the output (ft1 holds 2)" in result.notes
    message = merge_refused(base, fts, tmp_path / "strict", "ln_1.bias': 2 NaN/inf .*refused by --strict", strict=True)
    assert "ft1 holds 2" in message


def test_large_finite_outputs_whose_sum_overflows_are_not_reported(workdir, tmp_path):
    """The writer's quick check sums each chunk; a sum that overflows on finite values must fall
    through to the exact count, which finds nothing."""
    base, fts = workdir
    for directory in (base, *fts):
        tensors = load_file(directory / "model.safetensors")
        tensors["transformer.wte.weight"] = torch.full_like(tensors["transformer.wte.weight"], 5e37)
        save_file(tensors, directory / "model.safetensors")
    result = merge_checkpoints(fts, tmp_path / "out", base=base, progress=False)
    assert not [n for n in result.notes if "NaN/inf" in n], result.notes
    merged = load_file(tmp_path / "out" / "model.safetensors")["transformer.wte.weight"]
    assert torch.equal(merged, torch.full_like(merged, 5e37))


def test_overflow_of_the_output_dtype_is_reported(workdir, tmp_path):
    base, fts = workdir
    result = merge_checkpoints(fts, tmp_path / "out", base=base, scale=1e9, dtype="float16", progress=False)
    overflow = [n for n in result.notes if "the inputs are finite: the result overflows F16" in n]
    assert overflow, result.notes
    merged = load_file(tmp_path / "out" / "model.safetensors")
    name = overflow[0].split("'")[1]
    counted = int(overflow[0].split(": ")[1].split(" ")[0])
    assert counted == int((~torch.isfinite(merged[name])).sum())
    clean = merge_checkpoints(fts, tmp_path / "clean", base=base, progress=False)
    assert not [n for n in clean.notes if "NaN/inf" in n]


def test_a_float32_sum_that_overflows_on_finite_inputs_is_named_in_the_note(workdir, tmp_path):
    """Fine-tunes near float32's largest value: their mean fits, but the float32 sum that forms
    it does not, so the output holds inf. The note must not claim the result itself overflows."""
    base, fts = workdir
    for directory in (base, *fts):
        tensors = load_file(directory / "model.safetensors")
        tensors["transformer.wte.weight"] = torch.full_like(tensors["transformer.wte.weight"],
                                                            0.0 if directory == base else 3e38)
        save_file(tensors, directory / "model.safetensors")
    result = merge_checkpoints(fts, tmp_path / "out", base=base, scale=-1.0, progress=False)
    (note,) = [n for n in result.notes if "'transformer.wte.weight'" in n]
    assert "the inputs are finite: the result overflows F32, or the float32 sum of the fine-tunes" in note, note
