"""TIES merging (Yadav et al., NeurIPS 2023): trim each task vector to its largest entries, elect
each entry's sign, take the disjoint mean. mergekit's `ties` (sparsify "magnitude", consensus
"sum", normalize) computes the same; ties in magnitude at the threshold go here by element index."""

from __future__ import annotations

from taskvec.methods.base import ChunkContext, FusedCombine, MergeMethod, Param


def _density(value: float) -> str | None:
    return None if 0 < value <= 1 else "must be in (0, 1]"


DENSITY = Param("density", float, None, "Fraction of each task vector's entries kept, in (0, 1] "
                "(ties: the largest |tau| per tensor; dare, dare-ties: at random). Required by "
                "ties, dare and dare-ties.", _density)


class Ties(MergeMethod):
    name = "ties"
    formula = ("base - scale * tau, tau = disjoint_mean_i(topk_density(ft_i - base)) "
               "with the sign of each entry elected by sum_i w_i topk(ft_i - base)")
    reference = "Yadav et al., NeurIPS 2023: TIES-Merging (arXiv:2306.01708)"
    params = (DENSITY,)
    linear = False
    memory = "N + 1 input chunks and the N task-vector chunks (the chunk shrinks with N); " \
             "pre-pass: two 65536-bucket histograms per input for split tensors"

    def statistics(self, n):
        from taskvec.methods.sparsify import MagnitudeThresholds

        density = self.values["density"]
        return None if density >= 1 else MagnitudeThresholds(density)

    def fused(self):
        return FusedCombine("magnitude" if self.values["density"] < 1 else None, "disjoint")

    def combine(self, base, finetuned, context: ChunkContext):
        from taskvec.methods.consensus import disjoint_mean

        deltas = finetuned.sub_(base)  # [N, n], ours to overwrite
        if context.stats is not None:
            for index, delta in enumerate(deltas):
                delta.mul_(context.stats.keep(context.name, index, delta))
        return disjoint_mean(deltas, context.weights)
