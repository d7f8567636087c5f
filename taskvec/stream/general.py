"""The general executor: torch on a device (CPU or a GPU) for what the fused kernel does not take,
the non-linear methods (TIES, DARE: a chunk-level combine, optionally after per-tensor statistics
pre-passes) and weighted linear forms on a GPU.

Same contract as the other executors: `run(plan, forms, reader, writers, progress)`. For a
non-linear method each job's base chunk and all N fine-tune chunks are held at once (a Prefetcher
with N + 2 buffers reads ahead), the method's combine turns them into the job's tau, segment by
segment (each segment is one tensor's elements start..start+numel), and every form (every scale)
is written from that one tau as base - scale * tau. On a GPU, a method that declares `fused()`
(TIES, DARE, dare-ties) runs each job as one launch of the fused Triton kernel instead
(kernels/sparse_combine.py: one pass, the torch path's bytes), for float32/16-bit jobs; float64
jobs take the torch path. On the CPU the same methods run each job as one compiled numba loop
(kernels/sparse_combine_cpu.py: the same pass, the torch path's bytes) for float32, float64 and
16-bit jobs; `COMPILED = False` (or `TorchExecutor(compiled=False)`) keeps the torch path, the
reference the tests hold both to. The plan's chunk shrinks with N
(`working_chunk_bytes`) so that memory stays flat in N. Statistics passes read the inputs one
chunk at a time (base + one fine-tune), so they hold three chunks.

Memory of a non-linear merge: (N + 2) input chunks + N float32 task-vector chunks (the combine's
stack) + about N more for the combine's temporaries + one tau and one output chunk per scale:
about (4N + 6) chunks of the plan, which `working_chunk_bytes` keeps near 4 x --chunk-size.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from taskvec.kernels.reference import linear_reference
from taskvec.methods import ChunkContext, CombineForm
from taskvec.stream.jobs import JobReader, JobWriter, Prefetcher, WriteBehind
from taskvec.stream.plan import Job, MergePlan

# The CPU path of a method's fused() combine: the compiled loop (True) or the torch reference.
COMPILED = True


def working_chunk_bytes(chunk_bytes: int, n_finetuned: int) -> int:
    """The plan's chunk for a non-linear merge of n fine-tunes: about (4N + 6) chunks are live at
    once, so a chunk of 4 * chunk_bytes / (4N + 6) keeps memory near 4 x chunk_bytes whatever N."""
    return max(4, chunk_bytes * 4 // (4 * n_finetuned + 6))


def weighted_sum(finetuned: Iterable[torch.Tensor], weights: Sequence[float], acc: torch.Tensor) -> torch.Tensor:
    """sum_i weights[i] * finetuned[i], accumulated in `acc` (float32, or float64): the weighted
    form's sum step, the same arithmetic on every device."""
    count = 0
    term = torch.empty_like(acc)
    for tensor, weight in zip(finetuned, weights, strict=False):
        if count == 0:
            acc.copy_(tensor).mul_(weight)
        else:  # multiply, then add: a fused multiply-add would round differently in a chunk's tail
            acc.add_(torch.mul(tensor if tensor.dtype == acc.dtype else term.copy_(tensor), weight, out=term))
        count += 1
    if count != len(weights):
        raise ValueError(f"{count} fine-tuned chunks for {len(weights)} weights")
    return acc


def acc_dtype(job: Job) -> torch.dtype:
    return torch.float64 if job.in_dtype == torch.float64 else torch.float32


