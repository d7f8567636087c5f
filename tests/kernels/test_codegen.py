"""The kernel compiles for an H100 (sm_90) down to PTX, and its loads are 128-bit vectors.

No GPU is needed: Triton's NVIDIA backend lowers to PTX with its bundled LLVM (ptxas, absent
here, is only needed for the binary). This catches GPU-only failures the interpreter cannot
(typing of the int64 -> pointer casts, the alignment hint) and checks the memory accesses:
with the fine-tunes' addresses known to be 16-byte aligned, their loads in full blocks must be
`ld.global.v4` like the base's; without the hint only the base's are.
"""

import pytest

pytest.importorskip("triton")

from ptx_tools import run_ptx  # noqa: E402

BODY = """
    from taskvec.kernels import combine

    def vector_loads(in_ty, out_ty, numel_ty, block, warps, aligned):
        signature = {"base_ptr": "*" + in_ty, "table_ptr": "*i64", "out_ptr": "*" + out_ty,
                     "n_ft": "i32", "numel": numel_ty, "base_coef": "fp32", "sum_coef": "fp32",
                     "BLOCK": "constexpr", "ALIGNED": "constexpr"}
        code = ptx(combine._combine_kernel, signature, {"BLOCK": block, "ALIGNED": aligned},
                   {(i,): [["tt.divisibility", 16]] for i in range(3)}, {"num_warps": warps})
        return len(re.findall(r"ld\\.global\\.v4", code))

    print(json.dumps([vector_loads(*case) for case in cases]))
"""

CASES = [  # (input, output, numel type, block, warps)
    ("bf16", "bf16", "i32", 4096, 8),
    ("fp32", "fp32", "i32", 1024, 4),
    ("fp16", "bf16", "i64", 4096, 8),  # numel >= 2**31 arrives as i64
    ("fp32", "fp16", "i64", 1024, 4),
]


def test_ptx_for_sm90_vectorises_every_input():
    cases = [[*case, aligned] for case in CASES for aligned in (True, False)]
    counts = run_ptx(BODY, cases, fp_fusion_default=True)
    for case, (aligned, unaligned) in zip(CASES, zip(counts[::2], counts[1::2], strict=True), strict=True):
        assert unaligned > 0, case  # the base, a typed argument, is always vectorised
        assert aligned == 2 * unaligned, case  # ... and with the hint the fine-tunes are too
