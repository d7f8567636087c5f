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
) -> torch.Tensor:
    """Return ``base_coef * base + sum_coef * sum(finetuned)`` in ``dtype`` (default: base's).

    The sum and the linear form are computed in float32 whatever the storage dtype. ``acc``
    (float32, base's numel) and ``out`` are optional workspaces for callers that reuse buffers.
    """
    tensors = iter(finetuned)
    first = next(tensors, None)
    if first is None:
        raise ValueError("combine_reference needs at least one fine-tuned tensor")
    if acc is None:
        acc = first.to(torch.float32, copy=True)
    else:
        acc = acc.view(base.shape).copy_(first)
    for tensor in tensors:
        acc.add_(tensor)
    acc.mul_(sum_coef).add_(base, alpha=base_coef)
    dtype = base.dtype if dtype is None else dtype
    if out is None:
        return acc.to(dtype)
    out = out.view(base.shape)
    out.copy_(acc)
    return out
