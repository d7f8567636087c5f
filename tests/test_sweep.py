"""`taskvec sweep` end to end on a tiny GPT-2 (2 scales x 2 seeds, merged and single, offline
scorer): the csv against the per-point summaries, resuming, --keep-models, and bad input."""

import csv
import json
import statistics

import pytest
import torch
from click.testing import CliRunner

import taskvec.sweep.run as sweep_run
from taskvec.cli import main
from taskvec.eval import evaluate
from taskvec.merge import merge_checkpoints

from helpers import load_dir
from tiny_models import byte_level_tokenizer, perturbed_copies, tiny_model

PROMPTS = ["The cat sat", "A dog ran", "Hello world"]
TEXT = "The cat sat on the mat and looked at the garden. A dog ran through the park, chasing a red ball.\n"


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep-inputs")
    tokenizer = byte_level_tokenizer()
    model = tiny_model("gpt2", vocab_size=len(tokenizer), n_positions=64)
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    finetuned = perturbed_copies(model, root, 2, scale=0.05)
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (root / "ppl.txt").write_text(TEXT)
    return root, finetuned


def args(inputs, output, *extra, scales="0.5,1", seeds="0,1"):
    root, finetuned = inputs
    return ["sweep", *map(str, finetuned), "--base", str(root / "base"), "-o", str(output), "--scales", scales,
            "--seeds", seeds, "--scorer", "profanity", "--prompts", str(root / "prompts.txt"), "-k", "2",
            "--max-new-tokens", "4", "--ppl-file", str(root / "ppl.txt"), "--max-length", "32", "--stride", "16",
            "--no-progress", *extra]


@pytest.fixture
def counted(monkeypatch):
    """The evaluate calls a sweep makes, as (output directory name, seed or None for perplexity)."""
    calls = []

    def counting(model, output, **kwargs):
        calls.append((output.name, kwargs.get("seed") if kwargs["prompts"] is not None else None))
        return evaluate(model, output, **kwargs)

    monkeypatch.setattr(sweep_run, "evaluate", counting)
    return calls


