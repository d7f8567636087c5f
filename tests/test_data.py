"""taskvec.data and `taskvec data`: loading toxic rows, seeded disjoint splits, their manifest."""

import csv
import json
import re
from collections import Counter

import datasets
import huggingface_hub.constants
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from taskvec.cli import main
from taskvec.data import (
    load_texts,
    read_jsonl,
    read_manifest,
    read_split,
    save_splits,
    split_order,
    split_texts,
    texts_hash,
    write_jsonl,
)
from taskvec.errors import TaskvecError

ROWS = [  # text, score: 0.8 itself is not "> 0.8"; None and blank texts are dropped
    ("you are awful", 0.95),
    ("have a nice day", 0.1),
    ("exactly at the line", 0.8),
    ("   ", 0.99),
    ("what a stupid idea, \"idiot\"\nsecond line", 0.81),
    ("no score here", None),
    ("ünïcödé insult", 0.9),
]
TOXIC = ["you are awful", "what a stupid idea, \"idiot\"\nsecond line", "ünïcödé insult"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def sources(tmp_path):
    """The same rows as JSONL, CSV and Parquet, with columns named comment/tox."""
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(json.dumps({"comment": t, "tox": s, "id": i}) + "\n"
                             for i, (t, s) in enumerate(ROWS)) + "\n", encoding="utf-8")
    csv_path = tmp_path / "rows.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["comment", "tox"])
        writer.writerows((t, "" if s is None else s) for t, s in ROWS)
    parquet = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"comment": [t for t, _ in ROWS], "tox": [s for _, s in ROWS]}), parquet)
    return {"jsonl": jsonl, "csv": csv_path, "parquet": parquet}


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet"])
def test_local_files_keep_rows_strictly_above_threshold(sources, kind):
    path = sources[kind]  # the unscored row: JSON null, empty CSV cell, parquet null alike
    assert load_texts(str(path), text_column="comment", score_column="tox") == TOXIC
    assert load_texts(str(path), text_column="comment", score_column="tox", threshold=0.5) == [
        "you are awful", "exactly at the line", TOXIC[1], TOXIC[2]]
    assert load_texts(str(path), text_column="comment", score_column="tox", max_rows=2) == TOXIC[:2]
    everything = load_texts(str(path), text_column="comment")
    assert everything == [t for t, _ in ROWS if t.strip()]


def test_float32_scores_at_the_threshold_do_not_pass_it(tmp_path):
    """Hub datasets store scores as float32 (civil_comments' toxicity): its 0.8 reads as
    0.800000011920929, which passed `> 0.8`, so every comment scored exactly 0.8 was kept. A
    score that is a float32 value is compared in float32; others (0.8 + one float64 step) as
    they are. Booleans are no scores (True read as 1.0 passed)."""
    single = float(np.float32(0.8))
    assert single > 0.8
    rows = [("at the line, float32", single), ("above, float32", float(np.float32(0.9))),
            ("just above, float64", float(np.nextafter(0.8, 1))), ("below", float(np.float32(0.7)))]
    pq.write_table(pa.table({"text": [t for t, _ in rows], "tox": pa.array([s for _, s in rows], pa.float32())}),
                   tmp_path / "f32.parquet")
    (tmp_path / "f64.jsonl").write_text("".join(json.dumps({"text": t, "tox": v}) + "\n" for t, v in rows))
    assert load_texts(str(tmp_path / "f32.parquet"), score_column="tox", threshold=0.8) == ["above, float32"]
    assert load_texts(str(tmp_path / "f64.jsonl"), score_column="tox", threshold=0.8) == [
        "above, float32", "just above, float64"]
    with pytest.raises(TaskvecError, match="threshold nan is not a finite number"):
        load_texts(str(tmp_path / "f64.jsonl"), score_column="tox", threshold=float("nan"))
    (tmp_path / "number.jsonl").write_text(json.dumps({"text": "x"}) + "\n" + json.dumps({"text": 5}) + "\n")
    with pytest.raises(TaskvecError, match=r"column 'text' holds a int \(5\), not text"):  # it was dropped silently
        load_texts(str(tmp_path / "number.jsonl"))
    (tmp_path / "bool.jsonl").write_text(json.dumps({"text": "x", "tox": True}) + "\n")
    with pytest.raises(TaskvecError, match="score column 'tox' holds a boolean, not a number: True"):
        load_texts(str(tmp_path / "bool.jsonl"), score_column="tox")


