"""The one pass: the merge's plan and readers feed each job's task vectors to the accumulators.

Inputs are [base, fine-tunes..., merged...]. The vectors are tau_i = ft_i - base, then the mean
of the fine-tunes' (for two or more), then M - base for each merged model. On a CPU the compiled
loop (taskvec.inspect.fused) reads each input's row of a job where its file is mapped
(taskvec.inspect.mapped: float32 and float64 tensors at aligned offsets), or else from a stacked
(inputs x elements) buffer that the merge's JobReader fills on the Prefetcher thread. On CUDA,
and as the reference, each input's chunk arrives in the job's dtype from the same reader and
each vector becomes one row of a float64 (vectors x elements) matrix for the torch accumulators.
Memory is a job's chunks and a few temporaries of their size, whatever the model, so the chunk
is divided among the vectors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from taskvec.inspect.accumulators import Binning, SignCodes, TensorAccumulator, Totals, grid_keys
from taskvec.inspect.settings import Settings
from taskvec.stream import JobReader, MergePlan, Prefetcher

CPU_ENGINE = "fused"  # or "torch": the reference accumulators, which tests also run on CPU


@dataclass
class PassResult:
    tensors: dict[str, Totals]  # in the plan's order
    base_std: dict[str, float]
    hist_abs: torch.Tensor  # (vectors, bins + 2): below, bins..., above
    hist_norm: torch.Tensor


def run_pass(plan: MergePlan, n_finetuned: int, n_merged: int, settings: Settings, device: torch.device,
             progress) -> PassResult:
    with_mean = n_finetuned >= 2
    rows = n_finetuned + with_mean + n_merged
    jobs = [job for job in plan.jobs if job.kind == "combine"]
    abs_binning = Binning(settings.edges(settings.range), settings.log_bins, device)
    norm_binning = Binning(settings.edges(settings.norm_range), settings.log_bins, device)
    if device.type == "cpu" and CPU_ENGINE == "fused":
        return _fused_pass(plan, jobs, n_finetuned, rows, settings, abs_binning, norm_binning, progress)
    hist_abs = torch.zeros(rows, abs_binning.slots_count, dtype=torch.int64, device=device)
    hist_norm = torch.zeros_like(hist_abs)
    signs = SignCodes(rows, n_finetuned, device)
    open_tensors: dict[str, TensorAccumulator] = {}
    tensors: dict[str, Totals] = {}
    base_std: dict[str, float] = {}
    reader = JobReader()
    reads = [(job, index) for job in jobs for index in range(plan.n_inputs)]
    chunks = Prefetcher(reader, reads, max((job.nbytes_in for job in jobs), default=0))
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads - 1))  # a core for the reader thread, as the merge does
    try:
        for job in jobs:
            base, tau = _task_vectors(job, chunks, plan.n_inputs, n_finetuned, with_mean, device)
            magnitude = tau.abs()
            hist_abs += abs_binning.count_rows(magnitude)
            keys = grid_keys(magnitude)
            codes = signs.codes(tau)
            position = 0
            for segment in job.segments:
                end = position + segment.numel
                total = segment.sources[0].numel
                accumulator = open_tensors.get(segment.name)
                if accumulator is None:
                    accumulator = open_tensors[segment.name] = TensorAccumulator(total, rows, n_finetuned,
                                                                                 settings, device)
                accumulator.add(tau[:, position:end], magnitude[:, position:end], keys[:, position:end],
                                None if codes is None else codes[position:end], signs, base[position:end])
                if segment.start + segment.numel == total:
                    tensors[segment.name] = open_tensors.pop(segment.name).finish(norm_binning, hist_norm)
                    base_std[segment.name] = accumulator.base_std
                position = end
            progress.update(job.nbytes_in * plan.n_inputs)
    finally:
        torch.set_num_threads(threads)
        chunks.close()
        reader.close()
    order = [spec.name for spec in plan.outputs if spec.name in tensors]
    return PassResult({name: tensors[name] for name in order}, base_std, hist_abs.cpu(), hist_norm.cpu())


def _task_vectors(job, chunks: Prefetcher, n_inputs: int, n_finetuned: int, with_mean: bool,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The job's base chunk and its (vectors x elements) task vectors, in float64."""
    base = torch.empty(job.numel, dtype=torch.float64, device=device)
    tau = torch.empty(n_inputs - 1 + with_mean, job.numel, dtype=torch.float64, device=device)
    for index in range(n_inputs):
        raw = chunks.take()
        values = raw[:job.nbytes_in].view(job.in_dtype)
        if index == 0:
            base.copy_(values)
        else:
            row = index - 1 + (with_mean and index > n_finetuned)
            tau[row].copy_(values).sub_(base)
        chunks.give_back(raw)
    if with_mean:
        mean = tau[n_finetuned]
        mean.copy_(tau[0])
        for row in tau[1:n_finetuned]:  # in order, as the fused loop adds them
            mean.add_(row)
        mean.div_(n_finetuned)
    return base, tau


