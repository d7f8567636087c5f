"""`taskvec data` on hostile input: one `Error:` line naming the file, nothing written, inputs kept."""

import os

import pytest
from cli_errors import refused
from click.testing import CliRunner

from taskvec.cli import main

DEEP = 100_000
BAD_JSONL = {  # second line of a JSONL file -> the error it must give
    "deep-array": (b"[" * DEEP + b"]" * DEEP, "nested too deeply"),
    "deep-object": (b'{"a": ' * DEEP + b"1" + b"}" * DEEP, "nested too deeply"),
    "not-utf8": (b'{"text": "caf\xe9"}', "not valid UTF-8"),
    "not-json": (b'{"text": oops}', "not valid JSON"),
    "array": (b'["a list"]', "expected a JSON object"),
    "string": (b'"a string"', "expected a JSON object"),
    "lone-surrogate": (b'{"text": "half \\ud800 a pair", "score": 0.9}', "a string holds a lone surrogate"),
}
BIG = 200 * 1024  # over csv.field_size_limit()'s 128 KiB
BAD_TEXT = {  # file name, content -> the error it must give, on the line it names
    "csv-big-field": ("rows.csv", "text,score\nok,0.9\n" + "x" * BIG + ",0.9\n", "3: not readable as CSV"),
    "csv-big-quoted": ("rows.csv", 'text,score\nok,0.9\n"' + "x\n" * (BIG // 2) + '",0.9\n', "3: not readable as CSV"),
    "csv-big-header": ("rows.csv", "x" * BIG + "\nok\n", "1: not readable as CSV"),
    "csv-not-utf8": ("rows.csv", b"text,score\nok,0.9\ncaf\xe9,0.9\n", "3: not valid UTF-8"),
    "txt-not-utf8": ("rows.txt", b"ok\n\xff\xfe\n", "2: not valid UTF-8"),
    "csv-column-twice": ("rows.csv", "text,score,text\nok,0.9,other\n", "1: the header names column 'text' twice"),
}


def jsonl(path, second_line):
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(b'{"text": "fine", "score": 0.9}\n' + second_line + b"\n")
    return path


@pytest.mark.parametrize("kind", BAD_JSONL)
@pytest.mark.parametrize("command", ["toxic", "split"])
def test_bad_jsonl_lines(tmp_path, command, kind):
    line, message = BAD_JSONL[kind]
    source = jsonl(tmp_path / "rows.jsonl", line)
    args = ["-o", tmp_path / "out.jsonl"] if command == "toxic" else ["-n", 1, "-o", tmp_path / "out"]
    error = refused(tmp_path, "data", command, source, *args, where=f"{source}:2: ")
    assert message in error


@pytest.mark.parametrize("kind", BAD_TEXT)
def test_bad_csv_and_text_files(tmp_path, kind):
    name, content, message = BAD_TEXT[kind]
    source = tmp_path / name
    source.write_bytes(content if isinstance(content, bytes) else content.encode())
    refused(tmp_path, "data", "toxic", source, "-o", tmp_path / "out.jsonl", where=f"{source}:{message}")


@pytest.mark.parametrize("seed", [2**63, 2**64 + 1, 10**40, 2**32, -1])
def test_seed_out_of_range(tmp_path, seed):
    source = jsonl(tmp_path / "rows.jsonl", b'{"text": "more"}')
    error = refused(tmp_path, "data", "split", source, "-n", 2, "-o", tmp_path / "out", "--seed", seed,
                    where="Invalid value for '--seed'", status=2)  # a usage error, as click reports them
    assert "0<=x<=4294967295" in error


def test_largest_seed_still_splits(tmp_path):
    source = jsonl(tmp_path / "rows.jsonl", b'{"text": "more"}')
    result = CliRunner().invoke(main, ["data", "split", str(source), "-n", "2", "-o", str(tmp_path / "out"),
                                       "--seed", str(2**32 - 1)])
    assert result.exit_code == 0, result.output


def _same(path, source):
    return source


def _symlink(path, source):
    path.symlink_to(source.name)
    return path


def _hard_link(path, source):
    os.link(source, path)
    return path


def _spelled_differently(path, source):
    return source.parent / "." / ".." / source.parent.name / source.name


@pytest.mark.parametrize("make_output", [_same, _symlink, _hard_link, _spelled_differently])
def test_toxic_never_replaces_its_input(tmp_path, make_output):
    source = jsonl(tmp_path / "rows.jsonl", b'{"text": "calm", "score": 0.1}')
    output = make_output(tmp_path / "out.jsonl", source)
    error = refused(tmp_path, "data", "toxic", source, "--score-column", "score", "-o", output, "--overwrite",
                    where=f"output {output} is the input {source}")
    assert "choose another file" in error


def test_split_never_replaces_the_directory_of_its_input(tmp_path):
    source = jsonl(tmp_path / "sub" / "rows.jsonl", b'{"text": "more"}')
    refused(tmp_path, "data", "split", source, "-n", 2, "-o", tmp_path / "sub", "--overwrite",
            where=f"input {source} is inside output {tmp_path / 'sub'}")
