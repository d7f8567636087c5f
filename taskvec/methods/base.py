"""What a merge method declares: its name, formula, parameters and how a chunk is combined.

Every method writes `base - scale * tau` for a task vector `tau` of the fine-tunes (a negative
scale adds it). A method whose `tau` is linear in the inputs offers a `LinearForm`, which the
fused kernel and the torch path evaluate in one pass; the plan and executors never need to know
which method they run.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from taskvec.errors import TaskvecError


@dataclass(frozen=True)
class LinearForm:
    """out = base_coef * inputs[0] + sum_coef * sum(inputs[1:]), accumulated in float32."""

    base_coef: float
    sum_coef: float


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


class MergeMethod(ABC):
    """A merge method, with its parameters' values. Subclasses declare the class attributes."""

    name = ""
    formula = ""
    reference = ""  # where the method comes from
    params: tuple[Param, ...] = ()
    needs_base = True  # False: the first input takes the base's place (layout, side files)
    min_inputs = 1

    def __init__(self, **values: object) -> None:
        known = {p.name: p for p in self.params}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise TaskvecError(f"{self.name} takes no parameter {unknown[0]!r}")
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

    @abstractmethod
    def linear_form(self, n: int, scale: float) -> LinearForm:
        """The coefficients for n fine-tunes at `scale`."""

    def provenance(self) -> dict:
        return {"method": self.name, "formula": self.formula, **({"params": self.values} if self.values else {})}
