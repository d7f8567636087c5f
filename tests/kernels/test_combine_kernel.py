"""The fused Triton kernel against a float64 reference, on CPU (interpreted) and CUDA.

Tolerances come from tests/helpers.error_bound: float32 accumulation of N + 2 terms costs at
most about (N + 3) float32 unit roundoffs (2**-24) of sum |terms| (doubled for summation order
and fused multiply-adds), and rounding the float32 result to a 16-bit output adds at most one
unit roundoff of that dtype (2**-8 for bfloat16, 2**-11 for float16) relative to the result,
or half a subnormal step near zero. Storage dtype of the inputs adds nothing: they are exact.
"""

import re

import pytest
import torch

from helpers import assert_close_to_reference, error_bound, negated_mean_f64

pytest.importorskip("triton")

from taskvec.errors import TaskvecError  # noqa: E402
from taskvec.kernels import combine  # noqa: E402
from taskvec.kernels.combine import combine_triton, pointer_table  # noqa: E402
from taskvec.kernels.reference import combine_reference  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# one element; less than a block; exactly one 1024-element block; a block plus a one-element
# tail; several blocks plus a tail that is not a multiple of 16 (the unvectorised path)
SIZES = [1, 127, 1024, 1025, 5003]


def make_inputs(numel, n, dtype, device, seed=0, shape=None):
    """A base and n fine-tunes = base + shared task + own noise, like real fine-tunes."""
    generator = torch.Generator().manual_seed(seed)
    shape = shape or (numel,)
    base = torch.randn(shape, generator=generator)
    task = torch.randn(shape, generator=generator) * 0.1
    fts = [base + task + 0.05 * torch.randn(shape, generator=generator) for _ in range(n)]
    return base.to(dtype).to(device), [f.to(dtype).to(device) for f in fts]


def check(actual, base, fts, base_coef, sum_coef, reference, out_dtype, what):
    bound = error_bound(base.cpu(), [f.cpu() for f in fts], base_coef, sum_coef, reference, out_dtype)
    assert actual.dtype == out_dtype
    assert actual.shape == base.shape
    assert_close_to_reference(actual.cpu(), reference, bound, what)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("numel", SIZES)
