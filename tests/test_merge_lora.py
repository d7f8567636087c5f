"""PEFT LoRA adapters as fine-tunes: checked against the float64 formula and PEFT's own merge."""

import json
import math

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from taskvec.errors import TaskvecError
from taskvec.merge import merge_checkpoints

from helpers import UNIT_ROUNDOFF, assert_close_to_reference, load_dir
from tiny_models import perturbed_copies, tiny_model

GPT2_LORA = dict(target_modules=["c_attn", "c_proj", "wte"], modules_to_save=["ln_f"], bias="lora_only")
LLAMA_LORA = dict(target_modules=["q_proj", "v_proj", "down_proj"])


def make_adapter(model, path, seed, **options):
    """An adapter with random A and B (PEFT's default B = 0 would make every delta zero)."""
    torch.manual_seed(seed)
    fresh = type(model)(model.config)
    fresh.load_state_dict(model.state_dict())
    peft_model = get_peft_model(fresh, LoraConfig(init_lora_weights=False, **options))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if parameter.requires_grad and "lora_" not in name:  # modules_to_save, trained biases
                parameter.add_(torch.randn_like(parameter) * 0.01)
    peft_model.save_pretrained(path)
    return path


def formula_f64(base_dir, adapter_dir) -> dict[str, torch.Tensor]:
    """The fine-tune an adapter stands for, in float64, from the saved tensors and config alone."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    stored = {k.removeprefix("base_model.model."): v.double()
              for k, v in load_file(adapter_dir / "adapter_model.safetensors").items()}
    weights = {k: v.double() for k, v in load_dir(base_dir).items()}
    for key, value in stored.items():
        if ".lora_" in key:
            continue
        weights[key.replace(".base_layer.", ".")] = value
    for key in stored:
        for a_name, b_name, transpose in ((".lora_A.weight", ".lora_B.weight", config["fan_in_fan_out"]),
                                          (".lora_embedding_A", ".lora_embedding_B", True)):
            if key.endswith(a_name):
                module = key.removesuffix(a_name)
                a, b = stored[key], stored[module + b_name]
                rank = a.shape[0]
                alpha = next((v for p, v in config["alpha_pattern"].items() if module.endswith(p)),
                             config["lora_alpha"])
                scaling = alpha / (math.sqrt(rank) if config["use_rslora"] else rank)
                delta = (b @ a) * scaling
                weights[f"{module}.weight"] = weights[f"{module}.weight"] + (delta.T if transpose else delta)
    return weights


def peft_merged(base_dir, adapter_dir) -> dict[str, torch.Tensor]:
    """PEFT's route: load base + adapter, merge_and_unload, the state dict save_pretrained writes."""
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)
    merged = model.merge_and_unload()
    return {k: v.detach() for k, v in merged.state_dict().items() if k in load_dir(base_dir)}


def check(out, base_dir, fine_tunes, scale, rank):
    """Output = base - scale * mean(ft - base), to a bound for float32 deltas of rank `rank`.

    Each delta is a sum of `rank` float32 products, scaled and added to the base: at most
    (rank + 2) unit roundoffs of |base| + sum|B||A|*s; the mean of N and the negation add (N + 3)
    more of the magnitudes, as in helpers.error_bound. A factor of 4 covers orderings.
    """
    base = {k: v.double() for k, v in load_dir(base_dir).items()}
    merged = load_dir(out)
    n = len(fine_tunes)
    for name, value in merged.items():
        fts = [ft[name].double() for ft in fine_tunes]
        reference = base[name] - scale * (torch.stack(fts).mean(0) - base[name])
        magnitude = (1 + abs(scale)) * base[name].abs() + abs(scale) / n * sum(f.abs() for f in fts)
        bound = 4 * (rank + n + 5) * UNIT_ROUNDOFF[torch.float32] * magnitude + 1e-30
        assert_close_to_reference(value, reference, bound, name)


