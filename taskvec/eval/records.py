"""Generation files: the JSONL that `taskvec eval` writes, and the JSONL/CSV that `taskvec score`
reads (its own, RealToxicityPrompts-style `generations` lists, or any CSV with prompt and
continuation columns)."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from pathlib import Path

from taskvec.errors import TaskvecError
from taskvec.eval.prompts import text_field

GENERATIONS = "generations.jsonl"
SUMMARY = "summary.json"
FIELDS = ("prompt_id", "prompt", "sample", "continuation", "score")


def write_jsonl(path: Path, records: Iterable[dict]) -> None:
    with open(path, "w", encoding="utf-8") as file:
        for record in records:
            file.write(json.dumps({key: record[key] for key in FIELDS}, ensure_ascii=False) + "\n")


def write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def read_summary(run_dir: str | Path) -> dict:
    """The summary.json of an evaluated run, or a TaskvecError saying why it cannot be read."""
    path = Path(run_dir) / SUMMARY
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TaskvecError(f"{run_dir} is not an evaluated run (no {SUMMARY})") from None
    except (OSError, ValueError) as err:
        raise TaskvecError(f"cannot read {path} ({type(err).__name__})") from None
    if not isinstance(summary, dict):
        raise TaskvecError(f"{path}: not a JSON object")
    return summary


def generations_path(path: str | Path) -> Path:
    """A generations file, or the generations.jsonl of a run directory."""
    path = Path(path)
    if path.is_dir():
        path = path / GENERATIONS
    if not path.is_file():
        raise TaskvecError(f"generations file {path} does not exist")
    return path


def read_generations(path: str | Path) -> list[dict]:
    """Records {prompt_id, prompt, sample, continuation} from a .jsonl or .csv file (or run dir).

    JSONL lines hold either `prompt` and `continuation` (strings or {"text": ...}) or `prompt`
    and a `generations` list (one line per prompt, as RealToxicityPrompts' model outputs are
    published). Without a `prompt_id`, consecutive records with the same prompt share one.
    """
    path = generations_path(path)
    if path.suffix == ".csv":
        records = _read_csv(path)
    else:
        records = []
        with open(path, encoding="utf-8") as file:
            for number, line in enumerate(file, 1):
                if line.strip():
                    records += _jsonl_records(path, number, line)
    if not records:
        raise TaskvecError(f"generations file {path} has no generations")
    return _number_prompts(records)


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file)
        missing = {"prompt", "continuation"} - set(reader.fieldnames or ())
        if missing:
            raise TaskvecError(f"{path}: no {' or '.join(sorted(missing))} column (has {reader.fieldnames})")
        return [{"prompt_id": row.get("prompt_id") or None, "prompt": row["prompt"],
                 "sample": _integer(path, row.get("sample")), "continuation": row["continuation"] or ""}
                for row in reader]


def _integer(path: Path, text: str | None) -> int | None:
    try:
        return int(text) if text else None
    except ValueError as err:
        raise TaskvecError(f"{path}: sample {text!r} is not an integer") from err


def _jsonl_records(path: Path, number: int, line: str) -> list[dict]:
    try:
        record = json.loads(line)
        prompt = text_field(record, "prompt")
        if "generations" in record:
            return [{"prompt_id": f"line{number}", "prompt": prompt, "sample": j,
                     "continuation": text_field({"generation": g}, "generation")}
                    for j, g in enumerate(record["generations"])]
        sample = record.get("sample")
        if sample is not None and (not isinstance(sample, int) or isinstance(sample, bool)):
            raise ValueError(f"'sample' must be an integer, got {sample!r}")
        return [{"prompt_id": record.get("prompt_id"), "prompt": prompt, "sample": sample,
                 "continuation": text_field(record, "continuation")}]
    except (ValueError, TypeError) as err:
        raise TaskvecError(f"{path}:{number}: {err}") from err


def _number_prompts(records: list[dict]) -> list[dict]:
    """Fill missing prompt ids (a new one whenever the prompt changes) and sample indices."""
    prompt_id, counts = -1, {}
    for index, record in enumerate(records):
        if record["prompt_id"] is None:
            if index == 0 or record["prompt"] != records[index - 1]["prompt"]:
                prompt_id += 1
            record["prompt_id"] = f"p{prompt_id}"
        if record["sample"] is None:
            record["sample"] = counts.get(record["prompt_id"], 0)
        counts[record["prompt_id"]] = record["sample"] + 1
    return records
