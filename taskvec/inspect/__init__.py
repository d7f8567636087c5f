"""Statistics of task vectors, streamed: the paper's "decoupling" evidence for any set of models.

`inspect_checkpoints` reads a base, N fine-tunes and any merged models once, chunk by chunk,
through the merge's own planning and readers (taskvec.stream: canonical names, dtype casts,
LoRA adapters, its one-line errors), and measures tau_i = ft_i - base, their mean and M - base:
norms, extremes, near-zero shares on absolute and per-tensor relative scales, histograms of
|tau| on both scales, and cosines and sign agreement across vectors (docs/inspect.md).

    accumulators  float64 sums, exact counts, the per-tensor relative grid (torch: the reference, CUDA)
    keys          the relative grid's keys (bits of |tau|), shared by both
    loops         the same statistics as compiled loops over cache-sized tiles (numba, no torch)
    fused         the CPU pass: the loops on a thread per core, closed into the reference's totals
    warm          loading the loops on a thread, beside torch's import
    stream        the pass over the plan's jobs
    mapped        inputs read in place from read-only mappings (the CPU pass)
    summary       statistics from the sums, per tensor, group and overall
    groups        tensor groups by name
    report        stats.json, tensors.csv, counts.npy/bin_edges.npy, the terminal table
    plots         the PNGs (matplotlib, imported only for them)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from taskvec.errors import TaskvecError
from taskvec.inspect.settings import Settings

__all__ = ["DEFAULT_CHUNK_SIZE", "Settings", "inspect_checkpoints"]

DEFAULT_CHUNK_SIZE = "4MiB"  # float32 bytes of all vectors' chunks together (the torch path's temporaries: ~10x)


def inspect_checkpoints(
    base: str | Path,
    finetuned: Sequence[str | Path] = (),
    *,
    merged: Sequence[str | Path] = (),
    output: str | Path | None = None,
    chunk_size: str | int = DEFAULT_CHUNK_SIZE,
    device: str = "cpu",
    plot: bool = True,
    overwrite: bool = False,
    strict: bool = False,
    progress: bool | None = None,
    **settings,
) -> dict:
    """Measure the task vectors of `finetuned` (and `merged`) against `base` in one pass; return
    the statistics (stats.json's content), and with `output` write the report there.

    settings: the fields of `Settings` (p, thresholds, rms_fractions, std_fractions, bins,
    range, norm_range, log_bins, log_decades). chunk_size: elements per step as float32 bytes,
    shared by all vectors, so memory does not grow with their number. device: cpu or cuda.
    """
    chosen = Settings(**settings)
    finetuned, merged = list(finetuned), list(merged)
    if not finetuned and not merged:
        raise TaskvecError("nothing to inspect: give at least one fine-tuned or merged model")
    if device == "cpu":
        from taskvec.inspect import warm

        warm.start()
    import torch

    from taskvec import __version__
    from taskvec.inspect.stream import run_pass
    from taskvec.inspect.summary import summarize
    from taskvec.io.checkpoint import open_checkpoint, resolve_model_path
    from taskvec.io.shards import parse_size
    from taskvec.merge import check_distinct, input_label
    from taskvec.progress import progress_bar
    from taskvec.stream import plan_merge

    names = [base, *finetuned, *merged]
    paths = [resolve_model_path(name) for name in names]
    check_distinct(paths)
    if output is not None:
        from taskvec.outputs import check_output

        output = check_output(output, paths, overwrite)
    where = _device(device, torch)
    checkpoints = [open_checkpoint(path, input_label(name, path)) for name, path in zip(names, paths, strict=True)]
    n_finetuned = len(finetuned)
    labels = _unique([c.label for c in checkpoints[1:]], reserved={"mean"} if n_finetuned >= 2 else set())
    vectors = labels[:n_finetuned] + ["mean"] * (n_finetuned >= 2) + labels[n_finetuned:]
    per_vector = max(4, parse_size(chunk_size) // len(vectors))
    plan = plan_merge(checkpoints, chunk_bytes=per_vector, strict=strict)
    measured = {s.name for job in plan.jobs if job.kind == "combine" for s in job.segments if s.numel}
    skipped = list(dict.fromkeys(s.name for job in plan.jobs if job.kind != "combine" for s in job.segments))
    empty = [spec.name for spec in plan.outputs if spec.name not in measured and spec.name not in skipped]
    if not measured:
        raise TaskvecError(f"{checkpoints[0].path}: no floating-point entries to inspect")
    notes = plan.notes + plan.cast_note("each tensor is read as float32 (float64 where an input holds it so) "
                                        "and measured in float64")
    notes += [f"{len(names)} {what} skipped ({', '.join(names[:3])}{' ...' if len(names) > 3 else ''})"
              for what, names in (("integer or boolean buffers", skipped), ("empty tensors", empty)) if names]
    bytes_read = sum(job.nbytes_in * plan.n_inputs for job in plan.jobs if job.kind == "combine")
    bar = progress_bar(progress, total=bytes_read, unit="B", unit_scale=True, desc="taskvec inspect")
    try:
        result = run_pass(plan, n_finetuned, len(merged), chosen, where, bar)
    finally:
        bar.close()
    shapes = {spec.name: spec.shape for spec in plan.outputs}
    stats = {
        "taskvec_version": __version__,
        "base": checkpoints[0].label,
        "finetuned": [c.label for c in checkpoints[1:1 + n_finetuned]],
        "merged": [c.label for c in checkpoints[1 + n_finetuned:]],
        "vectors": vectors,
        "settings": chosen.as_dict() | {"relative_grid_bits": 8},
        "notes": notes + _nonfinite_notes(result.tensors, vectors),
        "bytes_read": bytes_read,
        **summarize(result.tensors, shapes, result.base_std, vectors, n_finetuned, chosen),
        "histograms": {kind: _histogram(counts, chosen.edges(top), vectors) for kind, counts, top in (
            ("absolute", result.hist_abs, chosen.range), ("normalised", result.hist_norm, chosen.norm_range))},
    }
    if output is not None:
        _write(Path(output), stats, plot, overwrite)
    return stats


def _write(output: Path, stats: dict, plot: bool, overwrite: bool) -> None:
    from taskvec.inspect.report import write_report
    from taskvec.outputs import staged_directory

    with staged_directory(output, overwrite) as staging:
        write_report(staging, stats)
        if plot:
            from taskvec.inspect.plots import write_plots

            write_plots(staging, stats)


def _nonfinite_notes(tensors: dict, vectors: list[str]) -> list[str]:
    """A note per vector with NaN or infinite entries, naming its tensors: their statistics are
    not numbers a reader should compare."""
    import numpy as np

    found: dict[str, list[str]] = {}
    for name, totals in tensors.items():
        for row in np.flatnonzero(~(np.isfinite(totals.mx) & np.isfinite(totals.mn))):
            found.setdefault(vectors[row], []).append(name)
    return [f"{vector}: NaN or infinite entries in {len(names)} tensor{'s' * (len(names) > 1)} ({', '.join(names[:3])}"
            f"{' ...' if len(names) > 3 else ''}): norms and RMS over them are NaN or infinite, and shares relative "
            "to the RMS mean nothing there" for vector, names in found.items()]


def _histogram(counts, edges, vectors: list[str]) -> dict:
    """A histogram as numpy.histogram gives it (`bins` counts, `bins + 1` edges), and what fell
    outside its range."""
    return {"edges": edges.tolist(),
            "counts": {v: counts[row, 1:-1].tolist() for row, v in enumerate(vectors)},
            "below_range": {v: int(counts[row, 0]) for row, v in enumerate(vectors)},
            "above_range": {v: int(counts[row, -1]) for row, v in enumerate(vectors)}}


def _device(name: str, torch):
    if name not in ("cpu", "cuda"):
        raise TaskvecError(f"unknown device {name!r}: use cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise TaskvecError("--device cuda: no CUDA device is available (use --device cpu)")
    return torch.device(name)


def _unique(labels: list[str], reserved: set[str]) -> list[str]:
    """Vector names: numbered where two inputs share a directory name, or where one is named like
    a vector of its own (`mean`, which stays the mean's name)."""
    seen: dict[str, int] = {}
    result = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        alone = labels.count(label) == 1 and label not in reserved
        result.append(label if alone else f"{label}#{seen[label]}")
    return result
