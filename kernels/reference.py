"""Pure-torch path of the fused merge: the CPU implementation and the kernels' reference.

Fine-tunes may be given as any iterable (a generator that refills one buffer works), so the
streaming CPU merge reads one fine-tune chunk at a time and memory stays flat in N.
"""

from collections.abc import Iterable

import torch


def combine_reference(
    base: torch.Tensor,
    finetuned: Iterable[torch.Tensor],
    base_coef: float,
    sum_coef: float,
    *,
    dtype: torch.dtype | None = None,
    acc: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    scratch: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return ``base_coef * base + sum_coef * sum(finetuned)`` in ``dtype`` (default: base's).

    The sum and the linear form are computed in float32 whatever the storage dtype. ``acc``
    (float32, base's numel) and ``out`` are optional workspaces for callers that reuse buffers;
    so is ``scratch`` (like ``acc``), into which 16-bit inputs are widened before they are added:
    several times faster on CPU than torch's mixed-dtype in-place add.
    """
    out_dtype = base.dtype if dtype is None else dtype
    tensors = iter(finetuned)
    first = next(tensors, None)
    if first is None:
        raise ValueError("combine_reference needs at least one fine-tuned tensor")
    if acc is None:
        acc = first.to(torch.float32, copy=True)
    else:
        acc = acc.view(base.shape).copy_(first)

    def widened(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal scratch
        if tensor.dtype == acc.dtype:
            return tensor
        if scratch is None:
            scratch = torch.empty_like(acc)
        return scratch.view(tensor.shape).copy_(tensor)

    for tensor in tensors:
        acc.add_(widened(tensor))
    acc.mul_(sum_coef).add_(widened(base), alpha=base_coef)
    if out is None:
        return acc.to(out_dtype)
    out = out.view(base.shape)
    out.copy_(acc)
    return out
