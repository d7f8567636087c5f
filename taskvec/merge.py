"""`taskvec merge`, `negate` and `average`: resolve the inputs, check them, plan, stream, publish.

The arithmetic is a method's linear form (taskvec.methods), planned and streamed by the engine
(taskvec.stream): one read of every input, a few chunks of memory whatever N, the output built
in a temporary directory beside the target and renamed into place only when complete. Many
scales (a list) are written from that one read, one model directory per scale.
"""

from __future__ import annotations

import errno
import json
import math
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from taskvec import __version__
from taskvec.dtypes import ARITHMETIC_CODES, dtype_name, parse_dtype
from taskvec.errors import TaskvecError
from taskvec.io.checkpoint import Checkpoint, copy_side_files, open_checkpoint, resolve_model_path
from taskvec.io.layout import PROVENANCE
from taskvec.io.safetensors_file import DTYPES, encode_header
from taskvec.io.shards import ShardWriter, parse_size
from taskvec.jsonfile import dumps, write_json
from taskvec.methods import check_weights, get_method
from taskvec.outputs import check_output, resolve_path, staged_directory
from taskvec.stream import (
    DEFAULT_CHUNK_BYTES,
    JobReader,
    JobWriter,
    MergePlan,
    make_executor,
    make_general_executor,
    plan_merge,
)
from taskvec.stream.general import working_chunk_bytes

__all__ = ["DEFAULT_CHUNK_BYTES", "DEFAULT_MAX_SHARD_SIZE", "PROVENANCE_FILE", "MergeResult", "check_distinct",
           "input_label", "merge_checkpoints", "scale_dir"]

DEFAULT_MAX_SHARD_SIZE = "50GB"  # transformers' save_pretrained default
PROVENANCE_FILE = PROVENANCE


def scale_dir(scale: float) -> str:
    """The directory a multi-scale merge writes the model of `scale` to, inside its output."""
    return f"scale-{scale:g}"


@dataclass
class MergeResult:
    output: Path
    files: list[str]
    bytes_read: int
    bytes_written: int
    seconds: float
    notes: list[str] = field(default_factory=list)  # what the merge renamed, dropped, cast or skipped
    outputs: list[Path] = field(default_factory=list)  # the model directories, one per scale


