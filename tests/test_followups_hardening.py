"""Issue 12 follow-ups: --seed ranges of train-splits and demo, train-splits outputs that would
replace their inputs, eval/score outputs over a local hf: classifier or tokenizer, bad --ppl-file."""

import os
import threading

import pytest
from cli_errors import refused
from click.testing import CliRunner

from taskvec.cli import main
from taskvec.data import save_splits
from taskvec.errors import TaskvecError
from taskvec.eval.likelihood import load_ppl_texts

TEXTS = [f"comment {i}: you are a rotten troll" for i in range(8)]


def _must_not_run(*args, **kwargs):
    raise TaskvecError("ran past the option check")


@pytest.mark.parametrize("seed", [2**32, 2**64, 10**40, -1])
def test_train_splits_seed_out_of_range(tmp_path, monkeypatch, seed):
    import taskvec.train

    monkeypatch.setattr(taskvec.train, "train_splits", _must_not_run)
    refused(tmp_path, "train-splits", tmp_path / "splits", "-o", tmp_path / "runs", "--seed", seed,
            where="Invalid value for '--seed'", status=2)


@pytest.mark.parametrize("seed", [2**32, 2**64, 10**40, -1])
def test_demo_seed_out_of_range(tmp_path, monkeypatch, seed):
    import taskvec.demo.pipeline

    monkeypatch.setattr(taskvec.demo.pipeline, "run_demo", _must_not_run)
    refused(tmp_path, "demo", "-o", tmp_path / "demo", "--seed", seed, where="Invalid value for '--seed'", status=2)


def test_largest_seed_reaches_training(tmp_path, monkeypatch):
    import taskvec.train

    seen = []
    monkeypatch.setattr(taskvec.train, "train_splits", lambda *args, **kwargs: seen.append(args[3]) or [])
    result = CliRunner().invoke(main, ["train-splits", str(tmp_path / "splits"), "-o", str(tmp_path / "runs"),
                                       "--seed", str(2**32 - 1)])
    assert result.exit_code == 0, result.output
    assert seen[0].seed == 2**32 - 1


@pytest.fixture
def base(tmp_path):
    """A local base model directory (never loaded: the refusals come first)."""
    path = tmp_path / "base"
    path.mkdir()
    (path / "config.json").write_text('{"model_type": "gpt2"}')
    return path


FAST = ["--max-steps", 1, "--batch-size", 4, "--max-length", 16]


def test_train_splits_never_replaces_its_splits(tmp_path, base):
    """`train-splits runs/split-00 -o runs` would train split 0 into runs/split-00: its own input."""
    splits = tmp_path / "runs" / "split-00"
    save_splits(TEXTS, 2, splits, seed=0)
    refused(tmp_path, "train-splits", splits, "--base", base, "-o", tmp_path / "runs", "--overwrite", *FAST,
            where=f"input {splits} is inside output {splits}")


def test_train_splits_checks_every_split_before_training_any(tmp_path, base):
    splits = tmp_path / "runs" / "split-01"
    save_splits(TEXTS, 2, splits, seed=0)
    refused(tmp_path, "train-splits", splits, "--base", base, "-o", tmp_path / "runs", "--overwrite", *FAST,
            where=f"input {splits} is inside output {splits}")  # split-00 would have trained first


def test_train_splits_output_inside_the_splits(tmp_path, base):
    splits = tmp_path / "splits"
    save_splits(TEXTS, 2, splits, seed=0)
    refused(tmp_path, "train-splits", splits, "--base", base, "-o", splits / "runs", *FAST,
            where=f"output {splits / 'runs' / 'split-00'} is inside input {splits}")


def test_train_splits_never_replaces_its_base(tmp_path, base):
    """A base inside the last split's output is refused before the first split trains."""
    splits = tmp_path / "splits"
    save_splits(TEXTS, 2, splits, seed=0)
    runs = tmp_path / "runs"
    (runs / "split-01").mkdir(parents=True)
    os.rename(base, runs / "split-01" / "base")
    refused(tmp_path, "train-splits", splits, "--base", runs / "split-01" / "base", "-o", runs, "--overwrite",
            *FAST, where=f"input {runs / 'split-01' / 'base'} is inside output {runs / 'split-01'}")


