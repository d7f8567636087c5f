"""The CUDA streaming executor: its pipeline on CPU (interpreted kernel), and on a real GPU.

On CPU, `CudaExecutor("cpu")` runs the same job loop, slot rotation and pointer tables with
synchronous stand-ins for streams, so CI exercises everything but the asynchrony itself; with a
GPU the same tests run `CudaExecutor("cuda")` with its streams and pinned buffers.
"""

import re

import pytest
import torch
from safetensors.torch import save_file

from helpers import assert_close_to_reference, error_bound, load_dir, negated_mean_f64

pytest.importorskip("triton")

from taskvec import merge  # noqa: E402
from taskvec.stream.cuda import CudaExecutor  # noqa: E402

SHAPES = {  # name -> (shape, dtype): split tensors, packed small ones, every job kind
    "a.weight": ((257, 9), torch.float32),
    "a.bias": ((13,), torch.float32),
    "b.weight": ((1000,), torch.bfloat16),
    "b.bias": ((3,), torch.bfloat16),
    "position_ids": ((5,), torch.int64),
    "scale64": ((11,), torch.float64),
}
N = 3
SCALE = 1.5


@pytest.fixture(scope="module")
def mixed_checkpoints(tmp_path_factory):
    """A base and N fine-tunes holding float32, bfloat16, float64 and int64 tensors."""
    root = tmp_path_factory.mktemp("mixed")
    generator = torch.Generator().manual_seed(0)
    paths = []
    for model in range(N + 1):
        tensors = {}
        for name, (shape, dtype) in SHAPES.items():
            if dtype == torch.int64:
                tensors[name] = torch.arange(5) + model  # only the base's is copied
            else:
                tensors[name] = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
        path = root / ("base" if model == 0 else f"ft-{model}")
        path.mkdir()
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
        paths.append(path)
    return paths


class CountingProgress:
    def __init__(self):
        self.n = 0

    def update(self, nbytes):
        self.n += nbytes


def test_pipeline_matches_float64(device, mixed_checkpoints, tmp_path, monkeypatch, launches):
    base_path, *ft_paths = mixed_checkpoints
    runs = []

    class Recording(CudaExecutor):
        def run(self, plan, forms, reader, writers, progress):
            counter = CountingProgress()
            super().run(plan, forms, reader, writers, counter)
            runs.append((plan, counter.n))

    monkeypatch.setattr(merge, "make_executor", lambda _: Recording(device))
    # 1 KiB chunks: a.weight is split into many jobs, so both slots are reused several times
    merge.merge_checkpoints(ft_paths, tmp_path / "out", base=base_path, scale=SCALE,
                            chunk_size=1024, progress=False)
    (plan, progressed), = runs
    kernel_jobs = [j for j in plan.jobs if j.kind == "combine" and j.in_dtype != torch.float64]
    assert len(kernel_jobs) > 4 and len(launches) == len(kernel_jobs)
    assert progressed == plan.bytes_read

    base, fts, merged = load_dir(base_path), [load_dir(p) for p in ft_paths], load_dir(tmp_path / "out")
    assert merged.keys() == base.keys()
    monkeypatch.undo()
    merge.merge_checkpoints(ft_paths, tmp_path / "cpu", base=base_path, scale=SCALE, device="cpu",
                            chunk_size=1024, progress=False)
    cpu = load_dir(tmp_path / "cpu")
    for name, (_, dtype) in SHAPES.items():
        if dtype != torch.float64:  # the kernel writes the CPU merge's bytes (see docs/kernels.md)
            assert torch.equal(merged[name], cpu[name]), name
    for name, (_, dtype) in SHAPES.items():
        assert merged[name].dtype == dtype, name
        if dtype == torch.int64:
            assert torch.equal(merged[name], base[name])
            continue
        reference = negated_mean_f64(base[name], [f[name] for f in fts], SCALE)
        if dtype == torch.float64:  # torch path in float64: a few float64 roundoffs
            torch.testing.assert_close(merged[name], reference, rtol=1e-13, atol=1e-13)
            continue
        bound = error_bound(base[name], [f[name] for f in fts], 1 + SCALE, SCALE / N, reference, dtype)
        assert_close_to_reference(merged[name], reference, bound, name)


