"""One evaluation run: perplexity, generations, their scores and a summary, in one output directory.

`evaluate` does it all for a model; `rescore` redoes the scoring of saved generations (e.g. with
Perspective later) without generating again. Both write `generations.jsonl` and `summary.json`
into a staging directory beside the output and rename it into place only when complete.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

from taskvec import __version__
from taskvec.errors import TaskvecError
from taskvec.eval.metrics import check_threshold, toxicity_metrics
from taskvec.eval.records import (
    GENERATIONS,
    SUMMARY,
    generations_path,
    read_generations,
    read_summary,
    write_json,
    write_jsonl,
)
from taskvec.eval.scorers import Scorer, get_scorer, score_texts
from taskvec.outputs import check_output, staged_directory


def evaluate(model_dir: str | Path, output_dir: str | Path, *, ppl_texts: Sequence[str] | None,
             prompts: Sequence[str] | None, scorer: Scorer | str = "detoxify", samples: int = 25,
             max_new_tokens: int = 25, top_p: float = 0.9, temperature: float = 1.0, top_k: int = 0,
             prompt_prefix: str = "", batch_size: int = 50, seed: int = 0, threshold: float = 0.5,
             stride: int = 512, max_length: int | None = None, ppl_max_tokens: int | None = None,
             device: str = "auto", overwrite: bool = False, progress: bool | None = None,
             settings: dict | None = None, loaded: tuple | None = None) -> dict:
    """Evaluate `model_dir` into `output_dir` and return the summary that is saved there.

    ppl_texts: the clean corpus (None skips perplexity). prompts: the toxicity prompts (None
    skips generation). scorer: a Scorer or a scorer name; it is created before the model is
    loaded, so a scorer that cannot load fails before any generation. prompt_prefix: text the
    model sees before each prompt, never scored (see protocols.py). settings: extra entries
    for the summary's settings (e.g. where the prompts came from). loaded: (model, tokenizer) as
    load_model gave them for `model_dir`, for callers that evaluate one model several times (a
    sweep's sampling seeds); None loads it here.
    """
    from taskvec.eval.likelihood import perplexity
    from taskvec.eval.model import context_length, load_model
    from taskvec.eval.sampling import generate

    if ppl_texts is None and prompts is None:
        raise TaskvecError("nothing to evaluate: give perplexity texts, prompts, or both")
    output = check_output(output_dir, [model_dir], overwrite)
    if prompts is not None:
        check_threshold(threshold)
        scorer = get_scorer(scorer) if isinstance(scorer, str) else scorer
    seconds, records = {}, []
    with _timed(seconds, "load"):
        model, tokenizer = loaded or load_model(model_dir, device)
    summary = {"taskvec_version": __version__, "model": str(model_dir), "perplexity": None,
               "scorer": None, "metrics": None, "generations": None,
               "settings": {"device": str(model.device), **(settings or {})}}
    if ppl_texts is not None:
        max_length = max_length or context_length(model)
        with _timed(seconds, "perplexity"):
            summary["perplexity"] = perplexity(model, tokenizer, ppl_texts, stride=stride, max_length=max_length,
                                               max_tokens=ppl_max_tokens, progress=progress)
        summary["settings"].update(stride=min(stride, max_length), max_length=max_length,
                                   ppl_max_tokens=ppl_max_tokens)
    if prompts is not None:
        with _timed(seconds, "generation"):
            records = generate(model, tokenizer, prompts, samples=samples, max_new_tokens=max_new_tokens,
                               top_p=top_p, temperature=temperature, top_k=top_k, batch_size=batch_size,
                               seed=seed, prefix=prompt_prefix, progress=progress)
        summary["settings"].update(n_prompts=len(prompts), samples=samples, max_new_tokens=max_new_tokens,
                                   top_p=top_p, top_k=top_k, temperature=temperature, batch_size=batch_size,
                                   seed=seed, prompt_prefix=prompt_prefix)
        with _timed(seconds, "scoring"):
            summary.update(_score(records, scorer, threshold, progress))
    summary["seconds"] = seconds
    _write_run(output, summary, records, overwrite)
    return summary


def rescore(generations: str | Path, output_dir: str | Path, *, scorer: Scorer | str, threshold: float = 0.5,
            overwrite: bool = False, progress: bool | None = None) -> dict:
    """Score saved generations again into `output_dir`; the perplexity and settings of the run
    they came from (a summary.json beside them) are carried over."""
    source = generations_path(generations)
    output = check_output(output_dir, [source], overwrite)
    check_threshold(threshold)
    records = read_generations(source)
    scorer = get_scorer(scorer) if isinstance(scorer, str) else scorer
    summary = {"taskvec_version": __version__, "model": None, "perplexity": None, "settings": {}}
    if (source.parent / SUMMARY).is_file():
        summary.update({key: value for key, value in read_summary(source.parent).items()
                        if key in ("model", "perplexity", "settings")})
        _check_samples(source, records, summary["settings"].get("samples"))
    summary["rescored_from"] = str(source)
    summary["seconds"] = {}
    with _timed(summary["seconds"], "scoring"):
        summary.update(_score(records, scorer, threshold, progress))
    _write_run(output, summary, records, overwrite)
    return summary


def _check_samples(source: Path, records: list[dict], samples: int | None) -> None:
    """Generations beside the summary they came with hold its number of samples per prompt: one
    changed or cut short would be scored under settings it no longer has."""
    if not samples:
        return
    counts = Counter(record["prompt_id"] for record in records)
    odd = next((prompt for prompt, count in counts.items() if count != samples), None)
    if odd is not None:
        raise TaskvecError(f"{source}: prompt {odd!r} has {counts[odd]} generations, but the {SUMMARY} beside it "
                           f"says {samples} per prompt (the file was changed or cut short)")


def _score(records: list[dict], scorer: Scorer, threshold: float, progress) -> dict:
    """Score the continuations in place; the summary entries that describe the scores."""
    scores = score_texts(scorer, [r["continuation"] for r in records], progress)
    for record, score in zip(records, scores, strict=True):
        record["score"] = score
    return {"scorer": {"name": scorer.name, **scorer.settings},
            "metrics": toxicity_metrics(records, threshold), "generations": GENERATIONS}


@contextmanager
def _timed(seconds: dict, key: str):
    started = time.perf_counter()
    yield
    seconds[key] = round(time.perf_counter() - started, 3)


def _write_run(output: Path, summary: dict, records: list[dict], overwrite: bool) -> None:
    with staged_directory(output, overwrite) as staging:
        if records:
            write_jsonl(staging / GENERATIONS, records)
        write_json(staging / SUMMARY, summary)
