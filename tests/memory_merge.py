"""An in-memory merge for executor tests: flat models, jobs cut as plan.py cuts them, a reader
and writers over dicts of tensors, so an executor runs on a plan without files."""

from types import SimpleNamespace

import torch

from taskvec.stream.plan import Job, Segment

SHAPES = {"a.weight": (37, 41), "b.bias": (5,), "c.weight": (3, 1, 11), "d.scale": (1,), "e.weight": (300,)}


def make_models(n, dtype, seed=0, shapes=SHAPES, generic=False):
    """A base and n fine-tunes, flat, in `dtype`: multiples of 1/4 plus task vectors that are
    multiples of 1/512 in [-0.75, 0.75] (exact in float32 arithmetic, many exact ties in |tau|);
    `generic`: normal deviates instead (every mantissa bit in play)."""
    g = torch.Generator().manual_seed(seed)
    if generic:
        base = {k: torch.randn(s, generator=g).flatten() for k, s in shapes.items()}
        fts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(n)]
    else:
        base = {k: (torch.randint(-8, 9, s, generator=g) / 4).flatten() for k, s in shapes.items()}
        fts = [{k: v + torch.randint(-384, 385, v.shape, generator=g) / 512 for k, v in base.items()}
               for _ in range(n)]
    return [{k: v.to(dtype) for k, v in model.items()} for model in [base, *fts]]


def make_jobs(models, chunk, out_dtype):
    """Jobs as plan.py cuts them: tensors packed in order, at most `chunk` elements per job."""
    jobs = []
    for name, tensor in models[0].items():
        source = SimpleNamespace(numel=tensor.numel())
        start = 0
        while start < tensor.numel():
            if not jobs or jobs[-1].numel == chunk:
                jobs.append(Job("combine", tensor.dtype, out_dtype))
            take = min(tensor.numel() - start, chunk - jobs[-1].numel)
            jobs[-1].segments.append(Segment(name, start, take, (source,) * len(models)))
            jobs[-1].numel += take
            start += take
    return jobs


class MemoryReader:
    def __init__(self, models):
        self.models = models

    def read_job(self, job, index, buffer):
        position = 0
        for s in job.segments:
            values = self.models[index][s.name][s.start:s.start + s.numel].to(job.in_dtype)
            buffer[position:position + values.numel() * values.element_size()].view(job.in_dtype).copy_(values)
            position += values.numel() * values.element_size()


class MemoryWriter:
    def __init__(self, models, out_dtype):
        self.out = {k: torch.full_like(v, float("nan"), dtype=out_dtype) for k, v in models[0].items()}

    def write_job(self, job, buffer):
        values = buffer[:job.nbytes_out].view(job.out_dtype)
        position = 0
        for s in job.segments:
            self.out[s.name][s.start:s.start + s.numel] = values[position:position + s.numel]
            position += s.numel


class NoProgress:
    def update(self, nbytes):
        pass
