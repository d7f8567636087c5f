"""The one exception type users see: a one-line message naming the file and tensor at fault."""


class TaskvecError(Exception):
    """Bad input or an impossible request; the CLI prints the message alone, without a traceback."""


def brief(err: BaseException, limit: int = 200, *, last: bool = False) -> str:
    """Another library's exception as one short line for a TaskvecError: its first line (or its
    last, where a library puts the cause there), white space folded, at most `limit` characters,
    cut at a word boundary."""
    lines = [line for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
    text = " ".join((lines[-1] if last else lines[0]).split())
    if len(text) <= limit:
        return text
    cut = text[:limit - 3]
    return (cut.rsplit(" ", 1)[0] if " " in cut else cut) + "..."
