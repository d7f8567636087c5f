"""Plan and stream a merge of checkpoints: one pass, a few chunks of memory, whatever N.

`merge`, `average` and `negate` differ only in two coefficients of one linear form,

    out = base_coef * inputs[0] + sum_coef * sum(inputs[1:])      (float32 accumulation)

so they share this module: plan and validate from headers alone (every error is raised before
an output byte exists), cut the tensors into jobs of at most `chunk_elems` elements (small
tensors are packed together, big ones split), then run the jobs through an executor (CPU here,
CUDA in `taskvec.cuda_stream`) that reads each input chunk into reused buffers and writes the
result at its offset in the output shards. The output is built in a temporary directory beside
the target and renamed into place only when complete.
"""

from __future__ import annotations

import errno
import json
import math
import queue
import shutil
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from taskvec import __version__
from taskvec.errors import TaskvecError
from taskvec.io.checkpoint import Checkpoint, copy_side_files, open_checkpoint, resolve_model_path
from taskvec.io.layout import INPUT_EMBEDDINGS, LEGACY_BUFFERS, PROVENANCE, TIED_OUTPUT
from taskvec.io.names import naming_rules
from taskvec.io.peft_adapter import LoraDelta, LoraSource
from taskvec.io.safetensors_file import CODES, DTYPES, FileReader, OutputSpec, TensorEntry, encode_header
from taskvec.io.shards import ShardWriter, parse_size
from taskvec.jsonfile import dumps, write_json
from taskvec.kernels.reference import combine_reference
from taskvec.outputs import check_output, staged_directory

DEFAULT_CHUNK_BYTES = 16 * 2**20
DEFAULT_MAX_SHARD_SIZE = "50GB"  # transformers' save_pretrained default
PROVENANCE_FILE = PROVENANCE  # kept importable from here: callers and tests name it
ARITHMETIC_DTYPES = {"F16", "BF16", "F32", "F64"}
COPIED_DTYPES = {"I64", "I32", "I16", "I8", "U8", "U16", "U32", "U64", "BOOL"}


# --- methods ---------------------------------------------------------------------------------


class Method(ABC):
    """A merge method: which checkpoints are inputs, and the two coefficients of the linear form."""

    name = ""
    formula = ""

    def check_count(self, n: int) -> None:
        if n < 1:
            raise TaskvecError("at least one fine-tuned checkpoint is needed")

    def inputs(self, base: str | Path | None, finetuned: Sequence[str | Path]) -> list[str | Path]:
        if base is None:
            raise TaskvecError(f"{self.name} needs a base checkpoint (--base)")
        return [base, *finetuned]

    @abstractmethod
    def coefficients(self, n: int, scale: float) -> tuple[float, float]:
        """(base_coef, sum_coef) for n fine-tunes."""


class NegatedMean(Method):
    name = "negated_mean"
    formula = "base - scale * (mean(finetuned) - base)"

    def coefficients(self, n, scale):
        return 1.0 + scale, -scale / n


class Negate(NegatedMean):
    name = "negate"
    formula = "base - scale * (finetuned - base)"

    def check_count(self, n):
        if n != 1:
            raise TaskvecError(f"negate takes exactly one fine-tuned checkpoint, got {n}")


class Average(Method):
    name = "average"
    formula = "mean(finetuned)"

    def check_count(self, n):
        if n < 2:
            raise TaskvecError(f"average needs at least two checkpoints, got {n}")

    def inputs(self, base, finetuned):
        return list(finetuned)  # the first one also gives the layout and side files

    def coefficients(self, n, scale):
        return 1.0 / n, 1.0 / n


METHODS: dict[str, Method] = {m.name: m for m in (NegatedMean(), Negate(), Average())}


