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


def test_a_dangling_link_as_output_is_refused_before_any_work(tmp_path):
    """It failed only at the end, after the whole merge, naming a staging folder already gone."""
    (tmp_path / "out").symlink_to(tmp_path / "nowhere")
    for overwrite in (False, True):
        with pytest.raises(TaskvecError, match="output .*out is a link to .*nowhere, which does not exist"):
            check_output(tmp_path / "out", [], overwrite=overwrite)


def test_the_current_directory_and_its_parents_are_never_outputs(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for output in (".", "..", work):
        with pytest.raises(TaskvecError, match="holds the current directory"):
            check_output(output, [], overwrite=True)
    assert check_output("sub", [], overwrite=False).name == "sub"


def test_staged_directory_publishes_only_on_success(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), staged_directory(out, overwrite=False) as staging:
        (staging / "half.txt").write_text("x")
        raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []
    with staged_directory(out, overwrite=False) as staging:
        (staging / "done.txt").write_text("x")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (out / "done.txt").is_file()
