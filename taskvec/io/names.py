"""Canonical tensor names: the name an architecture's `from_pretrained` loads a tensor under.

The hub's own GPT-2 files store `h.0.attn.c_attn.weight` and causal-mask buffers; a fine-tune
written by `save_pretrained` stores `transformer.h.0.attn.c_attn.weight` and no masks. Both load
into the same model, so a merge must match them. The rules come from transformers itself: the
model class named by `config.json`, instantiated on the meta device (no memory, no weights),
gives its current state-dict keys, its base-model prefix and the patterns of keys it drops on
load. Building a model class costs seconds of imports, so it is done only when the inputs'
names disagree or hold a legacy buffer (`layout.LEGACY_BUFFERS`); otherwise names are used as
they are.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from taskvec.errors import brief
from taskvec.io.layout import LEGACY_BUFFERS


@dataclass(frozen=True)
class NamingRules:
    """How one architecture names its tensors today."""

    architecture: str
    prefix: str  # the base model's attribute, e.g. "transformer" for GPT-2
    expected: frozenset[str]  # state-dict keys save_pretrained writes (tied ones included)
    dropped: re.Pattern | None  # keys transformers ignores on load
    buffers: frozenset[str]  # non-persistent buffers: never in a current checkpoint
    transposed: frozenset[str] = frozenset()  # modules storing (in, out) weights: GPT-2's Conv1D

    def canonical(self, name: str) -> str | None:
        """The current name of a stored tensor; None for a buffer transformers drops on load."""
        candidates = [name] + ([f"{self.prefix}.{name}"] if self.prefix else [])
        for candidate in candidates:
            if candidate in self.expected:
                return candidate
        for candidate in candidates:
            if candidate in self.buffers or LEGACY_BUFFERS.search(candidate) \
                    or (self.dropped is not None and self.dropped.search(candidate)):
                return None
        return name


def naming_rules(config: dict) -> tuple[NamingRules | None, str | None]:
    """The rules of the architecture `config` names, or (None, why not) when transformers
    cannot build it (an unknown or remote-code architecture): then names match literally."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        return None, "no config.json names the model type"
    try:
        import torch
        import transformers
        from transformers import AutoConfig
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        from taskvec.hf import quiet_transformers

        architectures = config.get("architectures") or [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type, "")]
        name = architectures[0]
        model_class = getattr(transformers, name, None) if name else None
        if model_class is None:
            return None, f"transformers has no class {name}"
        fields = {k: v for k, v in config.items() if k not in ("model_type", "transformers_version")}
        with quiet_transformers():
            model_config = AutoConfig.for_model(model_type, **fields)
            with torch.device("meta"):
                model = model_class(model_config)
    except Exception as err:  # any failure to build it means: no rules, match names as they are
        return None, f"transformers could not build a {model_type} model ({brief(err)})"
    state = set(model.state_dict())
    patterns = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
    buffers = {n for n, _ in model.named_buffers()}
    if any(n.endswith("rotary_emb.inv_freq") for n in buffers):  # as PreTrainedModel adds them
        patterns.add(r"rotary_emb\.inv_freq")
    if any(n.endswith("position_ids") for n in buffers):
        patterns.add(r"(^|\.)position_ids$")
    dropped = re.compile("|".join(f"({p})" for p in sorted(patterns))) if patterns else None
    from transformers.pytorch_utils import Conv1D

    transposed = frozenset(n for n, module in model.named_modules() if isinstance(module, Conv1D))
    return NamingRules(name, model.base_model_prefix or "", frozenset(state), dropped,
                       frozenset(buffers - state), transposed), None
