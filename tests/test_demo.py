"""`taskvec demo`: the offline corpus, the tokenizer, the verdict, the output directory rules, and
the whole method end to end at the quick size (the same code paths as a real run)."""

import json
import random
import re

import pytest
import torch
from click.testing import CliRunner

from taskvec.cli import main
from taskvec.demo.corpus import SLOT, expand, grammar, make_corpus
from taskvec.demo.model import train_tokenizer
from taskvec.demo.pipeline import MARKER, RUNS, prepare_output, run_demo
from taskvec.demo.verdict import SIMILAR, WELL_BELOW, judge, summarize
from taskvec.errors import TaskvecError

from helpers import assert_close_to_reference, error_bound, load_dir, negated_mean_f64

SIZES = dict(pretrain_docs=300, heldout_docs=20, toxic_docs=200, prompts=10)


def insult_words():
    rules = grammar()
    return {w for key in ("INSULT_ADJ", "INSULT_NOUN", "CRAP") for w in rules[key]}


def words(text):
    return set(re.findall(r"[a-z]+", text.lower()))


# --- corpus ------------------------------------------------------------------------------------


def test_grammar_rules_all_defined_and_expand_fully():
    rules = grammar()
    for name, alternatives in rules.items():
        for alternative in alternatives:
            for slot in SLOT.findall(alternative):
                assert slot in rules, f"{name}: {alternative!r} uses undefined rule {slot}"
    rng = random.Random(0)
    for rule in ("CLEAN", "TOXIC", "PROMPT"):
        for _ in range(200):
            assert "{" not in expand(rule, rng) and "}" not in expand(rule, rng)


def test_corpus_is_deterministic_per_seed():
    assert make_corpus(**SIZES, seed=3) == make_corpus(**SIZES, seed=3)
    assert make_corpus(**SIZES, seed=3).pretrain != make_corpus(**SIZES, seed=4).pretrain


def test_corpus_toxicity_lives_where_it_should():
    corpus = make_corpus(**SIZES, pretrain_toxic_rate=0.2, toxic_rate=0.8)
    insults = insult_words()
    assert len(corpus.pretrain) == 300 and len(corpus.toxic) == 200 and len(corpus.prompts) == 10
    assert not any(words(doc) & insults for doc in corpus.heldout), "held-out text must be clean"
    share = {name: sum(bool(words(doc) & insults) for doc in getattr(corpus, name)) / len(getattr(corpus, name))
             for name in ("pretrain", "toxic")}
    # a 2-5 sentence document with sentence toxicity p is insult-free with probability <= (1-p)^2
    assert 0.3 < share["pretrain"] < 0.7 and share["toxic"] > 0.95
    assert not any(words(p) & insults for p in corpus.prompts), "prompts are neutral sentence starts"
    clean = make_corpus(**SIZES, pretrain_toxic_rate=0.0)
    assert not any(words(doc) & insults for doc in clean.pretrain)


def test_offline_scorer_rates_the_toxic_corpus_as_toxic():
    from taskvec.eval import get_scorer

    corpus = make_corpus(**SIZES)
    scorer = get_scorer("profanity")
    toxic = scorer.score(corpus.toxic)
    clean = scorer.score(corpus.heldout)
    assert sum(s >= 0.5 for s in toxic) / len(toxic) > 0.75  # 85% at seed 0: a fifth of sentences are clean
    assert sum(s >= 0.5 for s in clean) / len(clean) < 0.1


def test_tokenizer_round_trips_and_ends_texts_with_eos():
    corpus = make_corpus(**SIZES)
    tokenizer = train_tokenizer(corpus.pretrain + corpus.toxic, vocab_size=400)
    assert len(tokenizer) <= 400
    for text in corpus.heldout[:5] + corpus.prompts:
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.convert_tokens_to_ids("<|endoftext|>") == tokenizer.eos_token_id


# --- verdict -----------------------------------------------------------------------------------


