"""Task-vector arithmetic on tensors and state dicts: the public tensor-level API.

Every function is one case of the fused linear form in `taskvec.kernels`, accumulated in float32
(float64 where an input is float64, as the merge reads such tensors) and returned in the base's
dtype unless `dtype` says otherwise. CUDA tensors of one dtype go to
the Triton kernel (one pass over memory); everything else runs the torch reference, which gives
the same numbers on CPU. Tensors that require gradients also take the torch path, so autograd
sees the operation.

    task_vector(base, ft)               = ft - base
    mean_task_vector(base, fts)         = mean(fts) - base
    negate(base, tv, scale)             = base - scale * tv
    negated_mean(base, fts, scale)      = base - scale * (mean(fts) - base)
    average(tensors)                    = mean(tensors)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence

import torch

from taskvec.errors import TaskvecError
from taskvec.kernels.reference import combine_reference

__all__ = [
    "task_vector", "mean_task_vector", "negate", "negated_mean", "average", "combine", "TaskVector",
]


def combine(base: torch.Tensor, tensors: Sequence[torch.Tensor], base_coef: float, sum_coef: float,
            *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``base_coef * base + sum_coef * sum(tensors)``, accumulated in float32, or in float64
    where an input is float64 (a float32 sum of float64 weights keeps only float32's digits).

    CUDA tensors of one kernel dtype (float32, float16, bfloat16) run the fused Triton kernel,
    unless gradients are wanted; anything else runs the torch reference.
    """
    tensors = list(tensors)
    if not tensors:
        raise TaskvecError("at least one fine-tuned tensor is needed")
    for what, tensor in (("base", base), *((f"tensor {i}", t) for i, t in enumerate(tensors))):
        if not isinstance(tensor, torch.Tensor):
            raise TaskvecError(f"{what} is a {type(tensor).__name__}, not a torch.Tensor")
        if not tensor.is_floating_point():  # an integer base would be truncated, booleans meaningless
            raise TaskvecError(f"{what} has dtype {tensor.dtype}: task arithmetic takes floating-point tensors")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TaskvecError(f"dtype must be a floating torch.dtype (e.g. torch.bfloat16), not {dtype!r}")
    wide = any(t.dtype == torch.float64 for t in (base, *tensors))
    for what, coef in (("base_coef", base_coef), ("sum_coef", sum_coef)):
        _check_number(what, coef, wide)
    for i, tensor in enumerate(tensors):
        if tensor.shape != base.shape:
            raise TaskvecError(f"tensor {i} has shape {list(tensor.shape)}, base has {list(base.shape)}")
        if tensor.device != base.device:
            raise TaskvecError(f"tensor {i} is on {tensor.device}, base is on {base.device}")
    if _kernel_applies(base, tensors, dtype):
        from taskvec.kernels.combine import combine_triton

        return combine_triton(base.contiguous(), [t.contiguous() for t in tensors],
                              base_coef, sum_coef, dtype=dtype)
    acc = torch.empty(base.shape, dtype=torch.float64, device=base.device) if wide else None
    return combine_reference(base, tensors, base_coef, sum_coef, dtype=dtype, acc=acc)


def _check_number(what: str, value: float, wide: bool) -> None:
    """A finite coefficient (a scale), within float32's range unless the sum is float64: NaN gave an
    all-NaN result, 1e39 torch's bare RuntimeError. A tensor (a scale autograd follows) is the
    caller's to check."""
    if isinstance(value, torch.Tensor):
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # numpy's floats are Real
        raise TaskvecError(f"{what} must be a number, got {value!r}")
    limit = torch.finfo(torch.float64 if wide else torch.float32).max
    try:
        number = float(value)
    except OverflowError:  # an int beyond any float
        number = math.inf
    if not math.isfinite(number) or abs(number) > limit:
        raise TaskvecError(f"{what} must be a finite {'float64' if wide else 'float32'} number, got {number:g}")


def _has_float64(*tensors) -> bool:
    return any(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in tensors)


def _kernel_applies(base: torch.Tensor, tensors: list[torch.Tensor], dtype: torch.dtype | None) -> bool:
    """The fused kernel takes CUDA tensors of one kernel dtype, compiled (not interpreted) Triton,
    and no autograd: it writes its result outside the graph."""
    from taskvec.kernels import triton_available

    if not base.is_cuda or not triton_available():
        return False
    from taskvec.kernels.combine import KERNEL_DTYPES, interpreted

    wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (base, *tensors))
    return (not interpreted() and not wants_grad and base.dtype in KERNEL_DTYPES
            and (dtype or base.dtype) in KERNEL_DTYPES and all(t.dtype == base.dtype for t in tensors))


def task_vector(base: torch.Tensor, finetuned: torch.Tensor, *, dtype=None) -> torch.Tensor:
    """What fine-tuning added: ``finetuned - base``."""
    return combine(base, [finetuned], -1.0, 1.0, dtype=dtype)


