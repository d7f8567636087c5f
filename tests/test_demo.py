"""`taskvec demo`: the offline corpus, the tokenizer, the verdict, the output directory rules, and
the whole method end to end at the quick size (the same code paths as a real run)."""

import json
import random
import re
import time

import pytest
import torch
from click.testing import CliRunner

from taskvec.cli import main
from taskvec.demo.corpus import SLOT, expand, grammar, make_corpus
from taskvec.demo.model import ModelSize, train_tokenizer, write_untrained_model
from taskvec.demo.pipeline import MARKER, prepare_output, run_demo
from taskvec.demo.vectors import compare_vectors
from taskvec.demo.verdict import WELL_BELOW, judge, summarize
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


def test_the_model_computes_gpt2s_gelu_with_the_fused_operation(tmp_path):
    from transformers import GPT2LMHeadModel
    from transformers.activations import NewGELUActivation

    corpus = make_corpus(**SIZES)
    size = ModelSize(n_layer=1, n_embd=32, n_head=2, vocab_size=300, n_positions=64)
    model = GPT2LMHeadModel.from_pretrained(write_untrained_model(tmp_path / "m", corpus.pretrain, size, seed=0))
    assert model.config.activation_function == "gelu_pytorch_tanh"
    x = torch.linspace(-8, 8, 10001)
    assert torch.allclose(model.transformer.h[0].mlp.act(x), NewGELUActivation()(x), rtol=0, atol=1e-6)


# --- verdict -----------------------------------------------------------------------------------


def method(increase, ci=None, reached=True):
    return {"reached": reached, "increase": increase, "increase_ci": ci}


def level(value, merged, single, difference_ci, relative_ci, resolved, share=1.0):
    defined = merged is not None and single is not None
    return {"level": value,
            "methods": {"merged": method(merged, reached=merged is not None),
                        "single": method(single, reached=single is not None)},
            "pairs": [{"methods": ["merged", "single"], "difference": merged - single if defined else None,
                       "difference_ci": difference_ci, "resolved": resolved, "both_reached_share": share,
                       "relative_reduction": 1 - merged / single if defined and single > 0 else None,
                       "relative_reduction_ci": relative_ci}],
            "flags": []}


def matched(middle=None):
    """A matched comparison as taskvec.sweep.matched writes it: the base at 0.20, three levels."""
    middle = middle or level(0.06, 0.03, 0.12, [-0.14, -0.05], [0.5, 0.9], True)
    return {"base": {"mean_toxicity": 0.20, "perplexity": 10.0}, "bootstrap": {"confidence": 0.95},
            "levels": [level(0.03, 0.4, 0.9, [-1.5, 0.6], [-0.2, 0.95], False, share=0.7), middle,
                       level(0.12, 0.01, 0.05, [-0.06, -0.02], [0.6, 0.9], True)]}


def test_verdict_passes_when_the_matched_numbers_show_the_effect():
    checks = judge(0.7, {"merged": 0.03, "single": 0.02}, matched())
    assert [c.passed for c in checks] == [True] * 3
    text = summarize(checks, matched())
    assert "this run shows the effect" in text
    assert ("at mean toxicity 0.060, negating the merged vector raises perplexity by +0.030 against +0.120 for a "
            "single one: 75% less (95% CI of the reduction 50% to 90%)") in text
    assert ("at mean toxicity 0.030, negating the merged vector raises perplexity by +0.400 against +0.900 for a "
            "single one: 56% less (95% CI of the reduction -20% to 95%); not resolved: near the floor, 30% of "
            "resampled curves never come down to it") in text


@pytest.mark.parametrize("finetuned, lowest, middle, failing", [
    (0.15, {"merged": 0.03, "single": 0.02}, None, 0),  # fine-tuning did not make it toxic
    (0.7, {"merged": WELL_BELOW * 0.20 + 0.01, "single": 0.02}, None, 1),  # merged never well below the base
    (0.7, {"merged": 0.03, "single": 0.02}, level(0.06, 0.03, 0.12, [-0.14, 0.01], [0.5, 0.9], False), 2),  # noise
    (0.7, {"merged": 0.03, "single": 0.02}, level(0.06, 0.12, 0.03, [0.05, 0.14], [-3.0, -1.0], True), 2),  # reverse
])
def test_verdict_fails_the_right_check(finetuned, lowest, middle, failing):
    checks = judge(finetuned, lowest, matched(middle))
    assert [i for i, c in enumerate(checks) if not c.passed] == [failing]
    assert "does NOT show the full effect (1 of 3 checks failed)" in summarize(checks, matched(middle))


def test_verdict_judges_the_middle_level_where_both_raise_perplexity():
    from taskvec.demo.verdict import middle

    flat = level(0.15, -0.02, 0.01, [-0.05, -0.01], None, True)  # merged even lowers perplexity here
    result = matched()
    result["levels"] += [flat, level(0.18, -0.01, -0.01, [-0.01, 0.01], None, False)]
    assert middle(result)["level"] == 0.06  # the middle of 0.03, 0.06, 0.12; not of all five
    assert "changes perplexity by -0.020 against +0.010" in summarize(judge(0.7, {"merged": 0.03}, result), result)


