"""Hard kills and hang-ups mid-merge (issue 12): real signals on a real `taskvec merge` process.

SIGHUP unwinds like SIGTERM; what SIGKILL leaves is never loadable and is removed by the next
run to the same target, but never while the run that owns it is alive.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from taskvec.errors import TaskvecError
from taskvec.io.safetensors_file import OutputSpec, read_header
from taskvec.io.shards import ShardWriter
from taskvec.merge import merge_checkpoints
from taskvec.outputs import LOCK_FILE, UNLOCKED_GRACE_SECONDS, check_output, staged_directory

from helpers import load_dir


def start_merge(sset, output: Path) -> subprocess.Popen:
    """A merge in tiny chunks (seconds long), once its partial shard exists beside `output`."""
    argv = [sys.executable, "-m", "taskvec", "merge", "--base", str(sset.base), "-o", str(output),
            "--chunk-size", "64", "--no-progress", *map(str, sset.finetuned)]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not list(output.parent.glob(f".{output.name}.partial-*/model.safetensors")):
        assert process.poll() is None and time.monotonic() < deadline, "the merge ended before its partial appeared"
        time.sleep(0.01)
    time.sleep(0.2)  # some tensor bytes written
    assert process.poll() is None, "the merge ended before it could be interrupted"
    return process


def partials(output: Path) -> list[Path]:
    return sorted(output.parent.glob(f".{output.name}.partial-*"))


def assert_unloadable(file: Path) -> None:
    with pytest.raises(TaskvecError):
        read_header(file)
    with pytest.raises(Exception):  # noqa: B017 - safetensors raises its own error types
        with safe_open(str(file), framework="pt"):
            pass


def test_sighup_unwinds_like_sigterm(synthetic_sets, tmp_path):
    """An SSH session dropping mid-merge: the staged output goes, exit status 128 + 1."""
    output = tmp_path / "out"
    process = start_merge(synthetic_sets("float32"), output)
    process.send_signal(signal.SIGHUP)
    assert process.wait(timeout=60) == 128 + signal.SIGHUP
    assert list(tmp_path.iterdir()) == []


def test_sigkill_leaves_nothing_loadable_and_the_next_run_removes_it(synthetic_sets, tmp_path, capsys):
    sset = synthetic_sets("float32")
    output = tmp_path / "out"
    process = start_merge(sset, output)
    process.kill()
    assert process.wait(timeout=60) == -signal.SIGKILL
    [left] = partials(output)
    assert_unloadable(left / "model.safetensors")  # not a model full of zeros
    merge_checkpoints(sset.finetuned, output, base=sset.base, progress=False)
    assert f"note: removed stale partial output {left}" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert load_dir(output).keys() == load_dir(sset.base).keys()


def test_a_running_merges_partial_is_not_removed(synthetic_sets, tmp_path, capsys):
    """Its lock is held: a second run to the same target leaves it alone and finishes first."""
    sset = synthetic_sets("float32")
    output = tmp_path / "out"
    process = start_merge(sset, output)
    [running] = partials(output)
    merge_checkpoints(sset.finetuned, output, base=sset.base, progress=False)
    assert running.is_dir() and (running / LOCK_FILE).is_file()
    assert "removed" not in capsys.readouterr().err
    assert process.poll() is None
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 128 + signal.SIGTERM
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_killed_overwrite_swap_is_undone(tmp_path, capsys):
    """Killed between moving the old output aside and moving the new one in: the old one comes
    back. Killed after the new one is in place: the old copy goes."""
    output = tmp_path / "out"
    aside = tmp_path / ".out.old-abcd1234"
    (aside / "out").mkdir(parents=True)
    (aside / "out" / "weights").write_text("old")
    stale = tmp_path / ".out.partial-abcd1234"
    stale.mkdir()
    (stale / LOCK_FILE).touch()  # its run is gone: nobody holds the lock
    check_output(output, [], overwrite=True)
    err = capsys.readouterr().err
    assert f"note: restored {output} from {aside}" in err and f"removed stale partial output {stale}" in err
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (output / "weights").read_text() == "old"

    (aside / "out").mkdir(parents=True)
    with pytest.raises(TaskvecError, match="already exists"):
        check_output(output, [], overwrite=False)
    assert f"note: removed {aside}" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (output / "weights").read_text() == "old"


def test_unlocked_partials_are_removed_only_once_old(tmp_path, capsys):
    """Without a lock file (a run just starting, or a taskvec before locks) only age tells."""
    young, old = tmp_path / ".out.partial-young123", tmp_path / ".out.partial-old12345"
    young.mkdir()
    old.mkdir()
    then = time.time() - UNLOCKED_GRACE_SECONDS - 5
    os.utime(old, (then, then))
    other = tmp_path / ".other.partial-abcd1234"  # another target's
    other.mkdir()
    os.utime(other, (then, then))
    check_output(tmp_path / "out", [], overwrite=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([young.name, other.name])
    assert f"removed stale partial output {old}" in capsys.readouterr().err


def test_staging_holds_its_lock_until_it_is_gone(tmp_path):
    output = tmp_path / "out"
    with staged_directory(output, overwrite=False) as staging:
        check_output(output, [], overwrite=False)  # another run's tidy-up
        assert staging.is_dir()
        (staging / "x").write_text("x")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in output.iterdir()] == ["x"]


def test_a_shard_gets_its_header_only_when_complete(tmp_path):
    specs = [OutputSpec("w", "F32", (4, 3))]
    value = torch.randn(4, 3)
    raw = memoryview(value.flatten().view(torch.uint8).numpy())
    crashed = ShardWriter(tmp_path, specs, 1 << 20, {"format": "pt"})
    crashed.write("w", 0, raw)  # then killed: close() never runs
    os.fsync(crashed._fds[0])
    assert_unloadable(tmp_path / "model.safetensors")
    crashed.close(complete=False)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(RuntimeError), ShardWriter(tmp_path, specs, 1 << 20, {"format": "pt"}) as failed:
        failed.write("w", 0, raw[:8])
        raise RuntimeError("a read failed")
    assert_unloadable(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    with ShardWriter(tmp_path, specs, 1 << 20, {"format": "pt"}) as done:
        done.write("w", 0, raw)
    assert torch.equal(load_dir(tmp_path)["w"], value)
