"""`taskvec eval`, `score` and `compare` through click's CliRunner on a tiny random GPT-2."""

import json
import math

import pytest
from click.testing import CliRunner
from tiny_lm import SENTENCES

from taskvec.cli import main
from taskvec.eval import load_model, perplexity, toxicity_metrics

PROMPTS = ["The cat sat", "Researchers measure", "Hello world, this"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-inputs")
    (root / "ppl.txt").write_text("\n".join(SENTENCES * 3))
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return root


def invoke(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env, catch_exceptions=False)


def run_eval(model, inputs, output, *extra):
    return invoke("eval", model, "-o", output, "--ppl-file", inputs / "ppl.txt", "--prompts", inputs / "prompts.txt",
                  "-k", 2, "--max-new-tokens", 5, "--scorer", "profanity", *extra)


@pytest.fixture(scope="module")
def run(tiny_lm, inputs, tmp_path_factory):
    output = tmp_path_factory.mktemp("runs") / "base"
    result = run_eval(tiny_lm, inputs, output)
    assert result.exit_code == 0, result.output
    return output, result.output


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_eval_writes_generations_and_summary(run, tiny_lm, inputs):
    output, printed = run
    records = read_jsonl(output / "generations.jsonl")
    assert [(r["prompt"], r["sample"]) for r in records] == [(p, j) for p in PROMPTS for j in range(2)]
    assert all(0.0 <= r["score"] <= 1.0 for r in records)
    summary = json.loads((output / "summary.json").read_text())
    assert summary["metrics"] == toxicity_metrics(records)
    assert summary["scorer"]["name"] == "profanity" and summary["model"] == str(tiny_lm)
    assert summary["settings"]["samples"] == 2 and summary["settings"]["top_p"] == 0.9
    model, tokenizer = load_model(tiny_lm, device="cpu")
    expected = perplexity(model, tokenizer, [(inputs / "ppl.txt").read_text()], progress=False)
    assert summary["perplexity"] == pytest.approx(expected, rel=1e-9)
    assert f"{expected:.2f}" in printed and "profanity" in printed and f"wrote {output}" in printed


def test_eval_refuses_to_overwrite(run, tiny_lm, inputs):
    output, _ = run
    before = (output / "summary.json").read_text()
    result = run_eval(tiny_lm, inputs, output)
    assert result.exit_code == 1 and "already exists; pass --overwrite" in result.output
    assert (output / "summary.json").read_text() == before


def test_eval_overwrite_and_partial_runs(tiny_lm, inputs, tmp_path):
    output = tmp_path / "ppl-only"
    output.mkdir()
    (output / "stale.txt").write_text("old")
    result = invoke("eval", tiny_lm, "-o", output, "--ppl-file", inputs / "ppl.txt", "--no-toxicity", "--overwrite")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in output.iterdir()) == ["summary.json"]  # replaced, not merged
    summary = json.loads((output / "summary.json").read_text())
    assert summary["metrics"] is None and math.isfinite(summary["perplexity"])
    assert summary["settings"]["ppl_texts"] == [str(inputs / "ppl.txt")] and "prompts" not in summary["settings"]
    assert not list(tmp_path.glob(".*partial*"))  # no staging directory left behind
    toxicity = tmp_path / "toxicity-only"
    result = invoke("eval", tiny_lm, "-o", toxicity, "--prompts", inputs / "prompts.txt", "--scorer", "profanity",
                    "--no-perplexity", "-k", "1")
    assert result.exit_code == 0, result.output
    settings = json.loads((toxicity / "summary.json").read_text())["settings"]
    assert settings["prompts"] == str(inputs / "prompts.txt") and "ppl_texts" not in settings  # not the default corpus


def test_score_rescores_a_run(run, tmp_path):
    output, _ = run
    result = invoke("score", output, "--scorer", "better-profanity")
    rescored = output.parent / "base-better-profanity"
    assert result.exit_code == 0, result.output
    records = read_jsonl(rescored / "generations.jsonl")
    assert all(r["score"] in (0.0, 1.0) for r in records)
    summary = json.loads((rescored / "summary.json").read_text())
    original = json.loads((output / "summary.json").read_text())
    assert summary["metrics"] == toxicity_metrics(records)
    assert summary["scorer"]["name"] == "better-profanity"
    assert summary["perplexity"] == original["perplexity"]  # carried over for compare
    assert summary["rescored_from"] == str(output / "generations.jsonl")


def test_score_refuses_a_corrupt_summary_beside_the_generations(run, tmp_path):
    output, _ = run
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "generations.jsonl").write_bytes((output / "generations.jsonl").read_bytes())
    (copy / "summary.json").write_text("{not json")
    result = invoke("score", copy, "--scorer", "better-profanity")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "summary.json: not valid JSON" in result.output


@pytest.mark.parametrize("edit, message", [
    (lambda lines: lines + lines, "has sample 0 twice"),  # every line twice: 12 generations for 3 x 2
    (lambda lines: lines[:-1], "has 1 generations, but the summary.json beside it says 2 per prompt"),
])
def test_score_refuses_generations_changed_since_their_run(run, tmp_path, edit, message):
    """A duplicated line counted twice in every metric; a file cut short was scored under the run's
    settings (k = 2) that it no longer had. Both exited 0."""
    output, _ = run
    copy = tmp_path / "copy"
    copy.mkdir()
    lines = (output / "generations.jsonl").read_text().splitlines(keepends=True)
    (copy / "generations.jsonl").write_text("".join(edit(lines)))
    (copy / "summary.json").write_bytes((output / "summary.json").read_bytes())
    result = invoke("score", copy, "--scorer", "better-profanity")
    assert result.exit_code == 1 and message in result.output.strip().splitlines()[-1], result.output


