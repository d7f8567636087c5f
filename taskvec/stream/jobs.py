"""Job I/O shared by the executors: reading an input's chunks, prefetching them, writing results.

os.preadv and os.pwrite release the GIL, so a reader thread fills the next chunks while the
arithmetic runs (Prefetcher) and a writer thread writes the previous result (WriteBehind).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from taskvec.io.peft_adapter import LoraSource
from taskvec.io.safetensors_file import DTYPES, FileReader
from taskvec.io.shards import ShardWriter
from taskvec.stream.plan import Job


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
        finite = values is None or all_finite(values)
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


def all_finite(values: torch.Tensor) -> bool:
    """Whether every value is finite, from one vectorised sum: NaN and inf reach the sum, and a
    finite sum that overflows only sends the chunk to the exact per-tensor count. (isfinite().all()
    writes a bool per element: with K outputs per chunk it cost more than the merge's arithmetic.)"""
    wide = torch.float64 if values.dtype == torch.float64 else torch.float32
    return bool(torch.isfinite(values.sum(dtype=wide)))


class Prefetcher:
    """Reads chunks in merge order on a background thread, into a small pool of buffers.

    os.preadv releases the GIL, so the next chunk is read while the current one is added.
    `take()` hands out the next filled buffer; `give_back()` returns it to the pool. `pin=True`
    allocates page-locked buffers (for a GPU: host-to-device copies from them run asynchronously
    and at full speed); a buffer may then be given back only once its copy has finished.
    """

    def __init__(self, reader: JobReader, reads: list[tuple[Job, int]], nbytes: int, buffers: int = 4,
                 pin: bool = False) -> None:
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        self._ready: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(buffers):
            self._free.put(torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin))
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


class WriteBehind:
    """Hands jobs' results to the writers on one background thread, so disk writes overlap the
    next jobs' reads and arithmetic; any executor can use it.

    A result's buffers belong to its write until it is done: `submit(..., slot=s)` first waits for
    slot s's previous write, and the caller calls `wait(s)` before refilling s's buffers; or
    `release` (called on the writer thread once the write is done) hands them back instead. A
    write's error is raised in the caller's thread, by the next wait on its slot, a later submit
    or `finish()`. As a context manager: leaving normally waits for every write (raising the first
    error); leaving by an exception lets pending writes end without raising (the first error
    wins). Either way the thread has stopped when the `with` block is left.
    """

    def __init__(self, writers: Sequence[JobWriter]) -> None:
        self._writers = list(writers)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="taskvec-write")
        self._slots: dict[Hashable, Future] = {}
        self._released: list[Future] = []

    def submit(self, job: Job, results: Sequence[torch.Tensor], *, slot: Hashable | None = None,
               release: Callable[[], None] | None = None) -> None:
        """Write results[k] with writers[k], after the slot's previous write."""
        if slot is not None:
            self.wait(slot)
        while self._released and self._released[0].done():
            self._released.pop(0).result()
        future = self._pool.submit(self._write, job, list(results), release)
        if slot is None:
            self._released.append(future)
        else:
            self._slots[slot] = future

    def _write(self, job: Job, results: list[torch.Tensor], release) -> None:
        try:
            for writer, result in zip(self._writers, results, strict=True):
                writer.write_job(job, result)
        finally:
            if release is not None:
                release()

    def wait(self, slot: Hashable) -> None:
        """Until the slot's last write has finished (its buffers are free again); raises its error."""
        future = self._slots.pop(slot, None)
        if future is not None:
            future.result()

    def finish(self) -> None:
        for slot in list(self._slots):
            self.wait(slot)
        while self._released:
            self._released.pop(0).result()

    def __enter__(self) -> WriteBehind:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        try:
            if kind is None:
                self.finish()
        finally:
            for future in [*self._slots.values(), *self._released]:
                future.exception()  # let it end; another error is already on its way
            self._slots.clear()
            self._released.clear()
            self._pool.shutdown(wait=True)