def merge_checkpoints(
    finetuned: Sequence[str | Path],
    output: str | Path,
    *,
    base: str | Path | None = None,
    method: str = "negated_mean",
    scale: float | Sequence[float] = 1.0,
    weights: Sequence[float] | None = None,
    density: float | None = None,
    seed: int | None = None,
    dtype: str | torch.dtype | None = None,
    device: str = "cpu",
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    chunk_size: str | int = DEFAULT_CHUNK_BYTES,
    overwrite: bool = False,
    strict: bool = False,
    progress: bool | None = None,
) -> MergeResult:
    """Merge checkpoint directories into `output` in one streaming pass.

    method: 'negated_mean' (base - scale * (mean(ft) - base)), 'negate' (one fine-tune),
    'average' (mean of the fine-tunes; no base), or the non-linear 'ties' (density), 'dare' and
    'dare-ties' (density, seed), each writing base - scale * tau (taskvec.methods; docs/methods.md).
    weights: one per fine-tune, tau the weighted mean (weighted disjoint mean for ties and
    dare-ties); equal weights are the plain mean. density: fraction of each task vector kept, in
    (0, 1]. seed: DARE's mask seed, 0..2**32-1 (default 0). scale: a number, or a list of them: then
    `output/scale-X` (`scale_dir(X)`) is written for each, from one read of the inputs, each
    equal bit for bit to its single-scale merge. Inputs are model directories (safetensors or
    PyTorch .bin, single or sharded), single weight files, PEFT LoRA adapter directories, or hub
    ids. dtype: output dtype of floating tensors (default: the base's). strict: refuse fine-tune
    tensors the base does not have instead of leaving them out, and NaN/inf in the output
    instead of noting them. progress: a tqdm bar (None: only on a terminal).
    """
    from taskvec.progress import progress_bar

    started = time.perf_counter()
    params = {key: value for key, value in (("density", density), ("seed", seed)) if value is not None}
    chosen = get_method(method, **params)
    scales = _scales(scale, chosen.name)
    finetuned = list(finetuned)
    chosen.check_count(len(finetuned))
    weights = check_weights(weights, len(finetuned))
    names = chosen.inputs(base, finetuned)
    paths = [resolve_model_path(p) for p in names]
    check_distinct(paths)
    output = check_output(output, paths, overwrite)
    out_dtype = parse_dtype(dtype)
    checkpoints = [open_checkpoint(p, input_label(name, p)) for name, p in zip(names, paths, strict=True)]
    _check_files_outside(checkpoints, output)
    forms = chosen.forms(len(finetuned), scales, weights)
    chunk_bytes = parse_size(chunk_size)
    if not chosen.linear:  # all N chunks of a job are held at once: the chunk shrinks with N
        chunk_bytes = working_chunk_bytes(chunk_bytes, len(finetuned))
    plan = plan_merge(checkpoints, out_dtype, chunk_bytes, strict=strict)
    written_dtype = out_dtype or _floating_dtype(plan)
    targets = [Path(scale_dir(s)) for s in scales] if _is_list(scale) else [Path()]
    provenances = [{
        "taskvec_version": __version__,
        **chosen.provenance(),
        "scale": s if chosen.needs_base else None,
        "n_finetuned": len(finetuned),
        "base": _identity(checkpoints[0]) if base is not None else None,
        "finetuned": [_identity(c) for c in checkpoints[-len(finetuned):]],
        **({"base_coef": form.base_coef, "sum_coef": form.sum_coef} if chosen.linear else {}),
        **({"weights": list(form.weights)} if weights else {}),  # as applied: scaled by a power of two
        "dtype": dtype_name(out_dtype) if out_dtype else "as input",
        "left_out": plan.extras,
    } for s, form in zip(scales, forms, strict=True)]
    metadatas = [{"format": "pt", "taskvec": json.dumps(p, separators=(",", ":"))} for p in provenances]
    config_updates = _config_updates(checkpoints[0].config, written_dtype)
    _check_free_space(output, plan, metadatas, checkpoints[0], provenances)
    executor = _executor(chosen, weights, device)
    passes = 0 if chosen.linear else getattr(chosen.statistics(len(finetuned)), "passes", 0)
    reader = JobReader()
    with staged_directory(output, overwrite) as staging:
        for target in targets:
            (staging / target).mkdir(exist_ok=True)
        shards = [ShardWriter(staging / target, plan.outputs, parse_size(max_shard_size), metadata)
                  for target, metadata in zip(targets, metadatas, strict=True)]
        writers = [JobWriter(s) for s in shards]
        bar = progress_bar(progress, total=plan.bytes_read * (1 + passes), unit="B", unit_scale=True,
                           desc=f"taskvec {chosen.name}")
        try:
            with _output_errors(output), ExitStack() as stack:
                for writer in shards:
                    stack.enter_context(writer)
                executor.run(plan, forms, reader, writers, bar)
                nonfinite = [f"{target}: {note}" if target.name else note
                             for target, writer in zip(targets, writers, strict=True)
                             for note in _nonfinite_notes(plan, reader, writer.nonfinite)]
                if nonfinite and strict:
                    raise TaskvecError(f"{nonfinite[0]}; refused by --strict")
        finally:
            bar.close()
            reader.close()
        with _output_errors(output):
            for target, provenance in zip(targets, provenances, strict=True):
                skipped = copy_side_files(checkpoints[0], staging / target, config_updates)
                write_json(staging / target / PROVENANCE_FILE, provenance, fsync=False)
    cast = plan.cast_note("each is cast on read into the float32 sum; the output is "
                          f"{dtype_name(out_dtype) if out_dtype else 'in the base’s dtype'}")
    notes = plan.notes + cast + nonfinite + [f"not copied from {checkpoints[0].label}: {item}" for item in skipped]
    return MergeResult(output, shards[0].files, plan.bytes_read,
                       len(targets) * sum(spec.nbytes for spec in plan.outputs), time.perf_counter() - started,
                       notes, [output / target for target in targets])


def _executor(method, weights, device: str):
    """The fused-kernel executors for plain linear forms; the general torch executor (on the CPU
    or the GPU) for non-linear methods, and for weighted forms on a GPU."""
    if method.linear and (weights is None or device == "cpu" or (device == "auto" and not torch.cuda.is_available())):
        return make_executor(device)
    return make_general_executor(device)


def _is_list(scale) -> bool:
    return not isinstance(scale, (int, float))


def _scales(scale: float | Sequence[float], method: str) -> list[float]:
    """The scales to write: each a finite float32 number, no two with the same directory."""
    scales = [float(s) for s in scale] if _is_list(scale) else [float(scale)]
    if not scales:
        raise TaskvecError("no scale given: pass at least one")
    for s in scales:
        if not math.isfinite(s) or abs(s) > torch.finfo(torch.float32).max:
            raise TaskvecError(f"scale must be a finite float32 number, got {s}")
    if _is_list(scale):
        if method == "average":
            raise TaskvecError("average takes no scale, so it has no list of scales")
        names = [scale_dir(s) for s in scales]
        repeated = next((n for n in names if names.count(n) > 1), None)
        if repeated:
            raise TaskvecError(f"scales repeat (two would be written to {repeated})")
    return scales


