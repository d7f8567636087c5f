"""Offsets past 2**31 elements, checked without allocating 2**31 elements.

The kernel computes each program's offsets with `_block_offsets(program_id, BLOCK)`. A probe
kernel calls the same function with a program id taken from an argument (an int32 scalar, like
`tl.program_id`), so block indices of a multi-gigabyte tensor can be tried on a tiny buffer. A
second probe doing the arithmetic in int32 shows that the check would catch an overflow.
"""

import pytest
import torch

triton = pytest.importorskip("triton")
tl = triton.language

from taskvec.kernels.combine import LARGE, _block_offsets  # noqa: E402

BLOCK = LARGE[0]


@triton.jit
def _probe(pid, out_ptr, BLOCK: tl.constexpr):
    tl.store(out_ptr + tl.arange(0, BLOCK), _block_offsets(pid, BLOCK))


@triton.jit
def _probe_int32(pid, out_ptr, BLOCK: tl.constexpr):
    tl.store(out_ptr + tl.arange(0, BLOCK), (pid * BLOCK + tl.arange(0, BLOCK)).to(tl.int64))


@pytest.mark.parametrize("pid", [0, 2**31 // BLOCK - 1, 2**31 // BLOCK, 2**21 + 3, 2**31 - 1])
def test_block_offsets_are_exact_int64(device, pid):
    out = torch.empty(BLOCK, dtype=torch.int64, device=device)
    _probe[(1,)](pid, out, BLOCK=BLOCK)
    expected = torch.arange(BLOCK, dtype=torch.int64) + pid * BLOCK
    assert torch.equal(out.cpu(), expected)


def test_int32_offsets_would_overflow(device):
    pid = 2**21 + 3  # elements 2**33 onwards
    out = torch.empty(BLOCK, dtype=torch.int64, device=device)
    _probe_int32[(1,)](pid, out, BLOCK=BLOCK)
    assert not torch.equal(out.cpu(), torch.arange(BLOCK, dtype=torch.int64) + pid * BLOCK)
