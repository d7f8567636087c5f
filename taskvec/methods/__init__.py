"""Merge methods by name: each a small class declaring its formula and parameters.

>>> get_method("negated_mean").linear_form(4, 0.5)
LinearForm(base_coef=1.5, sum_coef=-0.125)
"""

from taskvec.errors import TaskvecError
from taskvec.methods.base import LinearForm, MergeMethod, Param
from taskvec.methods.linear import Average, Negate, NegatedMean

__all__ = ["METHODS", "LinearForm", "MergeMethod", "Param", "get_method"]

METHODS: dict[str, type[MergeMethod]] = {m.name: m for m in (NegatedMean, Negate, Average)}


def get_method(name: str, **params: object) -> MergeMethod:
    """The method called `name`, with its parameters checked."""
    if name not in METHODS:
        raise TaskvecError(f"unknown method {name!r}: choose from {', '.join(METHODS)}")
    return METHODS[name](**params)
