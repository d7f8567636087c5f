"""Checkpoints as they exist in the wild: hub layouts, mixed dtypes, .bin files, extra tensors.

Each case builds its layout here from a tiny transformers model, merges it, checks every tensor
against a float64 reference computed from the stored bytes (read with safetensors / torch.load,
names mapped by hand), and loads the output with from_pretrained: no missing or unexpected keys.
"""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from taskvec.errors import TaskvecError
from taskvec.merge import merge_checkpoints

from helpers import assert_close_to_reference, error_bound, load_dir, negated_mean_f64
from tiny_models import gpt2_hub_layout, perturbed_copies, tiny_model


def merged_against_reference(base_sd, ft_sds, out, scale=1.0, out_dtype=None):
    """Every output tensor equals the float64 negated mean of the stored values, to the bound."""
    merged = load_dir(out)
    assert set(merged) == set(base_sd), set(merged) ^ set(base_sd)
    n = len(ft_sds)
    for name, value in merged.items():
        fts = [sd[name] for sd in ft_sds]
        reference = negated_mean_f64(base_sd[name], fts, scale)
        dtype = out_dtype or base_sd[name].dtype
        assert value.dtype == dtype, name
        bound = error_bound(base_sd[name], fts, 1 + scale, -scale / n, reference, dtype)
        assert_close_to_reference(value, reference, bound, name)


def loads_and_generates(out):
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    tokens = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert tokens.shape == (1, 7)
    return model


def current_state(model) -> dict[str, torch.Tensor]:
    """What save_pretrained writes: the state dict without the tied head."""
    tied = model.config.tie_word_embeddings
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}