def test_output_dtype_conversion_on_the_pipeline(device, mixed_checkpoints, tmp_path, monkeypatch,
                                                 launches):
    base_path, *ft_paths = mixed_checkpoints
    monkeypatch.setattr(merge, "make_executor", lambda _: CudaExecutor(device))
    merge.merge_checkpoints(ft_paths[:1], tmp_path / "out", base=base_path, method="negate",
                            scale=0.5, dtype="bfloat16", chunk_size=4096, progress=False)
    base, ft, merged = load_dir(base_path), load_dir(ft_paths[0]), load_dir(tmp_path / "out")
    assert launches
    for name in ["a.weight", "a.bias", "b.weight", "scale64"]:
        reference = negated_mean_f64(base[name], [ft[name]], 0.5)
        bound = error_bound(base[name], [ft[name]], 1.5, 0.5, reference, torch.bfloat16)
        assert merged[name].dtype == torch.bfloat16
        assert_close_to_reference(merged[name], reference, bound, name)


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_cuda_merge_of_gpt2_sized_checkpoints_matches_cpu(tmp_path, dtype):
    from taskvec.synthetic import write_synthetic

    sset = write_synthetic(tmp_path / "set", size="gpt2", n_finetuned=3, dtype=dtype)
    assert isinstance(merge.make_executor("cuda"), CudaExecutor)
    for device in ("cuda", "cpu"):
        merge.merge_checkpoints(sset.finetuned, tmp_path / device, base=sset.base, scale=1.0,
                                device=device, progress=False)
    base, fts = load_dir(sset.base), [load_dir(p) for p in sset.finetuned]
    gpu, cpu = load_dir(tmp_path / "cuda"), load_dir(tmp_path / "cpu")
    assert gpu.keys() == cpu.keys() == base.keys()
    for name in base:
        reference = negated_mean_f64(base[name], [f[name] for f in fts], 1.0)
        bound = error_bound(base[name], [f[name] for f in fts], 2.0, 1 / 3, reference, gpu[name].dtype)
        assert_close_to_reference(gpu[name], reference, bound, f"cuda {name}")
        assert torch.equal(gpu[name], cpu[name]), name


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_slow_kernels_and_pending_work_do_not_break_the_buffer_order(mixed_checkpoints, tmp_path, monkeypatch):
    """Stretch every step of the pipeline so that a missing wait shows as wrong bytes: each
    compute waits ~1 ms before its kernel, and the caller's stream has a long kernel queued
    over memory it frees before the merge allocates its buffers."""
    from taskvec.stream import cuda as cuda_stream

    base_path, *ft_paths = mixed_checkpoints
    compute = cuda_stream._compute

    def slow_compute(forms, job, slot):
        torch.cuda._sleep(2_000_000)  # cycles, on the compute stream the caller has made current
        compute(forms, job, slot)

    merge.merge_checkpoints(ft_paths, tmp_path / "cpu", base=base_path, scale=SCALE, device="cpu",
                            chunk_size=1024, progress=False)
    monkeypatch.setattr(cuda_stream, "_compute", slow_compute)
    monkeypatch.setattr(merge, "make_executor", lambda _: CudaExecutor("cuda"))
    pending = torch.full((1 << 24,), 7.0, device="cuda")
    torch.cuda._sleep(50_000_000)
    pending.mul_(2)  # queued behind the sleep, then its memory goes back to the allocator
    del pending
    merge.merge_checkpoints(ft_paths, tmp_path / "gpu", base=base_path, scale=SCALE,
                            chunk_size=1024, progress=False)
    gpu, cpu = load_dir(tmp_path / "gpu"), load_dir(tmp_path / "cpu")
    for name, (_, dtype) in SHAPES.items():
        if dtype != torch.float64:
            assert torch.equal(gpu[name], cpu[name]), name


def test_many_scales_on_the_pipeline_equal_the_cpu_merge(device, mixed_checkpoints, tmp_path, monkeypatch):
    """One read, K outputs: the K-output kernel on the pipeline writes the CPU merge's bytes."""
    from taskvec.kernels import combine

    base_path, *ft_paths = mixed_checkpoints
    scales = [0.0, 0.5, -1.0, 2.5]
    launched = []
    kernel = combine._combine_scales_kernel

    class Spy:
        def __getitem__(self, grid):
            launched.append(grid)
            return kernel[grid]

    monkeypatch.setattr(combine, "_combine_scales_kernel", Spy())
    monkeypatch.setattr(merge, "make_executor", lambda _: CudaExecutor(device))
    gpu = merge.merge_checkpoints(ft_paths, tmp_path / "gpu", base=base_path, scale=scales, chunk_size=1024,
                                  progress=False)
    monkeypatch.undo()
    cpu = merge.merge_checkpoints(ft_paths, tmp_path / "cpu", base=base_path, scale=scales, device="cpu",
                                  chunk_size=1024, progress=False)
    assert launched
    for gpu_dir, cpu_dir in zip(gpu.outputs, cpu.outputs, strict=True):
        on_gpu, on_cpu = load_dir(gpu_dir), load_dir(cpu_dir)
        for name, (_, dtype) in SHAPES.items():
            if dtype == torch.float64:
                torch.testing.assert_close(on_gpu[name], on_cpu[name], rtol=1e-13, atol=1e-13)
            else:
                assert torch.equal(on_gpu[name], on_cpu[name]), (gpu_dir.name, name)


# ---- the shared job I/O on the pipeline: reader thread, write-behind thread ------------------

def copies(paths, root):
    """Private copies of the checkpoints, which a test may damage."""
    import shutil

    return [shutil.copytree(p, root / p.name) for p in paths]


def taskvec_threads():
    import threading

    return [t.name for t in threading.enumerate() if t.name.startswith("taskvec")]