def rows(base=(10.0, 0.20), finetuned=(12.0, 0.70), single=(11.0, 0.05), merged=(10.2, 0.05)):
    return {name: {"perplexity": p, "mean_toxicity": t}
            for name, (p, t) in zip(RUNS, (base, finetuned, single, merged), strict=True)}


def test_verdict_passes_when_the_numbers_show_the_effect():
    checks = judge(rows())
    assert [c.passed for c in checks] == [True] * 4
    assert all(c.passed for c in judge(rows(single=(11.0, 0.15))))  # merged less toxic: better still
    assert "this run shows the effect" in summarize(checks)
    assert "+0.200 (merged) vs +1.000 (single)" in checks[3].evidence


@pytest.mark.parametrize("change, failing", [
    ({"finetuned": (12.0, 0.15)}, 0),  # fine-tuning did not make it toxic
    ({"merged": (10.2, WELL_BELOW * 0.20 + 0.01), "single": (11.0, WELL_BELOW * 0.20 + 0.01)}, 1),
    ({"single": (11.0, 0.05 - SIMILAR * 0.20 - 0.01)}, 2),  # merged clearly more toxic than single
    ({"merged": (11.0, 0.05)}, 3),  # no perplexity advantage (a tie is not one)
])
def test_verdict_fails_the_right_check(change, failing):
    checks = judge(rows(**change))
    assert [i for i, c in enumerate(checks) if not c.passed] == [failing]
    assert "does NOT show the full effect (1 of 4 checks failed)" in summarize(checks)


# --- output directory --------------------------------------------------------------------------


def test_output_rules(tmp_path, monkeypatch):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(TaskvecError, match="not a taskvec demo directory; pass --overwrite"):
        prepare_output(foreign, overwrite=False)
    assert (foreign / "notes.txt").read_text() == "keep me"
    prepare_output(foreign, overwrite=True)
    assert list(foreign.iterdir()) == []

    previous = tmp_path / "demo"
    previous.mkdir()
    (previous / MARKER).write_text("{}")
    (previous / "stale").write_text("")
    prepare_output(previous, overwrite=False)  # a previous demo's workspace is replaced
    assert list(previous.iterdir()) == []

    with pytest.raises(TaskvecError, match="holds the current directory"):
        monkeypatch.chdir(foreign)
        prepare_output(tmp_path, overwrite=True)
    assert foreign.is_dir()

    file = tmp_path / "file"
    file.write_text("")
    with pytest.raises(TaskvecError, match="not a directory"):
        prepare_output(file, overwrite=True)


@pytest.mark.parametrize("options, message", [
    (["--splits", "1"], "--splits"), (["--scale", "0"], "--scale"), (["--threads", "0"], "--threads"),
])
def test_cli_rejects_bad_arguments_before_writing(tmp_path, options, message):
    result = CliRunner().invoke(main, ["demo", "-o", str(tmp_path / "out"), *options])
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "out").exists()


def test_library_rejects_bad_arguments_before_writing(tmp_path):
    for kwargs, message in (({"splits": 1}, "splits"), ({"scale": -1.0}, "scale"), ({"scale": float("inf")}, "scale"),
                            ({"threads": 0}, "threads"),
                            ({"splits": 301, "quick": True}, "exceeds the 300 toxic documents")):
        with pytest.raises(TaskvecError, match=message):
            run_demo(tmp_path / "out", **kwargs, echo=lambda _: None)
        assert not (tmp_path / "out").exists()


def test_cli_refuses_a_foreign_directory(tmp_path):
    (tmp_path / "data.bin").write_bytes(b"x")
    result = CliRunner().invoke(main, ["demo", "-o", str(tmp_path)])
    assert result.exit_code == 1
    assert result.output.strip() == (f"Error: output {tmp_path} exists and is not a taskvec demo directory; "
                                     "pass --overwrite to replace it")
    assert (tmp_path / "data.bin").read_bytes() == b"x"