def _nonfinite_notes(plan: MergePlan, reader: JobReader, counts: dict[str, int], shown: int = 5) -> list[str]:
    """One line per output tensor with NaN/inf, saying whether an input holds them or the result
    overflows its dtype. Inputs are re-read only for those tensors, so a clean merge pays nothing."""
    notes = []
    dtypes = {spec.name: spec.dtype for spec in plan.outputs}
    for name in list(counts)[:shown]:
        culprits = _nonfinite_inputs(plan, reader, name)
        cause = (", ".join(f"{label} holds {n}" for label, n in culprits.items()) if culprits
                 else f"the inputs are finite: the result overflows {dtypes[name]}, or the float32 sum of the "
                      "fine-tunes that forms it does")
        notes.append(f"tensor '{name}': {counts[name]} NaN/inf values in the output ({cause})")
    if len(counts) > shown:
        notes.append(f"{len(counts) - shown} more tensors hold NaN/inf values in the output")
    return notes


def _nonfinite_inputs(plan: MergePlan, reader: JobReader, name: str) -> dict[str, int]:
    found: dict[str, int] = {}
    for job in plan.jobs:
        for segment in job.segments:
            if segment.name != name:
                continue
            for index, checkpoint in enumerate(plan.inputs):
                values = torch.empty(segment.numel, dtype=job.in_dtype)
                reader.read_segment(segment.sources[index], segment.start, values)
                bad = segment.numel - int(torch.isfinite(values).sum())
                if bad:
                    found[checkpoint.label] = found.get(checkpoint.label, 0) + bad
    return found


def input_label(name: str | Path, path: Path) -> str:
    """How provenance and notes name an input: a hub id as given, a local one by its own name."""
    if Path(name) != path:  # fetched from the hub
        return str(name)
    snapshot = path if path.is_dir() else path.parent
    cache = snapshot.parent.parent.name  # hub cache: models--org--name/snapshots/<revision>
    if snapshot.parent.name == "snapshots" and cache.startswith("models--"):
        repo = cache.removeprefix("models--").replace("--", "/")
        return repo if path.is_dir() else f"{repo}/{path.name}"
    return path.name if path.is_dir() else f"{path.parent.name}/{path.name}"


def _identity(checkpoint: Checkpoint) -> dict:
    """An input as published models may record it: its name and a fingerprint, no local path."""
    return {"name": checkpoint.label, "format": checkpoint.format, "sha256": checkpoint.fingerprint()}


def _floating_dtype(plan: MergePlan) -> torch.dtype | None:
    """The dtype the output's floating tensors are written in (the base's), for config.json."""
    codes = [spec.dtype for spec in plan.outputs if spec.dtype in ARITHMETIC_CODES]
    return DTYPES[max(set(codes), key=codes.count)] if codes else None


@contextmanager
def _output_errors(output: Path) -> Iterator[None]:
    """A full disk or a read-only file system while writing names the output, not an input."""
    try:
        yield
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS):
            raise
        file = f" writing {Path(err.filename).name}" if err.filename else ""
        raise TaskvecError(f"output {output}: {err.strerror}{file} (on the file system of "
                           f"{_existing_parent(output)})") from None


def _config_updates(config: dict, dtype: torch.dtype | None) -> dict | None:
    """config.json names the dtype actually written, under both names transformers has read
    (`torch_dtype` before 4.56)."""
    if dtype is None or not config:
        return None
    name = dtype_name(dtype)
    updates = {"dtype": name, **({"torch_dtype": name} if "torch_dtype" in config else {})}
    return None if all(config.get(key) == value for key, value in updates.items()) else updates


def _check_files_outside(checkpoints: list[Checkpoint], output: Path) -> None:
    """No input file may live in the output, also through a symlink (the HF cache links
    snapshots to blobs): replacing the output would destroy it."""
    target = resolve_path(output)
    for checkpoint in checkpoints:
        for file in checkpoint.files():
            real = resolve_path(file)
            if target in real.parents:
                raise TaskvecError(f"input file {file} is stored inside output {output} "
                                   f"(as {real}); choose another directory")


def _check_free_space(output: Path, plan: MergePlan, metadatas: list[dict], source: Checkpoint,
                      provenances: list[dict]) -> None:
    """Refuse before reading anything when the output's file system cannot hold all of it:
    tensors, headers (one per shard at most), side files and provenance, for every scale."""
    side = sum(f.stat().st_size for f in source.side_files())
    tensors = sum(spec.nbytes for spec in plan.outputs)
    needed = sum(tensors + 2 * len(encode_header(plan.outputs, metadata)[0]) + side + 2 * len(dumps(provenance))
                 + 2**16 for metadata, provenance in zip(metadatas, provenances, strict=True))
    parent = _existing_parent(output)
    free = shutil.disk_usage(parent).free
    if free < needed:
        raise TaskvecError(f"output {output}: the merge writes {needed / 1e9:.2f} GB, but only "
                           f"{free / 1e9:.2f} GB is free on the file system of {parent}")


def _existing_parent(output: Path) -> Path:
    return next((p for p in (output, *output.parents) if p.exists()), Path("."))


def check_distinct(paths: list[Path]) -> None:
    seen = {}
    for path in paths:
        key = resolve_path(path)
        if key in seen:
            raise TaskvecError(f"{path} is given twice (also as {seen[key]})")
        seen[key] = path
