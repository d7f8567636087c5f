"""Weight files that are not files, symlink loops and absurd sizes (issue 12): each a one-line
error, promptly, never a hang or a traceback."""

import os
import shutil
import threading

import pytest
from cli_errors import refused

from taskvec.errors import TaskvecError
from taskvec.io.safetensors_file import FileReader
from taskvec.io.shards import parse_size
from taskvec.merge import merge_checkpoints
from taskvec.outputs import check_output


def outcome_within(seconds, work, fifo):
    """Run `work` in a thread; a hang fails the test (the FIFO is then opened to free the thread)."""
    result = {}

    def target():
        try:
            work()
        except Exception as err:  # handed to the test
            result["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # wakes a blocked open()
        pytest.fail(f"still blocked on {fifo} after {seconds} s")
    return result.get("error")


def test_a_fifo_named_model_safetensors_is_refused_without_waiting(synthetic_sets, tmp_path):
    sset = synthetic_sets("float32")
    fifo_model = tmp_path / "ft"
    fifo_model.mkdir()
    shutil.copy(sset.finetuned[0] / "config.json", fifo_model)
    fifo = fifo_model / "model.safetensors"
    os.mkfifo(fifo)
    error = outcome_within(20, lambda: merge_checkpoints(
        [fifo_model, sset.finetuned[1]], tmp_path / "out", base=sset.base, progress=False), fifo)
    assert isinstance(error, TaskvecError) and str(error) == f"{fifo}: not a regular file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ft"]

    reader = FileReader()  # a FIFO put where a weight file was after its header was read
    error = outcome_within(20, lambda: reader.read_into(fifo, 0, memoryview(bytearray(8))), fifo)
    assert isinstance(error, TaskvecError) and "not a regular file" in str(error)


@pytest.mark.parametrize("option", ["--chunk-size", "--max-shard-size"])
def test_sizes_with_hundreds_of_digits(synthetic_sets, tmp_path, option):
    sset = synthetic_sets("float32")
    line = refused(tmp_path, "merge", "--base", sset.base, "-o", tmp_path / "out", option, "9" * 300,
                   *sset.finetuned[:2], where="size '999")
    assert "too large" in line and len(line) < 200
    with pytest.raises(TaskvecError, match="too large"):
        parse_size("1" * 300 + ".5GB")


def test_a_symlink_loop_as_output(synthetic_sets, tmp_path):
    sset = synthetic_sets("float32")
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    refused(tmp_path, "merge", "--base", sset.base, "-o", loop, *sset.finetuned[:2],
            where=f"{loop}: cannot resolve")
    refused(tmp_path, "merge", "--base", sset.base, "-o", loop / "out", *sset.finetuned[:2],
            where=f"{loop / 'out'}: cannot resolve")


def test_a_symlink_loop_as_input_of_an_output_check(tmp_path):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(TaskvecError, match="loop: cannot resolve"):
        check_output(tmp_path / "out", [loop], overwrite=False)


def test_a_symlink_loop_as_input(synthetic_sets, tmp_path):
    sset = synthetic_sets("float32")
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    refused(tmp_path, "merge", "--base", sset.base, "-o", tmp_path / "out", loop, sset.finetuned[0],
            where=f"{loop}")
