"""The merge's CUDA executor: disk reads, host-to-device copies, the fused kernel, device-to-host
copies and disk writes overlap.

Same contract as `taskvec.stream.cpu.CpuExecutor.run(plan, forms, reader, writers, progress)`,
and the same job I/O (taskvec.stream.jobs): each "combine" job goes through a two-slot pipeline,

    reader thread:  a Prefetcher reads the inputs' chunks ahead, in merge order, into a pool of
                    pinned host buffers
    host thread:    takes each chunk and queues its upload on the copy stream into slot k%2's
                    device buffer for that input; gives the buffer back to the pool once its
                    upload has left (at most IN_FLIGHT uploads outstanding)
    compute stream: waits for the slot's uploads, runs the kernel, copies the results back to the
                    slot's pinned output buffers
    writer thread:  a WriteBehind writes job k-1's results (one per form) while job k computes

Events order the reuse: a slot's device inputs are refilled only after the kernel two jobs back
has read them, a slot's pinned outputs only after their previous write has finished, a result is
written only after it has arrived. "copy" jobs (integer tensors) never touch the GPU: their
chunks go straight to the writer, which hands the buffer back to the pool. A reader's or a
writer's error is raised on the host thread; both threads have stopped when `run` returns.

On a CPU device the same code runs with synchronous stand-ins for streams and events and plain
buffers; with TRITON_INTERPRET=1 the kernel is interpreted, which lets CI test this pipeline.
"""

from __future__ import annotations

from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from taskvec.kernels.combine import (
    KERNEL_DTYPES,
    PointerTable,
    coefficient_table,
    combine_triton,
    combine_triton_scales,
    pointer_table,
)
from taskvec.kernels.reference import linear_reference, sum_reference
from taskvec.stream.jobs import Prefetcher, WriteBehind

SLOTS = 2  # double buffering: one job computing while the next one loads
IN_FLIGHT = 2  # pinned input buffers whose uploads may be queued at once
READ_AHEAD = 2  # more pinned input buffers, for the reader to fill meanwhile


