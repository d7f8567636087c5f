"""Ops level: `taskvec.ops.negated_mean` against the unfused torch expression, per dtype and N.

Reports effective bandwidth (the bytes a merge must move, (N + 1) inputs read plus one output
written, over the median time) and its fraction of a plain copy's bandwidth measured in the
same run, on CUDA when present and on the CPU otherwise. Both results are checked against a
float64 reference.
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch

from benchmarks.check import compare
from taskvec.ops import negated_mean

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
NS = {"quick": (1, 5), "full": (1, 5, 16), "xl": (1, 5, 16)}
SCALE = 0.7


def numel_for(size: str, device: str) -> int:
    if size == "quick":
        return 1 << 16
    return 1 << 26 if device == "cuda" else 1 << 23  # well past the last-level cache


def unfused(base, finetuned, scale):
    """What one writes without taskvec; cast back so both produce the base's dtype."""
    return (base - scale * (torch.stack(finetuned).float().mean(0) - base)).to(base.dtype)


IMPLS = {"taskvec": negated_mean, "unfused": unfused}


def pytest_generate_tests(metafunc):
    if "impl" in metafunc.fixturenames:
        size = metafunc.config.getoption("--bench-size")
        metafunc.parametrize("dtype", list(DTYPES))
        metafunc.parametrize("n", NS[size])
        metafunc.parametrize("impl", list(IMPLS))


@pytest.fixture(scope="session")
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str, times: list[float]):
    """fn wrapped to append its own duration (device work included) to `times`."""
    def run():
        synchronize(device)
        started = time.perf_counter()
        result = fn()
        synchronize(device)
        times.append(time.perf_counter() - started)
        return result

    return run


@pytest.fixture(scope="session")
def copy_gbps(device):
    """Plain-copy bandwidth per element count: bytes read + written over the median of 7 copies."""
    cache = {}

    def get(numel: int) -> float:
        if numel not in cache:
            source = torch.randn(numel, device=device)
            target = torch.empty_like(source)
            times: list[float] = []
            copy = timed(lambda: target.copy_(source), device, times)
            for _ in range(8):
                copy()
            cache[numel] = 2 * source.nbytes / statistics.median(times[1:]) / 1e9
        return cache[numel]

    return get


def test_negated_mean(dtype, n, impl, benchmark, device, bench_size, copy_gbps, book):
    numel = numel_for(bench_size, device)
    generator = torch.Generator().manual_seed(n)
    base = torch.randn(numel, generator=generator) * 0.02
    finetuned = [base + 1e-3 * torch.randn(numel, generator=generator) for _ in range(n)]
    base_dev = base.to(device, DTYPES[dtype])
    ft_dev = [t.to(device, DTYPES[dtype]) for t in finetuned]
    times: list[float] = []
    result = benchmark(timed(lambda: IMPLS[impl](base_dev, ft_dev, SCALE), device, times))

    stored_ft = [t.double() for t in ft_dev]
    error, ratio = compare(result.cpu(), base_dev.double().cpu(), sum(stored_ft).cpu(),
                           sum(t.abs() for t in stored_ft).cpu(), n, SCALE)
    assert result.dtype == DTYPES[dtype]
    assert ratio <= 1.0, f"{impl} is off the float64 reference by {error:.3e} ({ratio:.2f}x its bound)"

    moved = (n + 2) * numel * DTYPES[dtype].itemsize
    gbps = moved / statistics.median(times) / 1e9
    info = {"device": device, "dtype": dtype, "n": n, "numel": numel, "impl": impl, "gbps": gbps,
            "copy_gbps": copy_gbps(numel), "fraction_of_copy": gbps / copy_gbps(numel)}
    benchmark.group = f"ops-{device}-{dtype}-N{n}"
    benchmark.extra_info.update(info)
    book.ops.append(info)
