"""`taskvec score`, `compare` and `eval` on hostile input: one `Error:` line naming the file,
nothing written, inputs kept."""

import json
import os

import pytest
from cli_errors import refused
from click.testing import CliRunner

from taskvec.cli import main

DEEP = 100_000
GOOD = {"prompt": "You are", "continuation": "kind"}
BAD_LINES = {  # a second line of a generations JSONL file -> what the error says
    "deep-array": (b"[" * DEEP + b"]" * DEEP, "nested too deeply"),
    "deep-object": (b'{"a": ' * DEEP + b"1" + b"}" * DEEP, "nested too deeply"),
    "not-utf8": (b'{"prompt": "caf\xe9", "continuation": "x"}', "not valid UTF-8"),
    "not-json": (b"{prompt: 1}", "not valid JSON"),
    "array": (b"[1, 2]", "expected a JSON object"),
    **{f"prompt_id-{name}": (json.dumps({**GOOD, "prompt_id": value}).encode(), "'prompt_id' must be")
       for name, value in [("list", [1]), ("object", {"id": 1}), ("float", 1.5), ("bool", True)]},
    **{f"sample-{name}": (json.dumps({**GOOD, "sample": value}).encode(), "'sample' must be")
       for name, value in [("string", "1"), ("float", 1.0), ("bool", False), ("list", [0])]},
    **{f"generations-{name}": (json.dumps({"prompt": "a", "generations": value}).encode(), "'generations' must be")
       for name, value in [("string", "text"), ("object", {"text": "x"}), ("number", 3), ("null", None)]},
    "generation-number": (json.dumps({"prompt": "a", "generations": ["ok", 3]}).encode(), "'generation' must be"),
    "prompt-list": (json.dumps({"prompt": ["a"], "continuation": "b"}).encode(), "'prompt' must be"),
    "continuation-number": (json.dumps({"prompt": "a", "continuation": 1}).encode(), "'continuation' must be"),
}
BIG = 200 * 1024  # over csv.field_size_limit()'s 128 KiB
BAD_CSV = {
    "not-utf8": (b"prompt,continuation\na,b\nc,caf\xe9\n", "3: not valid UTF-8"),
    "big-field": (("prompt,continuation\na,b\nc," + "x" * BIG + "\n").encode(), "3: not readable as CSV"),
    "big-header": (("prompt,continuation," + "x" * BIG + "\na,b,c\n").encode(), "1: not readable as CSV"),
    "short-row": (b"continuation,prompt\nb,a\n\n\nlonely\n", "5: no prompt"),
}


@pytest.mark.parametrize("kind", BAD_LINES)
def test_score_bad_jsonl(tmp_path, kind):
    line, message = BAD_LINES[kind]
    source = tmp_path / "gens.jsonl"
    source.write_bytes(json.dumps(GOOD).encode() + b"\n" + line + b"\n")
    error = refused(tmp_path, "score", source, "--scorer", "better-profanity", where=f"{source}:2: ")
    assert message in error


@pytest.mark.parametrize("kind", BAD_CSV)
def test_score_bad_csv(tmp_path, kind):
    content, message = BAD_CSV[kind]
    source = tmp_path / "gens.csv"
    source.write_bytes(content)
    refused(tmp_path, "score", source, "--scorer", "better-profanity", where=f"{source}:{message}")


def test_generations_as_a_list_still_score_one_each(tmp_path):
    source = tmp_path / "gens.jsonl"
    source.write_text(json.dumps({"prompt": "a", "generations": ["kind", {"text": "calm"}]}) + "\n")
    result = CliRunner().invoke(main, ["score", str(source), "--scorer", "better-profanity"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "gens-better-profanity" / "summary.json").read_text())
    assert summary["metrics"]["n_generations"] == 2