class _DoneEvent:
    """Stand-in for torch.cuda.Event on CPU, where every copy has finished when it returns."""

    def record(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass


class _Streams:
    """A copy stream and a compute stream on a CUDA device; synchronous stand-ins on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.copy = torch.cuda.Stream(device) if self.cuda else None
        self.compute = torch.cuda.Stream(device) if self.cuda else None

    def event(self):
        return torch.cuda.Event() if self.cuda else _DoneEvent()

    def on(self, stream):
        return torch.cuda.stream(stream) if self.cuda else nullcontext()

    def wait(self, stream, event) -> None:
        if self.cuda:
            stream.wait_event(event)

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.cuda)

    def follow_current(self) -> None:
        """Order both streams after the work already queued on the caller's stream: memory the
        caching allocator hands out may still be read by a kernel queued there."""
        if self.cuda:
            current = torch.cuda.current_stream(self.copy.device)
            self.copy.wait_stream(current)
            self.compute.wait_stream(current)

    def synchronize(self) -> None:
        if self.cuda:
            self.copy.synchronize()
            self.compute.synchronize()


@dataclass
class _Slot:
    """Device buffers for one job in flight and the pinned buffer its result comes back to."""

    inputs: list[torch.Tensor]
    outs: list[torch.Tensor]  # one per form
    host_outs: list[torch.Tensor]
    table: PointerTable  # addresses of inputs[1:], the fine-tunes, for the kernel
    coefficients: torch.Tensor  # the forms' (base_coef, sum_coef), for the K-output kernel
    loaded: object  # inputs uploaded
    consumed: object  # kernel done with the inputs
    returned: object  # result back in host_out
    key: object  # the slot's name for the WriteBehind


class CudaExecutor:
    """Runs a merge plan on a GPU with the fused Triton kernel, overlapping I/O and compute."""

    def __init__(self, device: str | torch.device = "cuda"):
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())

    def run(self, plan, forms, reader, writers, progress) -> None:
        combine_jobs = [job for job in plan.jobs if job.kind == "combine"]
        copy_jobs = [job for job in plan.jobs if job.kind != "combine"]
        if not plan.jobs:
            return
        streams = _Streams(self.device)
        reads = [(job, 0) for job in copy_jobs] + [(job, i) for job in combine_jobs for i in range(plan.n_inputs)]
        chunks = Prefetcher(reader, reads, max(job.nbytes_in for job in plan.jobs), buffers=IN_FLIGHT + READ_AHEAD,
                            pin=streams.cuda)
        try:
            with WriteBehind(writers) as writes:
                for job in copy_jobs:  # straight to the writer, which hands the buffer back
                    raw = chunks.take()
                    writes.submit(job, [raw[:job.nbytes_in]] * len(writers),
                                  release=lambda raw=raw: chunks.give_back(raw))
                    progress.update(job.nbytes_in)
                if combine_jobs:
                    self._combine(plan, forms, combine_jobs, streams, chunks, writes, progress)
        finally:
            streams.synchronize()  # no copy may still use buffers that are being freed
            chunks.close()

    def _combine(self, plan, forms, jobs, streams, chunks, writes, progress) -> None:
        in_bytes = max(job.nbytes_in for job in jobs)
        out_bytes = max(job.nbytes_out for job in jobs)
        slots = [self._slot(plan.n_inputs, forms, in_bytes, out_bytes, streams) for _ in range(SLOTS)]
        streams.follow_current()
        uploading: deque = deque()  # (pinned buffer, event): uploads that may still read the buffer
        pending = None
        for k, job in enumerate(jobs):
            slot = slots[k % SLOTS]
            streams.wait(streams.copy, slot.consumed)
            for index in range(plan.n_inputs):
                raw = chunks.take()
                with streams.on(streams.copy):
                    slot.inputs[index][:job.nbytes_in].copy_(raw[:job.nbytes_in], non_blocking=True)
                    uploaded = streams.event()
                    uploaded.record(streams.copy)
                uploading.append((raw, uploaded))
                while len(uploading) >= IN_FLIGHT:  # the oldest upload's buffer back to the reader
                    done, event = uploading.popleft()
                    event.synchronize()
                    chunks.give_back(done)
            slot.loaded.record(streams.copy)
            streams.wait(streams.compute, slot.loaded)
            writes.wait(slot.key)  # the slot's pinned outputs are written out
            with streams.on(streams.compute):
                _compute(forms, job, slot)
                slot.consumed.record(streams.compute)
                for out, host_out in zip(slot.outs, slot.host_outs, strict=True):
                    host_out[:job.nbytes_out].copy_(out[:job.nbytes_out], non_blocking=True)
                slot.returned.record(streams.compute)
            if pending is not None:
                _finish(plan, *pending, writes, progress)
            pending = (job, slot)
        _finish(plan, *pending, writes, progress)

    def _slot(self, n_inputs, forms, in_bytes, out_bytes, streams) -> _Slot:
        inputs = [torch.empty(in_bytes, dtype=torch.uint8, device=self.device) for _ in range(n_inputs)]
        with streams.on(streams.compute):  # the tables are uploaded in the order the kernels run
            table = pointer_table(inputs[1:])
            coefficients = coefficient_table([(f.base_coef, f.sum_coef) for f in forms], self.device)
        return _Slot(inputs, [torch.empty(out_bytes, dtype=torch.uint8, device=self.device) for _ in forms],
                     [streams.host_buffer(out_bytes) for _ in forms], table, coefficients,
                     streams.event(), streams.event(), streams.event(), object())


def _compute(forms, job, slot: _Slot) -> None:
    """The job's arithmetic on the device: the fused kernel (K forms in one pass over the inputs),
    or torch for float64."""
    base = slot.inputs[0][:job.nbytes_in].view(job.in_dtype)
    finetuned = [buffer[:job.nbytes_in].view(job.in_dtype) for buffer in slot.inputs[1:]]
    outs = [out_raw[:job.nbytes_out].view(job.out_dtype) for out_raw in slot.outs]
    if job.in_dtype in KERNEL_DTYPES and job.out_dtype in KERNEL_DTYPES:
        if len(forms) == 1:
            combine_triton(base, finetuned, forms[0].base_coef, forms[0].sum_coef, out=outs[0], table=slot.table)
        else:
            combine_triton_scales(base, finetuned, [(f.base_coef, f.sum_coef) for f in forms], outs,
                                  table=slot.table, coefficients=slot.coefficients)
        return
    acc_dtype = torch.float64 if job.in_dtype == torch.float64 else torch.float32
    acc = sum_reference(base, finetuned, acc=torch.empty(job.numel, dtype=acc_dtype, device=base.device))
    work = torch.empty_like(acc) if len(forms) > 1 else None
    for k, (form, out) in enumerate(zip(forms, outs, strict=True)):
        linear_reference(acc, base, form.base_coef, form.sum_coef, out=out,
                         work=None if k == len(forms) - 1 else work)


def _finish(plan, job, slot: _Slot, writes: WriteBehind, progress) -> None:
    """Hand a job's results, once they are back in the slot's pinned buffers, to the writer thread."""
    slot.returned.synchronize()
    writes.submit(job, [host_out[:job.nbytes_out] for host_out in slot.host_outs], slot=slot.key)
    progress.update(job.nbytes_in * plan.n_inputs)
