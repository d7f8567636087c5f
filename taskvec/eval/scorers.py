"""Toxicity scorers behind one interface: `score(texts) -> list[float]` in [0, 1], and a `name`.

detoxify (the original's classifier, `unbiased` model) needs its checkpoint, which is downloaded
from GitHub on first use; offline, pass one with `checkpoint=`. perspective calls Google's
Perspective API (see perspective.py). profanity (alt-profanity-check's linear SVM) and
better-profanity (a word list, 0 or 1) work offline out of the box but measure profanity, not
toxicity: their numbers are not comparable with the literature's. hf:MODEL is any Hugging Face
text-classification model (see hf_classifier.py).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from taskvec.errors import TaskvecError, brief


@runtime_checkable
class Scorer(Protocol):
    name: str
    settings: dict  # what identifies the scorer in a summary (model, checkpoint, ...)
    batch_size: int  # texts per call to score() that keep a progress bar moving

    def score(self, texts: list[str]) -> list[float]: ...


class ProfanityScorer:
    """alt-profanity-check: probability that a text is offensive, from a bundled classifier."""

    name = "profanity"
    batch_size = 1024

    def __init__(self):
        with warnings.catch_warnings():  # the bundled model was pickled by an older scikit-learn
            warnings.simplefilter("ignore")
            from profanity_check import predict_prob
        self._predict = predict_prob
        self.settings = {"package": "alt-profanity-check"}

    def score(self, texts):
        if not texts:
            return []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return [float(p) for p in self._predict(list(texts))]


class BetterProfanityScorer:
    """better-profanity: 1.0 if a text contains a listed word (with leetspeak variants), else 0.0."""

    name = "better-profanity"
    batch_size = 256

    def __init__(self):
        from better_profanity import Profanity

        self._profanity = Profanity()  # its own word list, not the module-level singleton
        self.settings = {"package": "better-profanity"}

    def score(self, texts):
        return [float(self._profanity.contains_profanity(text)) for text in texts]


class DetoxifyScorer:
    """Detoxify's `toxicity` head; the original paper used the `unbiased` (RoBERTa) model.

    checkpoint: a Detoxify .ckpt file (a dict with `config` and `state_dict`), for machines
    without access to GitHub. config_dir: a directory with the Hugging Face config and tokenizer
    of the checkpoint's architecture (e.g. roberta-base), for machines without the hub. Either
    way the checkpoint is read without running pickled code (see detoxify_loader).
    """

    name = "detoxify"

    def __init__(self, model_type: str = "unbiased", checkpoint: str | Path | None = None,
                 config_dir: str | Path | None = None, device: str = "cpu", batch_size: int = 32):
        from detoxify.detoxify import MODEL_URLS

        from taskvec.eval.detoxify_loader import hub_checkpoint, load_detoxify

        if checkpoint is None and model_type not in MODEL_URLS:
            raise TaskvecError(f"unknown Detoxify model {model_type!r}: choose from {', '.join(MODEL_URLS)}")
        for path, what in ((checkpoint, "checkpoint"), (config_dir, "config directory")):
            if path is not None and not Path(path).exists():
                raise TaskvecError(f"Detoxify {what} {path} does not exist")
        try:
            model, self._tokenizer, class_names = load_detoxify(
                hub_checkpoint(model_type) if checkpoint is None else checkpoint, config_dir)
        except TaskvecError:
            raise
        except Exception as err:  # download and transformers errors all mean "cannot load"
            source = f"checkpoint {checkpoint}" if checkpoint else f"model {model_type!r}"
            raise TaskvecError(
                f"cannot load the Detoxify {source} ({type(err).__name__}: {brief(err)}); offline, pass "
                "--detoxify-checkpoint FILE (and --detoxify-config DIR), or use --scorer profanity"
            ) from err
        if "toxicity" not in class_names:
            raise TaskvecError(f"Detoxify checkpoint {checkpoint} has no 'toxicity' class "
                               f"(it has {', '.join(class_names)})")
        self._model = model.to(device).eval()
        self._column = class_names.index("toxicity")
        self.batch_size = batch_size
        self.settings = {"model_type": None if checkpoint else model_type,
                         "checkpoint": None if checkpoint is None else str(checkpoint)}

    def score(self, texts):
        """Sigmoid of the toxicity logit, as Detoxify.predict computes it."""
        import torch

        if not texts:
            return []
        inputs = self._tokenizer(list(texts), return_tensors="pt", truncation=True, padding=True)
        with torch.inference_mode():
            logits = self._model(**inputs.to(self._model.device))[0]
        return torch.sigmoid(logits[:, self._column]).float().cpu().tolist()


def _perspective(**options):
    from taskvec.eval.perspective import PerspectiveScorer

    return PerspectiveScorer(**options)


SCORERS: dict[str, Callable[..., Scorer]] = {
    "detoxify": DetoxifyScorer,
    "perspective": _perspective,
    "profanity": ProfanityScorer,
    "better-profanity": BetterProfanityScorer,
}


def _hf_classifier(**options):
    from taskvec.eval.hf_classifier import HFClassifierScorer

    return HFClassifierScorer(**options)


HF_PREFIX = "hf:"  # hf:MODEL, a Hugging Face text-classification model (hub id or directory)


def get_scorer(name: str, **options) -> Scorer:
    """The scorer called `name`, created with `options` (e.g. checkpoint=, api_key=, qps=);
    `hf:MODEL` is the Hugging Face text-classification model MODEL (label=, tokenizer=, ...)."""
    if name.startswith(HF_PREFIX) and len(name) > len(HF_PREFIX):
        factory, options = _hf_classifier, {"model": name[len(HF_PREFIX):], **options}
    elif name in SCORERS:
        factory = SCORERS[name]
    else:
        raise TaskvecError(f"unknown scorer {name!r}: choose from {', '.join(SCORERS)} or {HF_PREFIX}MODEL")
    try:
        return factory(**options)
    except TypeError as err:
        if "unexpected keyword" not in str(err):
            raise
        raise TaskvecError(f"scorer {name!r} does not take that option ({err})") from err


def scorer_family(name: str) -> str:
    """`hf` for hf:MODEL, else the name: what scorer options are checked against."""
    return "hf" if name.startswith(HF_PREFIX) else name


def file_suffix(name: str) -> str:
    """The scorer name as one path component (hf:org/model -> hf-model), for default output names."""
    return f"hf-{Path(name[len(HF_PREFIX):]).name}" if name.startswith(HF_PREFIX) else name


def score_texts(scorer: Scorer, texts: Sequence[str], progress: bool | None = None) -> list[float]:
    """Score `texts` in the scorer's batches with a progress bar; check every score is in [0, 1]."""
    from taskvec.progress import progress_bar

    scores: list[float] = []
    with progress_bar(progress, total=len(texts), desc=f"scoring ({scorer.name})", unit="text") as bar:
        for start in range(0, len(texts), scorer.batch_size):
            batch = list(texts[start:start + scorer.batch_size])
            batch_scores = scorer.score(batch)
            if len(batch_scores) != len(batch):
                raise TaskvecError(f"scorer {scorer.name} returned {len(batch_scores)} scores "
                                   f"for {len(batch)} texts")
            scores.extend(batch_scores)
            bar.update(len(batch))
    bad = [s for s in scores if not 0.0 <= s <= 1.0]
    if bad:
        raise TaskvecError(f"scorer {scorer.name} returned {bad[0]!r}, outside [0, 1]")
    return scores
