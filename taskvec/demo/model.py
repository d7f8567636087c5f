"""The demo's starting point: a byte-level BPE tokenizer and an untrained tiny GPT-2, saved as a
model directory like any Hugging Face checkpoint, so that training, merging and evaluation treat
it exactly as they would treat `gpt2`.

The real GPT-2 tokenizer is not available offline, so the demo trains its own (seconds) on the
texts the model will see; a small vocabulary also keeps the embedding matrix, most of a tiny
model's weights, small.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

EOS = "<|endoftext|>"


@dataclass(frozen=True)
class ModelSize:
    n_layer: int
    n_embd: int
    n_head: int
    vocab_size: int
    n_positions: int


def train_tokenizer(texts: list[str], vocab_size: int):
    """A GPT-2-style byte-level BPE trained on `texts`, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=EOS
    )


def write_untrained_model(output: Path, texts: list[str], size: ModelSize, seed: int) -> Path:
    """Save a randomly initialised GPT-2 of `size` with a tokenizer trained on `texts`."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from taskvec.hf import quiet_transformers

    tokenizer = train_tokenizer(texts, size.vocab_size)
    config = GPT2Config(
        # GPT-2's tanh approximation of GELU as one fused torch operation instead of gelu_new's
        # seven: the same function, and on CPU a tenth less time to train and sample this model
        activation_function="gelu_pytorch_tanh",
        vocab_size=len(tokenizer),
        n_positions=size.n_positions,
        n_embd=size.n_embd,
        n_layer=size.n_layer,
        n_head=size.n_head,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng():  # seeded initial weights, caller's RNG state left alone
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    with quiet_transformers():
        model.save_pretrained(output)
        tokenizer.save_pretrained(output)
    return output