class TorchExecutor:
    """Runs non-linear methods (CombineForm) and weighted linear forms with torch on `device`; on a
    GPU (or with `kernel=True` under TRITON_INTERPRET=1) a method's `fused()` combine runs as the
    fused Triton kernel instead (kernels/sparse_combine.py: the same bytes, one pass), and on the
    CPU as the compiled loop (kernels/sparse_combine_cpu.py) unless `compiled` is False (None:
    the module's COMPILED when the merge runs)."""

    def __init__(self, device: str | torch.device = "cpu", kernel: bool | None = None,
                 compiled: bool | None = None) -> None:
        self.device = torch.device(device)
        if kernel is None:
            from taskvec.kernels import triton_available

            kernel = self.device.type == "cuda" and triton_available()
        self.kernel = kernel
        self.compiled = compiled
        self._pool: ThreadPoolExecutor | None = None
        self._scratch: list[torch.Tensor] = []

    def run(self, plan: MergePlan, forms: Sequence, reader: JobReader, writers: Sequence[JobWriter],
            progress) -> None:
        nonlinear = isinstance(forms[0], CombineForm)
        weights = forms[0].weights
        if any(isinstance(f, CombineForm) != nonlinear or f.weights != weights for f in forms):
            raise ValueError("the forms of one merge share their kind and weights")
        stats = forms[0].method.statistics(plan.n_inputs - 1) if nonlinear else None
        if stats is not None:
            for number in range(stats.passes):
                self._statistics_pass(plan, stats, number, reader, progress)
            stats.begin_merge()
        reads = [(job, index) for job in plan.jobs
                 for index in range(plan.n_inputs if job.kind == "combine" else 1)]
        chunks = Prefetcher(reader, reads, plan.buffer_bytes, buffers=plan.n_inputs + 2,
                            pin=self.device.type == "cuda")
        slots = [[torch.empty(plan.buffer_bytes, dtype=torch.uint8) for _ in forms] for _ in range(2)]
        weight_tables = {dtype: torch.tensor(weights, dtype=dtype, device=self.device)
                         for dtype in (torch.float32, torch.float64)} if weights else {}
        threads = torch.get_num_threads()
        torch.set_num_threads(max(1, threads - 1))  # a core for the reader thread
        if nonlinear and self._use_compiled(forms) and torch.get_num_threads() > 1:
            self._pool = ThreadPoolExecutor(torch.get_num_threads(), thread_name_prefix="taskvec-combine")
        try:
            with WriteBehind(writers) as behind:
                for number, job in enumerate(plan.jobs):
                    if job.kind == "copy":  # the read buffer itself is written, then handed back
                        raw = chunks.take()
                        behind.submit(job, [raw[:job.nbytes_in]] * len(writers),
                                      release=lambda raw=raw: chunks.give_back(raw))
                        progress.update(job.nbytes_in)
                        continue
                    outs = slots[number % 2]
                    behind.wait(number % 2)  # the slot's output buffers are free again
                    raws = [chunks.take() for _ in range(plan.n_inputs)]
                    if nonlinear:
                        results = self._combine_job(plan, forms, job, raws, stats, weight_tables.get(acc_dtype(job)),
                                                    outs)
                    else:
                        results = self._linear_job(forms, job, raws, outs)
                    for raw in raws:
                        chunks.give_back(raw)
                    behind.submit(job, results, slot=number % 2)
                    progress.update(job.nbytes_in * plan.n_inputs)
        finally:
            chunks.close()
            torch.set_num_threads(threads)
            if self._pool is not None:
                self._pool.shutdown()
                self._pool = None
            self._scratch.clear()

    def _use_compiled(self, forms) -> bool:
        """Whether the CPU runs the method's fused() combine as the compiled loop."""
        compiled = COMPILED if self.compiled is None else self.compiled
        return compiled and self.device.type == "cpu" and forms[0].method.fused() is not None

    def _values(self, raw: torch.Tensor, job: Job, dtype: torch.dtype) -> torch.Tensor:
        """A job's chunk from its host buffer, on the device, in `dtype` (no copy where none is needed)."""
        values = raw[:job.nbytes_in].view(job.in_dtype)
        if self.device.type != "cpu":
            values = values.to(self.device)
        return values if values.dtype == dtype else values.to(dtype)

    def _combine_job(self, plan, forms, job, raws, stats, weights, outs) -> list[torch.Tensor]:
        fused = forms[0].method.fused()
        if fused is not None and self.kernel:
            from taskvec.kernels.sparse_combine import KERNEL_DTYPES

            if job.in_dtype in KERNEL_DTYPES and job.out_dtype in KERNEL_DTYPES:
                return self._kernel_job(plan, forms, job, raws, stats, fused, outs)
        if fused is not None and self._use_compiled(forms):
            from taskvec.kernels.sparse_combine_cpu import DTYPES

            if job.in_dtype in DTYPES:
                return self._compiled_job(plan, forms, job, raws, stats, fused, outs)
        dtype = acc_dtype(job)
        base = self._values(raws[0], job, dtype)
        finetuned = [raws[i][:job.nbytes_in].view(job.in_dtype) for i in range(1, plan.n_inputs)]
        if self.device.type != "cpu":
            finetuned = [f.to(self.device) for f in finetuned]
        n = len(finetuned)
        tau = torch.empty(job.numel, dtype=dtype, device=self.device)
        position = 0
        for segment in job.segments:
            span = slice(position, position + segment.numel)
            stack = torch.empty((n, segment.numel), dtype=dtype, device=self.device)
            for row, values in zip(stack, finetuned, strict=True):
                row.copy_(values[span])
            context = ChunkContext(segment.name, segment.start, segment.sources[0].numel, stats, weights)
            tau[span] = forms[0].method.combine(base[span], stack, context)
            position += segment.numel
        results = []
        for form, out in zip(forms, outs, strict=True):
            merged = torch.mul(tau, -form.scale).add_(base)  # two roundings, never fused: chunk-independent
            target = out[:job.nbytes_out].view(job.out_dtype)
            target.copy_(merged)
            results.append(out[:job.nbytes_out])
        return results

    def _kernel_job(self, plan, forms, job, raws, stats, fused, outs) -> list[torch.Tensor]:
        """The job's outputs from the fused kernel: the bytes of the torch path above."""
        from taskvec.kernels.sparse_combine import sparse_combine_triton

        inputs = [raw[:job.nbytes_in].view(job.in_dtype) for raw in raws[:plan.n_inputs]]
        if self.device.type != "cpu":
            inputs = [values.to(self.device) for values in inputs]
        base, finetuned = inputs[0], inputs[1:]
        cutoffs = _keep_rules(job, stats, base, finetuned) if fused.sparsify == "magnitude" else None
        targets = [out[:job.nbytes_out].view(job.out_dtype) for out in outs]
        if self.device.type != "cpu":
            targets = [torch.empty(job.numel, dtype=job.out_dtype, device=self.device) for _ in outs]
        sparse_combine_triton(base, finetuned, job.segments, [form.scale for form in forms], targets,
                              sparsify=fused.sparsify, consensus=fused.consensus, density=fused.density,
                              seed=fused.seed, weights=forms[0].weights, cutoffs=cutoffs)
        for out, target in zip(outs, targets, strict=True):
            if target.device.type != "cpu":
                out[:job.nbytes_out].view(job.out_dtype).copy_(target)
        return [out[:job.nbytes_out] for out in outs]

    def _compiled_job(self, plan, forms, job, raws, stats, fused, outs) -> list[torch.Tensor]:
        """The job's outputs from the compiled CPU loop: the bytes of the torch path above. An
        output dtype other than the accumulation dtype is cast by torch's copy_, as above."""
        from taskvec.kernels.sparse_combine_cpu import sparse_combine_cpu

        dtype = acc_dtype(job)
        inputs = [raw[:job.nbytes_in].view(job.in_dtype) for raw in raws[:plan.n_inputs]]
        base, finetuned = inputs[0], inputs[1:]
        cutoffs = _keep_rules(job, stats, base, finetuned) if fused.sparsify == "magnitude" else None
        direct = job.out_dtype == dtype
        if not direct:
            while len(self._scratch) < len(outs):
                self._scratch.append(torch.empty(0, dtype=torch.uint8))
            for k in range(len(outs)):
                if self._scratch[k].numel() < job.numel * dtype.itemsize:  # once per run: the largest job
                    largest = max(j.numel for j in plan.jobs if j.kind == "combine")
                    self._scratch[k] = torch.empty(largest * dtype.itemsize, dtype=torch.uint8)
        targets = [out[:job.nbytes_out].view(dtype) if direct else self._scratch[k][:job.numel * dtype.itemsize]
                   .view(dtype) for k, out in enumerate(outs)]
        sparse_combine_cpu(base, finetuned, job.segments, [form.scale for form in forms], targets,
                           sparsify=fused.sparsify, consensus=fused.consensus, density=fused.density,
                           seed=fused.seed, weights=forms[0].weights, cutoffs=cutoffs,
                           threads=torch.get_num_threads(), pool=self._pool)
        if not direct:
            for out, target in zip(outs, targets, strict=True):
                out[:job.nbytes_out].view(job.out_dtype).copy_(target)
        return [out[:job.nbytes_out] for out in outs]

    def _linear_job(self, forms, job, raws, outs) -> list[torch.Tensor]:
        """A weighted linear form: the weighted sum, then each form, as the CPU executor does."""
        dtype = acc_dtype(job)
        on_device = [r[:job.nbytes_in].view(job.in_dtype) for r in raws]
        if self.device.type != "cpu":
            on_device = [v.to(self.device) for v in on_device]
        base = on_device[0]
        acc = torch.empty(job.numel, dtype=dtype, device=self.device)
        scratch = torch.empty(job.numel, dtype=dtype, device=self.device) if job.in_dtype != dtype else None
        weighted_sum(on_device[1:], forms[0].weights, acc)
        results = []
        for k, (form, out) in enumerate(zip(forms, outs, strict=True)):
            last = k == len(forms) - 1
            work = None if last else torch.empty_like(acc)
            result = linear_reference(acc, base, form.base_coef, form.sum_coef, dtype=job.out_dtype,
                                      work=work, scratch=scratch)
            out[:job.nbytes_out].view(job.out_dtype).copy_(result)
            results.append(out[:job.nbytes_out])
        return results

    def _statistics_pass(self, plan, stats, number, reader, progress) -> None:
        """One streaming pass of `stats.update` over the chunks it wants: base and one fine-tune at
        a time."""
        jobs = [job for job in plan.jobs if job.kind == "combine"]
        wanted = [job for job in jobs if any(stats.wants(number, s.name) for s in job.segments)]
        reads = [(job, index) for job in wanted for index in range(plan.n_inputs)]
        chunks = Prefetcher(reader, reads, plan.buffer_bytes, buffers=3)
        taus: dict[torch.dtype, torch.Tensor] = {}  # one buffer per dtype: no allocation per chunk
        try:
            for job in wanted:
                base_raw = chunks.take()
                base = self._values(base_raw, job, acc_dtype(job))
                if base.dtype not in taus:
                    largest = max(j.numel for j in wanted)
                    taus[base.dtype] = torch.empty(largest, dtype=base.dtype, device=self.device)
                tau = taus[base.dtype]
                for index in range(plan.n_inputs - 1):
                    raw = chunks.take()
                    values = self._values(raw, job, acc_dtype(job))
                    position = 0
                    for segment in job.segments:
                        if stats.wants(number, segment.name):
                            span = slice(position, position + segment.numel)
                            stats.update(number, segment.name, segment.start, segment.sources[0].numel, index,
                                         torch.sub(values[span], base[span], out=tau[span]))
                        position += segment.numel
                    chunks.give_back(raw)
                chunks.give_back(base_raw)
                progress.update(job.nbytes_in * plan.n_inputs)
        finally:
            chunks.close()
        read = {id(job) for job in wanted}
        progress.update(sum(job.nbytes_in for job in jobs if id(job) not in read) * plan.n_inputs)



def _keep_rules(job: Job, stats, base: torch.Tensor, finetuned: Sequence[torch.Tensor]) -> list:
    """TIES's keep rule of each (segment, input) of a job, as the fused loops take it: (T, cutoff)
    from `MagnitudeThresholds.keep_rule`, called in the order the torch path calls `keep()`."""
    dtype = acc_dtype(job)
    cutoffs, position = [], 0
    for segment in job.segments:
        span = slice(position, position + segment.numel)

        def tau(i, span=span):  # only where ties at the threshold are split in this chunk
            return finetuned[i][span].to(dtype) - base[span].to(dtype)

        cutoffs.append([stats.keep_rule(segment.name, i, segment.numel, lambda i=i: tau(i))
                        for i in range(len(finetuned))])
        position += segment.numel
    return cutoffs
