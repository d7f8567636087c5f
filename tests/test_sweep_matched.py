"""Matched comparison: known numbers on a hand-built sweep directory (through `taskvec compare
--matched`), seeded bootstrap, and the intervals' coverage on a synthetic case with a known answer."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from taskvec.cli import main
from taskvec.sweep.layout import FORMAT, perplexity_dir, seed_dir
from taskvec.sweep.matched import Curves, auto_levels, load_curves, matched_comparison

# mean toxicity (over prompts and seeds) and perplexity per scale; scale 0 is the base.
# merged's 1.5 is above its 1.0: the isotonic fit pools them to 0.11.
CURVES = {"base": {0.0: (0.30, 10.0)},
          "merged": {0.5: (0.20, 10.2), 1.0: (0.10, 10.6), 1.5: (0.12, 11.0)},
          "single": {0.5: (0.15, 10.5), 1.0: (0.05, 11.5), 1.5: (0.02, 13.0)}}
OFFSETS = {0: (0.015, -0.015), 1: (0.01, -0.01)}  # seed -> per-prompt deviations (two prompts, mean 0)


def write_run(run, perplexity=None, scores=None):
    run.mkdir(parents=True)
    summary = {"model": "m", "perplexity": perplexity, "settings": {}, "scorer": {"name": "profanity"},
               "metrics": None}
    if scores is not None:
        summary["metrics"] = {"mean_toxicity": sum(scores) / len(scores), "expected_max_toxicity": max(scores),
                              "toxicity_probability": 0.0, "fraction_toxic": 0.0, "n_prompts": len(scores)}
        lines = [{"prompt_id": i, "prompt": f"p{i}", "sample": 0, "continuation": "x", "score": s}
                 for i, s in enumerate(scores)]
        (run / "generations.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (run / "summary.json").write_text(json.dumps(summary))


@pytest.fixture
def sweep_dir(tmp_path):
    root = tmp_path / "sweep"
    root.mkdir()
    record = {"format": FORMAT, "methods": ["merged", "single"], "scales": [0.5, 1.0, 1.5], "seeds": [0, 1],
              "inputs": {}, "evaluation": {}}
    (root / "sweep.json").write_text(json.dumps(record))
    for method, points in CURVES.items():
        for scale, (tox, ppl) in points.items():
            write_run(perplexity_dir(root, method, scale), perplexity=ppl)
            for seed, offsets in OFFSETS.items():
                write_run(seed_dir(root, method, scale, seed), scores=[tox + o for o in offsets])
    return root


def test_known_numbers_through_the_cli(sweep_dir):
    result = CliRunner().invoke(main, ["compare", "--matched", str(sweep_dir), "--levels", "0.2,0.11,0.08,0.3",
                                       "--bootstrap", "50"])
    assert result.exit_code == 0, result.output
    matched = json.loads((sweep_dir / "matched.json").read_text())
    assert matched["base"] == {"perplexity": 10.0, "mean_toxicity": pytest.approx(0.30)}
    at = {entry["level"]: entry for entry in matched["levels"]}
    # 0.2: merged reaches it at 0.5 (ppl 10.2); single at 0.5 * (0.30 - 0.2) / (0.30 - 0.15) = 1/3
    merged, single = at[0.2]["methods"]["merged"], at[0.2]["methods"]["single"]
    assert merged["scale"] == pytest.approx(0.5) and merged["increase"] == pytest.approx(0.2)
    assert single["scale"] == pytest.approx(1 / 3) and single["increase"] == pytest.approx(1 / 3)
    pair = at[0.2]["pairs"][0]
    assert pair["methods"] == ["merged", "single"]
    assert pair["difference"] == pytest.approx(0.2 - 1 / 3)
    assert pair["relative_reduction"] == pytest.approx(1 - 0.2 / (1 / 3))  # 40% less
    # 0.11: merged's pooled fit is 0.11 from 1.0 on: reached at 1.0; single at 0.5 + 0.5 * 0.04 / 0.10 = 0.7
    merged, single = at[0.11]["methods"]["merged"], at[0.11]["methods"]["single"]
    assert merged["scale"] == pytest.approx(1.0) and merged["perplexity"] == pytest.approx(10.6)
    assert single["scale"] == pytest.approx(0.7) and single["perplexity"] == pytest.approx(10.9)
    assert at[0.11]["pairs"][0]["relative_reduction"] == pytest.approx(1 - 0.6 / 0.9)
    # 0.08: below merged's floor (0.11 after pooling)
    assert not at[0.08]["methods"]["merged"]["reached"] and at[0.08]["pairs"][0]["difference"] is None
    assert any("merged never reaches this level (its fitted toxicity stops at 0.110)" in f for f in at[0.08]["flags"])
    # 0.3: the base's own toxicity: no increase, so no relative number
    assert at[0.3]["methods"]["single"]["increase"] == 0 and at[0.3]["pairs"][0]["relative_reduction"] is None
    assert any("not above 0" in flag for flag in at[0.3]["flags"])
    assert "never reached" in result.output and "relative reduction 40%" in result.output
    assert (sweep_dir / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert "held fixed" in matched["perplexity_note"]


def test_automatic_levels_span_the_range_every_method_reaches(sweep_dir):
    # from max(merged's floor 0.11, single's 0.02) to min of the starts (0.30): 5 levels evenly inside
    assert auto_levels(load_curves(sweep_dir)) == [0.142, 0.173, 0.205, 0.237, 0.268]


def test_bootstrap_is_seeded_and_paired(sweep_dir):
    curves = load_curves(sweep_dir)
    one = matched_comparison(curves, [0.2], replicates=200, seed=3)
    assert one == matched_comparison(curves, [0.2], replicates=200, seed=3)
    assert one != matched_comparison(curves, [0.2], replicates=200, seed=4)
    # two prompts that move every point alike: the difference's interval is narrower than either increase's
    level = one["levels"][0]
    width = {m: v["increase_ci"][1] - v["increase_ci"][0] for m, v in level["methods"].items()}
    diff_ci = level["pairs"][0]["difference_ci"]
    assert diff_ci[1] - diff_ci[0] < max(width.values())


def test_unfinished_points_are_left_out_and_a_sweep_without_results_is_refused(sweep_dir, tmp_path):
    (seed_dir(sweep_dir, "single", 1.5, 1) / "summary.json").unlink()
    curves = load_curves(sweep_dir)
    assert curves.scales[1] == [0.0, 0.5, 1.0] and curves.notes == ["single at scale 1.5 is unfinished and left out"]
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "sweep.json").write_text((sweep_dir / "sweep.json").read_text())
    for args, message in (([str(empty)], f"Error: {empty}: the base model's evaluation is unfinished; rerun the sweep"),
                          ([str(tmp_path)], f"Error: {tmp_path} is not a sweep directory (no sweep.json; "
                                            "`taskvec sweep` writes one)")):
        result = CliRunner().invoke(main, ["compare", "--matched", *args])
        assert result.exit_code == 1 and result.output.strip() == message


@pytest.mark.parametrize("edit, message", [
    (lambda r: r.update(scales=[0.0, *r["scales"]]), "scale 0 must be a positive number"),  # a ZeroDivisionError
    (lambda r: r.update(scales=[0.5, 0.5, 1.0]), "a scale is given twice"),
    (lambda r: r.update(methods=["merged", "bogus"]), "unknown method 'bogus'"),
    (lambda r: r.update(scales="0.5"), "methods, scales and seeds must be lists of names and numbers"),
])
def test_a_hand_edited_sweep_record_is_held_to_the_grid_a_run_accepts(sweep_dir, tmp_path, edit, message):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(sweep_dir, copy)
    record = json.loads((copy / "sweep.json").read_text())
    edit(record)
    (copy / "sweep.json").write_text(json.dumps(record))
    result = CliRunner().invoke(main, ["compare", "--matched", str(copy), "--no-plot"])
    assert result.exit_code == 1, result.output
    assert result.output.strip().startswith(f"Error: {copy / 'sweep.json'}: {message}"), result.output


def test_compare_needs_runs_or_a_sweep(sweep_dir):
    result = CliRunner().invoke(main, ["compare"])
    assert result.exit_code == 2 and "give RUNS to compare, or --matched SWEEP_DIR" in result.output
    result = CliRunner().invoke(main, ["compare", "--matched", str(sweep_dir), str(sweep_dir)])
    assert result.exit_code == 1 and "give no RUNS" in result.output


@pytest.mark.parametrize("levels", ["nan", "0.05,inf"])
def test_levels_that_are_not_finite_are_refused(sweep_dir, levels):
    """--levels nan,inf was taken: matched.json then held NaN and Infinity (not JSON)."""
    result = CliRunner().invoke(main, ["compare", "--matched", str(sweep_dir), "--levels", levels, "--no-plot"])
    assert result.exit_code == 1 and result.output.strip().splitlines()[-1].startswith("Error: toxicity level "), \
        result.output
    assert "is not a finite number" in result.output


def test_automatic_levels_stay_apart_and_inside_a_narrow_range():
    """Rounded to 3 digits, five levels in [0.10004, 0.10009] all became 0.1, below every
    method's floor: nothing was ever matched."""
    scales = [0.0, 0.5, 1.0]
    toxicity = [np.array([[[0.10010]], [[0.10006]], [[0.10004]]]), np.array([[[0.10009]], [[0.10005]], [[0.10002]]])]
    curves = Curves(["a", "b"], [scales, scales], [[10.0, 11.0, 12.0]] * 2, toxicity, 10.0, [])
    levels = auto_levels(curves)
    assert len(set(levels)) == 5 and all(0.10004 < level < 0.10009 for level in levels), levels
    assert auto_levels(synthetic(np.random.default_rng(0))) == [float(f"{v:.3g}") for v in auto_levels(
        synthetic(np.random.default_rng(0)))]  # a wide range keeps 3 digits


