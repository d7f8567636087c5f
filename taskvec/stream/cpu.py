"""The CPU executor: the torch path, one fine-tune chunk added at a time, so RAM is flat in N."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from taskvec.kernels.reference import linear_reference, sum_reference
from taskvec.methods import LinearForm
from taskvec.stream.general import weighted_sum
from taskvec.stream.jobs import JobReader, JobWriter, Prefetcher, WriteBehind
from taskvec.stream.plan import MergePlan


class _Slot:
    """Output-side buffers of one job in flight (one per output form): reused once its writes
    have finished (WriteBehind's slot waits). Memory grows with the number of forms K, never N."""

    def __init__(self, chunk_elems: int, nbytes: int, forms: int) -> None:
        self.chunk_elems = chunk_elems
        self.outs = [torch.empty(nbytes, dtype=torch.uint8) for _ in range(forms)]
        self.accumulators: dict[torch.dtype, torch.Tensor] = {}
        self.works: dict[torch.dtype, torch.Tensor] = {}

    def accumulator(self, dtype: torch.dtype, numel: int) -> torch.Tensor:
        if dtype not in self.accumulators:
            self.accumulators[dtype] = torch.empty(self.chunk_elems, dtype=dtype)
        return self.accumulators[dtype][:numel]

    def work(self, dtype: torch.dtype, numel: int) -> torch.Tensor:
        """Where a form is computed when the sum is still needed for the next one."""
        if dtype not in self.works:
            self.works[dtype] = torch.empty(self.chunk_elems, dtype=dtype)
        return self.works[dtype][:numel]


class CpuExecutor:
    """Runs jobs with the torch path: one fine-tune chunk added at a time, so RAM is flat in N.

    Three things overlap (os.preadv, torch and os.pwrite all release the GIL): a reader thread
    fills the next chunks, the main thread adds, and a writer thread writes the previous result.
    The fine-tunes' sum is taken once per chunk, and each form (each scale) written from it; a
    weighted form (LinearForm.weights) takes the weighted sum instead.
    """

    def run(self, plan: MergePlan, forms: Sequence[LinearForm], reader: JobReader,
            writers: Sequence[JobWriter], progress) -> None:
        reads = [(job, index) for job in plan.jobs
                 for index in range(plan.n_inputs if job.kind == "combine" else 1)]
        chunks = Prefetcher(reader, reads, plan.buffer_bytes)
        scratch = torch.empty(plan.chunk_elems, dtype=torch.float32)
        slots = [_Slot(plan.chunk_elems, plan.buffer_bytes, len(forms)) for _ in range(2)]
        threads = torch.get_num_threads()
        torch.set_num_threads(max(1, threads - 1))  # a core for the reader and writer threads
        try:
            with WriteBehind(writers) as behind:
                try:
                    for number, job in enumerate(plan.jobs):
                        slot = slots[number % 2]
                        behind.wait(number % 2)  # the slot's buffers are free again
                        results = self._compute(plan, forms, job, chunks, slot, scratch)
                        behind.submit(job, results, slot=number % 2)
                        progress.update(job.nbytes_in * (plan.n_inputs if job.kind == "combine" else 1))
                finally:
                    chunks.close()
        finally:
            torch.set_num_threads(threads)

    @staticmethod
    def _compute(plan, forms, job, chunks: Prefetcher, slot: _Slot, scratch: torch.Tensor) -> list[torch.Tensor]:
        """The job's output bytes under each form, in buffers of `slot`."""
        base_raw = chunks.take()
        if job.kind == "copy":
            result = slot.outs[0][:job.nbytes_in].copy_(base_raw[:job.nbytes_in])
            chunks.give_back(base_raw)
            return [result] * len(forms)
        base = base_raw[:job.nbytes_in].view(job.in_dtype)

        def finetuned() -> Iterator[torch.Tensor]:
            for _ in range(1, plan.n_inputs):
                raw = chunks.take()
                yield raw[:job.nbytes_in].view(job.in_dtype)
                chunks.give_back(raw)  # the consumer has added it when it asks for the next

        acc_dtype = torch.float64 if job.in_dtype == torch.float64 else torch.float32
        widen = scratch[:job.numel] if acc_dtype == torch.float32 else None
        if forms[0].weights is None:  # the plain sum
            acc = sum_reference(base, finetuned(), acc=slot.accumulator(acc_dtype, job.numel), scratch=widen)
        else:  # a weighted form: every form of a merge shares the weights
            acc = weighted_sum(finetuned(), forms[0].weights, slot.accumulator(acc_dtype, job.numel))
        results = []
        for k, form in enumerate(forms):
            last = k == len(forms) - 1  # the last form may use the sum's buffer itself
            in_place = last and job.out_dtype == acc_dtype
            out = None if in_place else slot.outs[k][:job.nbytes_out].view(job.out_dtype)
            result = linear_reference(acc, base, form.base_coef, form.sum_coef, dtype=job.out_dtype, out=out,
                                      work=None if last else slot.work(acc_dtype, job.numel), scratch=widen)
            results.append(result.view(torch.uint8))
        chunks.give_back(base_raw)
        return results