@pytest.mark.parametrize("kind, options", [
    ("gpt2", dict(r=4, lora_alpha=8, **GPT2_LORA)),
    ("gpt2", dict(r=4, lora_alpha=8, use_rslora=True, alpha_pattern={"c_proj": 3}, **GPT2_LORA)),
    ("llama", dict(r=2, lora_alpha=16, **LLAMA_LORA)),
])
def test_adapters_match_the_formula_and_peft(tmp_path, kind, options):
    model = tiny_model(kind)
    model.save_pretrained(tmp_path / "base")
    adapters = [make_adapter(model, tmp_path / f"adapter-{i}", seed=i, **options) for i in range(3)]
    result = merge_checkpoints(adapters, tmp_path / "out", base=tmp_path / "base", scale=0.8, progress=False)
    assert result.bytes_written > 0
    check(tmp_path / "out", tmp_path / "base", [formula_f64(tmp_path / "base", a) for a in adapters], 0.8,
          options["r"])
    check(tmp_path / "out", tmp_path / "base", [peft_merged(tmp_path / "base", a) for a in adapters], 0.8,
          options["r"])
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_the_check_fails_for_a_wrong_scaling(tmp_path):
    """alpha / r and alpha / sqrt(r) differ by 2x at r = 4: the reference check must notice."""
    model = tiny_model("gpt2")
    model.save_pretrained(tmp_path / "base")
    adapter = make_adapter(model, tmp_path / "adapter", seed=0, r=4, lora_alpha=8, **GPT2_LORA)
    merge_checkpoints([adapter], tmp_path / "out", base=tmp_path / "base", progress=False)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "use_rslora": True}))
    with pytest.raises(AssertionError, match="exceeds bound"):
        check(tmp_path / "out", tmp_path / "base", [formula_f64(tmp_path / "base", adapter)], 1.0, 4)


def test_adapters_and_full_finetunes_mix_and_chunks_do_not_matter(tmp_path):
    model = tiny_model("gpt2")
    model.save_pretrained(tmp_path / "base")
    adapter = make_adapter(model, tmp_path / "adapter", seed=0, r=4, lora_alpha=8, **GPT2_LORA)
    (full,) = perturbed_copies(model, tmp_path, 1)
    merge_checkpoints([adapter, full], tmp_path / "out", base=tmp_path / "base", progress=False)
    check(tmp_path / "out", tmp_path / "base", [formula_f64(tmp_path / "base", adapter), load_dir(full)], 1.0, 4)
    merge_checkpoints([adapter, full], tmp_path / "small", base=tmp_path / "base", chunk_size=52, progress=False)
    small, default = (tmp_path / name / "model.safetensors" for name in ("small", "out"))
    assert small.read_bytes() == default.read_bytes()


def test_adapters_onto_a_bfloat16_base_keep_its_dtype(tmp_path):
    model = tiny_model("llama")
    model.to(torch.bfloat16).save_pretrained(tmp_path / "base")
    adapters = [make_adapter(model.float(), tmp_path / f"adapter-{i}", seed=i, r=2, lora_alpha=4, **LLAMA_LORA)
                for i in range(2)]
    result = merge_checkpoints(adapters, tmp_path / "out", base=tmp_path / "base", progress=False)
    merged = load_dir(tmp_path / "out")
    assert all(v.dtype == torch.bfloat16 for v in merged.values())
    base = {k: v.double() for k, v in load_dir(tmp_path / "base").items()}
    for name, value in merged.items():
        fts = [formula_f64(tmp_path / "base", a)[name] for a in adapters]
        reference = base[name] - (torch.stack(fts).mean(0) - base[name])
        bound = UNIT_ROUNDOFF[torch.bfloat16] * reference.abs() + 64 * UNIT_ROUNDOFF[torch.float32] * (
            2 * base[name].abs() + sum(f.abs() for f in fts)) + 2.0**-133
        assert_close_to_reference(value, reference, bound, name)
    assert any("differ in dtype" in note for note in result.notes)


