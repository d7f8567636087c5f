"""What a merge method declares: its name, formula, parameters and how a chunk is combined.

Every method writes `base - scale * tau` for a task vector `tau` of the fine-tunes (a negative
scale adds it). A method whose `tau` is linear in the inputs offers a `LinearForm`, which the
fused kernel and the torch path evaluate in one pass; the plan and executors never need to know
which method they run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from taskvec.errors import TaskvecError


@dataclass(frozen=True)
class LinearForm:
    """out = base_coef * inputs[0] + sum_coef * sum_i(weights[i] * inputs[1 + i]), accumulated in
    float32 (float64 for float64 inputs). `weights` None: the plain sum (the fused kernel's path);
    a weighted form runs the torch path (the CPU executor's sum step, or torch on the GPU)."""

    base_coef: float
    sum_coef: float
    weights: tuple[float, ...] | None = None

    def __repr__(self) -> str:
        weights = "" if self.weights is None else f", weights={self.weights!r}"
        return f"LinearForm(base_coef={self.base_coef!r}, sum_coef={self.sum_coef!r}{weights})"


@dataclass(frozen=True)
class CombineForm:
    """out = base - scale * tau, tau = method.combine(...) chunk by chunk: a non-linear method.
    Every form of one merge shares the method and weights, so tau is computed once per chunk."""

    method: MergeMethod
    scale: float
    weights: tuple[float, ...] | None = None


@dataclass(frozen=True)
class FusedCombine:
    """A non-linear combine the fused kernel (kernels/sparse_combine.py) computes with the same bytes
    as `combine()`: tau_i = ft_i - base, sparsified (None; "magnitude": the statistics pre-pass's
    thresholds; "random": DARE's mask at `density`, `seed`), then `consensus` ("mean": the
    (weighted) mean; "disjoint": TIES's sign election and disjoint mean)."""

    sparsify: str | None
    consensus: str
    density: float = 1.0
    seed: int = 0


@dataclass(frozen=True)
class ChunkContext:
    """What a chunk-level combine knows besides the values: which tensor, which elements, the
    statistics its pre-pass computed (None without one), and the per-input weights (None: equal)."""

    name: str
    start: int  # element index of the chunk's first element in the tensor
    numel: int  # elements in the whole tensor
    stats: object | None = None
    weights: object | None = None  # a float tensor of N weights on the chunk's device, or None


def check_weights(weights: Sequence[float] | None, n: int) -> tuple[float, ...] | None:
    """N finite, non-negative weights with a positive sum; None when there are none or all are
    equal (the plain mean, whose code path and bytes stay those of an unweighted merge)."""
    if weights is None:
        return None
    try:
        values = tuple(float(w) for w in weights)
    except (TypeError, ValueError):
        raise TaskvecError(f"--weights must be numbers, got {weights!r}") from None
    if len(values) != n:
        raise TaskvecError(f"--weights has {len(values)} values for {n} fine-tuned checkpoint"
                           f"{'s' * (n != 1)}: give one weight per fine-tune")
    if not all(math.isfinite(w) and w >= 0 for w in values) or not sum(values) > 0:
        raise TaskvecError(f"--weights must be finite and >= 0 with a positive sum, got "
                           f"{','.join(f'{w:g}' for w in values)}")
    if sum(values) > 1e30:
        raise TaskvecError("--weights sum too large: at most 1e30")
    return None if len(set(values)) == 1 else values


@dataclass(frozen=True)
class Param:
    """A declared method parameter: the CLI builds its option from this, the method checks it."""

    name: str
    type: type
    default: object
    help: str
    check: Callable[[object], str | None] | None = None  # returns why a value is refused

    def validate(self, value: object) -> object:
        try:
            value = self.type(value)
        except (TypeError, ValueError):
            raise TaskvecError(f"--{self.name.replace('_', '-')} must be a {self.type.__name__}, "
                               f"got {value!r}") from None
        problem = self.check(value) if self.check else None
        if problem:
            raise TaskvecError(f"--{self.name.replace('_', '-')} {problem}, got {value!r}")
        return value


class MergeMethod:
    """A merge method, with its parameters' values. Subclasses declare the class attributes."""

    name = ""
    formula = ""
    reference = ""  # where the method comes from
    params: tuple[Param, ...] = ()
    memory = "a few chunks, flat in N"  # what the streaming merge holds (docs, --help)
    linear = True  # False: no linear form; the method offers combine() (and optionally statistics())
    needs_base = True  # False: the first input takes the base's place (layout, side files)
    min_inputs = 1

    def __init__(self, **values: object) -> None:
        known = {p.name: p for p in self.params}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise TaskvecError(f"{self.name} takes no parameter {unknown[0]!r}")
        for p in self.params:
            if p.default is None and values.get(p.name) is None:
                raise TaskvecError(f"{self.name} needs --{p.name.replace('_', '-')}")
        self.values = {p.name: p.validate(values.get(p.name, p.default)) for p in self.params}

    def check_count(self, n: int) -> None:
        if n < self.min_inputs:
            count = {1: "one fine-tuned checkpoint", 2: "two checkpoints"}.get(self.min_inputs,
                                                                              f"{self.min_inputs} checkpoints")
            raise TaskvecError(f"{self.name} needs at least {count}, got {n}")

    def inputs(self, base: str | Path | None, finetuned: Sequence[str | Path]) -> list[str | Path]:
        """The checkpoints read, the one whose layout and side files the output takes first."""
        if not self.needs_base:
            return list(finetuned)
        if base is None:
            raise TaskvecError(f"{self.name} needs a base checkpoint (--base)")
        return [base, *finetuned]

    def linear_form(self, n: int, scale: float, weights: tuple[float, ...] | None = None) -> LinearForm:
        """The coefficients for n fine-tunes at `scale` (linear methods only)."""
        raise NotImplementedError(f"{self.name} has no linear form")

    def forms(self, n: int, scales: Sequence[float], weights: tuple[float, ...] | None = None) -> list:
        """What the executors evaluate, one per scale: LinearForm, or CombineForm when non-linear.
        Weights are scaled by a power of two that brings the largest into [0.5, 1): weights of
        1e-50 would underflow the kernels' float32 tables, the methods use their ratios only, and
        a power of two scales every product and sum exactly (the bytes are the unscaled ones)."""
        if weights is not None:
            exponent = math.frexp(max(weights))[1]
            weights = tuple(math.ldexp(w, -exponent) for w in weights)
        if self.linear:
            return [self.linear_form(n, s, weights) for s in scales]
        return [CombineForm(self, s, weights) for s in scales]

    def statistics(self, n: int):
        """A per-tensor statistics pre-pass (see taskvec.methods.sparsify.MagnitudeThresholds), or
        None. The executor streams its `passes` over the inputs before the merge pass."""
        return None

    def combine(self, base, finetuned, context: ChunkContext):
        """tau for one chunk of one tensor: `base` ([n]) and the fine-tunes' chunks (`finetuned`,
        [N, n], which the combine may overwrite) in the accumulation dtype (float32; float64 for
        float64 inputs), on the executor's device. Non-linear methods only."""
        raise NotImplementedError(f"{self.name} is linear: it has no chunk combine")

    def fused(self) -> FusedCombine | None:
        """What the fused kernel computes for this method on a GPU, or None (torch's combine only).
        It must equal combine() bit for bit (tests/kernels/test_sparse_combine.py)."""
        return None

    def provenance(self) -> dict:
        return {"method": self.name, "formula": self.formula, **({"params": self.values} if self.values else {})}
