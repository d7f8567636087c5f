"""JSON in and out, in one place: every file taskvec reads or writes as JSON goes through here.

Reading turns every way a JSON text can be bad (not UTF-8, not JSON, nested deeper than the
parser's recursion limit, the wrong kind of top-level value) into one TaskvecError line that
names the file, so no command shows a traceback for a hostile or broken JSON file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from taskvec.errors import TaskvecError
from taskvec.files import read_regular

__all__ = ["dumps", "parse_json", "read_json", "write_json"]

_KINDS = {dict: "a JSON object", list: "a JSON array"}


def parse_json(text: str | bytes, where: str | Path, expect: type | None = None, *,
               unique_keys: bool = False) -> object:
    """Parse `text`; `where` (a file name, or "file: field") prefixes any error. `unique_keys`
    refuses an object that repeats a key (JSON parsers silently keep the last one).

    >>> parse_json('{"a": 1}', "config.json", expect=dict)
    {'a': 1}
    """
    try:
        hook = _unique(where) if unique_keys else None
        value = json.loads(text.decode("utf-8") if isinstance(text, bytes) else text, object_pairs_hook=hook)
    except UnicodeDecodeError:
        raise TaskvecError(f"{where}: not valid UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise TaskvecError(f"{where}: not valid JSON ({err})") from None
    except RecursionError:
        raise TaskvecError(f"{where}: JSON nested too deeply to read") from None
    except ValueError as err:  # an integer longer than Python converts (sys.get_int_max_str_digits)
        raise TaskvecError(f"{where}: not valid JSON ({err})") from None
    if expect is not None and not isinstance(value, expect):
        raise TaskvecError(f"{where}: expected {_KINDS.get(expect, expect.__name__)}, "
                           f"found {type(value).__name__}")
    return value


def _unique(where):
    def pairs(items: list[tuple[str, object]]) -> dict:
        value = dict(items)
        if len(value) != len(items):
            seen = set()
            repeated = next(key for key, _ in items if key in seen or seen.add(key))
            raise TaskvecError(f"{where}: key {repeated!r} appears twice")
        return value

    return pairs


def read_json(path: str | Path, expect: type | None = None, *, unique_keys: bool = False) -> object:
    """Read and parse a JSON file: errors name the file, whatever went wrong."""
    path = Path(path)
    return parse_json(read_regular(path), path, expect, unique_keys=unique_keys)


def dumps(value: object) -> str:
    """The project's JSON style for files people read: indented, UTF-8, a final newline."""
    return json.dumps(value, indent=2, ensure_ascii=False) + "\n"


def write_json(path: str | Path, value: object, *, fsync: bool = True) -> None:
    """Write `value` to `path` through a temporary file renamed into place (never half a file)."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(dumps(value))
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
