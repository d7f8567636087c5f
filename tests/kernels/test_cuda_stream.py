"""The CUDA streaming executor: its pipeline on CPU (interpreted kernel), and on a real GPU.

On CPU, `CudaExecutor("cpu")` runs the same job loop, slot rotation and pointer tables with
synchronous stand-ins for streams, so CI exercises everything but the asynchrony itself; with a
GPU the same tests run `CudaExecutor("cuda")` with its streams and pinned buffers.
"""

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
