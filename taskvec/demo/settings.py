"""Sizes and hyper-parameters of the demo, chosen by experiment on a 2-core CPU.

Why these numbers: the base must be trained long enough that perplexity means something (about
1 minute); each toxic split must be small enough, and its fine-tune long and hot enough, that
the fine-tunes differ by a clear split-specific "noise" besides the shared toxic direction, which
is what averaging removes. The scales run from barely detoxified to the scorer's floor of
toxicity (about 0.03, reached near 0.5), and four sampling seeds per model let the matched
comparison tell the methods apart from the sampling noise (about 0.007 between two seeds).
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
    # Sequences sampled together: all of a seed's prompts x samples in one batch. Sampling this
    # model costs mostly per step, not per sequence: 200 at once take ~25% less than 4 x 50.
    generation_batch: int = 200
    scales: tuple[float, ...] = (0.1, 0.2, 0.3, 0.5, 0.75, 1.0)  # swept for merged and single
    sampling_seeds: int = 4  # toxicity is measured once per seed
    bootstrap: int = 1000  # resamples of the prompts for the matched comparison's intervals
    # matched levels, as shares of the way from the toxicity floor to the base: the floor, where the
    # effect is not resolved, and the mid range (higher up, small scales do not raise perplexity yet)
    level_fractions: tuple[float, ...] = (0.03, 0.1, 0.2, 0.3, 0.45)


DEFAULT = DemoSettings(
    size=ModelSize(n_layer=4, n_embd=128, n_head=4, vocab_size=1024, n_positions=128),
    pretrain_docs=4000, heldout_docs=200, toxic_docs=500, prompts=100, samples=2, max_new_tokens=20,
    pretrain_lr=3e-3, pretrain_epochs=1, finetune_lr=2e-3, finetune_epochs=4,
)

QUICK = replace(
    DEFAULT,
    size=ModelSize(n_layer=2, n_embd=96, n_head=4, vocab_size=512, n_positions=128),
    pretrain_docs=3000, heldout_docs=100, toxic_docs=300, prompts=60, pretrain_lr=5e-3, finetune_lr=3e-3,
    scales=(0.25, 0.5, 1.0), sampling_seeds=2, bootstrap=200,
)