def test_hub_gpt2_layout_base_with_save_pretrained_finetunes(tmp_path):
    """The README's recipe: the hub's gpt2 (no prefix, mask buffers) and Trainer-written fine-tunes."""
    model = tiny_model("gpt2")
    gpt2_hub_layout(model, tmp_path / "base")
    fts = perturbed_copies(model, tmp_path, 3)
    result = merge_checkpoints(fts, tmp_path / "out", base=tmp_path / "base", scale=0.7, progress=False)
    assert any("renamed" in note and "'transformer.'" in note for note in result.notes), result.notes
    assert any("buffers that transformers drops" in note and "attn.bias" in note for note in result.notes)
    base_sd = {f"transformer.{k}": v for k, v in load_file(tmp_path / "base" / "model.safetensors").items()
               if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    merged_against_reference(base_sd, [load_dir(p) for p in fts], tmp_path / "out", scale=0.7)
    loads_and_generates(tmp_path / "out")


def test_finetunes_in_the_hub_layout_onto_a_current_base(tmp_path):
    model = tiny_model("gpt2")
    model.save_pretrained(tmp_path / "base")
    fts = []
    for i, ft in enumerate(perturbed_copies(model, tmp_path, 2)):
        gpt2_hub_layout(AutoModelForCausalLM.from_pretrained(ft), tmp_path / f"hub-{i}")
        fts.append(tmp_path / f"hub-{i}")
    merge_checkpoints(fts, tmp_path / "out", base=tmp_path / "base", progress=False)
    ft_sds = [{f"transformer.{k}": v for k, v in load_file(p / "model.safetensors").items()} for p in fts]
    merged_against_reference(load_dir(tmp_path / "base"), ft_sds, tmp_path / "out")
    loads_and_generates(tmp_path / "out")


def test_opt_without_model_prefix(tmp_path):
    """Large OPT checkpoints on the hub store decoder.* without model."""
    model = tiny_model("opt")
    state = current_state(model)
    (tmp_path / "base").mkdir()
    save_file({k.removeprefix("model."): v.contiguous() for k, v in state.items()},
              tmp_path / "base" / "model.safetensors")
    model.config.save_pretrained(tmp_path / "base")
    fts = perturbed_copies(model, tmp_path, 2)
    merge_checkpoints(fts, tmp_path / "out", base=tmp_path / "base", progress=False)
    merged_against_reference(state, [load_dir(p) for p in fts], tmp_path / "out")
    loads_and_generates(tmp_path / "out")


def test_llama_with_per_layer_rotary_buffers(tmp_path):
    """Older Llama files carry rotary_emb.inv_freq per layer; current save_pretrained does not."""
    model = tiny_model("llama")
    state = current_state(model)
    legacy = dict(state)
    for i in range(model.config.num_hidden_layers):
        legacy[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.rand(4)
    (tmp_path / "base").mkdir()
    save_file({k: v.contiguous() for k, v in legacy.items()}, tmp_path / "base" / "model.safetensors")
    model.config.save_pretrained(tmp_path / "base")
    fts = perturbed_copies(model, tmp_path, 2)
    result = merge_checkpoints(fts, tmp_path / "out", base=tmp_path / "base", progress=False)
    assert any("rotary_emb.inv_freq" in note for note in result.notes), result.notes
    merged_against_reference(state, [load_dir(p) for p in fts], tmp_path / "out")
    loads_and_generates(tmp_path / "out")


@pytest.mark.parametrize("kind", ["gpt2", "llama", "mistral", "qwen2", "phi", "gpt_neox", "opt", "gemma"])
def test_save_pretrained_layouts_sharded_and_single_mixed(tmp_path, kind):
    model = tiny_model(kind)
    model.save_pretrained(tmp_path / "base", max_shard_size="20KB")
    fts = perturbed_copies(model, tmp_path, 2)
    merge_checkpoints(fts, tmp_path / "out", base=tmp_path / "base", scale=0.5, progress=False)
    merged_against_reference(load_dir(tmp_path / "base"), [load_dir(p) for p in fts], tmp_path / "out", 0.5)
    loads_and_generates(tmp_path / "out")


@pytest.mark.parametrize("kind, limit", [("llama", "2KB"), ("llama", "60KB"), ("gpt2", "20KB")])
def test_shards_and_index_are_those_save_pretrained_writes(tmp_path, kind, limit):
    """The index lacked total_parameters, and a small limit cut more shards than save_pretrained."""
    model = tiny_model(kind)
    model.save_pretrained(tmp_path / "base", max_shard_size=limit)
    fts = perturbed_copies(model, tmp_path, 2)
    merge_checkpoints(fts, tmp_path / "out", base=tmp_path / "base", max_shard_size=limit, progress=False)
    AutoModelForCausalLM.from_pretrained(tmp_path / "out").save_pretrained(tmp_path / "again", max_shard_size=limit)
    ours, theirs = (sorted(p.name for p in (tmp_path / d).glob("*.safetensors*")) for d in ("out", "again"))
    assert ours == theirs
    if len(ours) > 1:
        index = "model.safetensors.index.json"
        assert (json.loads((tmp_path / "out" / index).read_text())
                == json.loads((tmp_path / "again" / index).read_text()))


@pytest.mark.parametrize("base_dtype, ft_dtypes", [
    (torch.float32, [torch.bfloat16, torch.bfloat16]),
    (torch.bfloat16, [torch.float32, torch.float32]),
    (torch.float16, [torch.bfloat16, torch.float32]),
])
def test_mixed_dtypes_are_cast_on_read(tmp_path, base_dtype, ft_dtypes):
    model = tiny_model("gpt2")
    model.to(base_dtype).save_pretrained(tmp_path / "base")
    fts = []
    for ft, dtype in zip(perturbed_copies(model, tmp_path, len(ft_dtypes)), ft_dtypes, strict=True):
        sd = {k: v.to(dtype) for k, v in load_dir(ft).items()}
        (ft / "model.safetensors").unlink()
        save_file(sd, ft / "model.safetensors")
        fts.append(ft)
    result = merge_checkpoints(fts, tmp_path / "out", base=tmp_path / "base", progress=False)
    assert any("differ in dtype" in note for note in result.notes), result.notes
    merged_against_reference(load_dir(tmp_path / "base"), [load_dir(p) for p in fts], tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["dtype"] == str(base_dtype).removeprefix("torch.")
    merge_checkpoints(fts, tmp_path / "out32", base=tmp_path / "base", dtype="float32", progress=False)
    merged_against_reference(load_dir(tmp_path / "base"), [load_dir(p) for p in fts], tmp_path / "out32",
                             out_dtype=torch.float32)
    assert json.loads((tmp_path / "out32" / "config.json").read_text())["dtype"] == "float32"


def save_bin(state: dict, directory, shards: int = 1, legacy: bool = False) -> None:
    """pytorch_model.bin, or shards with pytorch_model.bin.index.json, as transformers 4 wrote them."""
    directory.mkdir(parents=True, exist_ok=True)
    names = list(state)
    if shards == 1:
        torch.save(state, directory / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)
        return
    weight_map = {}
    for i in range(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {name: state[name] for name in names[i::shards]}
        torch.save(part, directory / file, _use_new_zipfile_serialization=not legacy)
        weight_map.update(dict.fromkeys(part, file))
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize("shards, legacy", [(1, False), (3, False), (1, True)])
def test_pytorch_bin_inputs(tmp_path, shards, legacy):
    model = tiny_model("gpt2")
    base_state = current_state(model)
    save_bin(base_state, tmp_path / "base", shards, legacy)
    model.config.save_pretrained(tmp_path / "base")
    fts, ft_states = [], []
    for i, ft in enumerate(perturbed_copies(model, tmp_path, 2)):
        state = load_dir(ft)
        ft_states.append(state)
        if i == 0:  # one .bin fine-tune beside a safetensors one
            shutil.rmtree(ft)
            save_bin(state, ft, shards, legacy)
            model.config.save_pretrained(ft)
        fts.append(ft)
    merge_checkpoints(fts, tmp_path / "out", base=tmp_path / "base", progress=False)
    merged_against_reference(base_state, ft_states, tmp_path / "out")
    loads_and_generates(tmp_path / "out")
    provenance = json.loads((tmp_path / "out" / "taskvec.json").read_text())
    assert provenance["base"]["format"] == "torch" and provenance["finetuned"][1]["format"] == "safetensors"


@pytest.mark.parametrize("legacy", [False, True])
def test_a_tied_head_saved_as_a_view_of_the_embedding_is_no_tensor_of_its_own(tmp_path, legacy):
    """torch.save(model.state_dict()) of a tied model stores lm_head.weight as a view of wte's
    storage. It was taken for a tensor of its own: merged (harmless) and, worse, counted by
    inspect as a second embedding. It is the tied head: left out, as save_pretrained does."""
    from taskvec.inspect import inspect_checkpoints

    model = tiny_model("gpt2")
    state = dict(model.state_dict())
    assert state["lm_head.weight"].data_ptr() == state["transformer.wte.weight"].data_ptr()
    save_bin(state, tmp_path / "base", legacy=legacy)
    model.config.save_pretrained(tmp_path / "base")
    (ft,) = perturbed_copies(model, tmp_path, 1)
    result = merge_checkpoints([ft], tmp_path / "out", base=tmp_path / "base", progress=False)
    assert not result.notes[1:], result.notes  # the one-fine-tune note only
    merged_against_reference(current_state(model), [load_dir(ft)], tmp_path / "out")
    assert "lm_head.weight" not in load_dir(tmp_path / "out")
    loads_and_generates(tmp_path / "out")
    stats = inspect_checkpoints(tmp_path / "base", [ft], progress=False)
    assert stats["global"]["numel"] == sum(p.numel() for p in model.parameters())  # tied: counted once
    assert "head" not in stats["groups"]


class _Hostile:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_bin_file_that_would_run_code_is_refused(tmp_path):
    model = tiny_model("gpt2")
    model.save_pretrained(tmp_path / "base")
    marker = tmp_path / "ran"
    state = {**current_state(model), "evil": _Hostile(marker)}
    save_bin(state, tmp_path / "ft")
    with pytest.raises(TaskvecError, match="pytorch_model.bin: the pickle needs posix.system") as caught:
        merge_checkpoints([tmp_path / "ft"], tmp_path / "out", base=tmp_path / "base", progress=False)
    assert "\n" not in str(caught.value) and not marker.exists() and not (tmp_path / "out").exists()


def test_outputs_name_no_local_path(tmp_path):
    model = tiny_model("gpt2")
    model.save_pretrained(tmp_path / "base")
    fts = perturbed_copies(model, tmp_path, 2)
    merge_checkpoints(fts, tmp_path / "out", base=tmp_path / "base", progress=False)
    provenance = (tmp_path / "out" / "taskvec.json").read_text()
    with open(tmp_path / "out" / "model.safetensors", "rb") as handle:
        header = handle.read(int.from_bytes(handle.read(8), "little")).decode()
    for text in (provenance, header):
        assert str(tmp_path) not in text and "/tmp" not in text
    record = json.loads(provenance)
    assert record["base"]["name"] == "base" and [f["name"] for f in record["finetuned"]] == ["ft-00", "ft-01"]
    assert len({f["sha256"] for f in record["finetuned"]}) == 2  # fine-tunes of one architecture told apart


def expect_refusal(tmp_path, base, fts, match, **kwargs):
    with pytest.raises(TaskvecError, match=match) as caught:
        merge_checkpoints(fts, tmp_path / "out", base=base, progress=False, **kwargs)
    assert "\n" not in str(caught.value)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".out", "out"))]
    return str(caught.value)


def test_quantized_checkpoints_are_refused(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "base")
    (ft,) = perturbed_copies(model, tmp_path, 1)
    config = json.loads((ft / "config.json").read_text())
    (ft / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "gptq"}}))
    expect_refusal(tmp_path, tmp_path / "base", [ft], "a gptq checkpoint")
    (ft / "config.json").write_text(json.dumps(config))
    state = load_dir(ft)
    state["model.layers.0.self_attn.q_proj.qweight"] = torch.zeros(4, 8, dtype=torch.int32)
    save_file(state, ft / "model.safetensors")
    expect_refusal(tmp_path, tmp_path / "base", [ft], "'model.layers.0.self_attn.q_proj.qweight' is part of a quant")


