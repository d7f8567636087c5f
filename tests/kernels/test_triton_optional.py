"""Triton is optional: without it the reference and the CPU merge still import and run."""

import subprocess
import sys
import textwrap


def test_cpu_path_works_without_triton(synthetic_sets, tmp_path):
    sset = synthetic_sets("float32")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["triton"] = None  # any `import triton` now raises ImportError
        import torch
        import taskvec.kernels
        from taskvec.kernels.reference import combine_reference
        from taskvec.merge import merge_checkpoints
        from taskvec.ops import negated_mean

        assert not taskvec.kernels.triton_available()
        base, fts = torch.ones(3), [torch.full((3,), 2.0)] * 2
        assert torch.equal(combine_reference(base, fts, 2.0, -0.5), torch.zeros(3))
        assert torch.equal(negated_mean(base, fts, 1.0), torch.zeros(3))
        merge_checkpoints({[str(p) for p in sset.finetuned]!r}, {str(tmp_path / "out")!r},
                          base={str(sset.base)!r}, device="auto", progress=False)
        assert "triton" not in sys.modules or sys.modules["triton"] is None
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()
