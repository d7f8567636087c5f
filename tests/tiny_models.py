"""Tiny transformers models of the architectures people merge, and the layouts the hub holds."""

import importlib.util
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

_SIZES = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
              num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
CONFIGS = {  # model_type -> config fields beyond the shared sizes
    "gpt2": dict(n_embd=16, n_layer=2, n_head=2, n_positions=32, vocab_size=64),
    "llama": _SIZES,
    "mistral": _SIZES,
    "qwen2": _SIZES,
    "gemma": {**_SIZES, "head_dim": 8},
    "phi": {**_SIZES, "num_key_value_heads": None},
    "gpt_neox": {k: v for k, v in _SIZES.items() if k != "num_key_value_heads"},
    "opt": dict(vocab_size=64, hidden_size=16, ffn_dim=32, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=32, word_embed_proj_dim=16),
    # tied, with input embeddings named otherwise
    "falcon": dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, tie_word_embeddings=True),
    "bloom": dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, tie_word_embeddings=True),
    "mamba": dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, state_size=4, tie_word_embeddings=True),
}


def tiny_model(kind: str, seed: int = 0, **overrides):
    """A randomly initialised causal LM of `kind` with a few thousand parameters."""
    fields = {**CONFIGS[kind], "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0, **overrides}
    config = AutoConfig.for_model(kind, **fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.config.architectures = [type(model).__name__]
    return model.eval()


def perturbed_copies(model, directory, n: int, scale: float = 1e-2):
    """n fine-tunes written by save_pretrained: every parameter moved by seeded noise."""
    paths = []
    for i in range(n):
        generator = torch.Generator().manual_seed(1000 + i)
        state = {k: v + scale * torch.randn(v.shape, generator=generator).to(v.dtype) if v.is_floating_point() else v
                 for k, v in model.state_dict().items()}
        copy = type(model)(model.config)
        copy.load_state_dict(state)
        path = directory / f"ft-{i:02d}"
        copy.to(next(model.parameters()).dtype).save_pretrained(path)
        paths.append(path)
    return paths


def gpt2_hub_layout(model, directory) -> None:
    """GPT-2 as the hub's gpt2 files store it: no `transformer.` prefix, no lm_head, and the
    causal-mask buffers attn.bias and attn.masked_bias in every layer."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {k.removeprefix("transformer."): v.contiguous() for k, v in model.state_dict().items()
             if k != "lm_head.weight"}
    positions = model.config.n_positions
    for i in range(model.config.n_layer):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(positions, positions)).view(1, 1, positions, positions)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    model.config.save_pretrained(directory)


def byte_level_tokenizer():
    """The evaluation tests' tokenizer (tests/eval/tiny_lm.py), for a model that must encode text."""
    spec = importlib.util.spec_from_file_location("tiny_lm", Path(__file__).parent / "eval" / "tiny_lm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_tokenizer()