def test_untied_base_and_a_configless_finetune_without_head_is_refused(tmp_path):
    """Before: the fine-tune's input embedding was silently used as its output embedding."""
    model = tiny_model("llama", tie_word_embeddings=False)
    model.save_pretrained(tmp_path / "base")
    (ft,) = perturbed_copies(model, tmp_path, 1)
    state = load_dir(ft)
    del state["lm_head.weight"]
    save_file(state, ft / "model.safetensors")
    (ft / "config.json").unlink()
    message = expect_refusal(tmp_path, tmp_path / "base", [ft], "tensor 'lm_head.weight' is missing")
    assert "not tied" in message


def test_resized_vocabulary_is_refused_with_both_sizes(tmp_path):
    model = tiny_model("gpt2")
    model.save_pretrained(tmp_path / "base")
    (ft,) = perturbed_copies(model, tmp_path, 1)
    resized = AutoModelForCausalLM.from_pretrained(ft)
    resized.resize_token_embeddings(model.config.vocab_size + 8)
    shutil.rmtree(ft)
    resized.save_pretrained(ft)
    message = expect_refusal(tmp_path, tmp_path / "base", [ft], "the vocabulary was resized")
    assert f"{model.config.vocab_size + 8} rows" in message and f"has {model.config.vocab_size}" in message


