"""Sweeps over the scale and comparison at matched toxicity (`taskvec sweep`, `taskvec compare --matched`).

The paper's claim compares methods at matched toxicity: each method's models over a range of
scales, several sampling seeds each, then perplexity read where each method's toxicity curve
reaches the same level (matched.py), with bootstrap intervals over the prompts.
"""
