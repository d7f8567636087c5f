"""The one pass: the merge's plan and readers feed each job's task vectors to the accumulators.

Inputs are [base, fine-tunes..., merged...]; each input's chunk of a job arrives in the job's
dtype from the merge's JobReader, on the merge's Prefetcher thread. The vectors are tau_i =
ft_i - base, then the mean of the fine-tunes' (for two or more), then M - base for each merged
model. On a CPU the chunks go as one (inputs x elements) array to the compiled loop
(taskvec.inspect.fused); on CUDA, and as the reference, each vector becomes one row of a float64
(vectors x elements) matrix for the torch accumulators. Memory is that array or matrix and a few
temporaries of its size, whatever the model, so the chunk is divided among the vectors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from taskvec.inspect.accumulators import BaseSpread, Binning, SignCodes, TensorAccumulator, Totals, grid_keys
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
        if device.type == "cpu" and CPU_ENGINE == "fused":
            return _fused_pass(plan, jobs, chunks, n_finetuned, rows, settings, abs_binning, norm_binning, progress)
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


def _fused_pass(plan: MergePlan, jobs, chunks: Prefetcher, n_finetuned: int, rows: int, settings: Settings,
                abs_binning: Binning, norm_binning: Binning, progress) -> PassResult:
    from taskvec.inspect.fused import FusedState

    state = FusedState(rows, n_finetuned, settings, abs_binning)
    try:
        return _fused_jobs(plan, jobs, chunks, state, rows, norm_binning, progress)
    finally:
        state.close()


def _fused_jobs(plan: MergePlan, jobs, chunks: Prefetcher, state, rows: int, norm_binning: Binning,
                progress) -> PassResult:
    from taskvec.inspect import fused

    hist_norm = torch.zeros(rows, norm_binning.slots_count, dtype=torch.int64)
    tensors: dict[str, Totals] = {}
    base_std: dict[str, float] = {}
    spread = BaseSpread()
    largest = max((job.numel for job in jobs), default=0)
    wide = any(job.in_dtype == torch.float64 for job in jobs)
    stack = torch.empty(plan.n_inputs, largest, dtype=torch.float64 if wide else torch.float32)
    for job in jobs:
        dtype = torch.float64 if job.in_dtype == torch.float64 else torch.float32
        x = stack.view(-1)[:plan.n_inputs * job.numel].view(plan.n_inputs, job.numel)
        if dtype != stack.dtype:
            x = torch.empty(plan.n_inputs, job.numel, dtype=dtype)
        for index in range(plan.n_inputs):
            raw = chunks.take()
            x[index].copy_(raw[:job.nbytes_in].view(job.in_dtype))
            chunks.give_back(raw)
        values = x.numpy()
        position = 0
        for segment in job.segments:
            end = position + segment.numel
            state.add(values, position, end)
            spread.add_moments(segment.numel, *fused.base_moments(values, position, end))
            if segment.start + segment.numel == segment.sources[0].numel:
                base_std[segment.name] = spread.std
                tensors[segment.name] = state.finish(segment.sources[0].numel, spread.std, norm_binning, hist_norm)
                spread = BaseSpread()
            position = end
        progress.update(job.nbytes_in * plan.n_inputs)
    order = [spec.name for spec in plan.outputs if spec.name in tensors]
    return PassResult({name: tensors[name] for name in order}, base_std, state.histogram(), hist_norm)
