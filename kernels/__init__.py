"""Fused merge kernels (Triton) and their pure-torch reference, installed as `taskvec.kernels`.

Every merge taskvec computes is one linear form, accumulated in float32:

    out = base_coef * base + sum_coef * sum_i finetuned_i

negated mean: base_coef = 1 + scale, sum_coef = -scale / N; mean task vector: -1, 1 / N;
average: 0, 1 / N; negate one task vector tv: base_coef = 1, sum_coef = -scale with [tv].
"""

import functools
import importlib.util


@functools.cache
def triton_available() -> bool:
    """Whether triton is installed, so the fused kernels can run (on a GPU, or interpreted on CPU)."""
    return importlib.util.find_spec("triton") is not None
