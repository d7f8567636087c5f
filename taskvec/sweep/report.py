"""The matched comparison as a table people read (`taskvec compare --matched`)."""

from __future__ import annotations


def signed(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:+.{digits}f}"


def interval(bounds: list[float] | None, fmt=signed) -> str:
    return "-" if bounds is None else f"[{fmt(bounds[0])}, {fmt(bounds[1])}]"


def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def format_matched(result: dict) -> str:
    """One block per level: each method's scale, perplexity and increase over the base (with its
    interval), each pair's difference and relative reduction, and the level's flags."""
    base, boot = result["base"], result["bootstrap"]
    level_ci = f"{100 * boot['confidence']:.0f}% CI"
    lines = [f"matched at mean toxicity; base: perplexity {base['perplexity']:.3f}, mean toxicity "
             f"{base['mean_toxicity']:.3f}; intervals: {boot['replicates']} bootstrap resamples of {boot['resampled']}",
             "",
             f"{'level':>6}  {'method':<8} {'scale':>6} {'PPL':>9} {'increase':>9}  {level_ci}"]
    for entry in result["levels"]:
        first = True
        for method, values in entry["methods"].items():
            head = f"{entry['level']:>6.3f}" if first else " " * 6
            first = False
            if not values["reached"]:
                lines.append(f"{head}  {method:<8} {'never reached':>26}")
                continue
            lines.append(f"{head}  {method:<8} {values['scale']:>6.3f} {values['perplexity']:>9.3f} "
                         f"{signed(values['increase']):>9}  {interval(values['increase_ci'])}")
        for pair in entry["pairs"]:
            a, b = pair["methods"]
            verdict = "resolved" if pair["resolved"] else "NOT resolved"
            lines.append(f"{'':6}  {a} vs {b}: difference {signed(pair['difference'])} "
                         f"{interval(pair['difference_ci'])}; relative reduction {percent(pair['relative_reduction'])} "
                         f"{interval(pair['relative_reduction_ci'], percent)}; {verdict} "
                         f"(both reach the level in {percent(pair['both_reached_share'])} of resamples)")
        lines += [f"{'':6}  note: {flag}" for flag in entry["flags"]]
    lines.append(f"note: {result['perplexity_note']}")
    lines += [f"note: {note}" for note in result["notes"]]
    return "\n".join(lines)
