"""`python -m taskvec` runs the CLI."""

from taskvec.cli import run

run()
