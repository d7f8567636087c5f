"""DARE (Yu et al., ICML 2024): drop each task-vector entry with probability 1 - density and
rescale the kept ones by 1/density, then the (weighted) mean; dare-ties takes TIES's sign election
and disjoint mean instead. The drop is a counter-based mask of (seed, input, tensor, element index)
(taskvec.methods.sparsify), so the result does not depend on chunk size, device or order of work.

mergekit's `dare_linear`/`dare_ties` differ by default: they rescale by the L1 norm rather than
1/density, do not divide by the weights' sum, and draw the mask from torch's generator."""

from __future__ import annotations

from taskvec.methods.base import ChunkContext, FusedCombine, MergeMethod, Param
from taskvec.methods.ties import DENSITY


def _density(value: float) -> str | None:
    """(0, 1], and no lower than the mask's resolution: an entry is kept iff its 32-bit word is
    below density * 2**32, so below 2**-32 nothing would be (and float32(density) could be 0)."""
    if not 0 < value <= 1:
        return "must be in (0, 1]"
    if value < 2**-32:
        return "must be at least 2**-32 (2.3e-10) for dare and dare-ties: below it the random mask keeps no entry"
    return None


def _seed(value: int) -> str | None:
    return None if 0 <= value <= 2**32 - 1 else "must be in 0..4294967295"


SEED = Param("seed", int, 0, "Seed of DARE's random drop (dare, dare-ties), 0..2**32-1: the mask is a "
             "function of seed, input, tensor and element index alone.", _seed)


class Dare(MergeMethod):
    name = "dare"
    formula = "base - scale * weighted_mean_i(mask_i * (ft_i - base) / density), mask_i ~ Bernoulli(density)"
    reference = "Yu et al., ICML 2024: Language Models are Super Mario (arXiv:2311.03099)"
    params = (Param("density", float, None, DENSITY.help, _density), SEED)
    linear = False
    memory = "N + 1 input chunks and the N task-vector chunks (the chunk shrinks with N); no pre-pass"
    consensus = "mean"  # what combine() takes after the drop (the fused kernel's switch)

    def _dropped(self, base, finetuned, context: ChunkContext):
        from taskvec.methods.sparsify import dare_drop, random_keep

        density, seed = self.values["density"], self.values["seed"]
        deltas = finetuned.sub_(base)  # [N, n], ours to overwrite
        if density < 1:
            for index, delta in enumerate(deltas):
                keep = random_keep(seed, context.name, index, context.start, delta.numel(), density, delta.device)
                dare_drop(delta, keep, density)
        return deltas

    def fused(self):
        density = self.values["density"]
        return FusedCombine("random" if density < 1 else None, self.consensus, density, self.values["seed"])

    def combine(self, base, finetuned, context: ChunkContext):
        from taskvec.methods.consensus import weighted_mean

        return weighted_mean(self._dropped(base, finetuned, context), context.weights)


class DareTies(Dare):
    name = "dare-ties"
    formula = ("base - scale * disjoint_mean_i(mask_i * (ft_i - base) / density), mask_i ~ Bernoulli(density), "
               "signs elected as in ties")
    reference = "Yu et al., ICML 2024 (DARE) with Yadav et al., NeurIPS 2023 (TIES sign election)"
    consensus = "disjoint"

    def combine(self, base, finetuned, context: ChunkContext):
        from taskvec.methods.consensus import disjoint_mean

        return disjoint_mean(self._dropped(base, finetuned, context), context.weights)