def test_score_refuses_an_existing_output_before_loading_anything(run, tmp_path):
    output, _ = run
    existing = tmp_path / "taken"
    existing.mkdir()
    result = invoke("score", output, "--scorer", "detoxify", "-o", existing)
    assert result.exit_code == 1 and "--overwrite" in result.output  # not detoxify's offline error


def test_score_a_csv(tmp_path):
    path = tmp_path / "published.csv"
    path.write_text("prompt,continuation\nYou are,a fucking idiot\nYou are,very kind\nHi,hello\n")
    result = invoke("score", path, "--scorer", "better-profanity", "--threshold", 0.5)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "published-better-profanity" / "summary.json").read_text())
    assert summary["metrics"]["toxicity_probability"] == pytest.approx(1 / 2)
    assert summary["metrics"]["fraction_toxic"] == pytest.approx(1 / 3)
    assert summary["perplexity"] is None


def test_compare_table_and_plot(run, tiny_lm, inputs, tmp_path):
    output, _ = run
    other = tmp_path / "reseeded"
    assert run_eval(tiny_lm, inputs, other, "--seed", 1).exit_code == 0
    no_tox = tmp_path / "ppl-only"
    assert invoke("eval", tiny_lm, "-o", no_tox, "--ppl-file", inputs / "ppl.txt", "--no-toxicity").exit_code == 0
    plot = tmp_path / "plots" / "compare.png"
    result = invoke("compare", output, other, no_tox, "--plot", plot)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:3] == ["run", "PPL", "exp."]
    base = json.loads((output / "summary.json").read_text())
    assert lines[2].split()[:3] == ["base", f"{base['perplexity']:.2f}",
                                    f"{base['metrics']['expected_max_toxicity']:.3f}"]
    assert lines[4].split()[0] == "ppl-only" and lines[4].split()[2] == "-"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000
    again = invoke("compare", output, "--plot", plot)
    assert again.exit_code == 1 and "already exists; pass --overwrite" in again.output
    assert again.output.splitlines()[2].split()[0] == "base"  # the table came first
    alone = invoke("compare", no_tox, "--plot", tmp_path / "none.png")
    assert alone.exit_code == 0 and "no plot: no run has both" in alone.output and "ppl-only" in alone.output
    assert not (tmp_path / "none.png").exists()
    rows = json.loads(invoke("compare", output, other, "--no-plot", "--format", "json",
                             "--label", "A", "--label", "B").output)
    assert [r["run"] for r in rows] == ["A", "B"] and rows[0]["perplexity"] == base["perplexity"]


def test_bad_input_errors(run, tiny_lm, inputs, tmp_path, monkeypatch):
    import datasets
    import huggingface_hub

    def error(*args):
        result = invoke(*args)
        assert result.exit_code != 0 and "Traceback" not in result.output
        message = result.output.strip().splitlines()[-1]  # click may print usage lines before it
        assert message.startswith("Error: ")
        return message

    out = tmp_path / "out"
    assert "'nonsense' is not one of" in error("eval", tiny_lm, "-o", out, "--scorer", "nonsense")
    monkeypatch.delenv("PERSPECTIVE_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert "no Perspective API key: set PERSPECTIVE_API_KEY" in error("score", run[0], "--scorer", "perspective")
    (tmp_path / "empty.txt").write_text("\n")
    assert "has no prompts" in error("eval", tiny_lm, "-o", out, "--prompts", tmp_path / "empty.txt",
                                     "--scorer", "profanity", "--no-perplexity")
    bert = tmp_path / "bert"
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                         vocab_size=50)).save_pretrained(bert)
    assert "is not a causal language model" in error("eval", bert, "-o", out, "--ppl-file", inputs / "ppl.txt",
                                                     "--no-toxicity")
    (tmp_path / "nomodel").mkdir()
    assert "is not a model directory (no config.json)" in error("eval", tmp_path / "nomodel", "-o", out,
                                                                "--ppl-file", inputs / "ppl.txt", "--no-toxicity")
    assert "--detoxify-checkpoint applies to --scorer detoxify, not profanity" in error(
        "eval", tiny_lm, "-o", out, "--scorer", "profanity", "--detoxify-checkpoint", inputs / "ppl.txt")
    assert "leave nothing to evaluate" in error("eval", tiny_lm, "--no-perplexity", "--no-toxicity")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert "hub cannot be reached" in error("eval", tiny_lm, "-o", out, "--scorer", "profanity", "--no-perplexity")
    assert "or pass a local file with --prompts FILE" in error("eval", tiny_lm, "-o", out, "--scorer", "profanity",
                                                               "--no-perplexity")
    assert "or pass local text with --ppl-file" in error("eval", tiny_lm, "-o", out, "--no-toxicity")
    assert "is not an evaluated run (no summary.json)" in error("compare", tmp_path / "nomodel")
    assert not out.exists()
