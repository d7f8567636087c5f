"""TIES's streamed thresholds: the compiled key histograms, and the radix selection they feed.

The thresholds of a tensor streamed in chunks (two histogram passes) must equal those of the same
tensor selected whole (torch.kthvalue on every key), for any chunking, with ties at the threshold,
zeros, NaN and infinities; and the compiled histograms must equal torch's bincount of the keys.
"""

import pytest
import torch

from taskvec.methods.key_counts import count_high, count_low
from taskvec.methods.sparsify import BUCKETS, MagnitudeThresholds, magnitude_key


def _tau(numel: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    tau = torch.randn(numel, generator=generator, dtype=torch.float64) * 1e-3
    tau[torch.rand(numel, generator=generator) < 0.1] = 0.0  # unchanged entries
    tau[::7] = tau[3]  # many ties in magnitude, both signs
    tau[::11] = -tau[3]
    tau[:6] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 5e-324, 1e-40], dtype=torch.float64)
    return tau.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_compiled_histograms_equal_torchs_bincount_of_the_keys(dtype):
    tau = _tau(30001, dtype, 0)
    key = magnitude_key(tau)
    high = torch.zeros(BUCKETS, dtype=torch.int64)
    count_high(tau, high)
    assert torch.equal(high, torch.bincount(key >> 16, minlength=BUCKETS))
    for bucket in (int((key >> 16)[3]), int((key >> 16)[100]), 0):
        low = torch.zeros(BUCKETS, dtype=torch.int64)
        count_low(tau, bucket, low)
        assert torch.equal(low, torch.bincount(key[(key >> 16) == bucket] & 0xFFFF, minlength=BUCKETS))


def _stream(thresholds: MagnitudeThresholds, name: str, index: int, tau: torch.Tensor, chunk: int) -> None:
    for number in range(thresholds.passes):
        if thresholds.wants(number, name):
            for start in range(0, tau.numel(), chunk):
                thresholds.update(number, name, start, tau.numel(), index, tau[start:start + chunk])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("density", [0.01, 0.2, 0.5, 0.93])
@pytest.mark.parametrize("chunk", [977, 8192])
def test_streamed_thresholds_equal_the_whole_tensors(dtype, density, chunk):
    tau = _tau(20011, dtype, 1)
    k = int(density * tau.numel())
    order = torch.argsort(magnitude_key(tau).long(), descending=True, stable=True)[3:]  # past NaN and inf
    around = order[max(0, k - 60):k + 60]
    tau[around] = tau[order[k]].abs() * torch.sign(tau[around]).where(tau[around] != 0, 1)  # ties at the k-th
    whole, streamed = MagnitudeThresholds(density), MagnitudeThresholds(density)
    for index in range(2):
        values = tau if index == 0 else -tau.flip(0)
        _stream(whole, "w", index, values, values.numel())
        _stream(streamed, "w", index, values, chunk)
    assert streamed.thresholds == whole.thresholds
    threshold, _ = whole.thresholds[("w", 0)]
    assert (magnitude_key(tau) == threshold).sum() > 60  # the ties are at stake
