"""Combining N sparsified task-vector chunks, as mergekit's generalized task arithmetic does.

`disjoint_mean` is TIES's sign election and disjoint mean (mergekit's `get_mask(method="sum")`
followed by the normalized sum): weights multiply the deltas first, the elected sign of an entry
is + where sum_i w_i d_i >= 0 and - otherwise, and the entry is the sum of the w_i d_i whose sign
agrees, divided by the sum of those w_i (1 where none agrees). Entries equal to zero (dropped or
pruned) never agree. `weighted_mean` is sum_i w_i d_i / sum_i w_i (the plain mean without weights).
"""

from __future__ import annotations

import torch


def sum_rows(rows: torch.Tensor) -> torch.Tensor:
    """rows[0] + rows[1] + ... in that order, element by element: the same rounding whatever the
    chunk's length (torch's .sum(0) may reduce in another order for other shapes)."""
    total = rows[0].clone()
    for row in rows[1:]:
        total.add_(row)
    return total


def disjoint_mean(deltas: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """deltas: [N, n]; weights: [N] or None (all 1). Returns [n]."""
    if weights is not None:
        deltas.mul_(weights[:, None])
    elected = (sum_rows(deltas) >= 0).to(deltas.dtype).mul_(2).sub_(1)
    agree = deltas.sign() == elected
    mixed = sum_rows(deltas.mul_(agree))
    divisor = sum_rows(agree * weights[:, None]) if weights is not None else sum_rows(agree.to(deltas.dtype))
    divisor[divisor == 0] = 1
    return mixed.div_(divisor)


def weighted_mean(deltas: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """deltas: [N, n]; weights: [N] or None (all 1). Returns [n]."""
    if weights is None:
        return sum_rows(deltas).div_(deltas.shape[0])
    return sum_rows(deltas.mul_(weights[:, None])).div_(sum_rows(weights))