class StackedReader:
    """Reads every input's chunk of a job into one buffer, as the (inputs x elements) array the
    compiled pass takes: float64 for float64 jobs, else float32, cast on the reader thread (a
    chunk of another dtype, or a LoRA module's, is first formed in the job's dtype, as the torch
    pass forms it)."""

    def __init__(self, n_inputs: int) -> None:
        self.n_inputs = n_inputs
        self.reader = JobReader()
        self._scratch = torch.empty(0, dtype=torch.uint8)

    @staticmethod
    def dtype(job) -> torch.dtype:
        return torch.float64 if job.in_dtype == torch.float64 else torch.float32

    def nbytes(self, job) -> int:
        return self.n_inputs * job.numel * self.dtype(job).itemsize

    def stacked(self, job, buffer: torch.Tensor) -> torch.Tensor:
        """The job's (inputs x elements) view of a buffer."""
        return buffer[:self.nbytes(job)].view(self.dtype(job)).view(self.n_inputs, job.numel)

    def read_job(self, job, _index: int, buffer: torch.Tensor) -> None:
        stacked = self.stacked(job, buffer)
        direct = job.in_dtype == self.dtype(job)
        if not direct and self._scratch.numel() < job.nbytes_in:
            self._scratch = torch.empty(job.nbytes_in, dtype=torch.uint8)
        for index in range(self.n_inputs):
            if direct:
                self.reader.read_job(job, index, stacked[index].view(torch.uint8))
            else:
                self.reader.read_job(job, index, self._scratch)
                stacked[index].copy_(self._scratch[:job.nbytes_in].view(job.in_dtype))

    def close(self) -> None:
        self.reader.close()


def _fused_pass(plan: MergePlan, jobs, n_finetuned: int, rows: int, settings: Settings, abs_binning: Binning,
                norm_binning: Binning, progress) -> PassResult:
    from taskvec.inspect.fused import FusedState
    from taskvec.inspect.mapped import MappedFiles

    reader = StackedReader(plan.n_inputs)
    mapped = MappedFiles()
    in_place = [_in_place(job) for job in jobs]
    stacked = [job for job, direct in zip(jobs, in_place, strict=True) if not direct]
    chunks = Prefetcher(reader, [(job, 0) for job in stacked], max((reader.nbytes(job) for job in stacked), default=0),
                        buffers=3)
    state = None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # torch only closes tensors here, small ops: threads would spin beside the loop's
    try:
        state = FusedState(rows, n_finetuned, settings, abs_binning)
        return _fused_jobs(plan, jobs, in_place, chunks, reader, mapped, state, rows, norm_binning, progress)
    finally:
        torch.set_num_threads(threads)
        if state is not None:
            state.close()
        chunks.close()
        reader.close()
        mapped.close()


def _in_place(job) -> bool:
    """Whether every input's segments of the job can be read where their files are mapped."""
    from taskvec.inspect.mapped import MappedFiles

    dtype = StackedReader.dtype(job)
    return job.in_dtype == dtype and all(MappedFiles.readable(source, segment.start, dtype)
                                         for segment in job.segments for source in segment.sources)


def _fused_jobs(plan: MergePlan, jobs, in_place: list[bool], chunks: Prefetcher, reader: StackedReader, mapped, state,
                rows: int, norm_binning: Binning, progress) -> PassResult:
    """Each job's segments to the compiled pass: read in place, or from the reader's stacked
    buffer (its rows' addresses)."""
    hist_norm = torch.zeros(rows, norm_binning.slots_count, dtype=torch.int64)
    tensors: dict[str, Totals] = {}
    base_std: dict[str, float] = {}
    for job, direct in zip(jobs, in_place, strict=True):
        dtype = StackedReader.dtype(job)
        buffer = None if direct else chunks.take()
        if not direct:
            origin = reader.stacked(job, buffer).data_ptr()
            rows_at = origin + np.arange(plan.n_inputs, dtype=np.int64) * (job.numel * dtype.itemsize)
        position = 0
        for segment in job.segments:
            if direct:
                addresses = np.array([mapped.address(source, segment.start, dtype) for source in segment.sources],
                                     dtype=np.int64)
            else:
                addresses = rows_at + position * dtype.itemsize
            state.add(addresses, dtype == torch.float64, segment.numel)
            if segment.start + segment.numel == segment.sources[0].numel:
                tensors[segment.name], base_std[segment.name] = state.finish(segment.sources[0].numel, norm_binning,
                                                                             hist_norm)
            position += segment.numel
        if direct:
            mapped.done([(source, segment.start, segment.numel, dtype) for segment in job.segments
                         for source in segment.sources])
        else:
            chunks.give_back(buffer)
        progress.update(job.nbytes_in * plan.n_inputs)
    order = [spec.name for spec in plan.outputs if spec.name in tensors]
    return PassResult({name: tensors[name] for name in order}, base_std, state.histogram(), hist_norm)
