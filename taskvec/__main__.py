"""`python -m taskvec` runs the CLI."""

from taskvec.cli import main

main()
