"""The plan of a streaming merge: output tensors, and jobs of at most `chunk_elems` elements.

Small tensors are packed into one job, big ones split; a job holds segments of one dtype pair,
combined by one call (one kernel launch on CUDA). Planning reads headers only: the inputs are
matched (taskvec.stream.match), each tensor's read dtype chosen, and every error raised before
an output byte exists.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from taskvec.dtypes import ARITHMETIC_CODES, COPIED_CODES
from taskvec.errors import TaskvecError
from taskvec.io.checkpoint import Checkpoint
from taskvec.io.peft_adapter import LoraSource
from taskvec.io.safetensors_file import CODES, DTYPES, OutputSpec, TensorEntry
from taskvec.stream.match import match_inputs

DEFAULT_CHUNK_BYTES = 16 * 2**20


@dataclass(frozen=True)
class Segment:
    """A contiguous run of `numel` elements of tensor `name` from element `start`, in every input."""

    name: str
    start: int
    numel: int
    sources: tuple[TensorEntry | LoraSource, ...]


@dataclass
class Job:
    """Segments of one dtype pair, merged by one call (one kernel launch on CUDA)."""

    kind: str  # "combine" or "copy" (integer/bool buffers, taken from inputs[0])
    in_dtype: torch.dtype
    out_dtype: torch.dtype
    segments: list[Segment] = field(default_factory=list)
    numel: int = 0

    @property
    def nbytes_in(self) -> int:
        return self.numel * self.in_dtype.itemsize

    @property
    def nbytes_out(self) -> int:
        return self.numel * self.out_dtype.itemsize


@dataclass
class MergePlan:
    inputs: list[Checkpoint]
    outputs: list[OutputSpec]
    jobs: list[Job]
    chunk_elems: int
    notes: list[str] = field(default_factory=list)  # what was renamed, dropped or left out
    extras: dict[str, list[str]] = field(default_factory=dict)  # input label -> tensors left out
    cast: tuple[str, ...] = ()  # the dtypes cast on read, where inputs differ (sorted)

    def cast_note(self, how: str) -> list[str]:
        """The note on inputs whose dtypes differ, where they do: `how` a command reads them."""
        return [f"inputs differ in dtype ({', '.join(self.cast)}): {how}"] if self.cast else []

    @property
    def n_inputs(self) -> int:
        return len(self.inputs)

    @property
    def buffer_bytes(self) -> int:
        """The size of a buffer that holds any job's input or output chunk."""
        return max((max(job.nbytes_in, job.nbytes_out) for job in self.jobs), default=0)

    @property
    def bytes_read(self) -> int:
        return sum(j.nbytes_in * (self.n_inputs if j.kind == "combine" else 1) for j in self.jobs)


def plan_merge(
    inputs: list[Checkpoint],
    out_dtype: torch.dtype | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    *,
    strict: bool = False,
) -> MergePlan:
    """Match every input's tensors to the reference's (inputs[0]) and cut them into jobs; the
    floating tensors' output dtype is `out_dtype`, or the reference's."""
    matched = match_inputs(inputs, strict=strict)
    notes = list(matched.notes)
    chunk_elems = max(1, chunk_bytes // 4)
    outputs, jobs, cast = [], [], set()
    for name, entries in matched.sources.items():
        code = _read_code(name, entries, cast)
        if code in ARITHMETIC_CODES:
            kind, out_code = "combine", (CODES[out_dtype] if out_dtype else entries[0].dtype)
        elif code in COPIED_CODES:
            kind, out_code = "copy", code
        else:
            raise TaskvecError(f"{entries[0].path}: tensor '{name}' has dtype {code}, not supported")
        outputs.append(OutputSpec(name, out_code, entries[0].shape))
        _add_segments(jobs, kind, DTYPES[code], DTYPES[out_code], name, tuple(entries), chunk_elems)
    largest = max((job.numel for job in jobs), default=1)  # workspaces: no bigger than the biggest job
    return MergePlan(inputs, outputs, jobs, min(chunk_elems, largest), notes, matched.extras, tuple(sorted(cast)))


def _read_code(name: str, entries: list, cast: set) -> str:
    """The dtype a tensor's chunks are read in: the inputs' own, or float32 (float64 where one
    input is) when floating dtypes differ; integer buffers must agree."""
    codes = {entry.dtype for entry in entries}
    if len(codes) == 1:
        return codes.pop()
    if codes <= ARITHMETIC_CODES:
        cast.update(codes - {"F32"} if any(isinstance(e, LoraSource) for e in entries) else codes)
        return "F64" if "F64" in codes else "F32"
    odd = next(e for e in entries if e.dtype != entries[0].dtype)
    raise TaskvecError(f"{odd.path}: tensor '{name}' has dtype {odd.dtype}, but {entries[0].path} has "
                       f"{entries[0].dtype}; an integer buffer must have one dtype in every input")


def _add_segments(jobs, kind, in_dtype, out_dtype, name, entries, chunk_elems) -> None:
    numel = entries[0].numel
    start = 0
    while start < numel:
        job = jobs[-1] if jobs else None
        if job is None or (job.kind, job.in_dtype, job.out_dtype) != (kind, in_dtype, out_dtype) \
                or job.numel == chunk_elems:
            job = Job(kind, in_dtype, out_dtype)
            jobs.append(job)
        take = min(numel - start, chunk_elems - job.numel)
        job.segments.append(Segment(name, start, take, entries))
        job.numel += take
        start += take
