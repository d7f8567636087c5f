"""taskvec.ops against float64 definitions, across shapes and dtypes, and TaskVector algebra."""

import numpy as np
import pytest
import torch

from taskvec import ops
from taskvec.errors import TaskvecError

from helpers import UNIT_ROUNDOFF, assert_close_to_reference, error_bound, negated_mean_f64

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make(shape, n, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator) * 0.02
    fts = [base + 1e-3 * torch.randn(shape, generator=generator) for _ in range(n)]
    return base.to(dtype), [f.to(dtype) for f in fts]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (127,), (33, 65), (4, 5, 6)])
@pytest.mark.parametrize("n", [1, 2, 5])
@pytest.mark.parametrize("scale", [0.0, 1.0, -0.75])
def test_negated_mean(dtype, shape, n, scale):
    base, fts = make(shape, n, dtype)
    out = ops.negated_mean(base, fts, scale)
    assert out.dtype == dtype and out.shape == base.shape
    reference = negated_mean_f64(base, fts, scale)
    assert_close_to_reference(out, reference, error_bound(base, fts, 1 + scale, scale / n, reference, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_task_vectors_and_negate(dtype):
    base, fts = make((50, 7), 3, dtype)
    tv = ops.task_vector(base, fts[0])
    exact = fts[0].double() - base.double()
    assert_close_to_reference(tv, exact, error_bound(base, fts[:1], 1, 1, exact, dtype))
    mean_tv = ops.mean_task_vector(base, fts)
    exact_mean = torch.stack([f.double() for f in fts]).mean(0) - base.double()
    assert_close_to_reference(mean_tv, exact_mean, error_bound(base, fts, 1, 1 / 3, exact_mean, dtype))
    negated = ops.negate(base, mean_tv.float(), 0.5)
    exact_negated = base.double() - 0.5 * mean_tv.double()
    assert_close_to_reference(negated, exact_negated,
                              error_bound(base, [mean_tv], 1, 0.5, exact_negated, dtype))


def test_average_and_explicit_output_dtype():
    base, fts = make((300,), 4, torch.bfloat16)
    out = ops.average(fts, dtype=torch.float32)
    exact = torch.stack([f.double() for f in fts]).mean(0)
    assert out.dtype == torch.float32
    assert_close_to_reference(out, exact, error_bound(fts[0], fts[1:], 0.25, 0.25, exact, torch.float32))


def test_errors_are_clear():
    base, fts = make((8,), 2, torch.float32)
    with pytest.raises(TaskvecError, match="at least one"):
        ops.negated_mean(base, [], 1.0)
    with pytest.raises(TaskvecError, match=r"tensor 1 has shape \[9\]"):
        ops.negated_mean(base, [fts[0], torch.zeros(9)], 1.0)
    with pytest.raises(TaskvecError, match="at least two"):
        ops.average([base])
    # an integer base was truncated (negated_mean of [0.5, 1.5] gave [0, 1]), booleans gave garbage,
    # a dtype given as a string raised a RuntimeError, a list an AttributeError
    with pytest.raises(TaskvecError, match="base has dtype torch.int64: task arithmetic takes floating-point"):
        ops.negated_mean(torch.tensor([0, 1]), [torch.tensor([0.5, 1.5])])
    with pytest.raises(TaskvecError, match="tensor 0 has dtype torch.bool"):
        ops.task_vector(torch.zeros(2), torch.tensor([True, False]))
    with pytest.raises(TaskvecError, match="dtype must be a floating torch.dtype"):
        ops.negated_mean(base, fts, dtype="bf16")
    with pytest.raises(TaskvecError, match="tensor 0 is a list, not a torch.Tensor"):
        ops.negated_mean(base, [[0.0] * 8])
    # a NaN or infinite scale gave an all-NaN result, one beyond float32 torch's bare RuntimeError
    for scale in (float("nan"), float("inf")):
        with pytest.raises(TaskvecError, match="scale must be a finite float32 number, got nan|got inf"):
            ops.negated_mean(base, fts, scale)
        with pytest.raises(TaskvecError, match="scale must be a finite"):
            ops.negate(base, fts[0], scale)
    with pytest.raises(TaskvecError, match="scale must be a finite float32 number, got 1e"):
        ops.negated_mean(base, fts, 1e39)
    with pytest.raises(TaskvecError, match="scale must be a finite float32 number"):
        ops.negate(base, fts[0], 10**400)
    with pytest.raises(TaskvecError, match="base_coef must be a finite float32 number"):
        ops.combine(base, fts, 1e39, 1.0)
    assert torch.equal(ops.negated_mean(base, fts, torch.tensor(0.5)), ops.negated_mean(base, fts, 0.5))
    with pytest.raises(TaskvecError, match="scale must be a number, got '1'"):
        ops.negated_mean(base, fts, "1")
    assert torch.equal(ops.negated_mean(base, fts, np.float32(0.5)), ops.negated_mean(base, fts, 0.5))
    wide = ops.negated_mean(base.double(), [f.double() for f in fts], 1e39)  # a float64 sum holds it
    assert wide.dtype == torch.float64 and torch.isfinite(wide).all()


def state_dicts(n=3, dtype=torch.float32):
    generator = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(10, 4, generator=generator).to(dtype), "b": torch.randn(4, generator=generator).to(dtype),
            "steps": torch.tensor([7])}
    fts = [{k: (v + 1e-2 * torch.randn(v.shape, generator=generator).to(dtype)) if v.is_floating_point() else v + 1
            for k, v in base.items()} for _ in range(n)]
    return base, fts


def test_taskvector_algebra_matches_the_fused_ops():
    base, fts = state_dicts()
    tv = ops.TaskVector.mean(base, fts)
    assert set(tv.vector) == {"w", "b"}  # integer entries are not part of a task vector
    detox = (-tv).apply_to(base, scale=0.6)
    for name in ("w", "b"):
        fused = ops.negated_mean(base[name], [f[name] for f in fts], 0.6)
        tolerance = 8 * UNIT_ROUNDOFF[torch.float32] * (base[name].abs() + fts[0][name].abs()).max()
        assert (detox[name] - fused).abs().max() <= tolerance
    assert torch.equal(detox["steps"], base["steps"])
    singles = [ops.TaskVector.from_models(base, f) for f in fts]
    summed = sum(singles) * (1 / 3)
    for name in ("w", "b"):
        assert torch.allclose(summed.vector[name], tv.vector[name], atol=1e-6)
    difference = singles[0] - singles[0]
    assert all((v == 0).all() for v in difference.vector.values())


def test_taskvector_keeps_bfloat16_task_vectors_in_float32():
    """One rounding to bfloat16, at the end: the same result as the fused op, and within the
    bfloat16 bound of the float64 definition."""
    base, fts = make((4000,), 3, torch.bfloat16, seed=5)
    tv = ops.TaskVector.mean({"w": base}, [{"w": f} for f in fts])
    assert tv.vector["w"].dtype == torch.float32
    detox = (-tv).apply_to({"w": base}, scale=0.6)["w"]
    assert detox.dtype == torch.bfloat16
    reference = negated_mean_f64(base, fts, 0.6)
    assert_close_to_reference(detox, reference, error_bound(base, fts, 1.6, 0.2, reference, torch.bfloat16))
    stored = ops.TaskVector.mean({"w": base}, [{"w": f} for f in fts], dtype=None)
    assert stored.vector["w"].dtype == torch.bfloat16


def test_taskvector_errors():
    base, fts = state_dicts()
    with pytest.raises(TaskvecError, match="missing"):
        ops.TaskVector.mean(base, [{"w": fts[0]["w"]}])
    tv = ops.TaskVector.from_models(base, fts[0])
    with pytest.raises(TaskvecError, match="different tensors"):
        tv + ops.TaskVector({"w": tv.vector["w"]})
    with pytest.raises(TaskvecError, match="not in the base"):
        tv.apply_to({"w": base["w"]})


def test_gradients_flow_through_the_ops():
    """Tensors that require gradients take the torch path (on a GPU too), so autograd sees it."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base, fts = make((64,), 3, torch.float32)
    base = base.to(device).requires_grad_()
    out = ops.negated_mean(base, [f.to(device) for f in fts], 0.5)
    out.sum().backward()
    # d/d base of (1 + scale) * base - scale * mean(fts) is 1 + scale everywhere
    assert torch.equal(base.grad, torch.full_like(base, 1.5))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_tensors_run_the_kernel_and_match_the_cpu(dtype, monkeypatch):
    pytest.importorskip("triton")
    from taskvec.kernels import combine

    launched = []
    kernel = combine.combine_triton
    monkeypatch.setattr(combine, "combine_triton", lambda *a, **k: launched.append(1) or kernel(*a, **k))
    base, fts = make((33, 65), 5, dtype)
    gpu = ops.negated_mean(base.cuda(), [f.cuda() for f in fts], 0.75)
    assert launched and gpu.is_cuda
    assert torch.equal(gpu.cpu(), ops.negated_mean(base, fts, 0.75))
    strided = ops.negated_mean(base.cuda().t(), [f.cuda().t() for f in fts], 0.75)  # made contiguous first
    assert torch.equal(strided.cpu(), ops.negated_mean(base.t(), [f.t() for f in fts], 0.75))


def test_float64_inputs_are_computed_in_float64():
    """Weights near 1 with differences of 1e-9: a float32 sum (as for 16- and 32-bit inputs) kept
    none of them, so task_vector and negated_mean returned float64 tensors off by 38-57 times the
    task vector itself, where the merge of the same files is exact. Float64 in, float64 arithmetic:
    each result within a few float64 roundings of values near 1 (1e-15)."""
    generator = torch.Generator().manual_seed(0)
    base = 1.0 + torch.rand(1000, generator=generator, dtype=torch.float64)
    finetuned = [base + 1e-9 * torch.randn(1000, generator=generator, dtype=torch.float64) for _ in range(3)]
    exact_tv = finetuned[0] - base
    assert (ops.task_vector(base, finetuned[0]) - exact_tv).abs().max() < 1e-15
    mean = torch.stack(finetuned).mean(0)
    assert (ops.mean_task_vector(base, finetuned) - (mean - base)).abs().max() < 1e-15
    assert (ops.negated_mean(base, finetuned, 0.7) - negated_mean_f64(base, finetuned, 0.7)).abs().max() < 1e-14
    vector = ops.TaskVector.from_models({"w": base}, {"w": finetuned[0]}, dtype=torch.float64)
    assert (vector.vector["w"] - exact_tv).abs().max() < 1e-15
    scaled = (vector * 0.7).vector["w"]  # in float64 too: float32 kept 7 of the vector's digits
    assert (scaled - 0.7 * exact_tv).abs().max() < 1e-14 * exact_tv.abs().max()
    assert ops.task_vector(base.float(), finetuned[0].float()).dtype == torch.float32  # others as before