def test_verdict_says_where_a_method_never_reaches_the_level():
    result = matched(level(0.06, None, 0.12, None, None, False, share=0.0))
    text = summarize(judge(0.7, {"merged": 0.03, "single": 0.02}, result), result)
    assert "at mean toxicity 0.060: not resolved: merged never comes down to it" in text


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
    (["--splits", "1"], "--splits"), (["--threads", "0"], "--threads"), (["--workers", "0"], "--workers"),
])
def test_cli_rejects_bad_arguments_before_writing(tmp_path, options, message):
    result = CliRunner().invoke(main, ["demo", "-o", str(tmp_path / "out"), *options])
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "out").exists()


def test_library_rejects_bad_arguments_before_writing(tmp_path):
    for kwargs, message in (({"splits": 1}, "splits"), ({"threads": 0}, "threads"), ({"workers": 0}, "workers"),
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


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# --- end to end --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """`taskvec demo --quick --splits 3` through the CLI, as a user runs it."""
    output = tmp_path_factory.mktemp("demo") / "taskvec-demo"
    started = time.perf_counter()
    result = CliRunner().invoke(main, ["demo", "--quick", "--splits", "3", "-o", str(output)])
    assert result.exit_code == 0, result.output
    wall = time.perf_counter() - started
    assert json.loads((output / MARKER).read_text())["seconds"] > 0.95 * wall  # imports and workers counted too
    return output, result.output


def mean_rows(record):
    return {(row["method"], row["scale"]): row for row in record["rows"] if row["seed"] == "mean"}


@pytest.mark.slow
def test_quick_run_writes_everything_and_prints_the_table(quick_run):
    output, printed = quick_run
    for number in range(1, 8):
        assert f"[{number}/7, " in printed
    record = json.loads((output / MARKER).read_text())
    assert record["status"] == "complete" and record["splits"] == 3 and record["sampling_seeds"] == [0, 1]
    report = (output / "report.txt").read_text()
    assert report.strip() in printed
    assert (output / "sweep" / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in sorted((output / "models" / "finetuned").glob("split-*"))] == \
        ["split-00", "split-01", "split-02"]
    # the table's numbers are the evaluation summaries', and the verdict is computed from them
    rows = mean_rows(record)
    assert set(rows) == {("base", 0.0)} | {(m, s) for m in ("merged", "single") for s in (0.25, 0.5, 1.0)}
    for (method, scale), row in rows.items():
        point = output / "sweep" / "points" / method / f"scale-{scale:g}"
        ppl = json.loads((point / "perplexity" / "summary.json").read_text())["perplexity"]
        tox = [json.loads((point / f"seed-{s}" / "summary.json").read_text())["metrics"]["mean_toxicity"]
               for s in (0, 1)]
        assert row["perplexity"] == ppl and row["mean_toxicity"] == pytest.approx(sum(tox) / 2, abs=1e-15)
        assert f"{ppl:.3f}" in report
    assert json.loads((output / "sweep" / "matched.json").read_text()) == record["matched"]
    lowest = {m: min(r["mean_toxicity"] for (k, _), r in rows.items() if k == m) for m in ("merged", "single")}
    checks = judge(record["finetuned_toxicity"], lowest, record["matched"])
    assert [c["passed"] for c in record["checks"]] == [c.passed for c in checks]
    assert summarize(checks, record["matched"]) in report


@pytest.mark.slow
def test_quick_run_compares_the_mean_task_vector_with_the_single_ones(quick_run):
    """The report's task-vector lines are inspect's numbers for the 3 fine-tunes and their mean."""
    output, printed = quick_run
    stats = json.loads((output / "inspect" / "stats.json").read_text())
    assert stats["vectors"] == ["split-00", "split-01", "split-02", "mean"]
    lines, numbers = compare_vectors(stats)
    assert lines in (output / "report.txt").read_text() and lines in printed
    assert json.loads((output / MARKER).read_text())["task_vectors"] == numbers
    singles = [stats["global"]["vectors"][f"split-{k:02d}"]["l2"] for k in range(3)]
    assert numbers["l2_ratio"] == pytest.approx(stats["global"]["vectors"]["mean"]["l2"] / (sum(singles) / 3))
    assert numbers["l2_ratio"] < 1  # the mean of three different vectors is shorter than they are


def _stats(mean_shares, single_shares):
    """inspect's statistics for two fine-tunes and their mean, with the given relative shares."""
    def vector(l2, share):
        return {"l2": l2, "below_abs": {"0.001": share + 0.05}, "below_rms": {"0.1": share}}
    return {"settings": {"thresholds": [1e-5, 1e-3], "rms_fractions": [0.1]}, "finetuned": ["a", "b"],
            "global": {"vectors": {"a": vector(2.0, single_shares[0]), "b": vector(4.0, single_shares[1]),
                                   "mean": vector(2.4, mean_shares)},
                       "cross": {"mean_pairwise_cosine": 0.6, "all_agree": 0.4, "all_agree_by_chance": 0.5}}}


@pytest.mark.parametrize(("mean", "words"), [(0.0880, "no sparser in shape"), (0.20, "sparser in shape than"),
                                             (0.01, "denser in shape than")])
def test_task_vector_lines_say_what_the_numbers_show(mean, words):
    lines, numbers = compare_vectors(_stats(mean, [0.0873, 0.0890]))
    assert words in lines
    assert numbers["l2_ratio"] == pytest.approx(0.8)
    assert "0.80x a single vector's" in lines and "8.7%-8.9% of a single vector's" in lines
    assert "mean pairwise cosine 0.60; all 2 agree in sign on 40.0% of entries (50.0% by chance)" in lines


@pytest.mark.slow
def test_quick_run_merges_what_the_method_says(quick_run):
    """merged = base - 0.5 (mean of the 3 fine-tunes - base); single uses split 0 alone (float64 reference)."""
    output, _ = quick_run
    models = output / "models"
    base = load_dir(models / "base")
    tuned = [load_dir(models / "finetuned" / f"split-{k:02d}") for k in range(3)]
    merged = load_dir(output / "sweep" / "models" / "merged" / "scale-0.5")
    single = load_dir(output / "sweep" / "models" / "single" / "scale-0.5")
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
    record = json.loads((output / MARKER).read_text())
    rows = mean_rows(record)
    base = rows[("base", 0.0)]["mean_toxicity"]
    assert record["finetuned_toxicity"] > 2 * base
    assert rows[("merged", 1.0)]["mean_toxicity"] < base and rows[("single", 1.0)]["mean_toxicity"] < base


@pytest.mark.slow
def test_the_documented_eval_command_repeats_the_demo_perplexity(quick_run, tmp_path):
    """docs/demo.md re-evaluates demo models with `--ppl-file data/heldout.txt`: same number."""
    output, _ = quick_run
    model = output / "sweep" / "models" / "merged" / "scale-0.5"
    result = CliRunner().invoke(main, ["eval", str(model), "-o", str(tmp_path / "ev"),
                                       "--no-toxicity", "--ppl-file", str(output / "data" / "heldout.txt"),
                                       "--max-length", "64", "--stride", "32"])
    assert result.exit_code == 0, result.output
    again = json.loads((tmp_path / "ev" / "summary.json").read_text())["perplexity"]
    point = output / "sweep" / "points" / "merged" / "scale-0.5" / "perplexity" / "summary.json"
    assert again == json.loads(point.read_text())["perplexity"]


@pytest.mark.slow
def test_quick_run_works_side_by_side_with_the_numbers_of_one_process(quick_run, tmp_path, restore_threads):
    """The fine-tunes and evaluations ran in worker processes; split 1 trained here and a sweep
    point's seed sampled here give the same weights and the same generations."""
    from taskvec.demo.pipeline import _train_config
    from taskvec.demo.settings import QUICK
    from taskvec.eval import evaluate
    from taskvec.train import train_splits
    from taskvec.workers import default_workers

    output, printed = quick_run
    record = json.loads((output / MARKER).read_text())
    assert record["workers"] == default_workers()
    if record["workers"] > 1:
        assert f"Fine-tuning the base on each of the 3 toxic splits, {record['workers']} at a time" in printed
    config = _train_config(QUICK, QUICK.finetune_lr, QUICK.finetune_epochs, 0, QUICK.toxic_docs // 3)
    torch.set_num_threads(1)  # as in the demo's processes (restore_threads puts it back)
    here, = train_splits(output / "models" / "base", output / "data" / "toxic-splits", tmp_path / "ft", config,
                         split_index=1, progress=False)
    theirs, mine = load_dir(output / "models" / "finetuned" / "split-01"), load_dir(here)
    assert theirs.keys() == mine.keys() and all(torch.equal(theirs[k], mine[k]) for k in mine)

    point = output / "sweep" / "points" / "merged" / "scale-0.5" / "seed-1"
    settings = json.loads((point / "summary.json").read_text())["settings"]
    assert settings["batch_size"] == QUICK.generation_batch >= QUICK.prompts * QUICK.samples  # one batch a seed
    prompts = (output / "data" / "prompts.txt").read_text().splitlines()
    evaluate(output / "sweep" / "models" / "merged" / "scale-0.5", tmp_path / "ev", ppl_texts=None, prompts=prompts,
             scorer="profanity", device="cpu", progress=False,
             **{key: settings[key] for key in ("samples", "max_new_tokens", "top_p", "top_k", "temperature",
                                               "batch_size", "seed")})
    assert (tmp_path / "ev" / "generations.jsonl").read_text() == (point / "generations.jsonl").read_text()
