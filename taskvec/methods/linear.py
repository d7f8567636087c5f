"""The methods that are one linear form: the negated mean (the paper's), one negation, the mean."""

from __future__ import annotations

import math

from taskvec.errors import TaskvecError
from taskvec.methods.base import LinearForm, MergeMethod


class NegatedMean(MergeMethod):
    name = "negated_mean"
    formula = "base - scale * (mean(finetuned) - base)"
    reference = "Kim et al., COLM 2024: Decoupling Noise and Toxic Parameters ... by Task Vector Merging"

    def linear_form(self, n, scale, weights=None):
        if weights is None:  # the plain mean: today's path, the fused kernel's form
            return LinearForm(1.0 + scale, -scale / n)
        # base - scale * (sum_i w_i ft_i / W - base), W = sum_i w_i
        return LinearForm(1.0 + scale, -scale / math.fsum(weights), tuple(weights))


class Negate(NegatedMean):
    name = "negate"
    formula = "base - scale * (finetuned - base)"
    reference = "Ilharco et al., ICLR 2023: Editing Models with Task Arithmetic"

    def check_count(self, n):
        if n != 1:
            raise TaskvecError(f"negate takes exactly one fine-tuned checkpoint, got {n}")


class Average(MergeMethod):
    name = "average"
    formula = "mean(finetuned)"
    reference = "Wortsman et al., ICML 2022: Model soups"
    needs_base = False
    min_inputs = 2

    def linear_form(self, n, scale, weights=None):
        if weights is not None:
            raise TaskvecError("average takes no weights")
        return LinearForm(1.0 / n, 1.0 / n)
