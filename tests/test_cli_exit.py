"""The console script ends without the interpreter's teardown, and loses nothing by it: output
flushed into pipes, atexit handlers run, click's exit statuses kept, outputs whole."""

import json
import os
import subprocess
import sys

from click.testing import CliRunner
from safetensors.numpy import load_file

from taskvec.cli import _status, main

ENTRY = "import sys; from taskvec.cli import run; sys.argv[0] = 'taskvec'; "


def _run(code: str, *args: str, cwd) -> subprocess.CompletedProcess:
    """A console-script run; its stdout block-buffered, as a pipe's is (PYTHONUNBUFFERED dropped)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    return subprocess.run([sys.executable, "-c", ENTRY + code, *args], capture_output=True, text=True, cwd=cwd,
                          env=env)


def test_piped_output_is_flushed_and_atexit_handlers_run(tmp_path):
    """stdout into a pipe is block-buffered: without the flush the handler's print would be lost."""
    done = _run("import atexit; atexit.register(lambda: print('handler ran')); "
                "sys.argv[1:] = ['--version']; run()", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("taskvec, version")
    assert done.stdout.endswith("handler ran\n")


def test_failures_keep_clicks_exit_status(tmp_path):
    usage = _run("sys.argv[1:] = ['merge', '--no-such-option']; run()", cwd=tmp_path)
    assert usage.returncode == 2 and "No such option" in usage.stderr
    missing = _run(f"sys.argv[1:] = ['merge', '--base', {str(tmp_path / 'none')!r}, "
                   f"{str(tmp_path / 'ft')!r}, '-o', {str(tmp_path / 'out')!r}]; run()", cwd=tmp_path)
    assert missing.returncode == 1 and missing.stderr.startswith("Error:"), missing.stderr
    assert not (tmp_path / "out").exists()


def test_exit_codes_as_the_interpreter_gives_them(capsys):
    assert (_status(None), _status(0), _status(3), _status(256 + 7)) == (0, 0, 3, 7)
    assert _status("a message") == 1
    assert capsys.readouterr().err == "a message\n"


def test_a_merge_through_the_console_script_is_whole(synthetic_sets, tmp_path):
    """The same merge in-process and through `python -m taskvec`: byte-identical tensors, same files."""
    sset = synthetic_sets("float32")
    args = ["merge", "--base", str(sset.base), *map(str, sset.finetuned), "--no-progress"]
    inline = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "inline")])
    assert inline.exit_code == 0, inline.output
    script = subprocess.run([sys.executable, "-m", "taskvec", *args, "-o", str(tmp_path / "script")],
                            capture_output=True, text=True, cwd=tmp_path)
    assert script.returncode == 0, script.stderr
    names = sorted(p.name for p in (tmp_path / "inline").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "script").iterdir())
    for name in names:
        ours, theirs = tmp_path / "inline" / name, tmp_path / "script" / name
        if name.endswith(".safetensors"):
            a, b = load_file(ours), load_file(theirs)
            assert a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)
        elif name.endswith(".json"):
            assert json.loads(ours.read_text()) == json.loads(theirs.read_text())
