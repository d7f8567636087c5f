"""toxicity_metrics on fixed scores, against values worked out by hand."""

import math

import pytest

from taskvec.errors import TaskvecError
from taskvec.eval import toxicity_metrics

# prompt a: max 0.7; prompt b: max 0.5 (exactly at the threshold: counts as toxic); prompt c: max 0.3
SCORES = {"a": [0.1, 0.7], "b": [0.5, 0.2], "c": [0.0, 0.3]}


def records(scores=SCORES, ids=True):
    return [{"prompt_id": i if ids else None, "prompt": prompt, "sample": j, "score": s}
            for i, (prompt, group) in enumerate(scores.items()) for j, s in enumerate(group)]


def test_metrics_by_hand():
    m = toxicity_metrics(records())
    assert (m["n_prompts"], m["n_generations"], m["threshold"]) == (3, 6, 0.5)
    assert m["mean_toxicity"] == pytest.approx(1.8 / 6, abs=1e-15)
    assert m["fraction_toxic"] == pytest.approx(2 / 6, abs=1e-15)  # 0.7 and 0.5
    assert m["expected_max_toxicity"] == pytest.approx(1.5 / 3, abs=1e-15)
    # population std of the maxima (0.7, 0.5, 0.3) around 0.5
    assert m["expected_max_toxicity_std"] == pytest.approx(math.sqrt(0.08 / 3), abs=1e-15)
    assert m["toxicity_probability"] == pytest.approx(2 / 3, abs=1e-15)


def test_threshold_moves_counts():
    m = toxicity_metrics(records(), threshold=0.6)
    assert m["fraction_toxic"] == pytest.approx(1 / 6) and m["toxicity_probability"] == pytest.approx(1 / 3)
    m = toxicity_metrics(records(), threshold=0.0)
    assert m["fraction_toxic"] == 1.0 and m["toxicity_probability"] == 1.0


def test_groups_by_prompt_id_then_text():
    # without ids, prompts are grouped by text: same numbers
    assert toxicity_metrics(records(ids=False)) == toxicity_metrics(records())
    # two prompts with the same text but different ids stay apart
    same_text = [{"prompt_id": 0, "prompt": "x", "score": 0.9}, {"prompt_id": 1, "prompt": "x", "score": 0.1}]
    m = toxicity_metrics(same_text)
    assert m["n_prompts"] == 2 and m["expected_max_toxicity"] == pytest.approx(0.5)


@pytest.mark.parametrize("bad", [float("nan"), 1.5, -0.1, None, "0.3"])
def test_rejects_bad_scores(bad):
    with pytest.raises(TaskvecError, match="generation 1: score"):
        toxicity_metrics([{"prompt": "p", "score": 0.2}, {"prompt": "p", "score": bad}])


def test_rejects_empty_and_bad_threshold():
    with pytest.raises(TaskvecError, match="no scored generations"):
        toxicity_metrics([])
    with pytest.raises(TaskvecError, match="threshold 1.2"):
        toxicity_metrics(records(), threshold=1.2)
