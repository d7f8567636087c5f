"""Compiling a Triton kernel to PTX for an H100 (sm_90) without a GPU, for tests that read the code.

Triton's NVIDIA backend lowers to PTX with its bundled LLVM (ptxas, absent here, is only needed for
the binary). The compiler runs in a fresh interpreter, outside the suite's TRITON_INTERPRET=1:
`run_ptx(body, cases)` runs COMPILE (which defines `ptx(kernel, signature, constexprs, attrs,
options)` returning the PTX text, and `cases` from the command line) followed by `body`, which
prints one JSON value; that value is returned. Where this triton's compiler internals differ, the
test is skipped.
"""

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

COMPILE = textwrap.dedent("""
    import json, re, sys
    import triton
    import triton.language as tl
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    def ptx(kernel, signature, constexprs, attrs, options):
        target = GPUTarget("cuda", 90, 32)
        source = triton.compiler.ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs)
        backend = make_backend(target)
        options = backend.parse_options(options)
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
""")


def run_ptx(body: str, cases: list, *, fp_fusion_default: bool = False):
    """The JSON that `body` prints after COMPILE, for `cases`; fp_fusion_default sets
    TRITON_DEFAULT_FP_FUSION=1 (the kernels that want their FMAs)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_MOCK_PTX_VERSION="12.8")
    if fp_fusion_default:
        env.update(TRITON_DEFAULT_FP_FUSION="1")
    try:
        result = subprocess.run([sys.executable, "-c", COMPILE + textwrap.dedent(body), json.dumps(cases)],
                                capture_output=True, text=True, env=env, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail("compiling to PTX took over 5 minutes")
    if result.returncode and re.search(r"ImportError|AttributeError: module 'triton", result.stderr):
        pytest.skip(f"this triton's compiler internals differ: {result.stderr.splitlines()[-1]}")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)