def test_adapter_kinds_taskvec_does_not_compute_are_refused(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "base")
    adapter = make_adapter(model, tmp_path / "dora", seed=0, r=2, use_dora=True, **LLAMA_LORA)
    with pytest.raises(TaskvecError, match="adapter_config.json: use_dora is set") as caught:
        merge_checkpoints([adapter], tmp_path / "out", base=tmp_path / "base", progress=False)
    assert "\n" not in str(caught.value) and not (tmp_path / "out").exists()
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3", "use_dora": False}))
    with pytest.raises(TaskvecError, match="peft_type 'IA3'; taskvec merges PEFT LoRA adapters only"):
        merge_checkpoints([adapter], tmp_path / "out", base=tmp_path / "base", progress=False)
    del config["peft_type"]  # mlx-lm's and other tools' adapter configs
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "use_dora": False}))
    with pytest.raises(TaskvecError, match="no peft_type, so not a PEFT adapter"):
        merge_checkpoints([adapter], tmp_path / "out", base=tmp_path / "base", progress=False)


@pytest.mark.parametrize("change, refused", [
    (dict(alora_invocation_tokens=[1, 2]), "alora_invocation_tokens is set"),  # PEFT cannot merge aLoRA
    (dict(layer_replication=[[1, 2], [0, 1]]), "layer_replication is set"),  # deltas of layers the base lacks
    (dict(trainable_token_indices=[3]), "trainable_token_indices is set"),
    (dict(kasa_config={"r": 2}), "kasa_config is set"),
    (dict(velora_config={"rank": 2}), "velora_config is set"),
    (dict(init_lora_weights="lora_ga", lora_ga_config={"iters": 2}), "init_lora_weights is 'lora_ga'"),
    (dict(init_lora_weights="pissa"), "init_lora_weights is 'pissa': its factors belong to a base weight"),
    (dict(init_lora_weights="pissa_niter_4"), "init_lora_weights is 'pissa_niter_4'"),
    (dict(init_lora_weights="olora"), "init_lora_weights is 'olora'"),
    (dict(init_lora_weights="corda"), "init_lora_weights is 'corda'"),
    (dict(init_lora_weights="loftq"), "init_lora_weights is 'loftq'"),
    (dict(init_lora_weights="mica"), "init_lora_weights is 'mica'"),
    (dict(alpha_pattern={"q_proj(": 3}), "alpha_pattern key 'q_proj\\(' is not a regular expression"),
    (dict(alpha_pattern=["q_proj"]), "alpha_pattern is list, not an object"),
])
def test_lora_variants_and_changed_bases_are_refused_in_one_line(tmp_path, change, refused):
    """Adapters whose merged weight is not base + B @ A * scaling on the base's own layers: PiSSA,
    OLoRA, CorDA and LoftQ train factors of a base weight PEFT changed at initialisation (saved
    unconverted, merged as plain LoRA they gave a wrong model with exit 0, as did aLoRA and
    layer_replication); malformed patterns were tracebacks."""
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "base")
    adapter = make_adapter(model, tmp_path / "adapter", seed=0, r=2, **LLAMA_LORA)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(TaskvecError, match=refused) as caught:
        merge_checkpoints([adapter], tmp_path / "out", base=tmp_path / "base", progress=False)
    assert "\n" not in str(caught.value) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("init, extra", [(True, {}), ("gaussian", {}), ("eva", {}), ("orthogonal", {}),
                                         (True, {"lora_ga_config": {"iters": 2}})])  # LoRA-GA converted by PEFT
def test_initialisations_that_keep_the_base_merge_as_plain_lora(tmp_path, init, extra):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "base")
    adapter = make_adapter(model, tmp_path / "adapter", seed=0, r=2, **LLAMA_LORA)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "init_lora_weights": init, **extra}))
    merge_checkpoints([adapter], tmp_path / "out", base=tmp_path / "base", progress=False)
    check(tmp_path / "out", tmp_path / "base", [peft_merged(tmp_path / "base", adapter)], 1.0, 2)


