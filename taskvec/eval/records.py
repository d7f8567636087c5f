"""Generation files: the JSONL that `taskvec eval` writes, and the JSONL/CSV that `taskvec score`
reads (its own, RealToxicityPrompts-style `generations` lists, or any CSV with prompt and
continuation columns)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from taskvec.errors import TaskvecError
from taskvec.eval.prompts import text_field
from taskvec.jsonfile import read_json
from taskvec.rows import NUMBER, check_fields, csv_rows, jsonl_objects

GENERATIONS = "generations.jsonl"
SUMMARY = "summary.json"
FIELDS = ("prompt_id", "prompt", "sample", "continuation", "score")
METRICS = ("expected_max_toxicity", "toxicity_probability", "mean_toxicity", "fraction_toxic", "n_prompts")
# the summary fields that compare and score read back, and their types (each may be null)
SUMMARY_FIELDS = {"model": str, "perplexity": NUMBER, "settings": dict, "scorer": dict, "metrics": dict,
                  "settings.samples": int, "scorer.name": str,
                  **{f"metrics.{key}": int if key == "n_prompts" else NUMBER for key in METRICS}}


def write_jsonl(path: Path, records: Iterable[dict]) -> None:
    with open(path, "w", encoding="utf-8") as file:
        for record in records:
            file.write(json.dumps({key: record[key] for key in FIELDS}, ensure_ascii=False) + "\n")


def write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def read_summary(run_dir: str | Path) -> dict:
    """The summary.json of an evaluated run, checked for the types of the fields read back."""
    path = Path(run_dir) / SUMMARY
    if not path.exists():
        raise TaskvecError(f"{run_dir} is not an evaluated run (no {SUMMARY})")
    summary = read_json(path, expect=dict)
    check_fields(summary, SUMMARY_FIELDS, path)
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
    if path.suffix.lower() == ".csv":
        records = _read_csv(path)
    else:
        records = [generation for number, record in jsonl_objects(path)
                   for generation in _jsonl_records(path, number, record)]
    if not records:
        raise TaskvecError(f"generations file {path} has no generations")
    records = _number_prompts(records, path)
    seen = set()
    for record in records:  # a line given twice would count twice in every metric
        key = (record["prompt_id"], record["sample"])
        if key in seen:
            raise TaskvecError(f"{path}: prompt {key[0]!r} has sample {key[1]} twice")
        seen.add(key)
    return records


def _read_csv(path: Path) -> list[dict]:
    header, rows = csv_rows(path)
    missing = {"prompt", "continuation"} - set(header)
    if missing:
        raise TaskvecError(f"{path}: no {' or '.join(sorted(missing))} column (has {header})")
    records = []
    for number, row in rows:
        if row["prompt"] is None:
            raise TaskvecError(f"{path}:{number}: no prompt (the row has fewer fields than the header)")
        records.append({"prompt_id": row.get("prompt_id") or None, "prompt": row["prompt"],
                        "sample": _integer(path, row.get("sample")), "continuation": row["continuation"] or ""})
    return records


def _integer(path: Path, text: str | None) -> int | None:
    try:
        return int(text) if text else None
    except ValueError:
        raise TaskvecError(f"{path}: sample {text!r} is not an integer") from None


def _jsonl_records(path: Path, number: int, record: dict) -> list[dict]:
    where = f"{path}:{number}"
    check_fields(record, {"prompt_id": (str, int), "sample": int}, where)
    try:
        prompt = text_field(record, "prompt")
        if "generations" in record:
            if not isinstance(record["generations"], list):
                raise ValueError("'generations' must be a list of strings or objects with a 'text' string")
            return [{"prompt_id": None, "line": number, "prompt": prompt, "sample": j,
                     "continuation": text_field({"generation": g}, "generation")}
                    for j, g in enumerate(record["generations"])]
        return [{"prompt_id": record.get("prompt_id"), "prompt": prompt, "sample": record.get("sample"),
                 "continuation": text_field(record, "continuation")}]
    except ValueError as err:
        raise TaskvecError(f"{where}: {err}") from None


def _number_prompts(records: list[dict], path: Path) -> list[dict]:
    """Fill missing prompt ids (a line's `generations` share one; else a new one whenever the
    prompt changes) and sample indices. Ids are given to all records or to none: one made up for
    a record could be another's own, and two prompts would then count as one."""
    given = sum(record["prompt_id"] is not None for record in records)
    if 0 < given < len(records):
        raise TaskvecError(f"{path}: {given} generations have a prompt_id and {len(records) - given} have none; "
                           "give every generation a prompt_id, or none")
    prompt_id, counts = -1, {}
    for index, record in enumerate(records):
        if "line" in record:
            record["prompt_id"] = f"line{record.pop('line')}"
        elif record["prompt_id"] is None:
            if index == 0 or record["prompt"] != records[index - 1]["prompt"]:
                prompt_id += 1
            record["prompt_id"] = f"p{prompt_id}"
        if record["sample"] is None:
            record["sample"] = counts.get(record["prompt_id"], 0)
        counts[record["prompt_id"]] = record["sample"] + 1
    return records
