"""The streaming engine: a plan, the job I/O both executors share, and the executors.

    plan = plan_merge(checkpoints)                    # headers only; every error raised here
    executor = make_executor("auto")                  # CpuExecutor or CudaExecutor
    executor.run(plan, forms, reader, writers, bar)   # one read of the inputs, one output per form

Plain linear forms (the negated mean, negate, average) run on CpuExecutor or CudaExecutor (the
fused Triton kernel); non-linear methods (TIES, DARE: CombineForm) and weighted linear forms on a
GPU run on the general torch executor (`make_general_executor`, taskvec.stream.general).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from taskvec.errors import TaskvecError
from taskvec.methods import CombineForm, LinearForm
from taskvec.stream.jobs import JobReader, JobWriter, Prefetcher
from taskvec.stream.plan import DEFAULT_CHUNK_BYTES, Job, MergePlan, Segment, plan_merge

__all__ = ["DEFAULT_CHUNK_BYTES", "Executor", "Job", "JobReader", "JobWriter", "MergePlan", "Prefetcher",
           "Segment", "make_executor", "make_general_executor", "plan_merge"]


class Executor(Protocol):
    def run(self, plan: MergePlan, forms: Sequence[LinearForm | CombineForm], reader: JobReader,
            writers: Sequence[JobWriter], progress) -> None:
        """Read every job's inputs once and hand writers[k] the job's result under forms[k]."""


def make_executor(device: str) -> Executor:
    """'cpu', 'cuda', or 'auto' (CUDA when a GPU and triton are there)."""
    if device not in ("auto", "cpu", "cuda"):
        raise TaskvecError(f"unknown device {device!r}: use cpu, cuda or auto")
    if device == "cpu":
        from taskvec.stream.cpu import CpuExecutor

        return CpuExecutor()
    from taskvec.kernels import triton_available

    usable = torch.cuda.is_available() and triton_available()
    if device == "auto":
        return _cuda_executor() if usable else make_executor("cpu")
    if not torch.cuda.is_available():
        raise TaskvecError("--device cuda: no CUDA device is available (use --device cpu)")
    if not triton_available():
        raise TaskvecError("--device cuda needs triton: pip install 'taskvec[gpu]'")
    return _cuda_executor()


def _cuda_executor():
    from taskvec.stream.cuda import CudaExecutor

    return CudaExecutor()


def make_general_executor(device: str) -> Executor:
    """The torch executor for non-linear methods and weighted forms: 'cpu', 'cuda' (the same
    torch code on the GPU; no triton needed) or 'auto' (CUDA when a GPU is there)."""
    if device not in ("auto", "cpu", "cuda"):
        raise TaskvecError(f"unknown device {device!r}: use cpu, cuda or auto")
    if device == "cuda" and not torch.cuda.is_available():
        raise TaskvecError("--device cuda: no CUDA device is available (use --device cpu)")
    from taskvec.stream.general import TorchExecutor

    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    return TorchExecutor("cuda" if use_cuda else "cpu")
