"""Every command's --help answers at once: torch, transformers, datasets and triton are imported
only when a command runs."""

import subprocess
import sys

from click.testing import CliRunner

from taskvec.cli import main

HEAVY = ("torch", "transformers", "datasets", "triton")


def test_help_imports_nothing_heavy():
    commands = list(main.list_commands(None))
    code = ("import sys; from click.testing import CliRunner; from taskvec.cli import main; "
            f"codes = [CliRunner().invoke(main, [c, '--help']).exit_code for c in {commands!r}]; "
            f"print(codes, sorted(m for m in {HEAVY!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == f"{[0] * len(commands)} []"
    assert {"merge", "average", "negate", "train-splits", "data", "eval", "score", "compare", "demo"} <= set(commands)


def test_every_command_explains_itself():
    for command in main.list_commands(None):
        result = CliRunner().invoke(main, [command, "--help"])
        assert result.exit_code == 0 and "Usage: " in result.output and len(result.output.splitlines()) > 5, command


def test_every_option_says_what_it_does():
    from click import Group

    def commands(group):
        for name in group.list_commands(None):
            command = group.get_command(None, name)
            yield from commands(command) if isinstance(command, Group) else [(name, command)]

    for name, command in commands(main):
        for param in command.params:
            if param.param_type_name == "option":
                assert param.help, f"{name} {param.opts[0]} has no help text"
