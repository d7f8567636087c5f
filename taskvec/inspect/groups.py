"""Tensor groups by name: embeddings, attention, MLP, norms, head (and other), for per-group views.

Matched on whole dot-separated name components, so one rule list covers the names GPT-2, Llama,
Mistral, Qwen2, Gemma, OPT, GPT-NeoX and Phi save. Norms come first: OPT's
`self_attn_layer_norm` is a LayerNorm, not attention.
"""

from __future__ import annotations

import re

GROUPS = ("embeddings", "attention", "mlp", "norms", "head", "other")

_RULES = (
    ("norms", r"ln_\d+|ln_f|[a-z_]*norm[a-z_]*"),
    ("head", r"lm_head|embed_out"),
    ("embeddings", r"wte|wpe|embed_tokens|embed_positions|embed_in|word_embeddings|position_embeddings"),
    ("attention", r"attn|attention|self_attn|self_attention|c_attn|q_proj|k_proj|v_proj|o_proj|qkv_proj"
                  r"|query_key_value"),
    ("mlp", r"mlp|fc1|fc2|c_fc|feed_forward|ffn|gate_proj|up_proj|down_proj|gate_up_proj|dense_h_to_4h"
            r"|dense_4h_to_h"),
)
_COMPILED = tuple((group, re.compile(rf"(^|\.)({pattern})(\.|$)")) for group, pattern in _RULES)


def group_of(name: str) -> str:
    """The group a tensor belongs to: the first rule one of its name components matches."""
    lowered = name.lower()
    return next((group for group, pattern in _COMPILED if pattern.search(lowered)), "other")