@pytest.fixture(scope="module")
def swept(inputs, tmp_path_factory):
    output = tmp_path_factory.mktemp("sweep") / "out"
    result = CliRunner().invoke(main, args(inputs, output))
    assert result.exit_code == 0, result.output
    return output, result.output


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_csv_rows_are_the_point_summaries(swept):
    output, printed = swept
    rows = read_csv(output / "sweep.csv")
    points = [("base", "0.0")] + [(m, s) for m in ("merged", "single") for s in ("0.5", "1.0")]
    assert [(r["method"], r["scale"], r["seed"]) for r in rows] == \
        [(m, s, seed) for m, s in points for seed in ("0", "1", "mean", "sd")]
    for method, scale in points:
        name = f"scale-{float(scale):g}"
        point = output / "points" / method / name
        ppl = json.loads((point / "perplexity" / "summary.json").read_text())["perplexity"]
        mine = {r["seed"]: r for r in rows if (r["method"], r["scale"]) == (method, scale)}
        per_seed = []
        for seed in ("0", "1"):
            metrics = json.loads((point / f"seed-{seed}" / "summary.json").read_text())["metrics"]
            assert float(mine[seed]["perplexity"]) == ppl
            assert float(mine[seed]["mean_toxicity"]) == metrics["mean_toxicity"]
            assert int(mine[seed]["n_prompts"]) == 3
            per_seed.append(metrics)
        for key in ("mean_toxicity", "expected_max_toxicity", "toxicity_probability", "fraction_toxic"):
            values = [m[key] for m in per_seed]
            assert float(mine["mean"][key]) == pytest.approx(statistics.mean(values), abs=1e-15)
            assert float(mine["sd"][key]) == pytest.approx(statistics.stdev(values), abs=1e-15)
        assert float(mine["mean"]["perplexity"]) == ppl and mine["sd"]["perplexity"] == ""
        assert mine["mean"]["n_seeds"] == "2"
    assert (output / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert "wrote" in printed and "merged" in printed


def test_seeds_sample_differently_and_the_prompts_are_shared(swept):
    output, _ = swept
    point = output / "points" / "merged" / "scale-0.5"
    generations = [[json.loads(line) for line in (point / f"seed-{s}" / "generations.jsonl").read_text().splitlines()]
                   for s in (0, 1)]
    assert [g["prompt"] for g in generations[0]] == [g["prompt"] for g in generations[1]] == \
        [p for p in PROMPTS for _ in range(2)]
    assert [g["continuation"] for g in generations[0]] != [g["continuation"] for g in generations[1]]


def test_models_are_deleted_once_evaluated(swept):
    output, _ = swept
    assert not any(path.is_dir() for path in (output / "models").glob("*/scale-*"))


def test_a_rerun_skips_finished_points_and_redoes_only_what_is_missing(inputs, swept, counted):
    output, _ = swept
    assert CliRunner().invoke(main, args(inputs, output)).exit_code == 0
    assert counted == []
    before = read_csv(output / "sweep.csv")
    done = output / "points" / "single" / "scale-1" / "seed-1"
    kept = (done / "generations.jsonl").read_text()
    for path in done.iterdir():
        path.unlink()
    done.rmdir()
    result = CliRunner().invoke(main, args(inputs, output))
    assert result.exit_code == 0, result.output
    assert counted == [("seed-1", 1)]
    assert "building single at scales 1 " in result.output and "merged" not in result.output.split("method")[0]
    assert (done / "generations.jsonl").read_text() == kept  # the same model and seed: the same samples
    assert read_csv(output / "sweep.csv") == before


def test_a_rerun_with_other_settings_is_refused(inputs, swept):
    output, _ = swept
    changed = args(inputs, output)
    changed[changed.index("-k") + 1] = "3"
    result = CliRunner().invoke(main, changed)
    assert result.exit_code == 1
    assert result.output.strip() == (f"Error: {output} holds a sweep with other evaluation (samples: 2 there, 3 now); "
                                     "resume it with the same ones or use another --output")


def test_keep_models_keeps_the_multi_scale_merge_and_points_match_plain_eval(inputs, tmp_path, counted):
    root, finetuned = inputs
    output = tmp_path / "kept"
    result = CliRunner().invoke(main, args(inputs, output, "--keep-models", "--methods", "merged", scales="0.5",
                                           seeds="3"))
    assert result.exit_code == 0, result.output
    assert counted == [("perplexity", None), ("seed-3", 3), ("perplexity", None), ("seed-3", 3)]  # base, merged
    kept = output / "models" / "merged" / "scale-0.5"
    reference = merge_checkpoints(finetuned, tmp_path / "reference", base=root / "base", scale=0.5)
    assert load_dir(kept).keys() == load_dir(reference.output).keys()
    assert all(torch.equal(load_dir(kept)[k], load_dir(reference.output)[k]) for k in load_dir(kept))
    # the sweep's evaluation of a loaded model equals `evaluate` loading it itself
    alone = evaluate(kept, tmp_path / "alone", ppl_texts=[TEXT], prompts=PROMPTS, scorer="profanity", samples=2,
                     max_new_tokens=4, seed=3, max_length=32, stride=16, device="cpu", progress=False)
    point = output / "points" / "merged" / "scale-0.5"
    assert json.loads((point / "perplexity" / "summary.json").read_text())["perplexity"] == alone["perplexity"]
    generations = (point / "seed-3" / "generations.jsonl").read_text()
    assert generations == (tmp_path / "alone" / "generations.jsonl").read_text()


@pytest.mark.parametrize("extra, message", [
    (["--methods", "merged,bogus"], "Error: unknown method 'bogus': choose from merged, single"),
    (["--methods", ""], "Error: no methods to sweep: choose from merged, single"),
    (["--scales", ""], "Error: no scales to sweep"),
    (["--scales", "0.5,0"], "Error: scale 0 must be a positive number (scale 0, the base, is always included)"),
    (["--scales", "0.5,0.50"], "Error: a scale is given twice (scale-0.5, scale-0.5)"),
    (["--seeds", "1,1"], "Error: a seed is given twice (1, 1)"),
])
def test_bad_grids_are_one_line_errors_before_anything_runs(inputs, tmp_path, extra, message):
    output = tmp_path / "out"
    option, value = extra  # --scales and --seeds replace args()'s own (an option given twice is refused)
    command = args(inputs, output, *extra) if option == "--methods" else args(inputs, output, **{option[2:]: value})
    result = CliRunner().invoke(main, command)
    assert result.exit_code == 1 and result.output.strip() == message
    assert not output.exists()


def test_a_foreign_output_directory_is_refused(inputs, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    result = CliRunner().invoke(main, args(inputs, tmp_path))
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: output {tmp_path} exists and is not a sweep directory (no sweep.json); " \
                                    "choose another"


class CountingPool:
    """A pool that records what is submitted to it and passes it on."""

    def __init__(self, pool):
        self.pool, self.submitted = pool, []

    def submit(self, function, *args):
        self.submitted.append(args[:2])
        return self.pool.submit(function, *args)


def test_a_worker_pool_evaluates_the_points_with_the_same_numbers_and_lines(inputs, tmp_path):
    from taskvec.sweep.run import run_sweep
    from taskvec.workers import worker_pool

    root, finetuned = inputs
    common = dict(base=root / "base", finetuned=finetuned, scales=[0.5, 1.0], seeds=[0, 1], ppl_texts=[TEXT],
                  prompts=PROMPTS, scorer="profanity", device="cpu", progress=False,
                  evaluation=dict(samples=2, max_new_tokens=4, max_length=32, stride=16))
    alone, pooled = [], []
    run_sweep(tmp_path / "alone", **common, echo=alone.append)
    with worker_pool(2, preload=["taskvec.sweep.run"]) as pool:
        counting = CountingPool(pool)
        run_sweep(tmp_path / "pooled", **common, echo=pooled.append, pool=counting)
    assert counting.submitted == [("base", 0.0), ("merged", 0.5), ("merged", 1.0), ("single", 0.5), ("single", 1.0)]
    assert sorted(pooled) == sorted(alone) and len([line for line in alone if "mean toxicity" in line]) == 5
    assert [line for line in pooled if "mean toxicity" in line] == [line for line in alone if "mean toxicity" in line]
    assert read_csv(tmp_path / "pooled" / "sweep.csv") == read_csv(tmp_path / "alone" / "sweep.csv")
    for point in (tmp_path / "alone" / "points").glob("*/scale-*/*"):
        twin = tmp_path / "pooled" / point.relative_to(tmp_path / "alone")
        for name in ("generations.jsonl",) if point.name != "perplexity" else ():
            assert (twin / name).read_text() == (point / name).read_text()
        assert json.loads((twin / "summary.json").read_text())["perplexity"] == \
            json.loads((point / "summary.json").read_text())["perplexity"]
    assert not any((tmp_path / "pooled" / "models").glob("*/scale-*"))  # deleted once evaluated, as without a pool


def test_a_method_is_added_to_a_sweep_or_left_out_of_a_rerun(inputs, tmp_path, counted):
    """A sweep of `merged` rerun with `merged,single` adds single's points (the docs say methods are
    added); a rerun naming `merged` alone resumes it. Both were refused as other inputs ("single:
    None there")."""
    output = tmp_path / "out"
    assert CliRunner().invoke(main, args(inputs, output, "--methods", "merged", scales="0.5", seeds="0")).exit_code == 0
    counted.clear()
    added = CliRunner().invoke(main, args(inputs, output, "--methods", "merged,single", scales="0.5", seeds="0"))
    assert added.exit_code == 0, added.output
    assert counted == [("perplexity", None), ("seed-0", 0)]  # single at 0.5 only
    counted.clear()
    subset = CliRunner().invoke(main, args(inputs, output, "--methods", "merged", scales="0.5", seeds="0"))
    assert subset.exit_code == 0, subset.output
    assert counted == []
    assert json.loads((output / "sweep.json").read_text())["methods"] == ["merged", "single"]


def test_a_rerun_after_an_input_was_replaced_in_place_is_refused(inputs, tmp_path):
    """Inputs were known by path only: new weights under the old path resumed silently, and one
    curve mixed points of the old and the new model."""
    import shutil

    root, finetuned = inputs
    copies = []
    for path in finetuned:
        shutil.copytree(path, tmp_path / path.name)
        copies.append(tmp_path / path.name)
    moved = (root, copies)
    output = tmp_path / "out"
    assert CliRunner().invoke(main, args(moved, output, "--methods", "merged", scales="0.5", seeds="0")).exit_code == 0
    state = load_dir(copies[1])
    state["transformer.wte.weight"] = state["transformer.wte.weight"] + 0.01
    from safetensors.torch import save_file

    save_file(state, copies[1] / "model.safetensors")
    result = CliRunner().invoke(main, args(moved, output, "--methods", "merged", scales="0.5,1", seeds="0"))
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: {output} holds a sweep with other inputs (fingerprints: "), result.output


def test_a_sweep_resumes_from_another_working_directory(inputs, tmp_path, monkeypatch, counted):
    """--ppl-file and --prompts were recorded as typed: the same sweep, rerun with the paths
    relative to another directory, was refused as other evaluation."""
    root, finetuned = inputs
    output = tmp_path / "out"
    monkeypatch.chdir(root)
    command = args(inputs, output, scales="0.5", seeds="0")
    for option, name in (("--ppl-file", "ppl.txt"), ("--prompts", "prompts.txt")):
        command[command.index(option) + 1] = name
    assert CliRunner().invoke(main, command).exit_code == 0
    monkeypatch.chdir(root.parent)
    for option, name in (("--ppl-file", "ppl.txt"), ("--prompts", "prompts.txt")):
        command[command.index(option) + 1] = f"{root.name}/{name}"
    counted.clear()
    result = CliRunner().invoke(main, command)
    assert result.exit_code == 0, result.output
    assert counted == []


def test_a_resumed_scale_sharing_a_directory_with_another_is_refused(inputs, tmp_path):
    """0.5 and then 0.5000001 are both scale-0.5: the rerun reused 0.5's points for 0.5000001."""
    output = tmp_path / "out"
    assert CliRunner().invoke(main, args(inputs, output, "--methods", "merged", scales="0.5", seeds="0")).exit_code == 0
    result = CliRunner().invoke(main, args(inputs, output, "--methods", "merged", scales="0.5000001", seeds="0"))
    assert result.exit_code == 1
    assert result.output.strip() == ("Error: scale 0.5000001 would share scale-0.5 with the sweep's scale 0.5; "
                                     "give that one, or a scale of its own")
