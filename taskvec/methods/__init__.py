"""Merge methods by name: each a small class declaring its formula and parameters.

>>> get_method("negated_mean").linear_form(4, 0.5)
LinearForm(base_coef=1.5, sum_coef=-0.125)
"""

from taskvec.errors import TaskvecError
from taskvec.methods.base import ChunkContext, CombineForm, FusedCombine, LinearForm, MergeMethod, Param, check_weights
from taskvec.methods.dare import Dare, DareTies
from taskvec.methods.linear import Average, Negate, NegatedMean
from taskvec.methods.ties import Ties

__all__ = ["MERGE_METHODS", "METHODS", "ChunkContext", "CombineForm", "FusedCombine", "LinearForm", "MergeMethod",
           "Param", "check_weights", "get_method", "method_params"]

METHODS: dict[str, type[MergeMethod]] = {m.name: m for m in (NegatedMean, Negate, Average, Ties, Dare, DareTies)}
# What `taskvec merge --method` offers (negate and average have commands of their own).
MERGE_METHODS = ("negated_mean", "ties", "dare", "dare-ties")


def method_params() -> dict[str, tuple[Param, list[str]]]:
    """Every declared parameter by name, with the methods that take it (the CLI's options)."""
    found: dict[str, tuple[Param, list[str]]] = {}
    for method in METHODS.values():
        for param in method.params:
            found.setdefault(param.name, (param, []))[1].append(method.name)
    return found


def get_method(name: str, **params: object) -> MergeMethod:
    """The method called `name`, with its parameters checked."""
    if name not in METHODS:
        raise TaskvecError(f"unknown method {name!r}: choose from {', '.join(METHODS)}")
    return METHODS[name](**params)
