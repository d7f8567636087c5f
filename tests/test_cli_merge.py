"""`taskvec merge/average/negate` through click: outputs, help, and one-line errors."""

import subprocess
import sys

import torch
from click.testing import CliRunner

from taskvec.cli import main

from helpers import load_dir


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_merge_average_negate_commands(synthetic_sets, tmp_path):
    sset = synthetic_sets("float32")
    result = run("merge", "--base", sset.base, "--scale", "0.5", "-o", tmp_path / "m", *sset.finetuned)
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and "1 shard" in result.output
    result = run("average", "-o", tmp_path / "a", *sset.finetuned[:2], "--dtype", "bfloat16")
    assert result.exit_code == 0, result.output
    assert load_dir(tmp_path / "a")["transformer.wte.weight"].dtype == torch.bfloat16
    result = run("negate", "--base", sset.base, "--finetuned", sset.finetuned[0], "-o", tmp_path / "n")
    assert result.exit_code == 0, result.output
    merged, negated = load_dir(tmp_path / "m"), load_dir(tmp_path / "n")
    assert merged.keys() == negated.keys()
    result = run("merge", "--base", sset.base, "-o", tmp_path / "one", sset.finetuned[0])
    assert result.exit_code == 0 and "note: one fine-tune" in result.output  # a glob that matched one


def test_errors_are_one_line_without_traceback(synthetic_sets, tmp_path):
    sset = synthetic_sets("float32")
    result = run("merge", "--base", sset.base, "-o", tmp_path / "m", tmp_path / "missing")
    assert result.exit_code == 1
    assert result.output.strip().count("\n") == 0 and "no such file or directory" in result.output
    assert "Traceback" not in result.output
    result = run("merge", "--base", sset.base, "-o", tmp_path / "m")
    assert result.exit_code == 2 and "Missing argument" in result.output
    (tmp_path / "exists").mkdir()
    result = run("merge", "--base", sset.base, "-o", tmp_path / "exists", sset.finetuned[0])
    assert result.exit_code == 1 and "--overwrite" in result.output


def test_help_explains_the_method():
    result = run("merge", "--help")
    assert result.exit_code == 0
    assert "base - scale * (mean_i(finetuned_i) - base)" in result.output
    assert "--max-shard-size" in result.output and "--device" in result.output


def test_console_script_runs_and_kernels_are_namespaced(tmp_path):
    """The installed `taskvec` entry point works, and no top-level `kernels`/`cli` module exists."""
    version = subprocess.run([sys.executable, "-m", "taskvec", "--version"], capture_output=True,
                             text=True, cwd=tmp_path)
    assert version.returncode == 0 and "taskvec" in version.stdout
    probe = ("import importlib.util as u, taskvec.kernels, taskvec.cli;"
             "print(u.find_spec('kernels'), u.find_spec('cli'))")
    found = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path)
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip() == "None None"


def test_sigterm_removes_the_partial_output(synthetic_sets, tmp_path):
    """kill / scancel / a job's time limit mid-merge: the staged output goes, the target never appears."""
    import signal
    import time

    sset = synthetic_sets("float32")
    output = tmp_path / "out"
    argv = [sys.executable, "-m", "taskvec", "merge", "--base", str(sset.base), "-o", str(output),
            "--chunk-size", "64", "--no-progress", *map(str, sset.finetuned)]  # tiny chunks: seconds
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".out.partial-*")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert process.poll() is None, "the merge ended before it could be interrupted"
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []


def test_weights_without_a_config_are_merged_with_a_note(synthetic_sets, tmp_path):
    import shutil

    sset = synthetic_sets("float32")
    bare = []
    for model in (sset.base, *sset.finetuned[:2]):
        (tmp_path / model.name).mkdir()
        bare.append(shutil.copy(model / "model.safetensors", tmp_path / model.name))
    result = run("merge", "--base", bare[0], "-o", tmp_path / "out", *bare[1:])
    assert result.exit_code == 0, result.output
    assert "note: no config.json beside the base" in result.output
    assert [p.name for p in (tmp_path / "out").iterdir()] and not (tmp_path / "out" / "config.json").exists()


def test_os_errors_are_one_line(synthetic_sets, tmp_path, monkeypatch):
    """Disk full, permissions, a read-only file system: the OS's reason and the path, no traceback."""
    import errno

    from taskvec.io.shards import ShardWriter

    def full(self, name, start, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.directory / "model.safetensors"))

    monkeypatch.setattr(ShardWriter, "write", full)
    sset = synthetic_sets("float32")
    result = run("merge", "--base", sset.base, "-o", tmp_path / "out", *sset.finetuned[:2])
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert result.output.startswith(f"Error: output {tmp_path / 'out'}: No space left on device writing "
                                    "model.safetensors (on the file system of ")
    assert list(tmp_path.iterdir()) == []