# --- plan ------------------------------------------------------------------------------------


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
    base_coef: float
    sum_coef: float
    chunk_elems: int
    notes: list[str] = field(default_factory=list)  # what was renamed, dropped, cast or left out
    extras: dict[str, list[str]] = field(default_factory=dict)  # input label -> tensors left out

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
    base_coef: float,
    sum_coef: float,
    out_dtype: torch.dtype | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    *,
    strict: bool = False,
) -> MergePlan:
    """Match every input's tensors to the reference's (inputs[0]) by canonical name and cut them
    into jobs. Every problem is raised here, before an output byte exists."""
    notes: list[str] = []
    tensors = _canonical_tensors(inputs, notes)
    reference = inputs[0]
    if reference.adapter is not None:
        raise TaskvecError(f"{reference.path}: a LoRA adapter cannot be the base; pass the model it was "
                           "trained from as --base and the adapter as a fine-tune")
    ref_tensors = tensors[0]
    ref_tied = reference.ties_embeddings is not False
    sources: dict[str, list] = {name: [entry] for name, entry in ref_tensors.items()}
    extras: dict[str, list[str]] = {}
    for checkpoint, named in zip(inputs[1:], tensors[1:], strict=True):
        if checkpoint.adapter is not None:
            notes.extend(_match_adapter(reference, ref_tensors, ref_tied, checkpoint, named, sources))
        else:
            found = _match(reference, ref_tensors, ref_tied, checkpoint, named, sources)
            if found:
                extras[checkpoint.label] = found
    _extras_note(extras, strict, notes)
    chunk_elems = max(1, chunk_bytes // 4)
    outputs, jobs, cast = [], [], set()
    for name, entries in sources.items():
        code = _read_code(name, entries, cast)
        if code in ARITHMETIC_DTYPES:
            kind, out_code = "combine", (CODES[out_dtype] if out_dtype else entries[0].dtype)
        elif code in COPIED_DTYPES:
            kind, out_code = "copy", code
        else:
            raise TaskvecError(f"{entries[0].path}: tensor '{name}' has dtype {code}, not supported")
        outputs.append(OutputSpec(name, out_code, entries[0].shape))
        _add_segments(jobs, kind, DTYPES[code], DTYPES[out_code], name, tuple(entries), chunk_elems)
    if cast:
        notes.append(f"inputs differ in dtype ({', '.join(sorted(cast))}): each is cast on read into the "
                     f"float32 sum; the output is {_dtype_name(out_dtype) if out_dtype else 'in the base’s dtype'}")
    largest = max((job.numel for job in jobs), default=1)  # workspaces: no bigger than the biggest job
    return MergePlan(inputs, outputs, jobs, base_coef, sum_coef, min(chunk_elems, largest), notes, extras)


def _canonical_tensors(inputs: list[Checkpoint], notes: list[str]) -> list[dict[str, object]]:
    """Each input's tensors under the names the architecture loads them by (taskvec.io.names):
    only consulted when names disagree or legacy buffers are present, as that costs imports."""
    named = [dict(c.tensors) | (dict(c.adapter.deltas) if c.adapter else {}) for c in inputs]
    reference = set(named[0]) - {TIED_OUTPUT}
    if all(set(n) - {TIED_OUTPUT} <= reference if c.adapter else set(n) - {TIED_OUTPUT} == reference
           for c, n in zip(inputs, named, strict=True)) \
            and not any(LEGACY_BUFFERS.search(name) for n in named for name in n):
        return named
    configs = [c.config for c in inputs if c.adapter is None and c.config.get("model_type")]
    config = next((c for c in configs if c.get("architectures")), configs[0] if configs else {})
    rules, why_not = naming_rules(config)
    if rules is None:
        notes.append(f"tensor names differ between inputs, and {why_not}: names are matched as they are")
        return named
    result = []
    for checkpoint, tensors in zip(inputs, named, strict=True):
        canonical, renamed, dropped = {}, 0, []
        for name, entry in tensors.items():
            new = rules.canonical(name)
            if new is None:
                dropped.append(name)
                continue
            renamed += new != name
            if new in canonical:
                where = entry.a.path if isinstance(entry, LoraDelta) else entry.path
                raise TaskvecError(f"{where}: tensors '{name}' and another one both load as '{new}' "
                                   f"in {rules.architecture}")
            canonical[new] = entry
        if renamed:
            notes.append(f"{checkpoint.label}: {renamed} tensors renamed to {rules.architecture}'s current names "
                         f"(prefix '{rules.prefix}.')")
        if dropped:
            notes.append(f"{checkpoint.label}: {len(dropped)} buffers that transformers drops on load left out "
                         f"({_listing(dropped)})")
        result.append(canonical)
    return result


def _match(reference, ref_tensors, ref_tied, checkpoint, tensors, sources) -> list[str]:
    """Add a full fine-tune's entries to `sources`; returns its tensors the base does not have."""
    tied = checkpoint.ties_embeddings if checkpoint.ties_embeddings is not None else ref_tied
    for name, ref in ref_tensors.items():
        entry = tensors.get(name)
        if entry is None and name == TIED_OUTPUT and tied:
            embedding = next((n for n in INPUT_EMBEDDINGS if n in tensors), None)
            entry = tensors.get(embedding) if embedding else None
        if entry is None:
            hint = (" (the base's output embedding is not tied to its input embedding, and this fine-tune "
                    "has neither its own nor a config saying it ties them)"
                    if name == TIED_OUTPUT and not ref_tied else "")
            raise TaskvecError(f"{checkpoint.path}: tensor '{name}' is missing (present in {ref.path}){hint}")
        _check_shape(name, entry, ref)
        sources[name].append(entry)
    return [name for name in tensors if name not in ref_tensors and not (name == TIED_OUTPUT and tied)]


def _match_adapter(reference, ref_tensors, ref_tied, checkpoint, tensors, sources) -> list[str]:
    """A LoRA adapter as a fine-tune: base + delta for its target modules, its own tensors where it
    trains them whole, the base's everywhere else. Returns a note if it names another base."""
    for name in tensors:
        if name not in ref_tensors:
            raise TaskvecError(f"{checkpoint.path}: the adapter changes '{name}', which {reference.path} "
                               "does not have (an adapter of another model?)")
    embedding = next((n for n in INPUT_EMBEDDINGS if n in ref_tensors), None)
    for name, ref in ref_tensors.items():
        key = embedding if name == TIED_OUTPUT and ref_tied and name not in tensors and embedding else name
        item = tensors.get(key)
        if isinstance(item, LoraDelta):
            source = LoraSource(ref_tensors[key], item)
        elif item is not None:
            _check_shape(name, item, ref)
            source = item
        else:
            source = ref  # untouched by the adapter: the fine-tune holds the base's value
        sources[name].append(source)
    wanted = checkpoint.adapter.base_model
    if wanted and reference.label not in (str(wanted), Path(str(wanted)).name):
        return [f"{checkpoint.label}: adapter trained on {wanted}, merged onto {reference.label}"]
    return []


def _check_shape(name: str, entry, ref) -> None:
    if entry.shape == ref.shape:
        return
    vocabulary = (name == TIED_OUTPUT or name in INPUT_EMBEDDINGS) and entry.shape[1:] == ref.shape[1:]
    if vocabulary:
        raise TaskvecError(
            f"{entry.path}: tensor '{name}' has {entry.shape[0]} rows (vocabulary), but {ref.path} has "
            f"{ref.shape[0]}: the vocabulary was resized; merge against a base resized the same way "
            "(model.resize_token_embeddings, then save_pretrained)"
        )
    raise TaskvecError(f"{entry.path}: tensor '{name}' has shape {list(entry.shape)}, "
                       f"but {ref.path} has {list(ref.shape)}")


def _read_code(name: str, entries: list, cast: set) -> str:
    """The dtype a tensor's chunks are read in: the inputs' own, or float32 (float64 where one
    input is) when floating dtypes differ; integer buffers must agree."""
    codes = {entry.dtype for entry in entries}
    if len(codes) == 1:
        return codes.pop()
    if codes <= ARITHMETIC_DTYPES:
        cast.update(codes - {"F32"} if any(isinstance(e, LoraSource) for e in entries) else codes)
        return "F64" if "F64" in codes else "F32"
    odd = next(e for e in entries if e.dtype != entries[0].dtype)
    raise TaskvecError(f"{odd.path}: tensor '{name}' has dtype {odd.dtype}, but {entries[0].path} has "
                       f"{entries[0].dtype}; an integer buffer must have one dtype in every input")


def _extras_note(extras: dict[str, list[str]], strict: bool, notes: list[str]) -> None:
    for label, names in extras.items():
        if strict:
            raise TaskvecError(f"{label}: holds {len(names)} tensors the base does not have "
                               f"({_listing(names)}); without --strict they are left out")
        notes.append(f"{label}: {len(names)} tensors the base does not have left out ({_listing(names)})")


def _listing(names: list[str], shown: int = 3) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


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


# --- stream ----------------------------------------------------------------------------------


class JobReader:
    """Fills a buffer with one input's segments of a job, back to back, in the job's dtype.

    A segment stored in another dtype is read into a scratch buffer and cast (mixed-dtype
    inputs); a LoRA module is the base's chunk plus its delta's (taskvec.io.peft_adapter).
    """

    def __init__(self) -> None:
        self.files = FileReader()
        self._scratch = torch.empty(0, dtype=torch.uint8)

    def read_job(self, job: Job, input_index: int, buffer: torch.Tensor) -> None:
        position = 0
        for segment in job.segments:
            nbytes = segment.numel * job.in_dtype.itemsize
            out = buffer[position:position + nbytes].view(job.in_dtype)
            self.read_segment(segment.sources[input_index], segment.start, out)
            position += nbytes

    def read_segment(self, source, start: int, out: torch.Tensor) -> None:
        """Elements [start, start + out.numel()) of `source` into `out`, cast to out's dtype."""
        if isinstance(source, LoraSource):
            self.read_segment(source.base, start, out)
            source.add_delta(self.files, start, out)
            return
        stored = DTYPES[source.dtype]
        offset = source.offset + start * stored.itemsize
        if stored == out.dtype:
            self.files.read_into(source.path, offset, memoryview(out.view(torch.uint8).numpy()))
            return
        nbytes = out.numel() * stored.itemsize
        if self._scratch.numel() < nbytes:
            self._scratch = torch.empty(nbytes, dtype=torch.uint8)
        raw = self._scratch[:nbytes]
        self.files.read_into(source.path, offset, memoryview(raw.numpy()))
        out.copy_(raw.view(stored))

    def close(self) -> None:
        self.files.close()


class JobWriter:
    """Scatters a job's output bytes to its segments' places in the shards, counting the
    non-finite values each tensor gets on the way (a NaN in an input, an overflow of the output
    dtype): both executors hand every result to this, while it is still in cache."""

    def __init__(self, shards: ShardWriter) -> None:
        self.shards = shards
        self.nonfinite: dict[str, int] = {}

    def write_job(self, job: Job, buffer: torch.Tensor) -> None:
        view = memoryview(buffer.numpy())
        size = job.out_dtype.itemsize
        values = buffer[:job.nbytes_out].view(job.out_dtype) if job.kind == "combine" else None
        finite = values is None or bool(torch.isfinite(values).all())
        position = 0
        for segment in job.segments:
            nbytes = segment.numel * size
            self.shards.write(segment.name, segment.start * size, view[position:position + nbytes])
            if not finite:
                part = values[position // size:(position + nbytes) // size]
                bad = part.numel() - int(torch.isfinite(part).sum())
                if bad:
                    self.nonfinite[segment.name] = self.nonfinite.get(segment.name, 0) + bad
            position += nbytes


class Prefetcher:
    """Reads chunks in merge order on a background thread, into a small pool of buffers.

    os.preadv releases the GIL, so the next chunk is read while the current one is added.
    `take()` hands out the next filled buffer; `give_back()` returns it to the pool.
    """

    def __init__(self, reader: JobReader, reads: list[tuple[Job, int]], nbytes: int, buffers: int = 4) -> None:
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        self._ready: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(buffers):
            self._free.put(torch.empty(nbytes, dtype=torch.uint8))
        self._stopped = False
        self._thread = threading.Thread(target=self._read_all, args=(reader, reads),
                                        name="taskvec-read", daemon=True)
        self._thread.start()

    def _read_all(self, reader: JobReader, reads: list[tuple[Job, int]]) -> None:
        try:
            for job, index in reads:
                buffer = self._free.get()
                if self._stopped:
                    return
                reader.read_job(job, index, buffer)
                self._ready.put(buffer)
        except BaseException as err:  # handed to the consumer, which raises it
            self._ready.put(err)

    def take(self) -> torch.Tensor:
        item = self._ready.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def give_back(self, buffer: torch.Tensor) -> None:
        self._free.put(buffer)

    def close(self) -> None:
        self._stopped = True
        self._free.put(None)  # wakes the reader if it waits for a buffer
        self._thread.join()


class _Slot:
    """Output-side buffers of one job in flight: reused once its write has finished."""

    def __init__(self, chunk_elems: int, nbytes: int) -> None:
        self.chunk_elems = chunk_elems
        self.out_raw = torch.empty(nbytes, dtype=torch.uint8)
        self.accumulators: dict[torch.dtype, torch.Tensor] = {}
        self.pending: Future | None = None

    def accumulator(self, dtype: torch.dtype, numel: int) -> torch.Tensor:
        if dtype not in self.accumulators:
            self.accumulators[dtype] = torch.empty(self.chunk_elems, dtype=dtype)
        return self.accumulators[dtype][:numel]

    def wait(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()

    def cancel(self) -> None:
        """Let an unwaited write finish, without raising: another error is already on its way."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.exception()


class CpuExecutor:
    """Runs jobs with the torch path: one fine-tune chunk added at a time, so RAM is flat in N.

    Three things overlap (os.preadv, torch and os.pwrite all release the GIL): a reader thread
    fills the next chunks, the main thread adds, and a writer thread writes the previous result.
    """

    def run(self, plan: MergePlan, reader: JobReader, writer: JobWriter, progress) -> None:
        reads = [(job, index) for job in plan.jobs
                 for index in range(plan.n_inputs if job.kind == "combine" else 1)]
        chunks = Prefetcher(reader, reads, plan.buffer_bytes)
        scratch = torch.empty(plan.chunk_elems, dtype=torch.float32)
        slots = [_Slot(plan.chunk_elems, plan.buffer_bytes), _Slot(plan.chunk_elems, plan.buffer_bytes)]
        threads = torch.get_num_threads()
        torch.set_num_threads(max(1, threads - 1))  # a core for the reader and writer threads
        try:
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="taskvec-write") as pool:
                try:
                    for number, job in enumerate(plan.jobs):
                        slot = slots[number % 2]
                        slot.wait()
                        result = self._compute(plan, job, chunks, slot, scratch)
                        slot.pending = pool.submit(writer.write_job, job, result)
                        progress.update(job.nbytes_in * (plan.n_inputs if job.kind == "combine" else 1))
                    for slot in slots:
                        slot.wait()
                finally:
                    chunks.close()
                    for slot in slots:  # no write may still use a buffer; the first error wins
                        slot.cancel()
        finally:
            torch.set_num_threads(threads)

    @staticmethod
    def _compute(plan, job, chunks: Prefetcher, slot: _Slot, scratch: torch.Tensor) -> torch.Tensor:
        """The job's output bytes, in a buffer of `slot`."""
        base_raw = chunks.take()
        if job.kind == "copy":
            result = slot.out_raw[:job.nbytes_in].copy_(base_raw[:job.nbytes_in])
            chunks.give_back(base_raw)
            return result
        base = base_raw[:job.nbytes_in].view(job.in_dtype)

        def finetuned() -> Iterator[torch.Tensor]:
            for _ in range(1, plan.n_inputs):
                raw = chunks.take()
                yield raw[:job.nbytes_in].view(job.in_dtype)
                chunks.give_back(raw)  # the consumer has added it when it asks for the next

        acc_dtype = torch.float64 if job.in_dtype == torch.float64 else torch.float32
        out = None if job.out_dtype == acc_dtype else slot.out_raw[:job.nbytes_out].view(job.out_dtype)
        result = combine_reference(
            base, finetuned(), plan.base_coef, plan.sum_coef, dtype=job.out_dtype,
            acc=slot.accumulator(acc_dtype, job.numel), out=out,
            scratch=scratch[:job.numel] if acc_dtype == torch.float32 else None,
        )
        chunks.give_back(base_raw)
        return result.view(torch.uint8)


def make_executor(device: str):
    """'cpu', 'cuda', or 'auto' (CUDA when a GPU and triton are there)."""
    if device not in ("auto", "cpu", "cuda"):
        raise TaskvecError(f"unknown device {device!r}: use cpu, cuda or auto")
    if device == "cpu":
        return CpuExecutor()
    from taskvec.kernels import triton_available

    usable = torch.cuda.is_available() and triton_available()
    if device == "auto":
        return _cuda_executor() if usable else CpuExecutor()
    if not torch.cuda.is_available():
        raise TaskvecError("--device cuda: no CUDA device is available (use --device cpu)")
    if not triton_available():
        raise TaskvecError("--device cuda needs triton: pip install 'taskvec[gpu]'")
    return _cuda_executor()


def _cuda_executor():
    from taskvec.cuda_stream import CudaExecutor

    return CudaExecutor()


# --- public entry point --------------------------------------------------------------------------


@dataclass
class MergeResult:
    output: Path
    files: list[str]
    bytes_read: int
    bytes_written: int
    seconds: float
    notes: list[str] = field(default_factory=list)  # what the merge renamed, dropped, cast or skipped


def merge_checkpoints(
    finetuned: Sequence[str | Path],
    output: str | Path,
    *,
    base: str | Path | None = None,
    method: str = "negated_mean",
    scale: float = 1.0,
    dtype: str | torch.dtype | None = None,
    device: str = "cpu",
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    chunk_size: str | int = DEFAULT_CHUNK_BYTES,
    overwrite: bool = False,
    strict: bool = False,
    progress: bool | None = None,
) -> MergeResult:
    """Merge checkpoint directories into `output` in one streaming pass.

    method: 'negated_mean' (base - scale * (mean(ft) - base)), 'negate' (one fine-tune) or
    'average' (mean of the fine-tunes; no base). Inputs are model directories (safetensors or
    PyTorch .bin, single or sharded), single weight files, PEFT LoRA adapter directories, or hub
    ids. dtype: output dtype of floating tensors (default: the base's). strict: refuse fine-tune
    tensors the base does not have instead of leaving them out, and NaN/inf in the output
    instead of noting them. progress: a tqdm bar (None: only on a terminal).
    """
    from tqdm.auto import tqdm

    started = time.perf_counter()
    if method not in METHODS:
        raise TaskvecError(f"unknown method {method!r}: choose from {', '.join(METHODS)}")
    if not math.isfinite(scale) or abs(scale) > torch.finfo(torch.float32).max:
        raise TaskvecError(f"scale must be a finite float32 number, got {scale}")
    chosen = METHODS[method]
    finetuned = list(finetuned)
    chosen.check_count(len(finetuned))
    names = chosen.inputs(base, finetuned)
    paths = [resolve_model_path(p) for p in names]
    _check_distinct(paths)
    output = check_output(output, paths, overwrite)
    out_dtype = _parse_dtype(dtype)
    checkpoints = [open_checkpoint(p, _label(name, p)) for name, p in zip(names, paths, strict=True)]
    _check_files_outside(checkpoints, output)
    base_coef, sum_coef = chosen.coefficients(len(finetuned), scale)
    plan = plan_merge(checkpoints, base_coef, sum_coef, out_dtype, parse_size(chunk_size), strict=strict)
    written_dtype = out_dtype or _floating_dtype(plan)
    provenance = {
        "taskvec_version": __version__,
        "method": chosen.name,
        "formula": chosen.formula,
        "scale": scale if chosen.name != "average" else None,
        "n_finetuned": len(finetuned),
        "base": _identity(checkpoints[0]) if base is not None else None,
        "finetuned": [_identity(c) for c in checkpoints[-len(finetuned):]],
        "base_coef": base_coef,
        "sum_coef": sum_coef,
        "dtype": _dtype_name(out_dtype) if out_dtype else "as input",
        "left_out": plan.extras,
    }
    metadata = {"format": "pt", "taskvec": json.dumps(provenance, separators=(",", ":"))}
    config_updates = _config_updates(checkpoints[0].config, written_dtype)
    _check_free_space(output, plan, metadata, checkpoints[0], provenance)
    executor = make_executor(device)
    reader = JobReader()
    with staged_directory(output, overwrite) as staging:
        shards = ShardWriter(staging, plan.outputs, parse_size(max_shard_size), metadata)
        writer = JobWriter(shards)
        bar = tqdm(total=plan.bytes_read, unit="B", unit_scale=True, desc=f"taskvec {chosen.name}",
                   disable=None if progress is None else not progress)
        try:
            with _output_errors(output), shards:
                executor.run(plan, reader, writer, bar)
                nonfinite = _nonfinite_notes(plan, reader, writer.nonfinite)
                if nonfinite and strict:
                    raise TaskvecError(f"{nonfinite[0]}; refused by --strict")
        finally:
            bar.close()
            reader.close()
        with _output_errors(output):
            skipped = copy_side_files(checkpoints[0], staging, config_updates)
            write_json(staging / PROVENANCE_FILE, provenance, fsync=False)
    notes = plan.notes + nonfinite + [f"not copied from {checkpoints[0].label}: {item}" for item in skipped]
    return MergeResult(output, shards.files, plan.bytes_read, sum(spec.nbytes for spec in plan.outputs),
                       time.perf_counter() - started, notes)


def _nonfinite_notes(plan: MergePlan, reader: JobReader, counts: dict[str, int], shown: int = 5) -> list[str]:
    """One line per output tensor with NaN/inf, saying whether an input holds them or the result
    overflows its dtype. Inputs are re-read only for those tensors, so a clean merge pays nothing."""
    notes = []
    dtypes = {spec.name: spec.dtype for spec in plan.outputs}
    for name in list(counts)[:shown]:
        culprits = _nonfinite_inputs(plan, reader, name)
        cause = (", ".join(f"{label} holds {n}" for label, n in culprits.items()) if culprits
                 else f"the inputs are finite: the result overflows {dtypes[name]}")
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


def _label(name: str | Path, path: Path) -> str:
    """How provenance and notes name an input: a hub id as given, a local one by its own name."""
    if Path(name) != path:  # fetched from the hub
        return str(name)
    return path.name if path.is_dir() else f"{path.parent.name}/{path.name}"


def _identity(checkpoint: Checkpoint) -> dict:
    """An input as published models may record it: its name and a fingerprint, no local path."""
    return {"name": checkpoint.label, "format": checkpoint.format, "sha256": checkpoint.fingerprint()}


def _floating_dtype(plan: MergePlan) -> torch.dtype | None:
    """The dtype the output's floating tensors are written in (the base's), for config.json."""
    codes = [spec.dtype for spec in plan.outputs if spec.dtype in ARITHMETIC_DTYPES]
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
    name = _dtype_name(dtype)
    updates = {"dtype": name, **({"torch_dtype": name} if "torch_dtype" in config else {})}
    return None if all(config.get(key) == value for key, value in updates.items()) else updates


def _check_files_outside(checkpoints: list[Checkpoint], output: Path) -> None:
    """No input file may live in the output, also through a symlink (the HF cache links
    snapshots to blobs): replacing the output would destroy it."""
    target = output.resolve()
    for checkpoint in checkpoints:
        for file in checkpoint.files():
            if target in file.resolve().parents:
                raise TaskvecError(f"input file {file} is stored inside output {output} "
                                   f"(as {file.resolve()}); choose another directory")


def _check_free_space(output: Path, plan: MergePlan, metadata: dict, source: Checkpoint, provenance) -> None:
    """Refuse before reading anything when the output's file system cannot hold all of it:
    tensors, headers (one per shard at most), side files and provenance."""
    header = len(encode_header(plan.outputs, metadata)[0])
    side = sum(f.stat().st_size for f in source.side_files())
    needed = sum(spec.nbytes for spec in plan.outputs) + 2 * header + side + 2 * len(dumps(provenance)) + 2**16
    parent = _existing_parent(output)
    free = shutil.disk_usage(parent).free
    if free < needed:
        raise TaskvecError(f"output {output}: the merge writes {needed / 1e9:.2f} GB, but only "
                           f"{free / 1e9:.2f} GB is free on the file system of {parent}")


def _existing_parent(output: Path) -> Path:
    return next((p for p in (output, *output.parents) if p.exists()), Path("."))


def _check_distinct(paths: list[Path]) -> None:
    seen = {}
    for path in paths:
        key = path.resolve()
        if key in seen:
            raise TaskvecError(f"{path} is given twice (also as {seen[key]})")
        seen[key] = path


def _parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in names:
        raise TaskvecError(f"unknown dtype {dtype!r}: use float32, float16 or bfloat16")
    return names[dtype]
