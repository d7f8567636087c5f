"""Toxic training text: load it (hub datasets or local files), split it into N disjoint sets, save them.

Texts travel as JSONL, one `{"text": ...}` a line: readable with any tool, diffable, and what
`taskvec train-splits` reads. A split directory holds `split-00.jsonl`, ... and a `splits.json`
manifest with the seed and a hash of every file, so a split can be checked and reproduced.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from taskvec.errors import TaskvecError, brief
from taskvec.hf import load_hub_dataset
from taskvec.jsonfile import read_json
from taskvec.outputs import check_output, staged_directory
from taskvec.rows import csv_rows, jsonl_objects, text_lines

DEFAULT_THRESHOLD = 0.8
FILE_SUFFIXES = (".jsonl", ".csv", ".parquet", ".txt")
MANIFEST = "splits.json"
MANIFEST_FORMAT = "taskvec-splits/1"


@dataclass(frozen=True)
class HubDataset:
    """A known toxic corpus on the Hugging Face hub and how to pick its toxic rows."""

    path: str
    config: str | None
    text_column: str
    score_column: str


HUB_DATASETS = {
    "google/civil_comments": HubDataset("google/civil_comments", None, "text", "toxicity"),
    "skg/toxigen-data": HubDataset("skg/toxigen-data", "train", "generation", "roberta_prediction"),
}
ALIASES = {"civil_comments": "google/civil_comments", "toxigen": "skg/toxigen-data"}


def load_texts(source: str, *, text_column: str | None = None, score_column: str | None = None,
               threshold: float | None = None, split: str = "train",
               max_rows: int | None = None) -> list[str]:
    """Texts of `source` whose score exceeds `threshold`, in the source's order, empty ones dropped.

    `source` is a local .jsonl/.csv/.parquet/.txt file (one text a line for .txt), a known
    corpus (`civil_comments` / `google/civil_comments`: toxicity > 0.8; `toxigen` /
    `skg/toxigen-data`: roberta_prediction > 0.8), or any other hub dataset with a text column.
    Columns and threshold default to the corpus's own (`text`, no filtering, for other sources);
    a score column given without a threshold filters at 0.8. `split` applies to hub datasets only.
    """
    if max_rows is not None and max_rows < 1:
        raise TaskvecError(f"max_rows must be at least 1, got {max_rows}")
    known = HUB_DATASETS.get(ALIASES.get(source, source))
    if known is not None:
        text_column = text_column or known.text_column
        score_column = score_column or known.score_column
    text_column = text_column or "text"
    if threshold is not None and score_column is None:
        raise TaskvecError(f"{source}: a threshold needs a score column to compare against")
    if threshold is not None and not math.isfinite(threshold):
        raise TaskvecError(f"threshold {threshold} is not a finite number")
    if score_column is not None and threshold is None:
        threshold = DEFAULT_THRESHOLD

    path = Path(source)
    if known is None and (path.exists() or path.suffix.lower() in FILE_SUFFIXES):
        columns = _read_file(path, [text_column] + ([score_column] if score_column else []))
    else:
        dataset_path = known.path if known else source
        columns = _read_hub(dataset_path, known.config if known else None, split,
                            [text_column] + ([score_column] if score_column else []))
    texts = columns[text_column]
    if score_column is not None:
        scores = columns[score_column]
        texts = [t for t, s in zip(texts, scores, strict=True) if _above(_score(s, source, score_column), threshold)]
    odd = next((t for t in texts if t is not None and not isinstance(t, str)), None)
    if odd is not None:  # a number where text belongs: a wrong --text-column, not a text to drop
        raise TaskvecError(f"{source}: column {text_column!r} holds a {type(odd).__name__} ({odd!r}), not text")
    kept = [t for t in texts if isinstance(t, str) and t.strip()]
    if not kept:
        rule = f" with {score_column} > {threshold}" if score_column else ""
        raise TaskvecError(f"{source}: no non-empty texts in column {text_column!r}{rule}")
    return kept[:max_rows]


def _above(score: float, threshold: float) -> bool:
    """score > threshold, in float32 where the score is a float32 value: hub datasets store scores
    so (civil_comments' toxicity), and a float32 0.8 is 0.800000011920929, above the 0.8 it equals."""
    single = np.float32(score)
    if math.isfinite(score) and float(single) == score:
        return bool(single > np.float32(threshold))
    return score > threshold


def _score(value, source: str, column: str) -> float:
    if value is None or (isinstance(value, str) and not value.strip()):
        return float("-inf")  # a missing score (JSON null, empty CSV cell) never passes the threshold
    if isinstance(value, bool):
        raise TaskvecError(f"{source}: score column {column!r} holds a boolean, not a number: {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TaskvecError(f"{source}: score column {column!r} holds a non-number: {value!r}") from None


def _read_file(path: Path, columns: list[str]) -> dict[str, list]:
    """The named columns of a local file, each as a list; a missing column is an error."""
    if not path.is_file():
        raise TaskvecError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    suffix = path.suffix.lower()  # ROWS.CSV is a CSV file
    if suffix not in FILE_SUFFIXES:
        raise TaskvecError(f"{path}: unsupported file type; use one of {', '.join(FILE_SUFFIXES)}")
    if suffix == ".txt":
        if columns != ["text"]:
            raise TaskvecError(f"{path}: a .txt file has one text a line and no other columns")
        return {"text": [line.rstrip("\r\n") for line in text_lines(path)]}  # not str.splitlines: U+2028 is text
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            schema = pq.read_schema(path)
            _require_columns(path, columns, schema.names)
            table = pq.read_table(path, columns=columns)
        except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
            raise TaskvecError(f"{path}: not a readable parquet file ({brief(err)})") from None
        return {name: table.column(name).to_pylist() for name in columns}
    if suffix == ".csv":
        header, rows = csv_rows(path)
        _require_columns(path, columns, header)
        return {name: [row[name] for _, row in rows] for name in columns}
    rows = jsonl_objects(path)
    for number, row in rows:
        missing = [name for name in columns if name not in row]
        if missing:
            raise TaskvecError(f"{path}:{number}: no column {missing[0]!r} (columns: {', '.join(row) or 'none'})")
    return {name: [row[name] for _, row in rows] for name in columns}


def _require_columns(where, wanted: list[str], available: list[str]) -> None:
    missing = [name for name in wanted if name not in available]
    if missing:
        raise TaskvecError(f"{where}: no column {missing[0]!r} (columns: {', '.join(available) or 'none'})")


def _read_hub(dataset_path: str, config: str | None, split: str, columns: list[str]) -> dict[str, list]:
    """The named columns of a hub dataset split, through datasets.load_dataset (cached locally)."""
    hint = "or pass a local .jsonl/.csv/.parquet/.txt file (with --text-column, and --score-column to filter)"
    dataset = load_hub_dataset(dataset_path, config, split, local_hint=hint)
    _require_columns(f"{dataset_path} ({split})", columns, dataset.column_names)
    table = dataset.with_format("arrow")  # whole columns at once: row-by-row access is 100x slower
    return {name: table[name].to_pylist() for name in columns}


def write_jsonl(texts: Iterable[str], path: str | Path) -> Path:
    """Write one `{"text": ...}` per line, atomically (a temporary file beside `path`, renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent,
                                         prefix=f".{path.name}.", suffix=".tmp", delete=False)
    try:
        with handle:
            for text in texts:
                handle.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
    return path


def read_jsonl(path: str | Path) -> list[str]:
    """The `text` field of every line of a JSONL file written by write_jsonl (or alike)."""
    path = Path(path)
    if not path.is_file():
        raise TaskvecError(f"{path}: no such file")
    texts = []
    for number, record in jsonl_objects(path):
        text = record.get("text")
        if not isinstance(text, str):
            raise TaskvecError(f"{path}:{number}: no string 'text' field")
        texts.append(text)
    return texts


def split_order(n_texts: int, seed: int) -> list[int]:
    """A seeded permutation of range(n_texts), the same on every Python and platform.

    Sorting by a keyed hash of each index avoids depending on random's or numpy's algorithms,
    which are free to change between versions.
    """
    key = seed.to_bytes(8, "little", signed=True)
    return sorted(range(n_texts), key=lambda i: hashlib.blake2b(i.to_bytes(8, "little"), key=key).digest())


def split_texts(texts: list[str], n_splits: int, seed: int = 0) -> list[list[str]]:
    """Deal seeded-shuffled texts into n_splits disjoint lists whose sizes differ by at most one."""
    if n_splits < 1:
        raise TaskvecError(f"the number of splits must be at least 1, got {n_splits}")
    if not texts:
        raise TaskvecError("cannot split an empty dataset")
    if n_splits > len(texts):
        raise TaskvecError(f"cannot make {n_splits} non-empty splits of {len(texts)} texts")
    order = split_order(len(texts), seed)
    return [[texts[i] for i in order[k::n_splits]] for k in range(n_splits)]


def texts_hash(texts: Iterable[str]) -> str:
    """sha256 of the texts as write_jsonl stores them, to tell data sets apart."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update((json.dumps({"text": text}, ensure_ascii=False) + "\n").encode())
    return digest.hexdigest()


def split_file(k: int) -> str:
    return f"split-{k:02d}.jsonl"


def save_splits(texts: list[str], n_splits: int, output_dir: str | Path, seed: int = 0, *,
                source: str | None = None, overwrite: bool = False) -> list[Path]:
    """Split `texts` and write `output_dir/split-00.jsonl`, ... and the `splits.json` manifest.

    Everything is written into a temporary directory beside `output_dir` and renamed into place
    last, so a split directory either is complete or does not exist.
    """
    output_dir = check_output(output_dir, [source] if source else [], overwrite)
    splits = split_texts(texts, n_splits, seed)
    with staged_directory(output_dir, overwrite) as staging:
        for k, split in enumerate(splits):
            write_jsonl(split, staging / split_file(k))
        manifest = {
            "format": MANIFEST_FORMAT,
            "n_splits": n_splits,
            "seed": seed,
            "n_texts": len(texts),
            "source": source,
            "source_sha256": texts_hash(texts),
            "splits": [{"file": split_file(k), "size": len(split), "sha256": texts_hash(split)}
                       for k, split in enumerate(splits)],
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return [output_dir / split_file(k) for k in range(n_splits)]


def read_manifest(splits_dir: str | Path) -> dict:
    """The `splits.json` of a split directory, checked for the fields train-splits relies on."""
    path = Path(splits_dir) / MANIFEST
    if not path.is_file():
        raise TaskvecError(f"{splits_dir}: not a split directory (no {MANIFEST}; make one with `taskvec data split`)")
    manifest = read_json(path, expect=dict)
    if manifest.get("format") != MANIFEST_FORMAT:
        raise TaskvecError(f"{path}: not a {MANIFEST_FORMAT} manifest")
    n_splits, splits = manifest.get("n_splits"), manifest.get("splits")
    if not isinstance(n_splits, int) or isinstance(n_splits, bool) or n_splits < 1:
        raise TaskvecError(f"{path}: n_splits must be a positive integer, not {n_splits!r}")
    if not isinstance(splits, list) or len(splits) != n_splits:
        count = len(splits) if isinstance(splits, list) else "no"
        raise TaskvecError(f"{path}: n_splits is {n_splits} but it lists {count} splits")
    for k, entry in enumerate(splits):
        if not (isinstance(entry, dict) and all(isinstance(entry.get(key), str) for key in ("file", "sha256"))):
            raise TaskvecError(f"{path}: split {k} needs a file name and a sha256")
        if Path(entry["file"]).name != entry["file"]:
            raise TaskvecError(f"{path}: split {k} names {entry['file']!r}, not a file inside {splits_dir}")
    files = [entry["file"] for entry in splits]
    repeated = next((file for file in files if files.count(file) > 1), None)
    if repeated is not None:  # one file for two splits: they would not be disjoint, its rows trained twice
        first, second = [k for k, file in enumerate(files) if file == repeated][:2]
        raise TaskvecError(f"{path}: splits {first} and {second} both name {repeated!r}; splits must be disjoint")
    return manifest


def read_split(splits_dir: str | Path, k: int, manifest: dict | None = None) -> list[str]:
    """Texts of split k, checked against the manifest's hash so a changed file is caught.

    Pass the `manifest` read_manifest returned to read several splits without re-reading it.
    """
    manifest = read_manifest(splits_dir) if manifest is None else manifest
    n_splits = manifest["n_splits"]
    if not 0 <= k < n_splits:
        raise TaskvecError(f"{splits_dir}: split index {k} out of range (0..{n_splits - 1})")
    entry = manifest["splits"][k]
    texts = read_jsonl(Path(splits_dir) / entry["file"])
    if texts_hash(texts) != entry["sha256"]:
        raise TaskvecError(f"{Path(splits_dir) / entry['file']}: contents differ from {MANIFEST} "
                           "(file changed after splitting)")
    return texts
