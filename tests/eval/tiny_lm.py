"""Texts and a byte-level BPE tokenizer trained on them, for the tiny evaluation model."""

SENTENCES = [
    "The cat sat on the mat and looked at the garden.",
    "A dog ran through the park, chasing a red ball.",
    "Researchers measure how toxic the generations of a language model are.",
    "Task vectors are differences between fine-tuned and pretrained weights.",
    "Hello world, this is a small test of the evaluation code.",
]
EOS = "<|endoftext|>"


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(SENTENCES * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS, pad_token=EOS)
