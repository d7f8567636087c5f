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


def test_an_option_of_one_value_given_twice_is_refused_by_every_command():
    """click keeps the last of a repeated option silently: `negate --finetuned A --finetuned B`
    negated B alone and exited 0. Every such option of every command (and subcommand) is refused
    when repeated, in either spelling (`--opt v`, `--opt=v`, a short alias), before anything runs;
    repeatable options and flags are not."""
    from click import Group, Option

    def commands(group, path):
        for name in group.list_commands(None):
            command = group.get_command(None, name)
            yield from commands(command, [*path, name]) if isinstance(command, Group) else [([*path, name], command)]

    checked = 0
    for path, command in commands(main, []):
        for option in command.params:
            if not isinstance(option, Option) or option.multiple or option.count or option.is_flag:
                continue
            first, second = option.opts[0], option.opts[-1]
            result = CliRunner().invoke(main, [*path, first, "x", f"{second}=y"])
            assert result.exit_code == 2, (path, option.name, result.output)
            assert result.output.strip().splitlines()[-1] == \
                f"Error: option {max(option.opts, key=len)} is given more than once; it takes one value", result.output
            checked += 1
    assert checked > 50
    repeatable = CliRunner().invoke(main, ["inspect", "--base", "b", "-m", "x", "-m", "y", "--no-plot", "--plot"])
    assert "more than once" not in repeatable.output  # -m is repeatable, flags may be flipped
