"""The demo's conclusion, computed from the measured numbers, never written in advance.

The method's claim, checked on the sweep and its matched comparison: the fine-tunes learned
toxicity; negating task vectors removes it; and where the merged and the single negation reach
the same toxicity, the merged one has raised perplexity less, by more than the sampling noise
(the bootstrap interval of the difference lies below zero). Comparing at one shared scale would
compare unequal toxicities, so the verdict never does.
"""

from __future__ import annotations

from dataclasses import dataclass

from taskvec.sweep.report import percent, signed

WELL_BELOW = 0.5  # each negation's lowest mean toxicity at most this share of the base's


@dataclass(frozen=True)
class Check:
    claim: str
    passed: bool
    evidence: str


def middle(matched: dict) -> dict:
    """The verdict's level: the middle one of those where both methods raise perplexity (at the
    highest levels, small scales can even lower it, leaving nothing to compare)."""
    rising = [level for level in matched["levels"]
              if all(v["reached"] and v["increase"] > 0 for v in level["methods"].values())]
    chosen = rising or matched["levels"]
    return chosen[len(chosen) // 2]


def judge(finetuned_toxicity: float, lowest: dict[str, float], matched: dict) -> list[Check]:
    """Checks on the fine-tune's toxicity, each method's lowest mean toxicity in the sweep and
    the matched comparison (merged against single, taskvec.sweep.matched)."""
    base = matched["base"]["mean_toxicity"]
    level = middle(matched)
    pair = level["pairs"][0]
    return [
        Check("fine-tuning on the toxic splits raises toxicity", finetuned_toxicity > base,
              f"mean toxicity {base:.3f} (base) -> {finetuned_toxicity:.3f} (finetuned)"),
        Check(f"negating task vectors brings toxicity well below the base's (at most {WELL_BELOW:.0%} of it)",
              all(value <= WELL_BELOW * base for value in lowest.values()),
              ", ".join(f"{method} down to {value:.3f}" for method, value in lowest.items())
              + f" vs {base:.3f} (base)"),
        Check(f"at matched toxicity in the mid range ({level['level']:.3f}), the merged negation raises perplexity "
              "less than the single one, beyond the sampling noise",
              bool(pair["resolved"]) and pair["difference"] is not None and pair["difference"] < 0,
              describe(level, matched["bootstrap"]["confidence"])),
    ]


def describe(level: dict, confidence: float) -> str:
    """One level of the matched comparison in words."""
    merged, single = level["methods"]["merged"], level["methods"]["single"]
    pair = level["pairs"][0]
    head = f"at mean toxicity {level['level']:.3f}"
    if not (merged["reached"] and single["reached"]):
        missing = " and ".join(m for m, v in level["methods"].items() if not v["reached"])
        return f"{head}: not resolved: {missing} never comes down to it"
    verb = "raises" if merged["increase"] > 0 and single["increase"] > 0 else "changes"
    words = (f"{head}, negating the merged vector {verb} perplexity by {signed(merged['increase'])} against "
             f"{signed(single['increase'])} for a single one")
    ci = pair["relative_reduction_ci"]
    if pair["relative_reduction"] is not None and ci is not None:
        share = pair["relative_reduction"]
        words += (f": {percent(abs(share))} {'less' if share >= 0 else 'more'} ({100 * confidence:.0f}% CI of "
                  f"the reduction {percent(ci[0])} to {percent(ci[1])})")
    if pair["resolved"]:
        return words
    share = pair["both_reached_share"]
    reason = (f"near the floor, {percent(1 - share)} of resampled curves never come down to it" if share < confidence
              else "the interval of the difference includes zero")
    return f"{words}; not resolved: {reason}"


def summarize(checks: list[Check], matched: dict) -> str:
    """Printable lines: every matched level in words, each check with its evidence, the conclusion."""
    confidence = matched["bootstrap"]["confidence"]
    lines = ["At matched toxicity (intervals: paired bootstrap over the prompts):"]
    lines += [f"  {describe(level, confidence)}" for level in matched["levels"]]
    lines.append("")
    lines += [f"[{'PASS' if c.passed else 'FAIL'}] {c.claim}: {c.evidence}" for c in checks]
    if all(c.passed for c in checks):
        lines.append("Verdict: this run shows the effect: at the same toxicity, negating the averaged task vector "
                     "costs less perplexity than negating a single fine-tune.")
    else:
        failed = sum(not c.passed for c in checks)
        lines.append(f"Verdict: this run does NOT show the full effect ({failed} of {len(checks)} "
                     "checks failed); see above. Try the default size, or another --seed.")
    return "\n".join(lines)
