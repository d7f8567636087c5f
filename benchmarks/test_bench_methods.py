"""TIES and DARE end to end: `taskvec merge --method ties|dare-ties` against mergekit's `ties` and
`dare_ties` on the same synthetic checkpoints, wall time and peak RSS (benchmarks/measure.py).

quick: tiny N=2 (CI; checks the harness). full: gpt2 fp32 N=5 and N=16. Each pair is checked: the
TIES outputs agree to float32 rounding (the definitions agree where |tau| has no ties at the
threshold, which random synthetic weights do not have); DARE's masks are drawn differently (a
counter-based hash here, torch's generator there) and mergekit's dare_ties rescales by the L1 norm
without dividing by the weights, so only the run, not the values, is compared. The table is written
to --bench-report as taskvec-bench-methods-SIZE.md.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from benchmarks.measure import measure
from benchmarks.mergekit_runner import mergekit_command, mergekit_yaml
from benchmarks.tools import Case, taskvec_executable

CASES = {"quick": [Case("tiny", 2)], "full": [Case("gpt2", 5), Case("gpt2", 16)], "xl": []}
METHODS = {  # ours, mergekit's, parameters
    "ties": ("ties", {"density": 0.2}),
    "dare-ties": ("dare_ties", {"density": 0.5}),
}
ROWS: list[dict] = []


def _cases(size):
    return [(case, method) for case in CASES.get(size, []) for method in METHODS]


def pytest_generate_tests(metafunc):
    if "method_case" in metafunc.fixturenames:
        size = metafunc.config.getoption("--bench-size", "quick")
        pairs = _cases(size)
        metafunc.parametrize("method_case", pairs, ids=[f"{c.id}-{m}" for c, m in pairs])


def taskvec_command(inputs, method, params, output):
    extra = [arg for key, value in params.items() for arg in (f"--{key}", str(value))]
    return [taskvec_executable(), "merge", "--base", str(inputs.base), "--method", method, "--scale", "-1",
            "--output", str(output), "--device", "cpu", "--no-progress", *extra, *map(str, inputs.finetuned)]


def mergekit_config(path: Path, inputs, method, params) -> Path:
    config = {"merge_method": method, "base_model": str(inputs.base), "dtype": "float32", "out_dtype": "float32",
              "parameters": {"normalize": True} if method == "ties" else {},
              "models": [{"model": str(p), "parameters": {"weight": 1.0, **params}} for p in inputs.finetuned]}
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


def test_methods_against_mergekit(method_case, checkpoints, tmp_path, pytestconfig, bench_rounds):
    case, method = method_case
    if taskvec_executable() is None:
        pytest.skip("the taskvec command is not installed (pip install -e .)")
    inputs = checkpoints(case.size, case.dtype, case.n, case.format)
    theirs, params = METHODS[method]
    row = {"case": case.id, "method": method}
    ours_out = tmp_path / "taskvec"
    for _ in range(bench_rounds):
        shutil.rmtree(ours_out, ignore_errors=True)
        m = measure(taskvec_command(inputs, method, params, ours_out))
        row["taskvec_s"] = min(row.get("taskvec_s", float("inf")), m.wall_s)
        row["taskvec_rss_mib"] = max(row.get("taskvec_rss_mib", 0), m.max_rss_bytes / 2**20)
    if mergekit_yaml() is not None:
        config = mergekit_config(tmp_path / "mergekit.yml", inputs, theirs, params)
        theirs_out = tmp_path / "mergekit"
        m = measure(mergekit_command(config, theirs_out))
        row.update(mergekit_s=m.wall_s, mergekit_rss_mib=m.max_rss_bytes / 2**20)
        if method == "ties":
            _check_ties(ours_out, theirs_out)
    ROWS.append(row)
    _save(Path(pytestconfig.getoption("--bench-report")), pytestconfig.getoption("--bench-size"))
    if case.size == "gpt2":
        assert row["taskvec_rss_mib"] < 800, row


def _check_ties(ours: Path, theirs: Path) -> None:
    import torch

    from benchmarks.check import model_tensors

    a, b = model_tensors(ours), model_tensors(theirs)
    differ = total = 0
    for name in a.names() & b.names():
        x, y = a.get(name), b.get(name)
        if x.is_floating_point():
            close = torch.isclose(x, y, rtol=1e-5, atol=1e-6)
            differ, total = differ + int((~close).sum()), total + close.numel()
    # Where |tau| ties at a tensor's threshold the two pick different entries (mergekit: argsort's
    # order; taskvec: the lowest indices), so a few entries may differ; the rest must agree.
    assert differ <= 1e-3 * total, f"{differ} of {total} entries differ from mergekit's ties"


def _save(directory: Path, size: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    lines = ["| case | method | taskvec s | taskvec peak RSS MiB | mergekit s | mergekit peak RSS MiB | speed-up |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in ROWS:
        mk_s, mk_rss = r.get("mergekit_s"), r.get("mergekit_rss_mib")
        cells = [r["case"], r["method"], f"{r['taskvec_s']:.1f}", f"{r['taskvec_rss_mib']:.0f}",
                 f"{mk_s:.1f}" if mk_s else "-", f"{mk_rss:.0f}" if mk_rss else "-",
                 f"{mk_s / r['taskvec_s']:.1f}x" if mk_s else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    (directory / f"taskvec-bench-methods-{size}.md").write_text("\n".join(lines) + "\n")
