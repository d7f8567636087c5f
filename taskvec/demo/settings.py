"""Sizes and hyper-parameters of the demo, chosen by experiment on a 2-core CPU.

Why these numbers: the base must be trained long enough that perplexity means something (about
1 minute); each toxic split must be small enough, and its fine-tune long and hot enough, that
the fine-tunes differ by a clear split-specific "noise" besides the shared toxic direction, which
is what averaging removes. A scale of 0.5 brings toxicity to the scorer's floor while the
perplexity cost of the noise is still visible; at 1.0 both the toxicity and the gap grow.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from taskvec.demo.model import ModelSize


@dataclass(frozen=True)
class DemoSettings:
    size: ModelSize
    pretrain_docs: int
    heldout_docs: int
    toxic_docs: int
    prompts: int
    samples: int  # generations per prompt
    max_new_tokens: int
    pretrain_lr: float
    pretrain_epochs: float
    finetune_lr: float
    finetune_epochs: float
    batch_size: int = 16
    max_length: int = 128
    pretrain_toxic_rate: float = 0.2  # share of insulting sentences in the base's training text
    toxic_rate: float = 0.8  # ... and in the fine-tuning corpus
    # Perplexity windows: documents are about 45 tokens (at most ~90), so positions beyond 64
    # are seldom trained; 64-token windows scored from position 32 measure what was learned.
    ppl_window: int = 64


DEFAULT = DemoSettings(
    size=ModelSize(n_layer=4, n_embd=128, n_head=4, vocab_size=1024, n_positions=128),
    pretrain_docs=4000, heldout_docs=200, toxic_docs=500, prompts=100, samples=2, max_new_tokens=20,
    pretrain_lr=3e-3, pretrain_epochs=1, finetune_lr=2e-3, finetune_epochs=4,
)

QUICK = replace(
    DEFAULT,
    size=ModelSize(n_layer=2, n_embd=96, n_head=4, vocab_size=512, n_positions=128),
    pretrain_docs=3000, heldout_docs=100, toxic_docs=300, prompts=60, pretrain_lr=5e-3, finetune_lr=3e-3,
)
