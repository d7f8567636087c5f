"""The merge's CUDA executor: disk reads, host-to-device copies and the fused kernel overlap.

Same contract as `taskvec.stream.cpu.CpuExecutor.run(plan, forms, reader, writers, progress)`.
Each "combine" job goes through a two-slot pipeline:

    host thread:  read input i of job k into a pinned staging buffer (2 of them, alternating)
    copy stream:  staging buffer -> slot k%2's device buffer for input i (async)
    compute stream: waits for the slot's copies, runs the kernel, copies the result back to
                  the slot's pinned output buffer (async)
    host thread:  meanwhile writes job k-1's results (one per form), then reads job k+1

so the disk, PCIe and the kernel work at once. Events order the reuse: a slot's device inputs
are refilled only after the kernel two jobs back has read them, a staging buffer only after its
copy has left. "copy" jobs (integer tensors) never touch the GPU.

On a CPU device the same code runs with synchronous stand-ins for streams and events and plain
buffers; with TRITON_INTERPRET=1 the kernel is interpreted, which lets CI test this pipeline.
"""

from __future__ import annotations

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

SLOTS = 2  # double buffering: one job computing while the next one loads


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
class _Staging:
    """A pinned host buffer that the reader fills; `free` fires when its upload has left."""

    host: torch.Tensor
    free: object


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


class CudaExecutor:
    """Runs a merge plan on a GPU with the fused Triton kernel, overlapping I/O and compute."""

    def __init__(self, device: str | torch.device = "cuda"):
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())

    def run(self, plan, forms, reader, writers, progress) -> None:
        combine_jobs = [job for job in plan.jobs if job.kind == "combine"]
        copy_jobs = [job for job in plan.jobs if job.kind != "combine"]
        if copy_jobs:
            buffer = torch.empty(max(job.nbytes_in for job in copy_jobs), dtype=torch.uint8)
            for job in copy_jobs:
                reader.read_job(job, 0, buffer)
                for writer in writers:
                    writer.write_job(job, buffer[:job.nbytes_in])
                progress.update(job.nbytes_in)
        if combine_jobs:
            streams = _Streams(self.device)
            try:
                self._combine(plan, forms, combine_jobs, streams, reader, writers, progress)
            finally:
                streams.synchronize()  # no copy may still target buffers that are being freed

    def _combine(self, plan, forms, jobs, streams, reader, writers, progress) -> None:
        in_bytes = max(job.nbytes_in for job in jobs)
        out_bytes = max(job.nbytes_out for job in jobs)
        staging = [_Staging(streams.host_buffer(in_bytes), streams.event()) for _ in range(2)]
        slots = [self._slot(plan.n_inputs, forms, in_bytes, out_bytes, streams) for _ in range(SLOTS)]
        streams.follow_current()
        pending = None
        uploads = 0
        for k, job in enumerate(jobs):
            slot = slots[k % SLOTS]
            streams.wait(streams.copy, slot.consumed)
            for index in range(plan.n_inputs):
                stage = staging[uploads % len(staging)]
                uploads += 1
                stage.free.synchronize()
                reader.read_job(job, index, stage.host)
                with streams.on(streams.copy):
                    slot.inputs[index][:job.nbytes_in].copy_(stage.host[:job.nbytes_in], non_blocking=True)
                    stage.free.record(streams.copy)
            slot.loaded.record(streams.copy)
            streams.wait(streams.compute, slot.loaded)
            with streams.on(streams.compute):
                _compute(forms, job, slot)
                slot.consumed.record(streams.compute)
                for out, host_out in zip(slot.outs, slot.host_outs, strict=True):
                    host_out[:job.nbytes_out].copy_(out[:job.nbytes_out], non_blocking=True)
                slot.returned.record(streams.compute)
            if pending is not None:
                _finish(plan, *pending, writers, progress)
            pending = (job, slot)
        if pending is not None:
            _finish(plan, *pending, writers, progress)

    def _slot(self, n_inputs, forms, in_bytes, out_bytes, streams) -> _Slot:
        inputs = [torch.empty(in_bytes, dtype=torch.uint8, device=self.device) for _ in range(n_inputs)]
        with streams.on(streams.compute):  # the tables are uploaded in the order the kernels run
            table = pointer_table(inputs[1:])
            coefficients = coefficient_table([(f.base_coef, f.sum_coef) for f in forms], self.device)
        return _Slot(inputs, [torch.empty(out_bytes, dtype=torch.uint8, device=self.device) for _ in forms],
                     [streams.host_buffer(out_bytes) for _ in forms], table, coefficients,
                     streams.event(), streams.event(), streams.event())


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


def _finish(plan, job, slot: _Slot, writers, progress) -> None:
    slot.returned.synchronize()
    for writer, host_out in zip(writers, slot.host_outs, strict=True):
        writer.write_job(job, host_out[:job.nbytes_out])
    progress.update(job.nbytes_in * plan.n_inputs)