def test_trainer_output_dir_names_its_newest_checkpoint(tmp_path):
    model = tiny_model("gpt2")
    model.save_pretrained(tmp_path / "base")
    run = tmp_path / "run"
    for step in (500, 1500, 1000):
        (run / f"checkpoint-{step}").mkdir(parents=True)
    expect_refusal(tmp_path, tmp_path / "base", [run], f"the newest is {run / 'checkpoint-1500'}")


def test_trainer_checkpoint_dirs_merge(tmp_path):
    model = tiny_model("gpt2")
    model.save_pretrained(tmp_path / "base")
    fts = []
    for i, ft in enumerate(perturbed_copies(model, tmp_path, 2)):
        checkpoint = tmp_path / f"run{i}" / "checkpoint-10"
        shutil.copytree(ft, checkpoint)
        torch.save({"lr": 1.0}, checkpoint / "optimizer.pt")
        torch.save({}, checkpoint / "training_args.bin")
        fts.append(checkpoint)
    merge_checkpoints(fts, tmp_path / "out", base=tmp_path / "base", progress=False)
    merged_against_reference(load_dir(tmp_path / "base"), [load_dir(p) for p in fts], tmp_path / "out")


def test_value_head_of_a_trl_finetune_is_left_out(tmp_path):
    model = tiny_model("gpt2")
    model.save_pretrained(tmp_path / "base")
    fts = perturbed_copies(model, tmp_path, 2)
    state = load_dir(fts[0])
    state.update({"v_head.summary.weight": torch.randn(1, 16), "v_head.summary.bias": torch.randn(1)})
    save_file(state, fts[0] / "model.safetensors")
    result = merge_checkpoints(fts, tmp_path / "out", base=tmp_path / "base", progress=False)
    assert any("ft-00: 2 tensors the base does not have left out" in n for n in result.notes), result.notes
    del state["v_head.summary.weight"], state["v_head.summary.bias"]
    merged_against_reference(load_dir(tmp_path / "base"), [state, load_dir(fts[1])], tmp_path / "out")
    shutil.rmtree(tmp_path / "out")
    expect_refusal(tmp_path, tmp_path / "base", fts, "ft-00: holds 2 tensors", strict=True)


