"""The one JSON reader: every bad JSON file is a one-line TaskvecError naming the file."""

import pytest

from taskvec.errors import TaskvecError
from taskvec.jsonfile import parse_json, read_json, write_json


@pytest.mark.parametrize("raw, message", [
    (b"\xff\xfe{}", "not valid UTF-8"),
    (b'{"a": ', "not valid JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"a": ' * 50_000 + b"1" + b"}" * 50_000, "nested too deeply"),
    (b"[1, 2]", "expected a JSON object, found list"),
    (b'"text"', "expected a JSON object, found str"),
    (b'{"n": ' + b"9" * 5000 + b"}", "not valid JSON (Exceeds the limit"),
])
def test_bad_json_is_one_line_naming_the_file(tmp_path, raw, message):
    path = tmp_path / "bad.json"
    path.write_bytes(raw)
    with pytest.raises(TaskvecError) as caught:
        read_json(path, expect=dict)
    text = str(caught.value)
    assert text.startswith(f"{path}: ") and message in text and "\n" not in text


def test_unreadable_file_names_it(tmp_path):
    with pytest.raises(TaskvecError, match="missing.json: cannot read"):
        read_json(tmp_path / "missing.json")


def test_round_trip_and_no_temporary_left(tmp_path):
    value = {"name": "modèle", "list": [1, 2.5, None]}
    write_json(tmp_path / "out.json", value)
    assert read_json(tmp_path / "out.json", expect=dict) == value
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]
    assert parse_json("[1]", "x", expect=list) == [1]


def test_repeated_keys_are_refused_when_asked(tmp_path):
    path = tmp_path / "index.json"
    path.write_text('{"weight_map": {"a": "1.safetensors", "b": "1", "a": "2.safetensors"}}')
    assert read_json(path)["weight_map"]["a"] == "2.safetensors"
    with pytest.raises(TaskvecError, match="index.json: key 'a' appears twice"):
        read_json(path, unique_keys=True)
