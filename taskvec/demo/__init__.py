"""`taskvec demo`: the whole detoxification method offline on a small model.

corpus: the offline texts, from `data/grammar.json`. model: tokenizer and untrained tiny GPT-2.
settings: sizes and hyper-parameters. pipeline: the stages, through the library's real functions.
verdict: the conclusion, computed from the measured numbers.
"""