def test_reads_and_writes_overlap_on_their_threads_without_changing_bytes(device, mixed_checkpoints, tmp_path,
                                                                          monkeypatch):
    """Reads run on the Prefetcher's thread and ahead of a slow write (job 2's inputs are read
    while job 0's results are still being written), writes on the WriteBehind's thread, and the
    bytes are the CPU merge's however the two threads' timing falls (jittered here)."""
    import random
    import threading
    import time

    from taskvec.stream.jobs import JobReader, JobWriter

    base_path, *ft_paths = mixed_checkpoints
    scales = [0.5, -1.5]
    cpu = merge.merge_checkpoints(ft_paths, tmp_path / "cpu", base=base_path, scale=scales, device="cpu",
                                  chunk_size=1024, progress=False)
    log, lock, jitter = [], threading.Lock(), random.Random(0)
    read_job, write_job = JobReader.read_job, JobWriter.write_job

    def read(self, job, index, buffer):
        with lock:
            log.append(("read", id(job), threading.current_thread().name))
        time.sleep(jitter.random() * 1e-3)
        read_job(self, job, index, buffer)

    def write(self, job, buffer):
        time.sleep(0.05 if not any(e[0] == "wrote" for e in log) else jitter.random() * 1e-3)
        write_job(self, job, buffer)
        with lock:
            log.append(("wrote", id(job), threading.current_thread().name))

    monkeypatch.setattr(JobReader, "read_job", read)
    monkeypatch.setattr(JobWriter, "write_job", write)
    monkeypatch.setattr(merge, "make_executor", lambda _: CudaExecutor(device))
    gpu = merge.merge_checkpoints(ft_paths, tmp_path / "gpu", base=base_path, scale=scales, chunk_size=1024,
                                  progress=False)
    assert {name for kind, _, name in log if kind == "read"} == {"taskvec-read"}
    assert {name.rsplit("_", 1)[0] for kind, _, name in log if kind == "wrote"} == {"taskvec-write"}
    reads = list(dict.fromkeys(job for kind, job, _ in log if kind == "read"))  # jobs in read order
    combine = [job for job in reads if sum(1 for e in log if e[:2] == ("read", job)) == N + 1]
    first_write = next(i for i, e in enumerate(log) if e[0] == "wrote" and e[1] == combine[0])
    assert log.index(("read", combine[2], "taskvec-read")) < first_write
    assert not taskvec_threads()
    for gpu_dir, cpu_dir in zip(gpu.outputs, cpu.outputs, strict=True):
        on_gpu, on_cpu = load_dir(gpu_dir), load_dir(cpu_dir)
        for name, (_, dtype) in SHAPES.items():
            if dtype == torch.float64:  # torch in float64 on the device
                torch.testing.assert_close(on_gpu[name], on_cpu[name], rtol=1e-13, atol=1e-13)
            else:
                assert torch.equal(on_gpu[name], on_cpu[name]), (gpu_dir.name, name)


@pytest.mark.parametrize("fault", ["reader", "writer"])
def test_a_reader_or_writer_error_is_the_cpu_paths_one_line_error(device, mixed_checkpoints, tmp_path, monkeypatch,
                                                                  fault):
    """An input that shrinks under the merge (the reader thread's error) or a full disk (the
    writer thread's): the CUDA pipeline raises the CPU merge's one-line TaskvecError, leaves no
    output and no thread running."""
    import errno
    import os

    from taskvec.errors import TaskvecError
    from taskvec.io.safetensors_file import FileReader
    from taskvec.io.shards import ShardWriter

    messages = {}
    for executor in ("cpu", "cuda-pipeline"):
        base_path, *ft_paths = copies(mixed_checkpoints, tmp_path / executor)
        if fault == "reader":
            read_into, victim = FileReader.read_into, ft_paths[1] / "model.safetensors"

            def shrink(self, path, offset, buffer, read_into=read_into, victim=victim):
                if path == victim and os.path.getsize(victim) > 2000:
                    os.truncate(victim, 2000)  # inside a.weight's data, after the first chunks
                read_into(self, path, offset, buffer)

            monkeypatch.setattr(FileReader, "read_into", shrink)
        else:
            write, calls = ShardWriter.write, []

            def fail_fifth(self, name, start, data, write=write, calls=calls):
                calls.append(name)
                if len(calls) == 5:
                    raise OSError(errno.ENOSPC, "No space left on device", str(self.directory))
                write(self, name, start, data)

            monkeypatch.setattr(ShardWriter, "write", fail_fifth)
        if executor != "cpu":
            monkeypatch.setattr(merge, "make_executor", lambda _: CudaExecutor(device))
        out = tmp_path / executor / "out"
        with pytest.raises(TaskvecError) as error:
            merge.merge_checkpoints(ft_paths, out, base=base_path, scale=SCALE, chunk_size=1024, progress=False,
                                    device="cpu" if executor == "cpu" else "auto")
        monkeypatch.undo()
        message = str(error.value).replace(str(tmp_path / executor), "ROOT")
        messages[executor] = re.sub(r"partial-[0-9a-f]+", "partial-X", message)  # the staging directory
        assert "\n" not in messages[executor]
        assert not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(".out.")]
        assert not taskvec_threads(), executor
    assert messages["cpu"] == messages["cuda-pipeline"]
    assert ("unexpected end of file" if fault == "reader" else "No space left on device") in messages["cpu"]