def test_the_reference_check_catches_a_small_scale_error(tmp_path):
    """The reference check can fail: a merge at scale 1 + 2**-12 instead of 1 is outside the bound."""
    model = tiny_model("gpt2")
    model.save_pretrained(tmp_path / "base")
    fts = perturbed_copies(model, tmp_path, 2)
    merge_checkpoints(fts, tmp_path / "out", base=tmp_path / "base", scale=1 + 2**-12, progress=False)
    with pytest.raises(AssertionError, match="exceeds bound"):
        merged_against_reference(load_dir(tmp_path / "base"), [load_dir(p) for p in fts], tmp_path / "out")


def test_an_untied_finetune_of_a_tied_base_is_refused(tmp_path):
    """Before: its own lm_head was 'left out' as an extra and the output tied to the merged wte."""
    model = tiny_model("gpt2")
    model.save_pretrained(tmp_path / "base")
    (ft,) = perturbed_copies(model, tmp_path, 1)
    state = load_dir(ft)
    state["lm_head.weight"] = load_dir(tmp_path / "base")["transformer.wte.weight"]
    save_file(state, ft / "model.safetensors")
    config = json.loads((ft / "config.json").read_text())
    (ft / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    expect_refusal(tmp_path, tmp_path / "base", [ft], "its output embedding 'lm_head.weight' is its own")


def _input_embedding(model) -> str:
    return next(n for n, p in model.named_parameters() if p is model.get_input_embeddings().weight)


@pytest.mark.parametrize("kind", ["gpt2", "falcon", "bloom", "mamba"])
def test_a_tied_finetune_storing_a_head_of_its_own_is_refused(tmp_path, kind):
    """Its config ties the embeddings but its file stores lm_head with other values: transformers
    loads it untied, so a merge onto a tied base would lose that head (it was dropped silently,
    exit 0, and still was for architectures whose input embedding has another name: Falcon's and
    BLOOM's word_embeddings, Mamba's embeddings). The same values stored twice are a tied pair and
    merge as one."""
    model = tiny_model(kind)
    embedding = _input_embedding(model)
    model.save_pretrained(tmp_path / "base")
    (ft,) = perturbed_copies(model, tmp_path, 1)
    state = load_dir(ft)
    state["lm_head.weight"] = state[embedding] + 0.5
    save_file(state, ft / "model.safetensors")
    expect_refusal(tmp_path, tmp_path / "base", [ft], f"{ft}: its output embedding 'lm_head.weight' holds other values")
    state["lm_head.weight"] = state[embedding].clone()
    save_file(state, ft / "model.safetensors")
    merge_checkpoints([ft], tmp_path / "out", base=tmp_path / "base", progress=False)
    merged_against_reference(load_dir(tmp_path / "base"), [load_dir(ft)], tmp_path / "out")


@pytest.mark.parametrize("kind", ["falcon", "bloom", "mamba"])
def test_a_base_storing_its_tied_head_merges_with_finetunes_that_do_not(tmp_path, kind):
    """A tied base whose file stores the head beside the embedding (as some hub checkpoints do)
    and a fine-tune save_pretrained wrote without it: the fine-tune's head is its embedding. For
    input embeddings named otherwise than the common ones this was refused as a missing tensor."""
    model = tiny_model(kind)
    embedding = _input_embedding(model)
    (ft,) = perturbed_copies(model, tmp_path, 1)
    base = tmp_path / "base"
    model.save_pretrained(base)
    state = load_dir(base)
    state["lm_head.weight"] = state[embedding].clone()
    save_file(state, base / "model.safetensors", metadata={"format": "pt"})
    merge_checkpoints([ft], tmp_path / "out", base=base, progress=False)
    finetuned = load_dir(ft)
    merged_against_reference(load_dir(base), [{**finetuned, "lm_head.weight": finetuned[embedding]}], tmp_path / "out")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert loaded.lm_head.weight is loaded.get_input_embeddings().weight


@pytest.mark.parametrize("stale_shards", [False, True])
def test_a_single_file_beside_a_stale_index_is_read_as_transformers_reads_it(tmp_path, stale_shards):
    """A model re-saved unsharded into the directory it was once saved sharded to keeps the old
    index (save_pretrained leaves it), and a copied folder may keep the old shards too.
    from_pretrained loads model.safetensors; the merge read the index instead: it refused the
    missing shards, or, with them present, merged the old model with exit 0."""
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "base")
    tiny_model("llama", seed=5).save_pretrained(tmp_path / "old", max_shard_size="20KB")
    (ft,) = perturbed_copies(model, tmp_path, 1)
    shutil.copy(tmp_path / "old" / "model.safetensors.index.json", ft)
    if stale_shards:
        for shard in (tmp_path / "old").glob("model-*.safetensors"):
            shutil.copy(shard, ft)
    merge_checkpoints([ft], tmp_path / "out", base=tmp_path / "base", progress=False)
    loaded = current_state(AutoModelForCausalLM.from_pretrained(ft))
    assert all(torch.equal(loaded[k], v) for k, v in load_file(ft / "model.safetensors").items())
    merged_against_reference(load_file(tmp_path / "base" / "model.safetensors"), [loaded], tmp_path / "out")


