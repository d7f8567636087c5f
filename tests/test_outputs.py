"""The one rule every command's output directory follows."""

import pytest

from taskvec.errors import TaskvecError
from taskvec.outputs import check_output, staged_directory


def test_output_rules_for_file_and_directory_inputs(tmp_path):
    data = tmp_path / "toxic.jsonl"
    data.write_text("{}\n")
    model = tmp_path / "model"
    model.mkdir()
    assert check_output(tmp_path / "splits", [data, model], overwrite=False) == tmp_path / "splits"
    with pytest.raises(TaskvecError, match="input .* is inside output"):
        check_output(tmp_path, [data], overwrite=True)  # replacing it would delete the input
    with pytest.raises(TaskvecError, match="output .* is inside input"):
        check_output(model / "out", [model], overwrite=False)
    with pytest.raises(TaskvecError, match="not a directory"):
        check_output(data, [], overwrite=True)


def test_staged_directory_publishes_only_on_success(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), staged_directory(out, overwrite=False) as staging:
        (staging / "half.txt").write_text("x")
        raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []
    with staged_directory(out, overwrite=False) as staging:
        (staging / "done.txt").write_text("x")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (out / "done.txt").is_file()
