"""Evaluation: perplexity, generation, toxicity scorers and run comparison.

Names are resolved lazily so that light users (the metrics, the comparison table, the CLI's
--help) do not pay for importing torch and transformers.
"""

import importlib

_EXPORTS = {
    "load_model": "model",
    "perplexity": "likelihood",
    "load_ppl_texts": "likelihood",
    "generate": "sampling",
    "load_prompts": "prompts",
    "Scorer": "scorers",
    "get_scorer": "scorers",
    "score_texts": "scorers",
    "SCORERS": "scorers",
    "PerspectiveScorer": "perspective",
    "toxicity_metrics": "metrics",
    "read_generations": "records",
    "evaluate": "run",
    "rescore": "run",
    "compare_runs": "compare",
    "format_table": "compare",
    "plot_runs": "compare",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'taskvec.eval' has no attribute {name!r}")
    return getattr(importlib.import_module(f"taskvec.eval.{_EXPORTS[name]}"), name)
