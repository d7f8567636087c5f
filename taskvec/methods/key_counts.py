"""TIES's radix-select histograms as compiled loops: one read of a chunk, no temporaries.

The magnitude key of an entry is |tau| rounded to float32, its bits read as an int32 (they order
like the value). Pass 1 counts the upper 16 bits of every key, pass 2 the lower 16 bits of the
keys in one upper bucket (taskvec.methods.sparsify). In torch each pass took an abs, a cast, a
shift, a 65536-bucket bincount temporary (or a masked select) per chunk and input: most of a TIES
merge's time on a CPU. Here one loop reads tau once and adds to the persistent histogram.
"""

from __future__ import annotations

import numba
import numpy as np
import torch


@numba.njit(nogil=True, cache=True)
def _count_high(tau, hist):
    bits = np.empty(1, dtype=np.float32)
    key = bits.view(np.int32)
    for j in range(tau.shape[0]):
        bits[0] = np.float32(abs(tau[j]))
        hist[key[0] >> 16] += 1


@numba.njit(nogil=True, cache=True)
def _count_low(tau, bucket, hist):
    bits = np.empty(1, dtype=np.float32)
    key = bits.view(np.int32)
    for j in range(tau.shape[0]):
        bits[0] = np.float32(abs(tau[j]))
        if key[0] >> 16 == bucket:
            hist[key[0] & 0xFFFF] += 1


def count_high(tau: torch.Tensor, hist: torch.Tensor) -> None:
    """hist[key >> 16] += 1 for every entry of the CPU chunk `tau` (float32 or float64)."""
    _count_high(_numpy(tau), hist.numpy())


def count_low(tau: torch.Tensor, bucket: int, hist: torch.Tensor) -> None:
    """hist[key & 0xFFFF] += 1 for the entries of `tau` whose key >> 16 is `bucket`."""
    _count_low(_numpy(tau), bucket, hist.numpy())


def _numpy(tau: torch.Tensor) -> np.ndarray:
    if tau.dtype not in (torch.float32, torch.float64):
        tau = tau.float()  # bf16, fp16: exact in float32, and rounded to it by the key anyway
    return tau.contiguous().numpy()
