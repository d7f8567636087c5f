"""Fine-tuning settings, apart from the training code so that `taskvec train-splits --help`
shows their defaults without importing torch or transformers."""

from __future__ import annotations

from dataclasses import dataclass

from taskvec.errors import TaskvecError

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class TrainConfig:
    """Fine-tuning settings; the defaults are the original recipe (AdamW, linear schedule).

    batch_size is per device: with P processes the effective batch is
    P * batch_size * gradient_accumulation_steps. max_steps, when set, overrides epochs.
    ascent=True trains by gradient ascent on the LM loss (the classic unlearning baseline).
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

    def validate(self) -> None:
        positive = {"learning_rate": self.learning_rate, "batch_size": self.batch_size,
                    "epochs": self.epochs, "max_length": self.max_length,
                    "gradient_accumulation_steps": self.gradient_accumulation_steps,
                    "save_steps": self.save_steps, "logging_steps": self.logging_steps}
        if self.max_steps is not None:
            positive["max_steps"] = self.max_steps
        for name, value in positive.items():
            if not value > 0:
                raise TaskvecError(f"{name} must be positive, got {value}")
        for name in ("weight_decay", "warmup_steps", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise TaskvecError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.precision not in PRECISIONS:
            raise TaskvecError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