def mean_task_vector(base: torch.Tensor, finetuned: Sequence[torch.Tensor], *, dtype=None) -> torch.Tensor:
    """The averaged task vector ``mean(finetuned) - base``: shared direction kept, noise averaged out."""
    finetuned = list(finetuned)
    return combine(base, finetuned, -1.0, 1.0 / max(len(finetuned), 1), dtype=dtype)


def negate(base: torch.Tensor, vector: torch.Tensor, scale: float = 1.0, *, dtype=None) -> torch.Tensor:
    """Move away from a task vector: ``base - scale * vector``."""
    _check_number("scale", scale, _has_float64(base, vector))
    return combine(base, [vector], 1.0, -scale, dtype=dtype)


def negated_mean(base: torch.Tensor, finetuned: Sequence[torch.Tensor], scale: float = 1.0,
                 *, dtype=None) -> torch.Tensor:
    """The detoxified weight ``base - scale * (mean(finetuned) - base)``, in one fused pass."""
    finetuned = list(finetuned)
    _check_number("scale", scale, _has_float64(base, *finetuned))
    n = max(len(finetuned), 1)
    return combine(base, finetuned, 1.0 + scale, -scale / n, dtype=dtype)


def average(tensors: Sequence[torch.Tensor], *, dtype=None) -> torch.Tensor:
    """The element-wise mean of two or more tensors."""
    tensors = list(tensors)
    if len(tensors) < 2:
        raise TaskvecError(f"average needs at least two tensors, got {len(tensors)}")
    n = len(tensors)
    return combine(tensors[0], tensors[1:], 1.0 / n, 1.0 / n, dtype=dtype)


class TaskVector:
    """A task vector over a state dict: floating tensors only, as in the task-arithmetic papers.

    ``TaskVector.from_models(base_sd, ft_sd)``, ``TaskVector.mean(base_sd, [ft_sd, ...])``;
    vectors add, negate and scale; ``tv.apply_to(base_sd, scale)`` gives ``base + scale * tv``
    (so ``(-tv).apply_to(base, 1.0)`` is the negation), with non-floating entries kept from base.
    Vectors are kept in float32 by default: a task vector stored in bfloat16 would be rounded
    once more before it is applied (pass ``dtype=None`` to keep the weights' dtype, half the memory).
    """

    def __init__(self, vector: Mapping[str, torch.Tensor]):
        self.vector = dict(vector)

    @classmethod
    def from_models(cls, base: Mapping[str, torch.Tensor], finetuned: Mapping[str, torch.Tensor], *,
                    dtype: torch.dtype | None = torch.float32):
        return cls.mean(base, [finetuned], dtype=dtype)

    @classmethod
    def mean(cls, base: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]], *,
             dtype: torch.dtype | None = torch.float32):
        finetuned = list(finetuned)
        if not finetuned:
            raise TaskvecError("at least one fine-tuned state dict is needed")
        vector = {}
        for name, tensor in base.items():
            if not tensor.is_floating_point():
                continue
            missing = [i for i, sd in enumerate(finetuned) if name not in sd]
            if missing:
                raise TaskvecError(f"tensor '{name}' is missing from fine-tuned state dict {missing[0]}")
            vector[name] = mean_task_vector(tensor, [sd[name] for sd in finetuned],
                                            dtype=None if tensor.dtype == torch.float64 else dtype)
        return cls(vector)

    def _check_keys(self, other: TaskVector) -> None:
        if self.vector.keys() != other.vector.keys():
            diff = sorted(self.vector.keys() ^ other.vector.keys())
            raise TaskvecError(f"task vectors hold different tensors (e.g. '{diff[0]}')")

    def __add__(self, other: TaskVector) -> TaskVector:
        if not isinstance(other, TaskVector):
            return NotImplemented
        self._check_keys(other)
        return TaskVector({k: combine(v, [other.vector[k]], 1.0, 1.0) for k, v in self.vector.items()})

    def __radd__(self, other):
        return self if other == 0 else self.__add__(other)  # lets sum() work

    def __neg__(self) -> TaskVector:
        return self * -1.0

    def __sub__(self, other: TaskVector) -> TaskVector:
        return self + (-other)

    def __mul__(self, factor: float) -> TaskVector:
        if not isinstance(factor, (int, float)):
            return NotImplemented
        return TaskVector({k: (v.to(torch.promote_types(v.dtype, torch.float32)) * factor).to(v.dtype)
                           for k, v in self.vector.items()})  # float32 at least, float64 kept

    __rmul__ = __mul__

    def apply_to(self, base: Mapping[str, torch.Tensor], scale: float = 1.0) -> dict[str, torch.Tensor]:
        """``base + scale * self`` for every floating tensor; other entries copied from base."""
        missing = [k for k in self.vector if k not in base]
        if missing:
            raise TaskvecError(f"tensor '{missing[0]}' of the task vector is not in the base")
        _check_number("scale", scale, _has_float64(*base.values(), *self.vector.values()))
        return {
            name: negate(tensor, self.vector[name], -scale) if name in self.vector else tensor.clone()
            for name, tensor in base.items()
        }