def test_adapter_keys_with_peft_s_adapter_name_merge_alike(tmp_path):
    """`lora_A.default.weight` (a whole PEFT model's state dict, saved by hand): PEFT loads it as
    `lora_A.weight`; it was refused as a tensor the base does not have."""
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "base")
    adapter = make_adapter(model, tmp_path / "adapter", seed=0, r=2, **LLAMA_LORA)
    merge_checkpoints([adapter], tmp_path / "plain", base=tmp_path / "base", progress=False)
    tensors = load_file(adapter / "adapter_model.safetensors")
    named = {k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v
             for k, v in tensors.items()}
    assert named != tensors
    save_file(named, adapter / "adapter_model.safetensors")
    merge_checkpoints([adapter], tmp_path / "named", base=tmp_path / "base", progress=False)
    plain, named = load_dir(tmp_path / "plain"), load_dir(tmp_path / "named")
    assert plain.keys() == named.keys() and all(torch.equal(plain[k], named[k]) for k in plain)


def test_the_embedding_an_adapter_saves_is_the_one_its_delta_is_added_to(tmp_path):
    """With the embedding a LoRA target, PEFT saves its weight (`base_layer.weight`) in the adapter
    and loads it over the base's; where the trainer had edited it (re-initialised tokens, say), the
    merge kept the base's rows and lost the edit (a wrong model with exit 0)."""
    model = tiny_model("llama", tie_word_embeddings=False)
    model.save_pretrained(tmp_path / "base")
    edited = type(model)(model.config)
    edited.load_state_dict(model.state_dict())
    with torch.no_grad():
        edited.model.embed_tokens.weight[-4:] = edited.model.embed_tokens.weight[:-4].mean(0)
    adapter = make_adapter(edited, tmp_path / "adapter", seed=0, r=2, target_modules=["embed_tokens", "q_proj"])
    saved = load_file(adapter / "adapter_model.safetensors")["base_model.model.model.embed_tokens.base_layer.weight"]
    assert not torch.equal(saved, model.model.embed_tokens.weight)
    merge_checkpoints([adapter], tmp_path / "out", base=tmp_path / "base", progress=False)
    check(tmp_path / "out", tmp_path / "base", [peft_merged(tmp_path / "base", adapter)], 1.0, 2)


def test_an_adapter_of_another_model_is_refused_and_another_base_noted(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "base")
    other = tiny_model("llama", hidden_size=24, intermediate_size=40)
    adapter = make_adapter(other, tmp_path / "adapter", seed=0, r=2, **LLAMA_LORA)
    with pytest.raises(TaskvecError, match="makes a .* update, but .* has .*an adapter of another model"):
        merge_checkpoints([adapter], tmp_path / "out", base=tmp_path / "base", progress=False)
    good = make_adapter(model, tmp_path / "good", seed=0, r=2, **LLAMA_LORA)
    config = json.loads((good / "adapter_config.json").read_text())
    (good / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "meta/llama-7b"}))
    result = merge_checkpoints([good], tmp_path / "out", base=tmp_path / "base", progress=False)
    assert "good: adapter trained on meta/llama-7b, merged onto base" in result.notes
    (tmp_path / "link").symlink_to(tmp_path / "base")  # trained on a symlinked base: the same model, no note
    (good / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(tmp_path / "link")}))
    for base in ("link", "base"):
        result = merge_checkpoints([good], tmp_path / f"out-{base}", base=tmp_path / base, progress=False)
        assert not [note for note in result.notes if "trained on" in note], result.notes
    with pytest.raises(TaskvecError, match="a LoRA adapter cannot be the base"):
        merge_checkpoints([tmp_path / "base"], tmp_path / "out2", base=good, progress=False)


