"""The `taskvec` command: a click group whose subcommands are imported only when run.

Lazy loading keeps `taskvec --help` and `taskvec merge` free of the import cost of the modules
they do not use (transformers, datasets), which matters for a merge that takes seconds.
"""

import atexit
import importlib
import os
import signal
import sys
from contextlib import contextmanager

import click

from taskvec import __version__
from taskvec.cli.options import OneValueGroup
from taskvec.errors import TaskvecError

# command name -> "module:function" (module relative to taskvec.cli)
COMMANDS = {
    "merge": "merge:merge",
    "average": "merge:average",
    "negate": "merge:negate",
    "inspect": "inspect:inspect",
    "data": "data:data",
    "train-splits": "train:train_splits",
    "eval": "evaluate:eval_command",
    "score": "evaluate:score",
    "compare": "evaluate:compare",
    "demo": "demo:demo",
    "sweep": "sweep:sweep",
}


class LazyGroup(OneValueGroup):
    """A group that resolves its subcommands on first use."""

    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        target = COMMANDS.get(name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        module = importlib.import_module(f"taskvec.cli.{module_name}")
        return getattr(module, attr)

    def invoke(self, ctx):
        with _termination_unwinds():
            try:
                return super().invoke(ctx)
            except TaskvecError as err:
                raise click.ClickException(str(err)) from None
            except OSError as err:  # disk full, permissions, a read-only file system: one line too
                where = f"{err.filename}: " if err.filename else ""
                raise click.ClickException(f"{where}{err.strerror or err}") from None


@contextmanager
def _termination_unwinds():
    """Make SIGTERM (kill, scancel, a job's time limit) and SIGHUP (a dropped SSH session) unwind
    like Ctrl-C, so that staged outputs are removed on the way out instead of being left
    half-written; exit status 128 + the signal's number (143, 129). A signal the caller ignores
    (`nohup`) stays ignored, and a repeated one does not interrupt the cleanup."""

    def stop(signum, frame):
        for number in previous:
            signal.signal(number, signal.SIG_IGN)
        raise SystemExit(128 + signum)

    previous = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGHUP)
                if signal.getsignal(number) is not signal.SIG_IGN}
    for number in previous:
        signal.signal(number, stop)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="taskvec")
def main():
    """Task-vector arithmetic on language-model weights.

    The detoxification recipe: fine-tune a base LM on N disjoint splits of a toxic corpus
    (`taskvec data`, `taskvec train-splits`), negate the averaged task vector from the base
    (`taskvec merge`), and measure toxicity and perplexity (`taskvec eval`, `taskvec compare`).
    `taskvec demo` runs it all offline on a small model.
    """


def run() -> None:
    """The console script: `main`, then its exit status without the interpreter's teardown.

    A finished command has closed and renamed its outputs; tearing down torch's modules and
    static objects after that adds ~0.5 s to every command and changes nothing. The atexit
    handlers still run (temporary files, logging), then the process ends with main's status.
    """
    try:
        main()
        code = 0
    except SystemExit as stop:
        code = _status(stop.code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`taskvec ... | head`): nothing to flush into
            code = code or 1
    os._exit(code)


def _status(code) -> int:
    """A SystemExit code as the interpreter turns it into a status: None 0, an int itself, else
    printed to stderr and 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1