def test_train_splits_never_replaces_its_deepspeed_config(tmp_path, base):
    splits = tmp_path / "splits"
    save_splits(TEXTS, 2, splits, seed=0)
    config = tmp_path / "runs" / "split-00" / "zero3.json"
    config.parent.mkdir(parents=True)
    config.write_text("{}")
    refused(tmp_path, "train-splits", splits, "--base", base, "-o", tmp_path / "runs", "--deepspeed", config,
            "--overwrite", *FAST, where=f"input {config} is inside output {config.parent}")


@pytest.fixture
def classifier(tmp_path):
    path = tmp_path / "classifier"
    path.mkdir()
    (path / "config.json").write_text('{"model_type": "bert"}')
    return path


@pytest.mark.parametrize("output, message", [("classifier", "input {given} is inside output {output}"),
                                             ("classifier/run", "output {output} is inside input {given}")])
@pytest.mark.parametrize("how", ["scorer", "tokenizer"])
def test_eval_never_writes_over_a_local_classifier(tmp_path, classifier, output, message, how):
    output = tmp_path / output
    scorer = ["--scorer", f"hf:{classifier}"] if how == "scorer" else ["--scorer", "hf:org/hub-model",
                                                                      "--hf-tokenizer", classifier]
    refused(tmp_path, "eval", tmp_path / "no-model", "-o", output, *scorer, "--overwrite",
            where=message.format(given=classifier, output=output))


def test_score_never_writes_over_a_local_classifier(tmp_path, classifier):
    generations = tmp_path / "generations.jsonl"
    generations.write_text('{"prompt": "a", "continuation": "b"}\n')
    refused(tmp_path, "score", generations, "-o", classifier, "--scorer", f"hf:{classifier}", "--overwrite",
            where=f"input {classifier} is inside output {classifier}")


def test_a_hub_id_is_not_a_local_input(tmp_path, monkeypatch):
    """hf:org/model names no local path: an output called org is not refused for it."""
    from cli.evaluate import _scorer_files

    monkeypatch.chdir(tmp_path)
    assert _scorer_files("hf:org/model", {"detoxify_checkpoint": None, "detoxify_config": None,
                                          "perspective_config": None, "hf_tokenizer": "bert-base-uncased"}) == []


def _eval_ppl(tmp_path, ppl, where):
    return refused(tmp_path, "eval", tmp_path / "no-model", "-o", tmp_path / "out", "--ppl-file", ppl,
                   "--no-toxicity", where=where)


def test_ppl_file_not_utf8(tmp_path):
    ppl = tmp_path / "ppl.txt"
    ppl.write_bytes(b"fine\nalso fine\ncaf\xe9\n")
    assert "not valid UTF-8" in _eval_ppl(tmp_path, ppl, where=f"{ppl}:3: ")


def test_ppl_file_fifo(tmp_path):
    """Refused before it is opened: opening a FIFO blocks until a writer comes."""
    ppl = tmp_path / "ppl.txt"
    os.mkfifo(ppl)
    # A writer, so that a read (the bug) would find an empty pipe rather than hang the suite.
    writer = threading.Thread(target=lambda: open(ppl, "wb").close(), daemon=True)
    writer.start()
    try:
        _eval_ppl(tmp_path, ppl, where=f"{ppl}: not a regular file")
    finally:
        os.close(os.open(ppl, os.O_RDONLY | os.O_NONBLOCK))  # lets the writer's open return
        writer.join(5)


def test_ppl_file_directory(tmp_path):
    with pytest.raises(TaskvecError, match=f"^{tmp_path}: not a regular file$"):
        load_ppl_texts([tmp_path])


@pytest.mark.parametrize("reader", ["json", "text"])
def test_a_fifo_given_as_a_json_or_text_input_is_refused_at_once(tmp_path, reader):
    """Before, read_bytes() of a FIFO blocked forever (eval --prompts FIFO hung)."""
    from taskvec.jsonfile import read_json
    from taskvec.rows import read_text

    fifo = tmp_path / "prompts.jsonl"
    os.mkfifo(fifo)
    outcome = []

    def read():
        try:
            (read_json if reader == "json" else read_text)(fifo)
        except TaskvecError as err:
            outcome.append(str(err))

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    thread.join(20)
    if thread.is_alive():  # unblock the reader so the suite does not hang, then fail
        with open(fifo, "wb"):
            pass
        pytest.fail("reading a FIFO blocked")
    assert outcome == [f"{fifo}: not a regular file"]
