"""The kernel compiles for an H100 (sm_90) down to PTX, and its loads are 128-bit vectors.

No GPU is needed: Triton's NVIDIA backend lowers to PTX with its bundled LLVM (ptxas, absent
here, is only needed for the binary). This catches GPU-only failures the interpreter cannot
(typing of the int64 -> pointer casts, the alignment hint) and checks the memory accesses:
with the fine-tunes' addresses known to be 16-byte aligned, their loads in full blocks must be
`ld.global.v4` like the base's; without the hint only the base's are.
"""

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent("""
    import json, re, sys
    import triton
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from taskvec.kernels import combine

    def ptx(in_ty, out_ty, numel_ty, block, warps, aligned):
        target = GPUTarget("cuda", 90, 32)
        signature = {"base_ptr": "*" + in_ty, "table_ptr": "*i64", "out_ptr": "*" + out_ty,
                     "n_ft": "i32", "numel": numel_ty, "base_coef": "fp32", "sum_coef": "fp32",
                     "BLOCK": "constexpr", "ALIGNED": "constexpr"}
        aligned_args = {(i,): [["tt.divisibility", 16]] for i in range(3)}
        source = triton.compiler.ASTSource(combine._combine_kernel, signature,
                                           constexprs={"BLOCK": block, "ALIGNED": aligned},
                                           attrs=aligned_args)
        backend = make_backend(target)
        options = backend.parse_options({"num_warps": warps})
        stages = {}
        backend.add_stages(stages, options, source.language)
        context = ir.context()
        ir.load_dialects(context)
        backend.load_dialects(context)
        module = source.make_ir(target, options, backend.get_codegen_implementation(options),
                                backend.get_module_map(), context)
        metadata = {"hash": "0", "target": target, **options.__dict__}
        for stage in ("ttir", "ttgir", "llir", "ptx"):
            module = stages[stage](module, metadata)
        return module

    cases = json.loads(sys.argv[1])
    print(json.dumps([len(re.findall(r"ld\\.global\\.v4", ptx(*case))) for case in cases]))
""")

CASES = [  # (input, output, numel type, block, warps)
    ("bf16", "bf16", "i32", 4096, 8),
    ("fp32", "fp32", "i32", 1024, 4),
    ("fp16", "bf16", "i64", 4096, 8),  # numel >= 2**31 arrives as i64
    ("fp32", "fp16", "i64", 1024, 4),
]


def test_ptx_for_sm90_vectorises_every_input():
    cases = [[*case, aligned] for case in CASES for aligned in (True, False)]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_MOCK_PTX_VERSION="12.8", TRITON_DEFAULT_FP_FUSION="1")
    try:
        result = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(cases)],
                                capture_output=True, text=True, env=env, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail("compiling to PTX took over 5 minutes")
    if result.returncode and re.search(r"ImportError|AttributeError: module 'triton", result.stderr):
        pytest.skip(f"this triton's compiler internals differ: {result.stderr.splitlines()[-1]}")
    assert result.returncode == 0, result.stderr
    counts = json.loads(result.stdout)
    for case, (aligned, unaligned) in zip(CASES, zip(counts[::2], counts[1::2], strict=True), strict=True):
        assert unaligned > 0, case  # the base, a typed argument, is always vectorised
        assert aligned == 2 * unaligned, case  # ... and with the hint the fine-tunes are too