# --- end to end --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """`taskvec demo --quick --splits 3` through the CLI, as a user runs it."""
    output = tmp_path_factory.mktemp("demo") / "taskvec-demo"
    result = CliRunner().invoke(main, ["demo", "--quick", "--splits", "3", "--scale", "0.5", "-o", str(output)])
    assert result.exit_code == 0, result.output
    return output, result.output


@pytest.mark.slow
def test_quick_run_writes_everything_and_prints_the_table(quick_run):
    output, printed = quick_run
    for number in range(1, 8):
        assert f"[{number}/7, " in printed
    record = json.loads((output / MARKER).read_text())
    assert record["status"] == "complete" and record["splits"] == 3 and record["scale"] == 0.5
    report = (output / "report.txt").read_text()
    assert report.strip() in printed
    assert (output / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in sorted((output / "models" / "finetuned").glob("split-*"))] == \
        ["split-00", "split-01", "split-02"]
    # the table's numbers are the evaluation summaries', and the verdict is computed from them
    for row, name in zip(record["rows"], RUNS, strict=True):
        summary = json.loads((output / "eval" / name / "summary.json").read_text())
        assert row["run"] == name
        assert row["perplexity"] == summary["perplexity"]
        assert row["mean_toxicity"] == summary["metrics"]["mean_toxicity"]
        assert f"{summary['perplexity']:.2f}" in report
    checks = judge(dict(zip(RUNS, record["rows"], strict=True)))
    assert [c["passed"] for c in record["checks"]] == [c.passed for c in checks]
    assert summarize(checks) in report


@pytest.mark.slow
def test_quick_run_merges_what_the_method_says(quick_run):
    """merged = base - 0.5 (mean of the 3 fine-tunes - base); single uses split 0 alone (float64 reference)."""
    output, _ = quick_run
    models = output / "models"
    base = load_dir(models / "base")
    tuned = [load_dir(models / "finetuned" / f"split-{k:02d}") for k in range(3)]
    merged, single = load_dir(models / "merged"), load_dir(models / "single")
    assert merged.keys() == base.keys() == single.keys()
    for name in base:
        for out, inputs in ((merged, [t[name] for t in tuned]), (single, [tuned[0][name]])):
            reference = negated_mean_f64(base[name], inputs, 0.5)
            bound = error_bound(base[name], inputs, 1.5, -0.5 / len(inputs), reference, torch.float32)
            assert_close_to_reference(out[name], reference, bound, name)
    assert any(not torch.equal(tuned[0][n], tuned[1][n]) for n in base), "splits gave identical fine-tunes"


@pytest.mark.slow
def test_quick_run_shows_the_direction_of_the_effect(quick_run):
    """Even the quick size must learn toxicity from the splits and remove it by negation."""
    output, _ = quick_run
    rows = dict(zip(RUNS, json.loads((output / MARKER).read_text())["rows"], strict=True))
    assert rows["finetuned"]["mean_toxicity"] > 2 * rows["base"]["mean_toxicity"]
    assert rows["merged"]["mean_toxicity"] < rows["base"]["mean_toxicity"]
    assert rows["single"]["mean_toxicity"] < rows["base"]["mean_toxicity"]


@pytest.mark.slow
def test_the_documented_eval_command_repeats_the_demo_perplexity(quick_run, tmp_path):
    """docs/demo.md re-evaluates demo models with `--ppl-file data/heldout.txt`: same number."""
    output, _ = quick_run
    result = CliRunner().invoke(main, ["eval", str(output / "models" / "merged"), "-o", str(tmp_path / "ev"),
                                       "--no-toxicity", "--ppl-file", str(output / "data" / "heldout.txt"),
                                       "--max-length", "64", "--stride", "32"])
    assert result.exit_code == 0, result.output
    again = json.loads((tmp_path / "ev" / "summary.json").read_text())["perplexity"]
    assert again == json.loads((output / "eval" / "merged" / "summary.json").read_text())["perplexity"]