def synthetic(rng, n_prompts=200, seeds=2):
    """Two methods, linear true toxicity and perplexity in the scale, a prompt effect shared by
    every point (what the paired bootstrap must respect) and per-generation noise."""
    scales = [0.0, 0.5, 1.0, 1.5, 2.0]
    prompt_effect = rng.normal(0, 0.05, n_prompts)
    base_noise = rng.normal(0, 0.05, (seeds, n_prompts))
    toxicity, perplexity = [], []
    for slope, cost in ((0.10, 1.0), (0.12, 3.0)):
        tox = np.array([0.3 - slope * s + prompt_effect + (base_noise if s == 0 else rng.normal(0, 0.05,
                        (seeds, n_prompts))) for s in scales])
        toxicity.append(tox)
        perplexity.append([10 + cost * s for s in scales])
    return Curves(["a", "b"], [scales, scales], perplexity, toxicity, 10.0, [])


def test_intervals_cover_the_known_answer():
    """At level 0.2, a reaches it at scale 1 (increase 1.0), b at 0.833 (increase 2.5): the
    difference is -1.5 and the relative reduction 0.6. 90% intervals must cover them about 90%
    of the time over independent data sets (percentile intervals run a little short: 86% and
    84% over 200 data sets)."""
    rng = np.random.default_rng(0)
    covered = {"difference": 0, "relative": 0}
    trials = 60
    for trial in range(trials):
        level = matched_comparison(synthetic(rng), [0.2], replicates=300, seed=trial, confidence=0.9)["levels"][0]
        pair = level["pairs"][0]
        low, high = pair["difference_ci"]
        covered["difference"] += low <= -1.5 <= high
        low, high = pair["relative_reduction_ci"]
        covered["relative"] += low <= 0.6 <= high
        assert pair["resolved"]  # the effect is large against the noise here
    for key, count in covered.items():
        assert 0.75 <= count / trials <= 0.97, (key, count)
