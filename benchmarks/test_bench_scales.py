"""Many scales from one read: `taskvec merge --scale s1,...,sK` against K separate merges.

Measured side by side in one run, on one checkpoint set (warm cache where it fits): the floor
(a fresh import of taskvec's merge command + reading every input once + writing K outputs),
the multi-scale merge, K separate `taskvec merge` runs (summed), and K mergekit runs (summed,
where mergekit is installed). Every output of every tool is checked against a float64
reference. The ratios are printed and saved as `.benchmarks/taskvec-bench-scales-SIZE.md`.
Targets (issue 13, gpt2 fp32 N=5, K=8): multi-scale within 1.3x of the floor and at least 2.5x
faster than K separate merges.
"""

from __future__ import annotations

import shutil
import statistics
from pathlib import Path

import pytest

from benchmarks.baselines import (
    IMPORT_STATEMENTS,
    import_command,
    physical_memory,
    read_once,
    weights_bytes,
    write_once,
)
from benchmarks.check import check_negated_mean
from benchmarks.measure import measure
from benchmarks.tools import command, taskvec_executable, unavailable

CASES = {"quick": ("tiny", 2, [0.5, 1.0]), "full": ("gpt2", 5, [round(0.25 * k, 2) for k in range(1, 9)])}
QUICK_TOOLS = ("taskvec",)  # CI size: the harness runs, mergekit's K runs would cost a minute


@pytest.fixture
def case(bench_size):
    if bench_size not in CASES:
        pytest.skip(f"no multi-scale case at --bench-size {bench_size}")
    return CASES[bench_size]


def test_many_scales_from_one_read(case, checkpoints, bench_rounds, pytestconfig, capsys):
    reason = unavailable("taskvec")
    if reason:
        pytest.skip(reason)
    size, n, scales = case
    inputs = checkpoints(size, "float32", n, "safetensors")
    work = inputs.finetuned[0].parent / "bench-scales"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    if sum(weights_bytes(d) for d in inputs.directories) < physical_memory() // 2:
        read_once(inputs.directories)
    fts = [str(p) for p in inputs.finetuned]
    multi = [taskvec_executable(), "merge", "--base", str(inputs.base), "--scale", ",".join(map(str, scales)),
             "--output", str(work / "multi"), "--device", "cpu", "--no-progress", *fts]
    walls: dict[str, list[float]] = {}
    rss: dict[str, list[int]] = {}
    for _ in range(bench_rounds):  # interleaved rounds: load changes hit every tool alike
        floor = measure(import_command(IMPORT_STATEMENTS["import taskvec"])).wall_s
        floor += read_once(inputs.directories)[0]
        floor += sum(write_once(work / "write.bin", weights_bytes(inputs.base)) for _ in scales)
        walls.setdefault("floor", []).append(floor)
        shutil.rmtree(work / "multi", ignore_errors=True)
        done = measure(multi)
        walls.setdefault("taskvec --scale list", []).append(done.wall_s)
        rss.setdefault("taskvec --scale list", []).append(done.max_rss_bytes)
        for tool in QUICK_TOOLS if size == "tiny" else ("taskvec", "mergekit"):
            if unavailable(tool):
                continue
            total, peak = 0.0, 0
            for scale in scales:
                output = work / f"{tool}-{scale}"
                shutil.rmtree(output, ignore_errors=True)
                done = measure(command(tool, inputs, scale, output, work))
                total, peak = total + done.wall_s, max(peak, done.max_rss_bytes)
                if scale == scales[-1]:
                    check_negated_mean(output, inputs.base, inputs.finetuned, scale)
                shutil.rmtree(output)
            walls.setdefault(f"{len(scales)} x {tool} merge", []).append(total)
            rss.setdefault(f"{len(scales)} x {tool} merge", []).append(peak)
    for scale in scales:  # every model of the multi-scale run is right
        check_negated_mean(work / "multi" / f"scale-{scale:g}", inputs.base, inputs.finetuned, scale)
    table = _table(size, n, len(scales), walls, rss)
    report = Path(pytestconfig.getoption("--bench-report") or ".benchmarks")
    report.mkdir(parents=True, exist_ok=True)
    (report / f"taskvec-bench-scales-{pytestconfig.getoption('--bench-size')}.md").write_text(table)
    with capsys.disabled():
        print("\n" + table)
    shutil.rmtree(work)


def _table(size, n, k, walls, rss) -> str:
    floor = statistics.median(walls["floor"])
    multi = statistics.median(walls["taskvec --scale list"])
    lines = [f"{size} fp32 N={n}, K={k} scales (medians of {len(walls['floor'])} interleaved rounds)", "",
             "| tool | wall (s) | peak RSS (MiB) | / floor | multi-scale is faster by |", "|---|---:|---:|---:|---:|"]
    for tool, values in walls.items():
        wall = statistics.median(values)
        memory = f"{max(rss[tool]) / 2**20:.0f}" if tool in rss else ""
        faster = f"{wall / multi:.2f}x" if tool not in ("floor", "taskvec --scale list") else ""
        lines.append(f"| {tool} | {wall:.2f} | {memory} | {wall / floor:.2f}x | {faster} |")
    return "\n".join(lines) + "\n"
