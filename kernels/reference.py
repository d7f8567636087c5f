"""Pure-torch path of the fused merge: the CPU implementation and the kernels' reference.

Fine-tunes may be given as any iterable (a generator that refills one buffer works), so the
streaming CPU merge reads one fine-tune chunk at a time and memory stays flat in N. The sum and
the linear form are separate steps, so many scales can be written from one sum.
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
    acc = sum_reference(base, finetuned, acc=acc, scratch=scratch)
    return linear_reference(acc, base, base_coef, sum_coef, dtype=dtype, out=out, scratch=scratch)


def sum_reference(base: torch.Tensor, finetuned: Iterable[torch.Tensor], *, acc: torch.Tensor | None = None,
                  scratch: torch.Tensor | None = None) -> torch.Tensor:
    """``sum(finetuned)`` in float32 (in ``acc`` when given), shaped like ``base``."""
    tensors = iter(finetuned)
    first = next(tensors, None)
    if first is None:
        raise ValueError("combine_reference needs at least one fine-tuned tensor")
    acc = first.to(torch.float32, copy=True) if acc is None else acc.view(base.shape).copy_(first)
    for tensor in tensors:
        acc.add_(_widened(tensor, acc, scratch))
    return acc


def linear_reference(acc: torch.Tensor, base: torch.Tensor, base_coef: float, sum_coef: float, *,
                     dtype: torch.dtype | None = None, out: torch.Tensor | None = None,
                     work: torch.Tensor | None = None, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """``base_coef * base + sum_coef * acc`` in ``dtype`` (default: base's). Computed in ``out``
    when it has acc's dtype, else in ``work`` (like ``acc``) when given, else in ``acc`` itself:
    acc survives whenever ``out`` or ``work`` is given, for another scale. Two passes over the
    chunk (one more to convert to a narrower ``out``), each rounding as the single form does."""
    out_dtype = base.dtype if dtype is None else dtype
    if out is not None and out.dtype == acc.dtype:
        target = out.view(acc.shape)
    elif work is not None:
        target = work.view(acc.shape)
    else:
        target = acc
    if target is acc:
        acc.mul_(sum_coef)
    else:
        torch.mul(acc, sum_coef, out=target)
    target.add_(_widened(base, target, scratch), alpha=base_coef)
    if out is None:
        return target.to(out_dtype)
    out = out.view(base.shape)
    if out.data_ptr() != target.data_ptr():
        out.copy_(target)
    return out


def _widened(tensor: torch.Tensor, like: torch.Tensor, scratch: torch.Tensor | None) -> torch.Tensor:
    """`tensor` in `like`'s dtype: itself when it already is, else copied into `scratch`."""
    if tensor.dtype == like.dtype:
        return tensor
    if scratch is None:
        return tensor.to(like.dtype)
    return scratch.view(tensor.shape).copy_(tensor)