@pytest.mark.parametrize("n,scale", [(1, 1.0), (2, -0.5), (5, 0.0), (5, 1.0), (16, 2.5)])
def test_negated_mean_matches_float64(device, launches, dtype, numel, n, scale):
    base, fts = make_inputs(numel, n, dtype, device, seed=numel + n)
    base_coef, sum_coef = 1 + scale, -scale / n
    out = combine_triton(base, fts, base_coef, sum_coef)
    assert len(launches) == 1 and launches[0].grid == (-(-numel // launches[0].block),)
    reference = negated_mean_f64(base.cpu(), [f.cpu() for f in fts], scale)
    check(out, base, fts, base_coef, sum_coef, reference, dtype, f"{dtype} n={n} numel={numel}")


@pytest.mark.parametrize("in_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
def test_output_dtype_differs_from_input(device, launches, in_dtype, out_dtype):
    base, fts = make_inputs(3001, 3, in_dtype, device, seed=7, shape=(3, 1000, 1))
    out = combine_triton(base, fts, 2.0, -1 / 3, dtype=out_dtype)
    assert len(launches) == 1
    reference = negated_mean_f64(base.cpu(), [f.cpu() for f in fts], 1.0)
    check(out, base, fts, 2.0, -1 / 3, reference, out_dtype, f"{in_dtype}->{out_dtype}")


@pytest.mark.parametrize("form", ["mean_task_vector", "average", "negate"])
def test_other_linear_forms(device, launches, form):
    base, fts = make_inputs(2000, 4, torch.bfloat16, device, seed=3)
    b64, f64 = base.cpu().double(), [f.cpu().double() for f in fts]
    coefs, reference = {
        "mean_task_vector": ((-1.0, 0.25), torch.stack(f64).mean(0) - b64),
        "average": ((0.0, 0.25), torch.stack(f64).mean(0)),
        "negate": ((1.0, -0.7), b64 - 0.7 * (f64[0] + f64[1] + f64[2] + f64[3])),
    }[form]
    out = combine_triton(base, fts, *coefs, dtype=torch.float32)
    assert len(launches) == 1
    check(out, base, fts, *coefs, reference, torch.float32, form)


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() == "DEFAULT",
                    reason="torch's CPU build without SIMD computes add_(alpha=) with two roundings, not an FMA")
@pytest.mark.parametrize("in_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,numel", [(1, 1), (2, 127), (5, 5003), (16, 1025)])
def test_kernel_equals_the_torch_path_bit_for_bit(device, launches, in_dtype, out_dtype, n, numel):
    """Same accumulation order, one fma(base, base_coef, sum_coef * acc), round to nearest-even:
    the GPU merge and the CPU merge write the same bytes. Coefficients with long mantissas make
    any other rounding order show."""
    base, fts = make_inputs(numel, n, in_dtype, device, seed=11 * n + numel)
    base_coef, sum_coef = 1 + 0.7, -0.7 / n
    out = combine_triton(base, fts, base_coef, sum_coef, dtype=out_dtype)
    expected = combine_reference(base.cpu(), [f.cpu() for f in fts], base_coef, sum_coef, dtype=out_dtype)
    assert len(launches) == 1
    assert torch.equal(out.cpu(), expected), (out.cpu() != expected).sum().item()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy (the interpreter) on inf and NaN
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_rounding_to_16_bits_matches_torch_bit_for_bit(device, launches, out_dtype):
    """Round to nearest-even, ties both ways, overflow to inf, NaN, inf, subnormals."""
    bits = torch.tensor([
        0x3F808000, 0x3F818000, 0x3F80C000, 0x3F807FFF, 0xBF808000, 0xBF818000,  # bf16 ties
        0x3F801000, 0x3F803000, 0x3F800FFF,  # fp16 ties and neighbours
        0x7F7FFFFF, 0x477FF000, 0x477FEFFF, 0xC77FF000,  # overflow to +-inf / largest finite
        0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001, 0xFFFFFFFF,  # inf, NaNs
        0x00000001, 0x00400000, 0x33800000, 0x33C00000, 0x00000000,  # subnormals, zero
    ], dtype=torch.int64).to(torch.int32)
    values = bits.view(torch.float32)
    values = torch.cat([values, torch.randn(4000, generator=torch.Generator().manual_seed(1))])
    x = values.to(device)
    zeros = torch.zeros_like(x)
    out = combine_triton(zeros, [x], 0.0, 1.0, dtype=out_dtype)  # exactly x before rounding
    expected = combine_reference(zeros.cpu(), [x.cpu()], 0.0, 1.0, dtype=out_dtype)
    assert len(launches) == 1
    got, want = out.cpu().view(torch.int16), expected.view(torch.int16)
    nan = expected.isnan()
    assert torch.equal(out.cpu().isnan(), nan)
    assert torch.equal(got[~nan], want[~nan])


def test_large_blocks(device, launches, monkeypatch):
    monkeypatch.setattr(combine, "SMALL_NUMEL", 0)  # big-tensor configuration at a testable size
    base, fts = make_inputs(2 * 4096 + 77, 2, torch.float16, device)
    out = combine_triton(base, fts, 1.5, -0.25)
    assert [(r.grid, r.block) for r in launches] == [((3,), 4096)]
    reference = negated_mean_f64(base.cpu(), [f.cpu() for f in fts], 0.5)
    check(out, base, fts, 1.5, -0.25, reference, torch.float16, "large blocks")


def test_unaligned_views_take_the_unhinted_path(device, launches):
    base, fts = make_inputs(1500, 3, torch.bfloat16, device)
    shifted = [torch.cat([f[:1], f])[1:] for f in fts]  # storage offset of one element: 2 bytes
    assert all(s.data_ptr() % 16 for s in shifted)
    out = combine_triton(base, shifted, 2.0, -1 / 3)
    assert [r.aligned for r in launches] == [False]
    reference = negated_mean_f64(base.cpu(), [f.cpu() for f in fts], 1.0)
    check(out, base, fts, 2.0, -1 / 3, reference, torch.bfloat16, "unaligned")


def test_out_buffer_and_reused_pointer_table(device, launches):
    """The executor's pattern: fixed buffers, one table, refilled between launches."""
    buffers = [torch.empty(4000, dtype=torch.uint8, device=device) for _ in range(3)]
    out_raw = torch.empty(8000, dtype=torch.uint8, device=device)
    table = pointer_table(buffers[1:])
    for seed, numel in [(1, 999), (2, 1000)]:
        base, fts = make_inputs(numel, 2, torch.float32, device, seed=seed)
        views = [b[:numel * 4].view(torch.float32) for b in buffers]
        for view, source in zip(views, [base, *fts], strict=True):
            view.copy_(source)
        out = out_raw[:numel * 2].view(torch.bfloat16)
        result = combine_triton(views[0], views[1:], 3.0, -1.0, out=out, table=table)
        assert result.data_ptr() == out_raw.data_ptr()
        reference = negated_mean_f64(base.cpu(), [f.cpu() for f in fts], 2.0)
        check(result, base, fts, 3.0, -1.0, reference, torch.bfloat16, f"launch {seed}")
    assert len(launches) == 2


def test_inputs_are_not_modified_and_empty_tensors_launch_nothing(device, launches):
    base, fts = make_inputs(300, 3, torch.float16, device)
    before = [t.clone() for t in [base, *fts]]
    combine_triton(base, fts, 2.0, -1 / 3)
    assert all(torch.equal(a, b) for a, b in zip(before, [base, *fts], strict=True))
    empty = torch.empty(0, 5, dtype=torch.float16, device=device)
    result = combine_triton(empty, [empty.clone()], 2.0, -1.0)
    assert result.shape == (0, 5) and len(launches) == 1


def _cpu_pair():
    return torch.ones(8), [torch.ones(8), torch.ones(8)]


@pytest.fixture
def checks_only(monkeypatch):
    """Argument checks run before any launch, so CPU tensors serve on any machine: accept them
    as the interpreter does, also where the kernel is compiled for a GPU."""
    monkeypatch.setattr(combine, "interpreted", lambda: True)


@pytest.mark.parametrize("make,message", [
    (lambda b, f: (b, []), "at least one fine-tuned tensor"),
    (lambda b, f: (b, [f[0], f[1].half()]), "finetuned[1] has dtype torch.float16"),
    (lambda b, f: (b, [f[0], torch.ones(9)]), "finetuned[1] has shape [9]"),
    (lambda b, f: (b, [torch.ones(16)[::2], f[1]]), "finetuned[0] is not contiguous"),
    (lambda b, f: (b.double(), [t.double() for t in f]), "base has dtype torch.float64"),
    (lambda b, f: (b, [f[0], torch.ones(8, device="meta")]), "finetuned[1] is on meta"),
])
def test_bad_inputs_raise_one_line_errors(checks_only, make, message):
    base, fts = make(*_cpu_pair())
    with pytest.raises(TaskvecError, match=re.escape(message)) as error:
        combine_triton(base, fts, 1.0, 1.0)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("out,message", [
    (torch.empty(7), "out must be contiguous with 8 elements"),
    (torch.empty(16)[::2], "not contiguous"),
    (torch.empty(8, dtype=torch.float64), "out has dtype torch.float64"),
])
def test_bad_out_raises(checks_only, out, message):
    base, fts = _cpu_pair()
    with pytest.raises(TaskvecError, match=message):
        combine_triton(base, fts, 1.0, 1.0, out=out)


def test_out_may_not_overlap_an_input_nor_mismatch_dtype(checks_only):
    base, fts = _cpu_pair()
    with pytest.raises(TaskvecError, match="out overlaps finetuned.1."):
        combine_triton(base, fts, 1.0, 1.0, out=fts[1])
    with pytest.raises(TaskvecError, match="dtype=torch.float16 was asked"):
        combine_triton(base, fts, 1.0, 1.0, out=torch.empty(8), dtype=torch.float16)
    with pytest.raises(TaskvecError, match="pointer table was built for other tensors"):
        combine_triton(base, fts, 1.0, 1.0, table=pointer_table([fts[1], fts[0]]))


def test_cpu_tensors_are_refused_when_the_kernel_is_compiled(monkeypatch):
    monkeypatch.setattr(combine, "interpreted", lambda: False)
    base, fts = _cpu_pair()
    with pytest.raises(TaskvecError, match="needs CUDA tensors, base is on cpu"):
        combine_triton(base, fts, 1.0, 1.0)


def test_launch_configuration_is_one_of_two():
    assert combine.launch_config(1) == combine.SMALL
    assert combine.launch_config(combine.SMALL_NUMEL) == combine.LARGE
    assert combine.launch_config(2**40) == combine.LARGE


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_tensors_are_refused_by_the_interpreter(monkeypatch):
    monkeypatch.setattr(combine, "interpreted", lambda: True)
    base, fts = make_inputs(8, 2, torch.float32, "cuda")
    with pytest.raises(TaskvecError, match="TRITON_INTERPRET=1 runs kernels on the CPU"):
        combine_triton(base, fts, 1.0, 1.0)