def test_conv1d_modules_are_transposed_whatever_the_saved_flag_says(tmp_path):
    """PEFT sets fan_in_fan_out per module type but saves one flag: with a Linear target processed
    last it says false, and a square Conv1D delta was added untransposed (a wrong model, exit 0)."""
    model = tiny_model("gpt2", tie_word_embeddings=False)
    model.save_pretrained(tmp_path / "base")
    adapter = make_adapter(model, tmp_path / "adapter", seed=0, r=4, lora_alpha=8,
                           target_modules=["attn.c_proj", "lm_head"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "fan_in_fan_out": False}))
    merge_checkpoints([adapter], tmp_path / "out", base=tmp_path / "base", progress=False)
    check(tmp_path / "out", tmp_path / "base", [peft_merged(tmp_path / "base", adapter)], 1.0, 4)


def test_an_adapter_of_the_headless_model_is_oriented_under_its_renamed_name(tmp_path):
    """An adapter trained on GPT2Model (AutoModel: keys without `transformer.`) onto a
    GPT2LMHeadModel base: its modules are renamed, and the Conv1D transposition must follow the new
    name (the square c_proj's delta was added untransposed, a wrong model with exit 0, and the
    others were refused as another model's)."""
    from transformers import GPT2Model

    model = tiny_model("gpt2")
    model.save_pretrained(tmp_path / "base")
    body = GPT2Model(model.config)
    body.load_state_dict(model.transformer.state_dict())
    adapter = make_adapter(body, tmp_path / "adapter", seed=0, r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"])
    result = merge_checkpoints([adapter], tmp_path / "out", base=tmp_path / "base", progress=False)
    assert any("renamed" in note for note in result.notes)
    merged = PeftModel.from_pretrained(GPT2Model.from_pretrained(tmp_path / "base"), adapter).merge_and_unload()
    reference = {f"transformer.{k}": v.detach() for k, v in merged.state_dict().items()}
    reference["lm_head.weight"] = reference["transformer.wte.weight"]
    check(tmp_path / "out", tmp_path / "base", [reference], 1.0, 4)


def test_an_embedding_trained_whole_and_kept_tied_merges_as_peft_merges_it(tmp_path):
    """PEFT's ensure_weight_tying on a tied base: modules_to_save trains one embedding, saved both
    as the embedding and as the head with the same values. That is a tied pair: the trained
    embedding, the head following it (it was refused as a change of the tied head)."""
    model = tiny_model("llama", tie_word_embeddings=True)
    model.save_pretrained(tmp_path / "base")
    adapter = make_adapter(model, tmp_path / "adapter", seed=0, r=2, target_modules=["q_proj"],
                           modules_to_save=["embed_tokens"], ensure_weight_tying=True)
    saved = load_file(adapter / "adapter_model.safetensors")
    assert torch.equal(saved["base_model.model.lm_head.weight"], saved["base_model.model.model.embed_tokens.weight"])
    merge_checkpoints([adapter], tmp_path / "out", base=tmp_path / "base", progress=False)
    check(tmp_path / "out", tmp_path / "base", [peft_merged(tmp_path / "base", adapter)], 1.0, 2)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert loaded.lm_head.weight is loaded.get_input_embeddings().weight


def test_adapters_that_would_untie_a_tied_base_are_refused(tmp_path):
    model = tiny_model("gpt2")
    model.save_pretrained(tmp_path / "base")
    whole = make_adapter(model, tmp_path / "whole-wte", seed=0, r=4, target_modules=["c_attn"],
                         modules_to_save=["wte"])
    with pytest.raises(TaskvecError, match="trains 'transformer.wte.weight' whole .* ties to its output"):
        merge_checkpoints([whole], tmp_path / "out", base=tmp_path / "base", progress=False)
    head = make_adapter(model, tmp_path / "head", seed=0, r=4, target_modules=["lm_head"])
    with pytest.raises(TaskvecError, match="changes 'lm_head.weight', which .* ties to its input embedding"):
        merge_checkpoints([head], tmp_path / "out", base=tmp_path / "base", progress=False)
    assert not (tmp_path / "out").exists()
