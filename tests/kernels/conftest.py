"""Kernel test fixtures: the devices the Triton kernel can run on here, and a launch recorder.

TRITON_INTERPRET=1 is set by tests/conftest.py (loaded before this file and before any test
module decorates a kernel) whenever CUDA is missing, so on CPU the kernels run in Triton's
interpreter. The `launches` fixture proves a test really ran the kernel, not a torch fallback.
"""

from types import SimpleNamespace

import pytest
import torch

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def interpreted() -> bool:
    from taskvec.kernels import combine

    return combine.interpreted()


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, cuda])])
def device(request):
    """Where the kernel runs: CPU through Triton's interpreter, and the GPU when there is one."""
    if request.param == "cpu" and not interpreted():
        pytest.skip("Triton's interpreter is off (TRITON_INTERPRET=1 is set only without CUDA)")
    if request.param == "cuda" and interpreted():
        pytest.skip("TRITON_INTERPRET=1 is set: kernels run on the CPU, not on the GPU")
    return request.param


@pytest.fixture
def launches(monkeypatch):
    """A list that receives every launch of the combine kernel: grid, block size, alignment."""
    from taskvec.kernels import combine

    records = []
    kernel = combine._combine_kernel
    was_interpreted = combine.interpreted()

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                records.append(SimpleNamespace(grid=grid, block=kwargs["BLOCK"], aligned=kwargs["ALIGNED"]))
                return kernel[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(combine, "_combine_kernel", Spy())
    monkeypatch.setattr(combine, "interpreted", lambda: was_interpreted)
    return records