def test_a_bin_whose_pickle_rebuilds_a_tensor_from_no_storage_is_refused_in_one_line(tmp_path):
    """The allowed _rebuild_tensor_v2 called with a string for its storage: a traceback before."""
    import io
    import zipfile

    model = tiny_model("gpt2")
    model.save_pretrained(tmp_path / "base")
    pickled = (b"\x80\x02}(X\x01\x00\x00\x00actorch._utils\n_rebuild_tensor_v2\n"
               b"(X\x03\x00\x00\x00xyzK\x00K\x06\x85K\x01\x85\x89}tRu.")
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("archive/data.pkl", pickled)
        handle.writestr("archive/byteorder", "little")
    (tmp_path / "ft").mkdir()
    (tmp_path / "ft" / "pytorch_model.bin").write_bytes(archive.getvalue())
    expect_refusal(tmp_path, tmp_path / "base", [tmp_path / "ft"],
                   "pytorch_model.bin: not a readable PyTorch checkpoint .UnpicklingError: a tensor rebuilt from a str")


def test_bin_tensors_with_odd_strides_on_size_one_dimensions_are_read(tmp_path):
    """A (1, n) tensor made by .t() has strides (1, 1): contiguous, but refused before."""
    from taskvec.io.safetensors_file import FileReader
    from taskvec.io.torch_file import read_torch_file

    value = torch.randn(5, 1).t()
    save_bin({"row": value, "plain": torch.randn(3)}, tmp_path / "ft")
    entry = read_torch_file(tmp_path / "ft" / "pytorch_model.bin")["row"]
    raw = torch.empty(entry.nbytes, dtype=torch.uint8)
    FileReader().read_into(entry.path, entry.offset, memoryview(raw.numpy()))
    assert entry.shape == (1, 5) and torch.equal(raw.view(torch.float32).view(1, 5), value)
