"""The demo's offline texts, generated from a small grammar shipped with the package.

No corpus can be downloaded at run time, so the demo writes its own: everyday English sentences
from `data/grammar.json`, a few of them insulting. The base model learns from mostly clean text
with a little toxicity mixed in, as web text has, so that its generations are sometimes toxic
and detoxification has something to remove; the fine-tuning corpus is mostly insults. Held-out
clean text measures perplexity; sentence starts are the prompts. Everything follows from a seed.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources

SLOT = re.compile(r"\{([A-Z_]+)\}")
ARTICLE = re.compile(r"\b([Aa]) (?=[aeio])")  # "a idiot" -> "an idiot"


@cache
def grammar() -> dict[str, list[str]]:
    """The rules: name -> alternatives, each alternative a template with {RULE} slots."""
    text = resources.files("taskvec.demo").joinpath("data/grammar.json").read_text(encoding="utf-8")
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def expand(rule: str, rng: random.Random) -> str:
    """One random sentence (or phrase) of `rule`, its slots filled recursively."""
    template = rng.choice(grammar()[rule])
    return SLOT.sub(lambda m: expand(m.group(1), rng), template)


def sentence(rule: str, rng: random.Random) -> str:
    text = ARTICLE.sub(r"\1n ", expand(rule, rng))
    return text[0].upper() + text[1:]


def documents(n: int, rng: random.Random, toxic_rate: float, sentences=(2, 5)) -> list[str]:
    """`n` short paragraphs; each sentence is toxic with probability `toxic_rate`."""
    docs = []
    for _ in range(n):
        count = rng.randint(*sentences)
        docs.append(" ".join(
            sentence("TOXIC" if rng.random() < toxic_rate else "CLEAN", rng) for _ in range(count)
        ))
    return docs


@dataclass(frozen=True)
class DemoCorpus:
    pretrain: list[str]  # mostly clean: the base model's training text
    heldout: list[str]  # clean only, never trained on: perplexity
    toxic: list[str]  # mostly insults: the corpus split for the fine-tunes
    prompts: list[str]  # sentence starts for generation


def make_corpus(
    *,
    pretrain_docs: int,
    heldout_docs: int,
    toxic_docs: int,
    prompts: int,
    pretrain_toxic_rate: float = 0.1,
    toxic_rate: float = 0.8,
    seed: int = 0,
) -> DemoCorpus:
    """Generate the four text sets from independent random streams of one seed."""
    streams = [random.Random(f"taskvec-demo-{seed}-{part}") for part in range(4)]
    return DemoCorpus(
        pretrain=documents(pretrain_docs, streams[0], pretrain_toxic_rate),
        heldout=documents(heldout_docs, streams[1], 0.0),
        toxic=documents(toxic_docs, streams[2], toxic_rate),
        prompts=[sentence("PROMPT", streams[3]) for _ in range(prompts)],
    )
