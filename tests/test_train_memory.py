"""The parameter counts behind docs/training.md's memory table (examples/memory_estimate.py),
against the models transformers builds from each published config and the adapters PEFT adds."""

import importlib.util
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PhiConfig

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "memory_estimate.py"
spec = importlib.util.spec_from_file_location("memory_estimate", SCRIPT)
memory_estimate = sys.modules["memory_estimate"] = importlib.util.module_from_spec(spec)  # dataclasses look it up
spec.loader.exec_module(memory_estimate)

CONFIGS = {  # the shapes of gpt2, gpt2-medium, gpt2-large, microsoft/phi-1_5, meta-llama/Llama-2-7b-hf
    "GPT-2 small": GPT2Config(n_layer=12, n_embd=768, n_head=12),
    "GPT-2 medium": GPT2Config(n_layer=24, n_embd=1024, n_head=16),
    "GPT-2 large": GPT2Config(n_layer=36, n_embd=1280, n_head=20),
    "Phi-1.5": PhiConfig(vocab_size=51200, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                         num_attention_heads=32, partial_rotary_factor=0.5),
    "Llama-2-7B": LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                              num_attention_heads=32, num_key_value_heads=32),
}


@pytest.mark.parametrize("model", memory_estimate.MODELS, ids=lambda m: m.name)
def test_counts_match_the_models_transformers_and_peft_build(model):
    """Two layers of each (the layers are alike, and building all of them only takes longer)."""
    from peft import LoraConfig, get_peft_model

    model = replace(model, layers=2)
    config = CONFIGS[model.name]
    setattr(config, "n_layer" if model.kind == "gpt2" else "num_hidden_layers", 2)
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        built = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in built.parameters()) == model.parameters()
    adapted = get_peft_model(built, LoraConfig(r=16, task_type="CAUSAL_LM"))
    assert sum(p.numel() for p in adapted.parameters() if p.requires_grad) == model.lora_parameters(16)


def test_published_sizes():
    sizes = {m.name: m.parameters() for m in memory_estimate.MODELS}
    assert sizes["GPT-2 small"] == 124_439_808 and round(sizes["Llama-2-7B"] / 1e9, 2) == 6.74
    assert round(sizes["Phi-1.5"] / 1e9, 2) == 1.42 and "| Llama-2-7B | 4 |" in memory_estimate.tables()
