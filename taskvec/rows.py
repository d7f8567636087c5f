"""Text, JSONL and CSV inputs read in one place, as taskvec.jsonfile is for JSON.

Every way such a file can be bad (not UTF-8, a line that is not a JSON object or is nested too
deeply, a CSV field over the csv module's limit, a field of the wrong type) becomes one
TaskvecError naming the file and line, so no command shows a traceback for it.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

from taskvec.errors import TaskvecError
from taskvec.files import read_regular
from taskvec.jsonfile import parse_json

NUMBER = (int, float)
_NAMES = {str: "a string", int: "an integer", NUMBER: "a number", dict: "an object", list: "a list",
          (str, int): "a string or an integer"}


def read_text(path: str | Path) -> str:
    """The file decoded as UTF-8; bad bytes are an error naming the line they are on."""
    path = Path(path)
    raw = read_regular(path)
    try:
        return raw.decode("utf-8-sig")  # a byte-order mark (Excel's "CSV UTF-8", Notepad) is no text
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise TaskvecError(f"{path}:{line}: not valid UTF-8 text ({err.reason} at byte {err.start})") from None


def text_lines(path: str | Path) -> list[str]:
    """The lines of a text file, split as open() splits them (\\n, \\r\\n or \\r), ends kept."""
    return list(io.StringIO(read_text(path), newline=None))


def jsonl_objects(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file; a string with a lone
    surrogate escape ("\\ud800", valid JSON but no text) is refused, naming its line: no output
    file could hold it as UTF-8."""
    objects = []
    for number, line in enumerate(text_lines(path), 1):
        if line.strip():
            value = parse_json(line, f"{path}:{number}", expect=dict)
            if "\\u" in line:
                _check_text(value, f"{path}:{number}")
            objects.append((number, value))
    return objects


def _check_text(value: dict, where: str) -> None:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as err:
        raise TaskvecError(f"{where}: a string holds a lone surrogate ({err.object[err.start:err.end]!r}), "
                           "which is not text") from None


def csv_rows(path: str | Path) -> tuple[list[str], list[tuple[int, dict]]]:
    """The header and (first line, row) of each record of a CSV file, as csv.DictReader reads
    them (blank lines skipped, a short row's missing fields None), numbered by its first line."""
    reader = csv.reader(io.StringIO(read_text(path), newline=""))
    header, rows, start = None, [], 1
    try:
        for fields in reader:
            if header is None:
                header = fields
            elif fields:
                rows.append((start, {name: fields[i] if i < len(fields) else None for i, name in enumerate(header)}))
            start = reader.line_num + 1
    except csv.Error as err:  # e.g. a field over csv.field_size_limit() (128 KiB)
        raise TaskvecError(f"{path}:{start}: not readable as CSV ({err})") from None
    repeated = next((name for name in header or [] if header.count(name) > 1), None)
    if repeated is not None:  # DictReader keeps the last column of a name: which one was meant?
        raise TaskvecError(f"{path}:1: the header names column {repeated!r} twice")
    return header or [], rows


def check_fields(record: dict, types: dict[str, type | tuple], where: str | Path) -> None:
    """Check that each field (a key, or "outer.inner" inside an object) is null, absent or of its
    type; a boolean is never a number, nor an integer too large for a float. List an object
    before the fields inside it."""
    for name, kind in types.items():
        value = record
        for key in name.split("."):
            value = value.get(key) if isinstance(value, dict) else None
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            raise TaskvecError(f"{where}: {name!r} must be {_NAMES.get(kind, kind)} or null, "
                               f"not {type(value).__name__}")
        if kind == NUMBER and isinstance(value, int) and abs(value) > sys.float_info.max:
            raise TaskvecError(f"{where}: {name!r} is too large a number")
