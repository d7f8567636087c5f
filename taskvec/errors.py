"""The one exception type users see: a one-line message naming the file and tensor at fault."""


class TaskvecError(Exception):
    """Bad input or an impossible request; the CLI prints the message alone, without a traceback."""
