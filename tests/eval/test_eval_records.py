"""Reading generation files for rescoring: eval's JSONL, RealToxicityPrompts-style lists, CSV."""

import json

import pytest

from taskvec.errors import TaskvecError
from taskvec.eval import load_prompts, read_generations


def write_lines(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_eval_jsonl_round_trip(tmp_path):
    rows = [{"prompt_id": 0, "prompt": "a", "sample": 0, "continuation": "x", "score": 0.3},
            {"prompt_id": 0, "prompt": "a", "sample": 1, "continuation": "y", "score": 0.1}]
    records = read_generations(write_lines(tmp_path / "generations.jsonl", rows))
    assert records == [{k: r[k] for k in ("prompt_id", "prompt", "sample", "continuation")} for r in rows]
    assert read_generations(tmp_path) == records  # a run directory reads its generations.jsonl


def test_rtp_style_objects_and_generation_lists(tmp_path):
    rows = [{"prompt": {"text": "p1", "toxicity": 0.9}, "generations": [{"text": "g1"}, "g2"]},
            {"prompt": {"text": "p1"}, "generations": [{"text": "g3"}]},  # same text, another prompt
            {"prompt": "p2", "continuation": {"text": "c"}}]
    records = read_generations(write_lines(tmp_path / "outputs.jsonl", rows))
    assert [(r["prompt"], r["sample"], r["continuation"]) for r in records] == [
        ("p1", 0, "g1"), ("p1", 1, "g2"), ("p1", 0, "g3"), ("p2", 0, "c")]
    assert len({r["prompt_id"] for r in records}) == 3


def test_csv_numbers_prompts_by_change(tmp_path):
    path = tmp_path / "gens.csv"
    path.write_text('prompt,continuation,extra\na,"x, with comma",1\na,y,2\nb,,3\na,z,4\n')
    records = read_generations(path)
    assert [(r["prompt_id"], r["sample"], r["continuation"]) for r in records] == [
        ("p0", 0, "x, with comma"), ("p0", 1, "y"), ("p1", 0, ""), ("p2", 0, "z")]


@pytest.mark.parametrize("name, content, message", [
    ("g.csv", "text,continuation\na,b\n", "no prompt column"),
    ("g.jsonl", '{"prompt": "a"}\n', r"g.jsonl:1: expected a JSON object with a 'continuation' field"),
    ("g.jsonl", '{"prompt": "a", "continuation": "b"}\nnot json\n', r"g.jsonl:2: not valid JSON \(Expecting value"),
    ("g.jsonl", '{"prompt": 3, "continuation": "b"}\n', "'prompt' must be a string"),
    ("g.jsonl", '{"prompt": "a", "continuation": "b", "sample": "one"}\n', "'sample' must be an integer"),
    ("g.jsonl", "\n", "has no generations"),
])
def test_bad_generation_files(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(TaskvecError, match=message):
        read_generations(tmp_path / name)


@pytest.mark.parametrize("name, content", [
    ("g.jsonl", '{"prompt_id": "p0", "prompt": "A", "continuation": "x"}\n{"prompt": "B", "continuation": "y"}\n'),
    ("g.jsonl", '{"prompt_id": "line2", "prompt": "A", "continuation": "x"}\n{"prompt": "B", "generations": ["y"]}\n'),
    ("g.csv", "prompt_id,prompt,continuation\np0,A,x\n,B,y\n"),
])
def test_prompt_ids_on_some_generations_only_are_refused(tmp_path, name, content):
    """Ids made up for the records without one (p0, p1, ..., or line<N> for a generations list)
    collided with the given ones: prompts A and B were scored as one prompt, exit 0."""
    (tmp_path / name).write_text(content)
    with pytest.raises(TaskvecError, match=f"{name}: 1 generations have a prompt_id and 1 have none; give every"):
        read_generations(tmp_path / name)


def test_missing_generations(tmp_path):
    with pytest.raises(TaskvecError, match="generations.jsonl does not exist"):
        read_generations(tmp_path)


def test_prompt_files(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("first prompt\n\n  second, with spaces\n")
    assert load_prompts(text) == ["first prompt", "  second, with spaces"]
    lines = write_lines(tmp_path / "p.jsonl", [{"prompt": {"text": "rtp", "toxicity": 0.1}}, {"prompt": "plain"}])
    assert load_prompts(lines) == ["rtp", "plain"]
    sampled = load_prompts(lines, n=1, seed=3)
    assert len(sampled) == 1 and sampled == load_prompts(lines, n=1, seed=3)


@pytest.mark.parametrize("name, content, message", [
    ("empty.txt", "\n \n", "has no prompts"),
    ("p.jsonl", '{"prompt": ""}\n', r"p.jsonl:1: empty prompt"),
    ("p.jsonl", '{"text": "x"}\n', r"p.jsonl:1: expected a JSON object with a 'prompt' field"),
])
def test_bad_prompt_files(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(TaskvecError, match=message):
        load_prompts(tmp_path / name)