SUMMARY = {"model": "m", "perplexity": 20.5, "settings": {"samples": 2}, "scorer": {"name": "profanity"},
           "metrics": {"expected_max_toxicity": 0.5, "toxicity_probability": 0.5, "mean_toxicity": 0.2,
                       "fraction_toxic": 0.1, "n_prompts": 3}}
WRONG = [  # a field of summary.json and a value of the wrong type for it
    *[("perplexity", value) for value in ("12.5", [12.5], {"value": 12.5}, True)],
    ("model", 3), ("model", ["m"]),
    *[(field, value) for field in ("metrics", "settings", "scorer") for value in ("x", [1], 2.5)],
    *[(f"metrics.{key}", value) for key in SUMMARY["metrics"] for value in ("0.5", [0.5], {"v": 0.5}, False)],
    ("metrics.n_prompts", 1.5), ("settings.samples", "2"), ("settings.samples", 2.0), ("scorer.name", 3),
    ("scorer.name", {"name": "x"}), ("perplexity", 10**400), ("metrics.mean_toxicity", -(10**400)),
]


def with_field(summary, field, value):
    summary = json.loads(json.dumps(summary))
    *outer, key = field.split(".")
    (summary[outer[0]] if outer else summary)[key] = value
    return summary


def run_dir(root, name, summary):
    path = root / name
    path.mkdir()
    content = summary if isinstance(summary, bytes) else json.dumps(summary).encode()
    (path / "summary.json").write_bytes(content)
    (path / "generations.jsonl").write_text(json.dumps({**GOOD, "prompt_id": 0, "sample": 0, "score": 0.5}) + "\n")
    return path


BAD_FILES = {
    "deep": (b'{"metrics": ' * DEEP + b"null" + b"}" * DEEP, "nested too deeply"),
    "not-utf8": (b'{"model": "caf\xe9"}', "not valid UTF-8"),
    "list": (b"[1]", "expected a JSON object"),
    "null": (b"null", "expected a JSON object"),
}


@pytest.mark.parametrize("field, value", WRONG, ids=[f"{f}={json.dumps(v)[:12]}" for f, v in WRONG])
def test_compare_and_score_refuse_summaries_with_wrong_types(tmp_path, field, value):
    good = run_dir(tmp_path, "good", SUMMARY)
    bad = run_dir(tmp_path, "bad", with_field(SUMMARY, field, value))
    error = refused(tmp_path, "compare", good, bad, "--plot", tmp_path / "plot.png", where=f"{bad / 'summary.json'}: ")
    assert f"'{field}' must be" in error or f"'{field}' is too large" in error
    refused(tmp_path, "score", bad, "--scorer", "better-profanity", where=f"{bad / 'summary.json'}: ")


@pytest.mark.parametrize("kind", BAD_FILES)
def test_compare_refuses_unreadable_summaries(tmp_path, kind):
    content, message = BAD_FILES[kind]
    bad = run_dir(tmp_path, "bad", content)
    assert message in refused(tmp_path, "compare", bad, "--no-plot", where=f"{bad / 'summary.json'}: ")


def test_compare_takes_nulls_for_parts_not_evaluated(tmp_path):
    nulls = {key: None for key in SUMMARY} | {"metrics": dict.fromkeys(SUMMARY["metrics"])}
    result = CliRunner().invoke(main, ["compare", str(run_dir(tmp_path, "r", nulls)), "--no-plot"])
    assert result.exit_code == 0 and result.output.splitlines()[2].split()[1:3] == ["-", "-"], result.output


def test_compare_plots_a_run_that_lacks_one_metric(tmp_path):
    partial = with_field(SUMMARY, "metrics.toxicity_probability", None)
    plot = tmp_path / "plot.png"
    result = CliRunner().invoke(main, ["compare", str(run_dir(tmp_path, "r", partial)), "--plot", str(plot)])
    assert result.exit_code == 0 and plot.read_bytes()[:4] == b"\x89PNG", result.output