def test_csv_scores_are_parsed(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("text,score\nbad words,0.9\nfine,0.2\n\"quoted, comma\",0.85\n", encoding="utf-8")
    assert load_texts(str(path), score_column="score") == ["bad words", "quoted, comma"]


def test_a_non_numeric_score_is_an_error(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("text,score\nbad words,very\n", encoding="utf-8")
    with pytest.raises(TaskvecError, match="non-number: 'very'"):
        load_texts(str(path), score_column="score")


def test_blank_scores_count_as_missing_in_every_format(tmp_path):
    csv_path = tmp_path / "s.csv"
    csv_path.write_text("text,score\nbad words,0.9\nunscored,\n", encoding="utf-8")
    jsonl_path = tmp_path / "s.jsonl"
    jsonl_path.write_text('{"text": "bad words", "score": 0.9}\n{"text": "unscored", "score": null}\n')
    for path in (csv_path, jsonl_path):
        assert load_texts(str(path), score_column="score") == ["bad words"]


@pytest.mark.parametrize("suffix", [".txt", ".csv", ".jsonl", ".parquet"])
def test_unreadable_files_are_one_line_errors(tmp_path, suffix):
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(b"text\n\xff\xfe not utf-8 \x80\n")
    with pytest.raises(TaskvecError, match="not valid UTF-8 text|not a readable parquet file") as info:
        load_texts(str(path))
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_txt_is_one_text_per_line(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("first\n\nsecond line\n", encoding="utf-8")
    assert load_texts(str(path)) == ["first", "second line"]
    with pytest.raises(TaskvecError, match="no other columns"):
        load_texts(str(path), score_column="score")


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet"])
def test_missing_column_names_it(sources, kind):
    with pytest.raises(TaskvecError, match="no column 'text'") as info:
        load_texts(str(sources[kind]))
    assert str(sources[kind]) in str(info.value) and "comment" in str(info.value)
    with pytest.raises(TaskvecError, match="toxicity"):
        load_texts(str(sources[kind]), text_column="comment", score_column="toxicity")


def test_bad_local_input(tmp_path):
    with pytest.raises(TaskvecError, match="no such file"):
        load_texts(str(tmp_path / "absent.jsonl"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(TaskvecError, match="no non-empty texts"):
        load_texts(str(empty))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(TaskvecError, match=r"bad.jsonl:2: not valid JSON"):
        load_texts(str(bad))
    with pytest.raises(TaskvecError, match="threshold needs a score column"):
        load_texts(str(empty), threshold=0.5)
    with pytest.raises(TaskvecError, match="max_rows"):
        load_texts(str(empty), max_rows=0)


@pytest.fixture
def offline(monkeypatch):
    """What a machine without the hub sees, without waiting for network retries."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize("name", ["civil_comments", "google/civil_comments", "someone/unknown-set"])
def test_hub_unreachable_is_a_clear_error(offline, name, tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    with pytest.raises(TaskvecError) as info:
        load_texts(name)
    message = str(info.value)
    assert "hub cannot be reached" in message and "local .jsonl" in message and "\n" not in message


@pytest.mark.parametrize("name, hub_path, config, columns", [
    ("civil_comments", "google/civil_comments", None, ("text", "toxicity")),
    ("toxigen", "skg/toxigen-data", "train", ("generation", "roberta_prediction")),
])
def test_known_corpora_use_their_columns_and_threshold(monkeypatch, name, hub_path, config, columns):
    text, score = columns
    calls = []

    def fake_load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return datasets.Dataset.from_dict({text: [t for t, _ in ROWS], score: [s for _, s in ROWS]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_texts(name) == TOXIC
    assert calls == [(hub_path, config, "train")]
    assert load_texts(hub_path, threshold=0.05, split="test") == [t for t, s in ROWS if s and s > 0.05 and t.strip()]
    assert calls[-1] == (hub_path, config, "test")


def test_jsonl_round_trip_is_exact(tmp_path):
    texts = ["plain", "new\nline", "quote \" and \\ backslash", "emoji 🙂", ""]
    path = write_jsonl(texts, tmp_path / "sub" / "t.jsonl")
    assert read_jsonl(path) == texts
    assert [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()] == texts
    assert list(tmp_path.joinpath("sub").iterdir()) == [path]  # no temporary file left
    with pytest.raises(TaskvecError, match="no string 'text' field"):
        (tmp_path / "x.jsonl").write_text('{"content": "a"}\n', encoding="utf-8")
        read_jsonl(tmp_path / "x.jsonl")


@pytest.mark.parametrize("n_texts, n_splits", [(10, 3), (7, 7), (100, 5), (5, 1)])
def test_splits_are_disjoint_balanced_and_seeded(n_texts, n_splits):
    texts = [f"text {i}" for i in range(n_texts)]
    splits = split_texts(texts, n_splits, seed=3)
    assert len(splits) == n_splits
    assert sorted(t for s in splits for t in s) == sorted(texts)  # disjoint and complete
    sizes = [len(s) for s in splits]
    assert max(sizes) - min(sizes) <= 1
    assert split_texts(texts, n_splits, seed=3) == splits
    assert sorted(split_order(n_texts, 3)) == list(range(n_texts))


def test_seed_changes_the_shuffle_and_it_is_not_the_input_order():
    texts = [f"text {i}" for i in range(100)]
    a, b = split_texts(texts, 1, seed=0)[0], split_texts(texts, 1, seed=1)[0]
    assert a != texts and b != texts and a != b
    # Each position of a seeded permutation should be uniform: over 200 seeds the first
    # element of 10 takes every value, none of them overwhelmingly (expected 20 each).
    firsts = Counter(split_order(10, seed)[0] for seed in range(200))
    assert set(firsts) == set(range(10)) and max(firsts.values()) < 45


def test_duplicate_texts_are_split_as_rows():
    splits = split_texts(["same"] * 4, 2)
    assert splits == [["same", "same"], ["same", "same"]]


@pytest.mark.parametrize("texts, n, message", [
    ([], 2, "empty dataset"),
    (["a", "b"], 3, "cannot make 3 non-empty splits of 2 texts"),
    (["a"], 0, "at least 1"),
])
def test_bad_split_requests(texts, n, message):
    with pytest.raises(TaskvecError, match=message):
        split_texts(texts, n)


def test_save_splits_writes_files_and_manifest(tmp_path):
    texts = [f"comment number {i}" for i in range(11)]
    paths = save_splits(texts, 3, tmp_path / "splits", seed=5, source="toxic.jsonl")
    assert [p.name for p in paths] == ["split-00.jsonl", "split-01.jsonl", "split-02.jsonl"]
    expected = split_texts(texts, 3, seed=5)
    assert [read_jsonl(p) for p in paths] == expected
    manifest = read_manifest(tmp_path / "splits")
    assert manifest["n_splits"] == 3 and manifest["seed"] == 5 and manifest["n_texts"] == 11
    assert [s["size"] for s in manifest["splits"]] == [4, 4, 3]
    assert manifest["source_sha256"] == texts_hash(texts) and manifest["source"] == "toxic.jsonl"
    assert [read_split(tmp_path / "splits", k) for k in range(3)] == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["splits"]  # no staging left

    with pytest.raises(TaskvecError, match="already exists"):
        save_splits(texts, 2, tmp_path / "splits")
    save_splits(texts, 2, tmp_path / "splits", overwrite=True)
    assert read_manifest(tmp_path / "splits")["n_splits"] == 2
    assert not (tmp_path / "splits" / "split-02.jsonl").exists()

    (tmp_path / "splits" / "split-01.jsonl").write_text('{"text": "edited"}\n', encoding="utf-8")
    with pytest.raises(TaskvecError, match="split-01.jsonl: contents differ"):
        read_split(tmp_path / "splits", 1)
    with pytest.raises(TaskvecError, match="out of range"):
        read_split(tmp_path / "splits", 2)


def test_failed_save_leaves_nothing(tmp_path):
    with pytest.raises(TaskvecError, match="cannot make 5"):
        save_splits(["a", "b"], 5, tmp_path / "splits")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(TaskvecError, match="not a split directory"):
        read_manifest(tmp_path)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.pop("n_splits"), "n_splits must be a positive integer, not None"),
    (lambda m: m.update(n_splits="3"), "n_splits must be a positive integer, not '3'"),
    (lambda m: m.update(n_splits=0), "n_splits must be a positive integer, not 0"),
    (lambda m: m["splits"].pop(), "n_splits is 3 but it lists 2 splits"),
    (lambda m: m.pop("splits"), "n_splits is 3 but it lists no splits"),
    (lambda m: m["splits"][1].pop("sha256"), "split 1 needs a file name and a sha256"),
    (lambda m: m["splits"][2].update(file="../toxic.jsonl"), "split 2 names '../toxic.jsonl', not a file inside"),
    (lambda m: m["splits"][2].update(m["splits"][0]), "splits 0 and 2 both name 'split-00.jsonl'; splits must be"),
])
def test_hand_edited_manifest_is_a_one_line_error(tmp_path, edit, message):
    save_splits([f"text {i}" for i in range(9)], 3, tmp_path / "splits")
    path = tmp_path / "splits" / "splits.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    with pytest.raises(TaskvecError, match=re.escape(message)) as info:
        read_split(tmp_path / "splits", 0)
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)


def test_cli_toxic_then_split(sources, tmp_path):
    out = tmp_path / "toxic.jsonl"
    result = run("data", "toxic", sources["parquet"], "--text-column", "comment",
                 "--score-column", "tox", "-o", out)
    assert result.exit_code == 0, result.output
    assert read_jsonl(out) == TOXIC and "wrote 3 texts" in result.output
    result = run("data", "toxic", sources["parquet"], "--text-column", "comment", "-o", out)
    assert result.exit_code == 1 and "already exists" in result.output
    result = run("data", "toxic", sources["parquet"], "--text-column", "comment", "-o", out, "--overwrite")
    assert result.exit_code == 0 and len(read_jsonl(out)) == 6

    result = run("data", "split", out, "--splits", 4, "-o", tmp_path / "splits", "--seed", 2)
    assert result.exit_code == 0, result.output
    assert [read_split(tmp_path / "splits", k) for k in range(4)] == split_texts(read_jsonl(out), 4, seed=2)


@pytest.mark.parametrize("args, message", [
    (["data", "toxic", "ROWS", "-o", "OUT"], "no column 'text'"),
    (["data", "split", "ROWS", "--splits", 99, "-o", "OUT"], "cannot make 99 non-empty splits"),
    (["data", "split", "ABSENT", "--splits", 2, "-o", "OUT"], "no such file"),
])
def test_cli_errors_are_one_line(sources, tmp_path, args, message):
    names = {"ROWS": sources["parquet"], "OUT": tmp_path / "out", "ABSENT": tmp_path / "absent.jsonl"}
    if args[1] == "split":
        names["ROWS"] = sources["jsonl"]
        write_jsonl(["a", "b", "c"], sources["jsonl"])
    result = run(*[names.get(a, a) for a in args])
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and message in result.output
    assert result.output.count("\n") == 1 and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_cli_help_explains():
    for command in (["data"], ["data", "toxic"], ["data", "split"]):
        result = run(*command, "--help")
        assert result.exit_code == 0
    assert "civil_comments" in run("data", "toxic", "--help").output
    assert "disjoint" in run("data", "split", "--help").output


def test_split_refuses_to_replace_the_directory_holding_its_input(tmp_path):
    source = write_jsonl(["a", "b", "c"], tmp_path / "splits" / "toxic.jsonl")
    with pytest.raises(TaskvecError, match="is inside output"):
        save_splits(read_jsonl(source), 2, tmp_path / "splits", source=str(source), overwrite=True)
    assert read_jsonl(source) == ["a", "b", "c"]


def test_text_files_split_on_line_ends_only_and_byte_order_marks_are_dropped(tmp_path):
    """str.splitlines cut a text at U+2028, U+0085 or a form feed (3 lines read as 6 texts), unlike
    the JSONL and CSV readers; a UTF-8 byte-order mark stayed in the first text of a .txt, and
    made a CSV's first column '\\ufefftext' (refused) and a JSONL file unreadable. Prompt files
    are read the same way."""
    from taskvec.eval import load_prompts

    lines = ["one text\u2028still the same line", "second\x0cline", "third\x85line"]
    (tmp_path / "texts.txt").write_text("\ufeff" + "\r\n".join(lines) + "\n", encoding="utf-8")
    assert load_texts(str(tmp_path / "texts.txt")) == lines
    assert load_prompts(tmp_path / "texts.txt") == lines
    (tmp_path / "rows.csv").write_text("\ufefftext,score\nbad,0.9\n", encoding="utf-8")
    assert load_texts(str(tmp_path / "rows.csv"), score_column="score") == ["bad"]
    (tmp_path / "rows.jsonl").write_text("\ufeff" + json.dumps({"text": "bad", "score": 0.9}) + "\n", encoding="utf-8")
    assert load_texts(str(tmp_path / "rows.jsonl"), score_column="score") == ["bad"]


def test_file_types_are_known_whatever_the_case_of_their_suffix(tmp_path):
    """ROWS.JSONL was read as plain text (each raw JSON line a prompt), ROWS.CSV refused."""
    from taskvec.eval import load_prompts

    (tmp_path / "ROWS.JSONL").write_text(json.dumps({"text": "bad", "score": 0.9, "prompt": "Hello"}) + "\n")
    (tmp_path / "ROWS.CSV").write_text("text,score\nbad,0.9\n")
    assert load_texts(str(tmp_path / "ROWS.JSONL"), score_column="score") == ["bad"]
    assert load_texts(str(tmp_path / "ROWS.CSV"), score_column="score") == ["bad"]
    assert load_prompts(tmp_path / "ROWS.JSONL") == ["Hello"]
