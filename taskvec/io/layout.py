"""What a model directory holds, by name: the one place for file names and tensor-name rules.

The readers, the checkpoint opener, the shard writer and the merge all take their names from
here, so a new format or a new architecture's tied embedding is one line in one file.
"""

import re

# Safetensors weights, as save_pretrained writes them.
SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
# PyTorch pickles (GPT-2-era fine-tunes, save_pretrained(safe_serialization=False) before v5).
TORCH_SINGLE = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"
TORCH_SUFFIXES = (".bin", ".pt", ".pth")
# PEFT adapters.
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SAFETENSORS = "adapter_model.safetensors"
ADAPTER_TORCH = "adapter_model.bin"

CONFIG = "config.json"
PROVENANCE = "taskvec.json"

# Files copied from the base into a merged model: what from_pretrained and the tokenizer need.
SIDE_FILE_PATTERNS = (
    CONFIG,
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "*.model",
    "*.tiktoken",
    "chat_template.*",
    "additional_chat_templates/*.jinja",  # named chat templates, as save_pretrained writes them
    "tekken.json",  # Mistral's tokenizer
    "preprocessor_config.json",
    "LICENSE*",  # terms that travel with the weights
    "USE_POLICY*",
    "NOTICE*",
)
# Custom code (`auto_map` in config.json or tokenizer_config.json) is fetched from the hub and
# copied too, by the names auto_map gives: taskvec never runs it; transformers runs it only with
# trust_remote_code.
CUSTOM_CODE = "*.py"
TOKENIZER_CONFIG = "tokenizer_config.json"

# Names a tied output embedding may be stored under, and where its input embedding lives.
TIED_OUTPUT = "lm_head.weight"
INPUT_EMBEDDINGS = (
    "transformer.wte.weight",
    "model.embed_tokens.weight",
    "model.decoder.embed_tokens.weight",
    "gpt_neox.embed_in.weight",
    "transformer.word_embeddings.weight",  # Falcon, BLOOM
    "backbone.embeddings.weight",  # Mamba
    "wte.weight",
    "embed_tokens.weight",
    "decoder.embed_tokens.weight",
    "embed_in.weight",
)

# Buffers that older checkpoints stored and current transformers drops on load (GPT-2's causal
# masks, per-layer rotary inv_freq, position_ids). Their presence, or names that differ between
# inputs, makes the merge consult the architecture's own naming rules (taskvec.io.names).
LEGACY_BUFFERS = re.compile(
    r"(^|\.)(attn\.bias|attn\.masked_bias|attention\.bias|attention\.masked_bias|"
    r"rotary_emb\.inv_freq|inv_freq|position_ids)$"
)

# Tensors that only quantized checkpoints hold (GPTQ, AWQ, bitsandbytes): such weights are
# packed integers plus scales, not values a task vector can be taken of.
QUANTIZED_TENSORS = re.compile(
    r"\.(qweight|qzeros|scales|g_idx|absmax|quant_map|nested_absmax|nested_quant_map|"
    r"quant_state(\.\w+)?|SCB|weight_format)$"
)

# A Trainer checkpoint folder inside output_dir.
TRAINER_CHECKPOINT = re.compile(r"checkpoint-(\d+)")
