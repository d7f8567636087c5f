"""The K-output kernel (many scales from one read): every output equals the single-scale
kernel's bit for bit, which equals the torch path's (test_combine_kernel); it compiles for an
H100 with vectorised loads and stores."""


import pytest
import torch

pytest.importorskip("triton")

from ptx_tools import run_ptx  # noqa: E402

from taskvec.errors import TaskvecError  # noqa: E402
from taskvec.kernels.combine import combine_triton, combine_triton_scales  # noqa: E402
from taskvec.kernels.reference import linear_reference, sum_reference  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SCALES = [0.0, 0.1, 1.0, -0.5, 2.5]


def inputs(numel, n, dtype, device, seed):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(numel, generator=generator)
    fts = [base + 0.1 * torch.randn(numel, generator=generator) for _ in range(n)]
    return base.to(dtype).to(device), [f.to(dtype).to(device) for f in fts]


@pytest.mark.parametrize("in_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("numel, n", [(1, 1), (1025, 2), (5003, 5)])
def test_each_output_is_the_single_scale_kernel_and_the_torch_path(device, in_dtype, out_dtype, numel, n):
    base, fts = inputs(numel, n, in_dtype, device, seed=numel + n)
    forms = [(1 + s, -s / n) for s in SCALES]
    outs = [torch.empty(numel, dtype=out_dtype, device=device) for _ in forms]
    combine_triton_scales(base, fts, forms, outs)
    acc = sum_reference(base.cpu(), [f.cpu() for f in fts])
    for (base_coef, sum_coef), out in zip(forms, outs, strict=True):
        single = combine_triton(base, fts, base_coef, sum_coef, dtype=out_dtype)
        assert torch.equal(out, single), (base_coef, sum_coef)
        torch_path = linear_reference(acc, base.cpu(), base_coef, sum_coef, dtype=out_dtype,
                                      work=torch.empty_like(acc))
        assert torch.equal(out.cpu(), torch_path), (base_coef, sum_coef)


def test_bad_output_lists_are_refused(device):
    base, fts = inputs(64, 2, torch.float32, device, seed=0)
    out = torch.empty(64, device=device)
    with pytest.raises(TaskvecError, match="2 forms but 1 outputs"):
        combine_triton_scales(base, fts, [(1, 0), (2, -1)], [out])
    with pytest.raises(TaskvecError, match="out overlaps"):
        combine_triton_scales(base, fts, [(1, 0), (2, -1)], [out, out])
    with pytest.raises(TaskvecError, match="out overlaps"):
        combine_triton_scales(base, fts, [(1, 0)], [fts[1]])


BODY = """
    from taskvec.kernels import combine

    TL = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16}

    def vector_accesses(in_ty, out_ty, block, warps, aligned):
        signature = {"base_ptr": "*" + in_ty, "table_ptr": "*i64", "outs_ptr": "*i64", "coefs_ptr": "*fp32",
                     "n_ft": "i32", "n_out": "i32", "numel": "i32",
                     "OUT_DTYPE": "constexpr", "BLOCK": "constexpr", "ALIGNED": "constexpr"}
        code = ptx(combine._combine_scales_kernel, signature,
                   {"OUT_DTYPE": TL[out_ty], "BLOCK": block, "ALIGNED": aligned},
                   {(0,): [["tt.divisibility", 16]]}, {"num_warps": warps})
        return [len(re.findall(r"ld\\.global\\.v4", code)), len(re.findall(r"st\\.global\\.v4", code))]

    print(json.dumps([vector_accesses(*case) for case in cases]))
"""


@pytest.mark.parametrize("in_ty, out_ty", [("bf16", "bf16"), ("fp32", "fp32"), ("fp16", "bf16")])
def test_ptx_for_sm90_vectorises_loads_and_stores(in_ty, out_ty):
    cases = [[in_ty, out_ty, 4096, 8, aligned] for aligned in (True, False)]
    (aligned_loads, aligned_stores), (unaligned_loads, unaligned_stores) = run_ptx(BODY, cases,
                                                                                  fp_fusion_default=True)
    assert unaligned_loads > 0 and aligned_loads == 2 * unaligned_loads  # the fine-tunes vectorised too
    assert aligned_stores > 0 and unaligned_stores == 0  # outputs reached through the table: hint needed
