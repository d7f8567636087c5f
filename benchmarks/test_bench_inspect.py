"""End to end: `taskvec inspect` against the machine's floor (a fresh import plus reading every input once).

Each case, measured in one run so that the ratio means something on a noisy machine: a fresh
`import torch, taskvec.inspect`, reading every input once (warm cache), then `taskvec inspect
--no-plot` as a subprocess under benchmarks/measure.py (wall time, peak RSS). The quick case (a
tiny set, N = 2) runs in the default suite in a few seconds; the gpt2-shaped fp32 cases (N = 1
and N = 5: the issue's target is 1.3x the floor, peak RSS under 600 MiB and flat in N) are opt-in
with `--bench-size full`. The ratio is reported, not asserted (docs/inspect.md states where it
stands); memory is asserted.
"""

from __future__ import annotations

import json
import shutil
import statistics

import pytest

from benchmarks.baselines import import_command, physical_memory, read_once, weights_bytes
from benchmarks.measure import measure
from benchmarks.tools import taskvec_executable

CASES = {"quick": [("tiny", 2)], "full": [("gpt2", 1), ("gpt2", 5)], "xl": []}
RSS_LIMIT_MIB = 600
RESULTS: dict[tuple[str, int], dict] = {}


def pytest_generate_tests(metafunc):
    if "inspect_case" in metafunc.fixturenames:
        cases = CASES[metafunc.config.getoption("--bench-size")]
        metafunc.parametrize("inspect_case", cases, ids=[f"{size}-n{n}" for size, n in cases])


def test_inspect(inspect_case, benchmark, checkpoints, bench_rounds, bench_size):
    executable = taskvec_executable()
    if executable is None:
        pytest.skip("the taskvec command is not installed")
    size, n = inspect_case
    inputs = checkpoints(size, "float32", n)
    directories = [inputs.base, *inputs.finetuned[:n]]
    workdir = inputs.finetuned[0].parent / "bench-work"
    workdir.mkdir(exist_ok=True)
    output = workdir / "out-inspect"
    if sum(weights_bytes(d) for d in directories) < physical_memory() // 2:
        read_once(directories)  # warm cache
    walls, rss, floors = [], [], []
    argv = [executable, "inspect", "--base", inputs.base, *inputs.finetuned[:n], "-o", output, "--no-plot"]

    def target():
        imported = measure(import_command("import torch, taskvec.inspect")).wall_s
        read_s, _ = read_once(directories)
        floors.append(imported + read_s)
        measured = measure(argv)
        walls.append(measured.wall_s)
        rss.append(measured.max_rss_bytes / 2**20)

    benchmark.pedantic(target, setup=lambda: shutil.rmtree(output, ignore_errors=True), rounds=bench_rounds)
    stats = json.loads((output / "stats.json").read_text())
    assert stats["vectors"][:n] == [d.name for d in inputs.finetuned[:n]]
    shutil.rmtree(output)
    result = {"wall_s": statistics.median(walls), "floor_s": statistics.median(floors),
              "ratio": statistics.median(w / f for w, f in zip(walls, floors, strict=True)),
              "peak_rss_mib": max(rss)}
    RESULTS[inspect_case] = result
    benchmark.extra_info.update(result)
    print(f"\ninspect {size} N={n}: {result['wall_s']:.2f} s, floor {result['floor_s']:.2f} s, "
          f"ratio {result['ratio']:.2f}x, peak RSS {result['peak_rss_mib']:.0f} MiB")
    if bench_size != "quick":
        assert result["peak_rss_mib"] < RSS_LIMIT_MIB
        if (size, 1) in RESULTS and n > 1:  # flat in N: the chunk is shared by all vectors
            assert result["peak_rss_mib"] < 1.25 * RESULTS[(size, 1)]["peak_rss_mib"]