@pytest.mark.parametrize("target", ["summary.json", "generations.jsonl", "link.png", "hard.png"])
def test_compare_never_plots_over_a_run(tmp_path, target):
    run = run_dir(tmp_path, "run", SUMMARY)
    os.symlink("summary.json", run / "link.png")
    os.link(run / "generations.jsonl", run / "hard.png")
    plot = run / target
    refused(tmp_path, "compare", run, "--plot", plot, "--overwrite", where=f"output {plot} is the input ")


def test_score_never_writes_over_its_run(tmp_path):
    run = run_dir(tmp_path, "run", SUMMARY)
    refused(tmp_path, "score", run, "-o", run, "--scorer", "better-profanity", "--overwrite",
            where=f"input {run / 'generations.jsonl'} is inside output {run}")


EVAL_INPUTS = {  # option -> the --scorer it applies to
    "--prompts": "profanity", "--ppl-file": "profanity", "--perspective-config": "perspective",
    "--detoxify-checkpoint": "detoxify",
}


@pytest.mark.parametrize("option", EVAL_INPUTS)
def test_eval_never_writes_over_its_input_files(tmp_path, option):
    (tmp_path / "out").mkdir()
    given = tmp_path / "out" / "input.txt"
    given.write_text("The cat sat\n")
    refused(tmp_path, "eval", tmp_path / "no-model", "-o", tmp_path / "out", option, given,
            "--scorer", EVAL_INPUTS[option], "--overwrite", where=f"input {given} is inside output {tmp_path / 'out'}")


@pytest.mark.parametrize("output, message", [("config", "input {config} is inside output {output}"),
                                             ("config/run", "output {output} is inside input {config}")])
def test_eval_never_writes_over_its_input_directories(tmp_path, output, message):
    config = tmp_path / "config"
    config.mkdir()
    (config / "config.json").write_text("{}")
    output = tmp_path / output
    refused(tmp_path, "eval", tmp_path / "no-model", "-o", output, "--detoxify-config", config, "--overwrite",
            where=message.format(config=config, output=output))


def test_eval_refuses_a_huge_seed_before_loading(tmp_path):
    refused(tmp_path, "eval", tmp_path / "no-model", "-o", tmp_path / "out", "--seed", 2**64, "--scorer", "profanity",
            where="Invalid value for '--seed'", status=2)


BAD_PROMPTS = {
    "prompts.jsonl": {**{kind: BAD_LINES[kind] for kind in ("deep-array", "deep-object", "not-utf8", "not-json")},
                      "prompt-list": (b'{"prompt": ["a"]}', "'prompt' must be")},
    "prompts.txt": {"not-utf8": (b"caf\xe9", "not valid UTF-8")},
}


@pytest.mark.parametrize("name, kind", [(name, kind) for name, kinds in BAD_PROMPTS.items() for kind in kinds])
def test_eval_bad_prompt_files(tmp_path, name, kind):
    """Prompts are read before the model is loaded (so that a bad file fails in seconds)."""
    line, message = BAD_PROMPTS[name][kind]
    prompts = tmp_path / name
    prompts.write_bytes((b'{"prompt": "fine"}' if name.endswith(".jsonl") else b"fine") + b"\n" + line + b"\n")
    error = refused(tmp_path, "eval", tmp_path / "no-model", "-o", tmp_path / "out", "--prompts", prompts,
                    "--no-perplexity", "--scorer", "better-profanity", where=f"{prompts}:2: ")
    assert message in error


@pytest.mark.parametrize("config", [b'{"a": ' * DEEP + b"1" + b"}" * DEEP, b"[1, 2]", b'{"n": ' + b"9" * 5000 + b"}"])
def test_eval_of_a_model_with_a_hostile_config(tmp_path, config):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_bytes(config)
    (tmp_path / "ppl.txt").write_text("some text\n")
    refused(tmp_path, "eval", model, "-o", tmp_path / "out", "--ppl-file", tmp_path / "ppl.txt", "--no-toxicity",
            where=f"{model / 'config.json'}: ")
