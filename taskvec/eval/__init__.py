"""Evaluation: perplexity, generation, toxicity scorers and run comparison."""
