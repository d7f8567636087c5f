"""Test helpers: reading checkpoints whole, the float64 reference, and per-dtype error bounds."""

from pathlib import Path

import torch
from safetensors.torch import load_file

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
# Half the smallest subnormal step: the absolute rounding error of tiny values in each dtype.
TINY = {torch.float32: 2.0**-150, torch.bfloat16: 2.0**-134, torch.float16: 2.0**-25}


def load_dir(path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def negated_mean_f64(base, finetuned, scale):
    """The method's definition in float64, written independently of taskvec's linear form."""
    base = base.double()
    mean = torch.stack([f.double() for f in finetuned]).mean(0)
    return base - scale * (mean - base)


def error_bound(base, finetuned, base_coef, sum_coef, reference, out_dtype):
    """Element-wise bound on |taskvec - float64 reference|.

    float32 accumulation: summing N terms, scaling and adding the base costs at most about
    (N + 3) unit roundoffs of the magnitudes involved, |a*base| + |c|*sum|ft_i| (plus the float64
    reference's own rounding of mean(), far smaller). Rounding the float32 result to the output
    dtype adds at most one unit roundoff of that dtype relative to the result (or half a
    subnormal step for tiny values). A factor of 2 covers the sum's ordering and the fused
    multiply-adds a kernel may use.
    """
    magnitudes = abs(base_coef) * base.double().abs() + abs(sum_coef) * sum(f.double().abs() for f in finetuned)
    accumulate = 2 * (len(finetuned) + 3) * UNIT_ROUNDOFF[torch.float32] * magnitudes
    output = UNIT_ROUNDOFF[out_dtype] * reference.abs() + TINY[out_dtype] if out_dtype != torch.float32 else 0
    return accumulate * (1 + UNIT_ROUNDOFF[out_dtype]) + output


def assert_close_to_reference(actual, reference, bound, what=""):
    error = (actual.double() - reference).abs()
    worst = (error - bound).argmax()
    assert (error <= bound).all(), (
        f"{what}: error {error.flatten()[worst].item():.3e} exceeds bound "
        f"{torch.as_tensor(bound).expand_as(error).flatten()[worst].item():.3e}"
    )


def merge_refused(base, fts, out, match, **options) -> str:
    """merge_checkpoints refuses with a one-line TaskvecError matching `match`, leaving neither the
    output nor a staging directory; returns the message."""
    import pytest

    from taskvec.errors import TaskvecError
    from taskvec.merge import merge_checkpoints

    with pytest.raises(TaskvecError, match=match) as caught:
        merge_checkpoints(fts, out, base=base, progress=False, **options)
    message = str(caught.value)
    assert "\n" not in message
    assert not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    return message
