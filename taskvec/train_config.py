"""Fine-tuning settings, apart from the training code so that `taskvec train-splits --help`
shows their defaults without importing torch or transformers."""

from __future__ import annotations

import math
from dataclasses import dataclass

from taskvec.errors import TaskvecError

PRECISIONS = ("fp32", "bf16", "fp16")
# The Trainer's optimizer names offered; the bitsandbytes ones need that package.
BNB_OPTIMIZERS = ("paged_adamw_32bit", "paged_adamw_8bit", "adamw_bnb_8bit")
OPTIMIZERS = ("adamw_torch_fused", "adamw_torch", "adafactor", "sgd", *BNB_OPTIMIZERS)
MODEL_DTYPES = ("float32", "bfloat16", "float16")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")


@dataclass
class TrainConfig:
    """Fine-tuning settings; the defaults are the original recipe (AdamW, linear schedule).

    batch_size is per device: with P processes the effective batch is
    P * batch_size * gradient_accumulation_steps. max_steps, when set, overrides epochs.
    ascent=True trains by gradient ascent on the LM loss (the classic unlearning baseline).

    lora_rank set trains a LoRA adapter instead of every weight: lora_alpha defaults to the rank
    (scale alpha / r = 1) and lora_target_modules to PEFT's modules for the architecture.
    model_dtype is the dtype the base is loaded and trained in; below float32 only the LoRA path
    or DeepSpeed (which keeps float32 master weights) can train it. attn_implementation None is
    transformers' choice; deepspeed is the path of a DeepSpeed JSON config.
    """

    learning_rate: float = 1e-5
    batch_size: int = 16
    epochs: float = 5
    max_length: int = 128
    weight_decay: float = 0.0
    warmup_steps: int = 0
    seed: int = 0
    ascent: bool = False
    max_steps: int | None = None
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    precision: str = "fp32"
    save_steps: int = 500
    save_total_limit: int | None = 2
    logging_steps: int = 50
    lora_rank: int | None = None
    lora_alpha: float | None = None
    lora_target_modules: tuple[str, ...] | None = None
    lora_dropout: float = 0.0
    gradient_checkpointing: bool = False
    optim: str = "adamw_torch_fused"  # the Trainer's default on torch >= 2.8, so older runs compare equal
    model_dtype: str = "float32"
    attn_implementation: str | None = None
    deepspeed: str | None = None

    def validate(self) -> None:
        positive = {"learning_rate": self.learning_rate, "batch_size": self.batch_size,
                    "epochs": self.epochs, "max_length": self.max_length,
                    "gradient_accumulation_steps": self.gradient_accumulation_steps,
                    "save_steps": self.save_steps, "logging_steps": self.logging_steps}
        if self.max_steps is not None:
            positive["max_steps"] = self.max_steps
        for name, value in positive.items():  # finite too: an infinite rate or decay trains NaN weights
            if not (value > 0 and math.isfinite(value)):
                raise TaskvecError(f"{name} must be a positive finite number, got {value}")
        for name in ("weight_decay", "warmup_steps", "max_grad_norm"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise TaskvecError(f"{name} must be a finite number, not negative, got {value}")
        if self.precision not in PRECISIONS:
            raise TaskvecError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        for name, allowed in (("optim", OPTIMIZERS), ("model_dtype", MODEL_DTYPES),
                              ("attn_implementation", (None, *ATTN_IMPLEMENTATIONS))):
            if getattr(self, name) not in allowed:
                raise TaskvecError(f"{name} must be one of {', '.join(filter(None, allowed))}, "
                                   f"got {getattr(self, name)!r}")
        if self.lora_rank is None:
            for name, unset in (("lora_alpha", None), ("lora_target_modules", None), ("lora_dropout", 0.0)):
                if getattr(self, name) != unset:
                    raise TaskvecError(f"{name} is a LoRA setting; set lora_rank (--lora-rank) to train LoRA")
        elif not self.lora_rank > 0:
            raise TaskvecError(f"lora_rank must be positive, got {self.lora_rank}")
        if self.lora_alpha is not None and not (self.lora_alpha > 0 and math.isfinite(self.lora_alpha)):
            raise TaskvecError(f"lora_alpha must be a positive finite number, got {self.lora_alpha}")
        if self.lora_target_modules is not None and not (self.lora_target_modules and all(self.lora_target_modules)):
            raise TaskvecError(f"lora_target_modules must be module names, got {self.lora_target_modules!r}")
        if not 0 <= self.lora_dropout < 1:
            raise TaskvecError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.model_dtype != "float32" and self.lora_rank is None and self.deepspeed is None:
            raise TaskvecError(f"model_dtype {self.model_dtype} would train every weight in {self.model_dtype}, "
                               "where small updates round away; use it with --lora-rank or --deepspeed "
                               "(float32 master weights), or --precision for mixed precision")
