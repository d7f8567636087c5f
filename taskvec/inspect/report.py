"""Files and the terminal table of `taskvec inspect`: stats.json holds every number, tensors.csv one
row per tensor and vector, and task_vector_histogram/<vector>/counts.npy and bin_edges.npy the
absolute histogram as the original get_task_vector_histogram saved it (numpy.histogram's output)."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import numpy as np

from taskvec.jsonfile import write_json

STATS_FILE = "stats.json"
TENSORS_FILE = "tensors.csv"
HISTOGRAM_DIR = "task_vector_histogram"
_SCALARS = ("l1", "l2", "linf", "lp", "min", "max", "mean", "rms", "zero_share")
_SHARES = ("below_abs", "below_rms", "below_std")


def write_report(directory: Path, stats: dict) -> list[str]:
    """Write stats.json, tensors.csv and the .npy histograms into `directory`; the names written."""
    write_json(directory / STATS_FILE, strict_json(stats), fsync=False)
    _write_csv(directory / TENSORS_FILE, stats)
    absolute = stats["histograms"]["absolute"]
    for vector, folder_name in zip(stats["vectors"], histogram_folders(stats["vectors"]), strict=True):
        folder = directory / HISTOGRAM_DIR / folder_name
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "counts.npy", np.asarray(absolute["counts"][vector], dtype=np.int64))
        np.save(folder / "bin_edges.npy", np.asarray(absolute["edges"], dtype=np.float64))
    return [STATS_FILE, TENSORS_FILE, HISTOGRAM_DIR]


def path_safe(name: str) -> str:
    """A vector's name as one path component."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip(".") or "vector"


def histogram_folders(vectors: list[str]) -> list[str]:
    """Each vector's folder under task_vector_histogram/: its name where that is path-safe, else
    its path-safe form, with -2, -3, ... where that is taken (`ft#1` beside a vector `ft_1`), so
    no histogram overwrites another."""
    folders = {vector: vector for vector in vectors if path_safe(vector) == vector}
    taken = set(folders)
    for vector in vectors:
        if vector in folders:
            continue
        folder, k = path_safe(vector), 1
        while folder in taken:
            k += 1
            folder = f"{path_safe(vector)}-{k}"
        taken.add(folder)
        folders[vector] = folder
    return [folders[vector] for vector in vectors]


def strict_json(value):
    """`value` with NaN and infinite floats as None: stats.json stays JSON that every parser reads
    (Python's json writes bare NaN and Infinity); the notes say which vectors hold such values."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(item) for item in value]
    return value


def _write_csv(path: Path, stats: dict) -> None:
    first = stats["tensors"][0]["vectors"][stats["vectors"][0]]
    share_columns = [(kind, level) for kind in _SHARES for level in first[kind]]
    header = ["tensor", "group", "numel", "base_std", "vector", *_SCALARS,
              *(f"{kind}_{level}" for kind, level in share_columns), "cosine_to_mean"]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for record in stats["tensors"]:
            to_mean = record["cross"].get("cosine_to_mean", {})
            for vector, values in record["vectors"].items():
                writer.writerow([record["name"], record["group"], record["numel"], repr(record["base_std"]), vector,
                                 *(repr(values[key]) for key in _SCALARS),
                                 *(repr(values[kind][level]) for kind, level in share_columns),
                                 repr(to_mean[vector]) if vector in to_mean else ""])


def table(stats: dict) -> str:
    """A few columns per vector, and a line on how the fine-tunes agree."""
    settings = stats["settings"]
    threshold, fraction = f"{max(settings['thresholds']):g}", f"{max(settings['rms_fractions']):g}"
    overall = stats["global"]
    to_mean = overall["cross"].get("cosine_to_mean", {})
    width = max(len(v) for v in stats["vectors"]) + 2
    lines = [f"{'vector':<{width}}{'L2':>11}{'Linf':>11}{'zero':>8}{'<' + threshold:>9}"
             f"{'<' + fraction + ' RMS':>11}{'cos(mean)':>11}"]
    for vector in stats["vectors"]:
        values = overall["vectors"][vector]
        cosine = f"{to_mean[vector]:.3f}" if to_mean.get(vector) is not None else "-"
        lines.append(f"{vector:<{width}}{values['l2']:>11.4g}{values['linf']:>11.4g}{values['zero_share']:>8.2%}"
                     f"{values['below_abs'][threshold]:>9.2%}{values['below_rms'][fraction]:>11.2%}{cosine:>11}")
    cross = overall["cross"]
    if "all_agree" in cross:
        lines.append(f"{len(stats['finetuned'])} fine-tunes: mean pairwise cosine {cross['mean_pairwise_cosine']:.3f}, "
                     f"sign agreement {cross['mean_pairwise_sign_agreement']:.2%}, all agree in sign on "
                     f"{cross['all_agree']:.2%} (by chance {cross['all_agree_by_chance']:.2%})")
    return "\n".join(lines)
